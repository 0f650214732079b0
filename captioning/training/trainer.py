"""The caption trainer: inputs, one run (resumable, best epoch, early stopping), cross-validation.

Owns
  prepare_inputs   text + features -> feature matrix, encoded train/dev captions, model.json config.
  train_run        train (or resume) one run in its run folder with model.fit and the Keeper callback.
  Keeper           after every epoch: a history row (losses, dev BLEU-4 with a scorer, seconds,
                   learning rate) and the dropout RNG state, then ONE checkpoint of the run folder
                   (captioning.training.run_folder: selection, patience, atomic writes, resume).
  dev_bleu_scorer  greedy dev-split BLEU-4 of a model (train.py --select-by bleu).
  cross_validate   K folds over the training images per variant -> cv.csv (dev loss and
                   BLEU-4 of each held-out fold, mean and std, seconds).
Pooled variants (merge, inject) train on a features pickle (loaded whole) or a features.npy
(memory-mapped: each batch copies out its rows) through captioning.data.inputs; grid variants
(attention, transformer) on a spatial HDF5 file, read a batch at a time through
captioning.data.grid_inputs, so a run's memory does not grow with the dataset (COCO) (whole
images per batch: each image's grid is encoded once for its five captions; the attention
model's training loss adds the doubly stochastic attention penalty, its dev loss is the
cross-entropy alone). The models and their layer names: captioning.models (the variant
registry, registry.py). Files of a run folder: train.py's docstring.
With --finetune-top (grid variants) the input is a trunk file instead: batches carry the cached
trunk maps, a joint model (captioning.models.finetune) runs the encoder top on them and feeds
its grids to the captioner, the top's convolutions train with their own Adam, and every
checkpoint holds the top beside the captioner (CheckpointFiles).

Training modes:
  sequence (default): whole captions, input = ids[:-1], target = ids[1:], one masked sparse
      cross-entropy over all real target words (padding targets masked out). Batches are
      drawn from length-sorted pools and trimmed to their longest caption (bucketing), so
      almost no work is spent on padding. No one-hot targets, no pair expansion.
  pairs: the tutorial's progressive loading - one photo per batch, all its (prefix -> next
      word) pairs, prefixes pre-padded to max_length. Same loss per predicted word; kept
      for comparison (benchmarks/bench_train.py) and ~20x slower. merge/inject only.

Keras, TensorFlow and matplotlib are imported inside functions (heavy).
"""
import csv
import io
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from captioning.data import grid_inputs, inputs, text
from captioning.data.features import is_spatial_file, recorded_backbone
from captioning.data.spatial import SpatialFeatures
from captioning.encoders import efficientnet_lite
from captioning.evaluation import metrics
from captioning.inference import decoding
from captioning.models import finetune, registry
from captioning.training.run_folder import LAST_FILE, RunFolder, Selection, fsync_path
from captioning.utils import PipelineError, atomic_write, read_json, save_settings, sha256_file

# ---- defaults (train.py's argparse defaults come from here) -----------------------------------
EPOCHS = 20                     # upper bound; early stopping usually ends sooner
BATCH_SIZE = 64                 # captions per batch (sequence mode); pairs mode: one photo
PATIENCE = 3                    # epochs without improvement before stopping
# A recipe fills in --label-smoothing and --select-by when they are not given. "best" is the
# best measured on the dev split for merge (docs/results.md, "What moved the number": dev BLEU-4
# greedy 0.167 -> 0.182); "tutorial" is the course's plain cross-entropy with the epoch of the
# lowest dev loss. select_by: which epoch model.keras keeps, lowest dev "loss" or highest dev
# "bleu" (greedy BLEU-4 of the dev images after every epoch: seconds for merge, ~20 s for attention).
RECIPES = {"best": {"label_smoothing": 0.1, "select_by": "bleu"},
           "tutorial": {"label_smoothing": 0.0, "select_by": "loss"}}
RECIPE = "best"
SELECT_BY_CHOICES = ("loss", "bleu")
SEED = 1                        # same seed, same data, same weights
MAX_MISSING = 0.01              # fraction of split images without features we tolerate
CV_VARIANTS = "merge,inject"
CV_EPOCHS = 3
CV_SUBSET = 0                   # 0 = all training images

