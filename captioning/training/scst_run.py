"""One self-critical training run (train_scst.py): inputs, the run folder, the epoch loop.

Owns
  load_inputs   the --init model (in sequence mode), its config and tokenizer, the train/dev
                splits, references, image features and reward references, all cross-checked.
  image_rows    the features of the model's input kind (registry.VARIANTS): pooled (N, D) from
                a pickle or features.npy for merge/inject, grids (N, G, C) read a batch at a time
                from the spatial HDF5 file for attention/transformer, or, for a model with a
                fine-tuned encoder top, that top's grids over the trunk file (tuned_rows); the
                wrong kind or shape is a one-line error naming the file's and the model's.
  train_run     SCST epochs (captioning.training.scst.Trainer) in a run folder
                (captioning.training.run_folder): epoch 0 is the --init model itself, scored on
                dev; after every epoch a history row, the selection by dev CIDEr-D (of greedy
                captions, or of beam-3 captions with --select-decoding beam), patience, then one
                atomic checkpoint. A rerun resumes after the last finished epoch.
Files of the run folder: train_scst.py's docstring. TensorFlow is imported inside functions.
"""
import sys

import numpy as np

from captioning.data import grid_inputs, inputs, text
from captioning.data.features import is_spatial_file
from captioning.data.spatial import SpatialFeatures
from captioning.inference import decoding
from captioning.models import finetune, registry
from captioning.training import scst
from captioning.training.run_folder import LAST_FILE, RunFolder, Selection
from captioning.training.trainer import CheckpointFiles, seed_everything
from captioning.utils import PipelineError, progress, read_json, sha256_file

EPOCHS = 10             # upper bound; early stopping on dev CIDEr-D usually ends sooner
PATIENCE = 3            # epochs without a better dev CIDEr-D before stopping
SEED = 1
HISTORY_FIELDS = ["epoch", "sample_reward", "greedy_reward", "loss", "dev_cider_d",
                  "dev_distinct_captions", "dev_vocabulary_used", "seconds", "cpu_seconds"]
# --select-decoding: the decoding whose dev CIDEr-D picks model.keras. "greedy" (default) is the
# selection measure of every run; "beam" picks the epoch for a model that will be used with
# beam search (BEAM, decoding.ALPHA, as evaluate_bleu.py --beam 3), and adds its column.
SELECT_DECODINGS = ("greedy", "beam")
SELECT_DECODING = "greedy"
BEAM = 3
BEAM_FIELD = "dev_beam_cider_d"


def selection_key(select_decoding):
    """state.json's and model.json's field holding the best selection value."""
    return "best_dev_cider_d" if select_decoding == "greedy" else "best_" + BEAM_FIELD


def image_rows(path, ids, config, model_dir, top=None):
    """(features, row_of_id) of `ids` for the model of `config`: every id required. top: a
    fine-tuned model's encoder top (finetune.load_top), which makes its grids from the trunk.

    Grid families: a data.grid_inputs.GridRows (float16 grids read per batch; a grid of
    Flickr8k's Lite0 file is 49 x 1280, ~0.9 GB for train + dev, never all in memory). Pooled
    families: float32 (N, D) (features.npy as a memory map). The wrong kind of file or another
    shape is a one-line PipelineError naming the file's shape and the model's.
    """
    variant = config.get("variant", "merge")
    if config.get(finetune.KEY):
        return tuned_rows(path, ids, config, model_dir, top)
    if scst.is_grid_model(config):
        return grid_inputs.model_grid_rows(path, ids, config, model_dir)
    if is_spatial_file(path):
        with SpatialFeatures(path) as grids:
            shape = (len(grids.ids), *grids.grid, grids.width)
        raise PipelineError(f"spatial grids {shape} given to the {variant} model ({model_dir}), "
                            f"which was trained on pooled features (N, {config['feature_dim']}) ({path})")
    # max_missing 0: an image of the split without features is an error, not a silent skip
    matrix, row_of_id, _ = inputs.pooled_rows(path, ids, 0.0)
    if matrix.shape[1] != config["feature_dim"]:
        raise PipelineError(f"features have width {matrix.shape[1]} but model {model_dir} was trained "
                            f"on {config['feature_dim']}-d features ({path})")
    return matrix, row_of_id