HISTORY_FIELDS = ["epoch", "loss", "val_loss", "dev_bleu4", "seconds", "lr"]
# settings that must match for a rerun to resume the run in a folder
RESUME_KEYS = ("variant", "mode", "embed_dim", "units", "dropout", "batch_size", "learning_rate",
               "label_smoothing", "seed", "features_sha256", "tokenizer_sha256", "select_by")
# the grid variants' sizes (from the registry), compared through model.json alone (absent for
# merge/inject)
GRID_RESUME_KEYS = ("grid", *dict.fromkeys(key for name in registry.GRID_VARIANTS
                                           for key in registry.OPTIONS[name] if key not in RESUME_KEYS))


def seed_everything(seed):
    """Python, numpy, Keras and TF seeds plus deterministic TF kernels: same seed, same weights."""
    import keras
    import tensorflow as tf
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def apply_recipe(args):
    """Fill args.label_smoothing and args.select_by (None = not given) from args.recipe's entry of
    RECIPES; options given on the command line win."""
    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def check_options(args):
    """train.py's option values that no run can use: a one-line PipelineError naming the option.
    Applies the recipe first (apply_recipe)."""
    apply_recipe(args)
    for name in ("embed_dim", "units", "epochs", "batch_size", "keep_epochs", "annotation_dim",
                 "attention_dim", "d_model", "heads", "decoder_layers", "ff_dim"):
        if getattr(args, name) < 1:
            raise PipelineError(f"--{name.replace('_', '-')} must be at least 1")
    if args.encoder_layers < 0 or args.penalty < 0:
        raise PipelineError("--encoder-layers and --penalty must not be negative")
    if args.d_model % args.heads:
        raise PipelineError(f"--d-model {args.d_model} must be a multiple of --heads {args.heads}")
    if not all(0 <= x < 1 for x in (args.dropout, args.transformer_dropout, args.label_smoothing)) \
            or not 0 <= args.max_missing <= 1:
        raise PipelineError("--dropout, --transformer-dropout, --label-smoothing and --max-missing "
                            "must be in [0, 1)")
    if getattr(args, "finetune_top", False):
        if args.variant not in registry.GRID_VARIANTS:
            raise PipelineError(f"--finetune-top trains a grid captioner (attention, transformer) on "
                                f"top(trunk); {args.variant} reads pooled features")
        if args.cv:
            raise PipelineError("--finetune-top trains one run; --cv compares frozen features")
        if not args.top_learning_rate > 0:
            raise PipelineError("--top-learning-rate must be above 0")
    if args.mode == "pairs" and not args.cv and args.variant in registry.GRID_VARIANTS:
        raise PipelineError(f"--mode pairs is the tutorial's merge/inject training; {args.variant} "
                            f"trains on whole captions (--mode sequence)")
    bad = [v for v in args.variants.split(",") if v.strip() and v.strip() not in registry.VARIANTS]
    if bad:
        raise PipelineError(f"unknown variant {bad[0]!r} in --variants "
                            f"(choose from {', '.join(registry.VARIANTS)})")


# ---- inputs -----------------------------------------------------------------------------------
def features_path(args, variant):
    """The file a variant trains on: the grid variants' --spatial when given, else --features."""
    if variant in registry.GRID_VARIANTS and getattr(args, "spatial", None):
        return Path(args.spatial)
    return Path(args.features)


def model_options(args, variant):
    """model.json's size fields of `variant` (the registry's options), from train.py's options;
    the transformer's dropout is --transformer-dropout."""
    return {key: args.transformer_dropout if (variant, key) == ("transformer", "dropout")
            else getattr(args, key) for key in registry.OPTIONS[variant]}


def pooled_matrix(path, wanted, max_missing, variant):
    """(float32 (N, D), row_of_id, missing ids) of a features pickle, or of a features.npy as a
    read-only memory map (its rows are read by the batches that use them); a spatial file given
    to a pooled variant is a one-line error with its shape."""
    if is_spatial_file(path):
        with SpatialFeatures(path) as grids:
            shape = (len(grids.ids), *grids.grid, grids.width)
        raise PipelineError(f"spatial grids {shape} given to the {variant} model, which needs "
                            f"pooled features (N, D): use the features pickle ({path})")
    return inputs.pooled_rows(path, wanted, max_missing)


def prepare_inputs(args, variant=None):
    """Everything training needs: (feature matrix, train examples, dev examples, config, row_of_id).

    args: train.py's namespace (features, spatial, data_dir, max_missing, fail_on_missing,
    variant, mode and the model sizes); variant: another one than args.variant (--cv). The
    matrix is float32 (N, D) for merge/inject (a memory map for features.npy), and for
    attention/transformer a GridRows that reads float16 (n, G, C) grids a batch at a time; both
    are indexed by lists of the rows in row_of_id.
    """
    variant = variant or args.variant
    meta, tokenizer, descriptions, splits = inputs.load_text(args.data_dir)
    path = features_path(args, variant)
    where = str(path)
    wanted = list(splits["train"]) + list(splits["dev"])
    tuned = getattr(args, "finetune_top", False)
    if tuned:
        matrix, row_of_id, missing, info = finetune.trunk_matrix(path, wanted, args.max_missing,
                                                                 variant, grid=True)
    elif variant in registry.GRID_VARIANTS:
        matrix, row_of_id, missing, info = grid_inputs.grid_matrix(path, wanted, args.max_missing, variant)
    else:
        matrix, row_of_id, missing = pooled_matrix(path, wanted, args.max_missing, variant)
        info = {"backbone": recorded_backbone(path)}
    if missing:
        if args.fail_on_missing:
            raise PipelineError(f"{len(missing)} split images have no features (first: {missing[0]}) ({where})")
        print(f"warning: {len(missing)} of {len(wanted)} train/dev images have no features; "
              f"skipped (first: {missing[0]})", file=sys.stderr)
    max_length = meta["max_length"]
    train = inputs.encode_split(splits["train"], row_of_id, descriptions, tokenizer, max_length)
    dev = inputs.encode_split(splits["dev"], row_of_id, descriptions, tokenizer, max_length)
    if not train or not dev:
        raise PipelineError(f"no training or dev captions with features ({args.data_dir})")
    word_index = tokenizer["word_index"]
    width = efficientnet_lite.HEAD_FILTERS if tuned else int(matrix.shape[-1])
    config = {"variant": variant, "mode": args.mode, "feature_dim": width,
              "vocab_size": meta["vocab_size"], "max_length": max_length,
              **model_options(args, variant), **({"grid": info["grid"]} if "grid" in info else {}),
              "start_token": meta["start_token"], "end_token": meta["end_token"],
              "pad_id": meta.get("pad_id", 0), "oov_token": meta.get("oov_token"),
              "start_id": word_index[meta["start_token"]], "end_id": word_index[meta["end_token"]],
              "tokenizer_sha256": meta["tokenizer_sha256"],
              "features_file": str(path), "features_sha256": sha256_file(path),
              "backbone": info["backbone"],
              "data_dir": str(Path(args.data_dir).resolve()),
              "epochs_trained": 0, "best_epoch": None, "best_val_loss": None}
    if tuned:
        if info["flips"]:     # mirrored views for the training images whose captions allow it
            sided = finetune.sided_images(descriptions, splits["train"])
            matrix.flippable = np.zeros(len(matrix), bool)
            matrix.flippable[[row_of_id[i] for i in splits["train"]
                              if i in row_of_id and i not in sided]] = True
        config[finetune.KEY] = finetune.encoder_record(info["spec"], path, args.top_batchnorm,
                                                       args.top_learning_rate, info["flips"])
    return matrix, train, dev, config, row_of_id