def tuned_rows(path, ids, config, model_dir, top):
    """(grids, row_of_id) of a model with a fine-tuned encoder top: its top, run once over the
    trunk file's maps of `ids` (the unmirrored view), float16 (N, G, C) in memory (Flickr8k's
    7000 train + dev images: 0.9 GB), every id required. SCST trains the captioner only: the
    top stays as train.py left it, so its grids are computed once. A file of another kind, or
    a trunk of another backbone, size, block or weights, is finetune's one-line error."""
    found, grids = finetune.model_features(config, top, path, ids, model_dir)
    if len(found) != len(ids):
        missing = next(i for i in ids if i not in set(found))
        raise PipelineError(f"image {missing} is not in the trunk file {path} "
                            f"({len(ids) - len(found)} of {len(ids)} train and dev images missing)")
    return grids.astype(np.float16), {image_id: row for row, image_id in enumerate(found)}


def load_inputs(args):
    """(init_dir, model, config, tokenizer, top, splits, references, matrix, row_of_id, rewards,
    features_sha256) of train_scst.py's namespace; one-line PipelineError for a missing or
    mismatched model, features or split. init_dir is the checkpoint folder the --init links
    resolve to; top is a fine-tuned model's encoder top (None for others), which SCST keeps
    frozen; matrix is image_rows' (pooled features or grids)."""
    init_dir = registry.run_folder(args.init)
    model, config, tokenizer = registry.load_captioner(init_dir, args.data_dir)
    if config.get("mode", "sequence") != "sequence":
        model = registry.rebuild_for_mode(model, config, "sequence")
        config = dict(config, mode="sequence")
    top = finetune.load_top(init_dir, compile=False) if config.get(finetune.KEY) else None
    splits = text.load_splits(args.data_dir)
    descriptions = text.load_descriptions(args.data_dir / "descriptions.txt")
    references = text.load_references(args.data_dir)
    wanted = list(splits["train"]) + list(splits["dev"])
    matrix, row_of_id = image_rows(args.features, wanted, config, init_dir, top)
    features_sha256 = sha256_file(args.features)      # once: a grid file is ~1 GB
    if config.get("features_sha256") and config["features_sha256"] != features_sha256:
        print(f"warning: {args.features} is not the features file model {init_dir} was trained on "
              f"({config.get('features_file')}); continuing, as the shape matches", file=sys.stderr)
    rewards = scst.reward_references(descriptions, splits["train"], tokenizer,
                                     str(args.data_dir / "descriptions.txt"))
    return (init_dir, model, config, tokenizer, top, splits, references, matrix, row_of_id, rewards,
            features_sha256)


def dev_row(score, model, config, beam_score=None):
    """The dev half of a history row: CIDEr-D of the greedy captions, how many differ, words
    used; with beam_score, the beam captions' CIDEr-D too (BEAM_FIELD)."""
    cider, words = score(model, config)
    texts = [" ".join(w) for w in words]
    row = {"dev_cider_d": round(cider, 6), "dev_distinct_captions": len(set(texts)),
           "dev_vocabulary_used": len({w for ws in words for w in ws})}
    if beam_score is not None:
        row[BEAM_FIELD] = round(beam_score(model, config)[0], 6)
    return row


def beam_text(row):
    """The beam measure for a progress line ('' without it)."""
    return f" (beam {BEAM}: {row[BEAM_FIELD]:.4f})" if BEAM_FIELD in row else ""


def save_epoch(folder, model, config, state, row, top=None):
    """Record one epoch's row (selection by the dev CIDEr-D of the selection decoding, patience),
    then its checkpoint, with model.json's "scst" block describing the run so far. top: a
    fine-tuned model's encoder top, saved beside the captioner in every checkpoint (as train.py
    does), so the run folder is a fine-tuned model too."""
    key = folder.selection.key
    measure = "dev_cider_d" if key == "best_dev_cider_d" else BEAM_FIELD
    improved = folder.record(state, row, row[measure])
    config["scst"].update({"epochs_trained": state["epoch"], "best_epoch": state["best_epoch"],
                           key: state[key]})
    folder.save(model if top is None else CheckpointFiles(model, top, folder.checkpoint, improved),
                state, config, improved)