def dev_bleu_scorer(data_dir, matrix, row_of_id):
    """A function (model, config) -> standard BLEU-4 of greedy captions for every dev image.

    Why (train.py --select-by bleu): dev loss keeps falling after the captions stop improving
    (blander, more generic words lower the loss), so the checkpoint with the best loss is often
    not the one that captions best. Costs a few seconds per epoch for the 1000 dev images.
    With a fine-tuned top (matrix: trunk maps) the model given is the joint model
    (finetune.joint_model): the dev grids are its top's output at that epoch.
    """
    tokenizer = text.load_tokenizer(Path(data_dir) / "tokenizer.json")
    references = text.load_references(data_dir)
    ids = [i for i in text.load_splits(data_dir)["dev"] if i in row_of_id]
    dev_matrix = matrix[[row_of_id[i] for i in ids]]
    id_to_word, _, end_id, _ = decoding.vocabulary(tokenizer)
    built = {}      # the step functions of the model being trained: traced once, not per epoch

    def score(model, config):
        features = dev_matrix
        if hasattr(model, "encode_grids"):   # a fine-tuned top: this epoch's grids of the dev maps
            features, model = model.encode_grids(dev_matrix), model.captioner
        if built.get("model") is not model:
            built.update(model=model, step_fns=decoding.make_step_fn(model, config))
        id_lists = decoding.caption_features(model, config, tokenizer, features, beam=1,
                                             step_fns=built["step_fns"])
        words = [decoding.ids_to_words(id_to_word, x, end_id) for x in id_lists]
        return metrics.standard_bleu([references[i] for i in ids], words)["bleu4"]

    return score


# ---- one run: a Keras fit whose callback keeps the run folder ------------------------------------
def loss_png(history):
    """PNG bytes: training and dev loss per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [r["epoch"] for r in history]
    ax.plot(epochs, [r["loss"] for r in history], "o-", label="train")
    ax.plot(epochs, [r["val_loss"] for r in history], "o-", label="dev")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy per word (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def rng_state(model):
    """The dropout/LSTM seed-generator states, {layer name: [[seed, counter], ...]}.

    Keras does not save them in model.keras (a loaded model draws fresh seeds), so they travel
    in state.json: a resumed run then drops out exactly the units an uninterrupted run would.
    """
    return {layer.name: [np.asarray(v).tolist() for v in layer.variables if v.name == "seed_generator_state"]
            for layer in model.layers
            if any(v.name == "seed_generator_state" for v in layer.variables)}


def restore_rng_state(model, saved):
    for layer_name, values in (saved or {}).items():
        variables = [v for v in model.get_layer(layer_name).variables if v.name == "seed_generator_state"]
        if len(variables) != len(values):
            raise PipelineError(f"checkpoint RNG state does not fit layer {layer_name}")
        for variable, value in zip(variables, values):
            variable.assign(np.asarray(value, dtype=np.asarray(variable).dtype))


def dev_loss_scale(model, examples, mode):
    """Factor turning Keras' val_loss into the mean per predicted dev word.

    CaptionLoss divides by the TRAINING set's words per row, so Keras reports a dev loss
    scaled by train/dev words per row (about 1.0 on Flickr8k; exact after this factor).
    """
    train_words = getattr(model.loss, "words_per_row", None)
    return train_words / inputs.words_per_row(examples, mode) if train_words else 1.0


class CheckpointFiles:
    """What folder.save writes for a fine-tuned run: save(path) writes the captioner to path
    (last.keras), and beside it the top twice: encoder_top_last.keras (with the top's Adam, for
    resuming) and encoder_top.keras, the top of the kept epoch (a hard link to the new file when
    this epoch improved, else to the previous checkpoint's), so model.keras and
    encoder_top.keras in one checkpoint always come from the same epoch. Everything is written
    inside the checkpoint folder before its rename, so a kill never separates them."""

    def __init__(self, captioner, top, previous, improved):
        self.captioner, self.top, self.previous, self.improved = captioner, top, previous, improved

    def save(self, path):
        folder = Path(path).parent
        self.captioner.save(path)
        self.top.save(folder / finetune.TOP_LAST_FILE)
        fsync_path(folder / finetune.TOP_LAST_FILE)
        target = folder / finetune.TOP_FILE
        source = (folder / finetune.TOP_LAST_FILE if self.improved or self.previous is None
                  else self.previous / finetune.TOP_FILE)
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
            fsync_path(target)


def make_keeper(folder, state, config, scorer=None, dev_scale=1.0, top=None):
    """Keras callback: after each epoch, a history row, the selection (folder.record), then one
    checkpoint (folder.save). With a scorer (--select-by bleu) the row also holds dev BLEU-4.
    top: a fine-tuned run's encoder top; the model fitted is then the joint model, and the
    checkpoint holds the captioner and the top (CheckpointFiles)."""
    import keras

    class Keeper(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.time()

        def on_epoch_end(self, epoch, logs=None):
            val = float(logs["val_loss"]) * dev_scale
            logs["val_loss"] = val     # Keras' progress line and History print this, after us
            bleu4 = round(float(scorer(self.model, config)), 6) if scorer else None
            lr = float(f"{float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)):.6g}")
            row = {"epoch": epoch + 1, "loss": round(float(logs["loss"]), 6), "val_loss": round(val, 6),
                   "dev_bleu4": bleu4, "seconds": round(time.time() - self.started, 1), "lr": lr}
            # the measure not selected by is recorded for the kept epoch too
            improved = (folder.record(state, row, bleu4, best={"best_val_loss": val}) if scorer else
                        folder.record(state, row, val, best={"best_dev_bleu4": bleu4}))
            if improved:
                config.update(best_epoch=state["best_epoch"], best_val_loss=val, best_dev_bleu4=bleu4)
            if state["stopped_early"]:
                self.model.stop_training = True
            # model.json describes model.keras, the kept epoch: epochs_trained is that epoch's
            # count; the run's own count is state.json's "epoch"
            config["epochs_trained"] = state["best_epoch"]
            captioner = getattr(self.model, "captioner", self.model)
            state["rng"] = rng_state(captioner)
            folder.save(CheckpointFiles(captioner, top, folder.checkpoint, improved) if top is not None
                        else captioner, state, config, improved)
            bleu_text = f"  dev BLEU-4 {bleu4:.4f}" if scorer else ""
            print(f"epoch {epoch + 1}: loss {logs['loss']:.4f}  dev {val:.4f}{bleu_text}  "
                  f"best epoch {state['best_epoch']}", flush=True)

    return Keeper()


def run_folder(run_dir, by_bleu, patience, keep=1):
    """The RunFolder of a caption run: keeps the lowest dev loss, or the highest dev BLEU-4, and
    the newest `keep` checkpoint folders."""
    selection = (Selection("best_dev_bleu4", higher=True, patience=patience) if by_bleu
                 else Selection("best_val_loss", higher=False, patience=patience))
    return RunFolder(run_dir, selection, HISTORY_FIELDS, plots={"loss.png": loss_png},
                     remedy="use another --name, or --overwrite to start again", keep=keep)


def resume_settings(args, config):
    """The settings that must match for a rerun to continue a run folder's training."""
    settings = {key: config[key] if key in config else getattr(args, key) for key in RESUME_KEYS}
    settings.update({key: config[key] for key in GRID_RESUME_KEYS if key in config})
    if config.get(finetune.KEY):       # only fine-tuned runs: frozen runs resume as before
        settings[finetune.KEY] = {k: v for k, v in config[finetune.KEY].items() if k != "file"}
    return settings


def make_datasets(config, batch_size, seed, train, dev, matrix, first_epoch=0):
    """(training, dev) tf.data pipelines: caption batches for merge/inject (captioning.data.inputs),
    whole-image batches for the grid variants (captioning.data.grid_inputs)."""
    if config["variant"] in registry.GRID_VARIANTS:
        return (grid_inputs.make_grid_dataset(train, matrix, batch_size, seed=seed, first_epoch=first_epoch),
                grid_inputs.make_grid_dataset(dev, matrix, batch_size))
    mode, max_length = config.get("mode", registry.MODE), config["max_length"]
    return (inputs.make_dataset(train, matrix, mode, batch_size, max_length, seed=seed,
                              first_epoch=first_epoch),
            inputs.make_dataset(dev, matrix, mode, batch_size, max_length))


def train_run(args, run_dir, matrix, train, dev, config, scorer=None):
    """Train (or resume) one run in run_dir (layout: captioning.training.run_folder). Returns
    the final state dict (state.json)."""
    folder = run_folder(run_dir, scorer is not None, args.patience, args.keep_epochs)
    if getattr(args, "overwrite", False):
        folder.clear()
    seed_everything(args.seed)
    settings = resume_settings(args, config)
    state = folder.resume(settings)
    if state is not None:
        config.update(read_json(folder.checkpoint / registry.CONFIG_FILE), **{
            k: config[k] for k in ("features_file", "data_dir")})
        if folder.finished(state, args.epochs):
            print(f"{run_dir}: already trained {state['epoch']} epochs "
                  f"(best epoch {state['best_epoch']}); nothing to do (--overwrite starts again)")
            return state
        model = registry.load_keras(folder.checkpoint / LAST_FILE)   # weights + optimizer state
        top = finetune.load_top(folder.checkpoint, last=True) if config.get(finetune.KEY) else None
        restore_rng_state(model, state.get("rng"))
        print(f"resuming {run_dir} after epoch {state['epoch']}", flush=True)
    else:
        state = folder.new_state(best_val_loss=None)
        model = registry.build_from_config(config)
        registry.compile_model(model, args.learning_rate, args.label_smoothing,
                             inputs.words_per_row(train, args.mode))
        config["layers"] = registry.layer_names(model)
        top = None
        if config.get(finetune.KEY):
            top = finetune.build_top(config[finetune.KEY])
            finetune.compile_top(top, config[finetune.KEY]["learning_rate"])
    state["settings"] = settings
    folder.write_settings(args, **{k: config[k] for k in (
        "feature_dim", "vocab_size", "max_length", "features_sha256", "tokenizer_sha256")},
        train_captions=len(train), dev_captions=len(dev))
    train_ds, dev_ds = make_datasets(config, args.batch_size, args.seed, train, dev, matrix,
                                     first_epoch=state["epoch"])
    fitted = model if top is None else finetune.joint_model(top, model, config)
    fitted.fit(train_ds, validation_data=dev_ds, epochs=args.epochs, initial_epoch=state["epoch"],
              callbacks=[make_keeper(folder, state, config, scorer,
                                     dev_loss_scale(model, dev, args.mode), top)],
              verbose=args.verbose,
              shuffle=False)  # the dataset shuffles itself, seeded per epoch
    return state


# ---- cross-validation -------------------------------------------------------------------------
def fold_bleu4(model, config, tokenizer, references, matrix, row_of_id, ids):
    """Standard BLEU-4 of greedy captions for the images `ids` (a held-out fold)."""
    ids = [i for i in ids if i in row_of_id]
    id_to_word, _, end_id, _ = decoding.vocabulary(tokenizer)
    id_lists = decoding.caption_features(model, config, tokenizer, matrix[[row_of_id[i] for i in ids]])
    words = [decoding.ids_to_words(id_to_word, x, end_id) for x in id_lists]
    return metrics.standard_bleu([references[i] for i in ids], words)["bleu4"]


def cross_validate(args, run_dir, first):
    """K folds over the training images (dev/test untouched) per variant; writes cv.csv.

    first: prepare_inputs' (matrix, train, dev, config, row_of_id) for args.variant; a variant
    of the other kind (pooled vs grid) loads its own file once (features_path). Folds are drawn
    over image ids, so every variant holds out the same images. Per fold: the dev loss (mean
    per predicted word) of the held-out images at the best of --cv-epochs epochs, their greedy
    standard BLEU-4 with that epoch's weights, and the seconds it took.
    """
    import keras
    tokenizer = text.load_tokenizer(Path(args.data_dir) / "tokenizer.json")
    references = text.load_references(args.data_dir)
    ids_all = sorted(text.load_splits(args.data_dir)["train"])
    rng = np.random.default_rng(args.seed)
    ids_all = [ids_all[i] for i in rng.permutation(len(ids_all))]
    if args.cv_subset:
        ids_all = ids_all[:args.cv_subset]
    if args.cv < 2 or args.cv > len(ids_all):
        raise PipelineError(f"--cv needs 2..{len(ids_all)} folds, got {args.cv}")
    fold_of = {image_id: k % args.cv for k, image_id in enumerate(ids_all)}
    loaded = {args.variant in registry.GRID_VARIANTS: first}
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    results = []
    for variant in variants:
        grid = variant in registry.GRID_VARIANTS
        if grid not in loaded:
            loaded[grid] = prepare_inputs(args, variant)
        matrix, train, _, base, row_of_id = loaded[grid]
        config = dict(base, variant=variant, mode="sequence", **model_options(args, variant))
        id_of_row = {row: image_id for image_id, row in row_of_id.items()}
        for fold in range(args.cv):
            seed_everything(args.seed)
            held_out = [i for i in ids_all if fold_of[i] == fold]
            fit_ex = [e for e in train if fold_of.get(id_of_row[e[0]], fold) != fold]
            val_ex = [e for e in train if fold_of.get(id_of_row[e[0]]) == fold]
            model = registry.build_from_config(config, "sequence")
            registry.compile_model(model, args.learning_rate, args.label_smoothing,
                                 inputs.words_per_row(fit_ex, "sequence"))
            started = time.time()
            fit_ds, val_ds = make_datasets(config, args.batch_size, args.seed, fit_ex, val_ex, matrix)
            best = keras.callbacks.ModelCheckpoint(str(run_dir / f".cv-{variant}-{fold}.weights.h5"),
                                                   save_best_only=True, save_weights_only=True)
            run_dir.mkdir(parents=True, exist_ok=True)
            hist = model.fit(fit_ds, validation_data=val_ds, epochs=args.cv_epochs,
                             verbose=args.verbose, shuffle=False, callbacks=[best])
            model.load_weights(best.filepath)           # the epoch with the lowest fold loss
            Path(best.filepath).unlink()
            val = [v * dev_loss_scale(model, val_ex, "sequence") for v in hist.history["val_loss"]]
            epoch = int(np.argmin(val))
            bleu4 = fold_bleu4(model, config, tokenizer, references, matrix, row_of_id, held_out)
            results.append({"variant": variant, "fold": fold, "val_loss": round(val[epoch], 6),
                            "bleu4": round(bleu4, 6), "best_epoch": epoch + 1,
                            "seconds": round(time.time() - started, 1)})
            print(f"cv {variant} fold {fold + 1}/{args.cv}: val loss {val[epoch]:.4f}, BLEU-4 "
                  f"{bleu4:.4f} (epoch {epoch + 1}) {results[-1]['seconds']:.0f}s", flush=True)
            keras.backend.clear_session()
    summary = []
    print(f"\n{'variant':<12} {'dev loss':>17} {'dev BLEU-4':>17} {'seconds':>9}   "
          f"(mean ± std over {args.cv} folds)")
    for variant in variants:
        rows = [r for r in results if r["variant"] == variant]
        stats = {key: (float(np.mean([r[key] for r in rows])), float(np.std([r[key] for r in rows], ddof=1)))
                 for key in ("val_loss", "bleu4", "seconds")}
        summary += [{"variant": variant, "fold": name, **{k: round(v[i], 6) for k, v in stats.items()}}
                    for i, name in enumerate(("mean", "std"))]
        print(f"{variant:<12} {stats['val_loss'][0]:>8.4f} ± {stats['val_loss'][1]:.4f} "
              f"{stats['bleu4'][0]:>8.4f} ± {stats['bleu4'][1]:.4f} {stats['seconds'][0]:>9.0f}")
    with atomic_write(run_dir / "cv.csv") as handle:
        writer = csv.DictWriter(handle, lineterminator="\n", fieldnames=[
            "variant", "fold", "val_loss", "bleu4", "best_epoch", "seconds"])
        writer.writeheader()
        writer.writerows(results + summary)
    save_settings(run_dir / "settings.json", args, images=len(ids_all),
                  **{f"{'grid' if k else 'pooled'}_features": v[3]["features_file"] for k, v in loaded.items()})
    return results