def train_run(args):
    """Run (or resume) SCST as train_scst.py's namespace says. Returns (run folder, final state),
    state None where the folder's run had already finished (nothing to do)."""
    (init_dir, model, config, tokenizer, top, splits, references, matrix, row_of_id, rewards,
     features_sha256) = load_inputs(args)
    select_decoding = args.select_decoding
    # the folder the user named (init_dir is the checkpoint its links resolve to, which a later
    # train.py epoch replaces): it names the run and is what model.json records
    named_dir = args.init if args.init.is_dir() else args.init.parent
    run_dir = args.output_dir / (args.name or named_dir.resolve().name + "-scst")
    if run_dir.resolve() == init_dir.resolve():
        raise PipelineError(f"the output folder is the --init folder ({run_dir}); choose another --name")
    # the settings a rerun must match to continue the run in its folder
    settings = {"init": str(named_dir), "init_sha256": sha256_file(init_dir / registry.MODEL_FILE),
                "features_sha256": features_sha256, "tokenizer_sha256": config["tokenizer_sha256"],
                "samples": args.samples, "batch_images": args.batch_images,
                "learning_rate": args.learning_rate, "baseline": args.baseline, "seed": args.seed}
    if select_decoding != SELECT_DECODING:
        # only when not the default, so a greedy-selected run folder reads as it always did
        settings["select_decoding"] = select_decoding

    seed_everything(args.seed)
    beam = select_decoding == "beam"
    folder = RunFolder(run_dir, Selection(selection_key(select_decoding), higher=True, patience=args.patience),
                       HISTORY_FIELDS + ([BEAM_FIELD] if beam else []), what="an SCST run")
    state = folder.resume(settings)
    if state is not None:
        # a greedy-selected folder has no select_decoding setting (the default is not recorded),
        # so its selection field tells which decoding picked its epochs
        recorded = next(d for d in SELECT_DECODINGS if selection_key(d) in state)
        if recorded != select_decoding:
            raise PipelineError(f"run folder holds an SCST run with another select_decoding ({recorded!r} "
                                f"there, {select_decoding!r} now); use another --name or remove it ({run_dir})")
        model = registry.load_keras(folder.checkpoint / LAST_FILE)      # weights + Adam state
        config = read_json(folder.checkpoint / registry.CONFIG_FILE)
        print(f"resuming {run_dir} after SCST epoch {state['epoch']}", flush=True)
    else:
        registry.compile_model(model, args.learning_rate)    # gives the model its Adam, saved with it
        # its (zero) moments exist before the first step, so epoch 0's checkpoint saves them and
        # a resume from it loads a whole optimizer (Keras warns on a partial one)
        model.optimizer.build(model.trainable_variables)
        config = dict(config, scst=dict(settings, epochs_trained=0))
    folder.write_settings(args, **settings, train_images=len(splits["train"]), dev_images=len(splits["dev"]))

    dev_ids = list(splits["dev"])
    dev_rows = [row_of_id[i] for i in dev_ids]
    score = scst.dev_scorer(references, dev_ids, matrix, dev_rows, tokenizer)
    beam_score = (scst.dev_scorer(references, dev_ids, matrix, dev_rows, tokenizer, BEAM, decoding.ALPHA)
                  if beam else None)
    if state is None:
        state = folder.new_state()
        row = dict(epoch=0, **dev_row(score, model, config, beam_score))
        save_epoch(folder, model, config, state, row, top)
        print(f"epoch 0 (the --init model): dev CIDEr-D {row['dev_cider_d']:.4f}{beam_text(row)}", flush=True)
    if folder.finished(state, args.epochs):
        print(f"{run_dir}: already trained {state['epoch']} SCST epochs; nothing to do")
        return run_dir, None

    scst_trainer = scst.Trainer(model, config, tokenizer, matrix, row_of_id, splits["train"], rewards,
                                model.optimizer, args.samples, args.batch_images, args.baseline)
    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        rng = np.random.default_rng([args.seed, epoch])     # per epoch: a resumed run draws the same
        stats = scst_trainer.epoch(rng, lambda it: progress(it, desc=f"SCST epoch {epoch}", unit="batch"))
        row = {"epoch": epoch, **{k: round(v, 1 if k.endswith("seconds") else 6) for k, v in stats.items()},
               **dev_row(score, model, config, beam_score)}
        save_epoch(folder, model, config, state, row, top)
        print(f"SCST epoch {epoch}: reward sample {row['sample_reward']:.4f} greedy {row['greedy_reward']:.4f}  "
              f"dev CIDEr-D {row['dev_cider_d']:.4f}{beam_text(row)} (best epoch {state['best_epoch']})  "
              f"{row['seconds']:.0f} s ({row['cpu_seconds']:.0f} s CPU)", flush=True)
        if state["stopped_early"]:
            break
    return run_dir, state

