"""Train the VSE++ image-sentence embedding on the training split (issue 13).

Usage:
    python prepare_text.py --text-dir ../shared/flickr8k/Flickr8k_text --output-dir data
    python train_retrieval.py --features ../shared/flickr8k/features_efficientnet_lite0.pkl \\
        --backbone lite0 --data-dir data --output-dir models --name vse
Rerunning the same command after an interruption resumes after the last finished epoch
(weights, optimizer state, best-so-far, early-stopping counter); a folder holding a run with
other settings is refused.

Reads:
    --features   pickle {image_id: vector (D,) or (1, D)} (extract_features.py's layout; float16
                 is cast), read with captioning.data.features' restricted unpickler. D, the image
                 input width, comes from here.
                 Its `<stem>.settings.json` (written by extract_features.py), when present, gives
                 the backbone and the extractor fingerprint recorded in model.json.
    --data-dir   prepare_text.py's outputs: meta.json, tokenizer.json (checked against meta's
                 sha256), descriptions.txt, splits.json.
Writes, into <output-dir>/<name>/, train.py's layout: one checkpoint-NNNN folder per epoch
(built under a temporary name, fsync'd, renamed: a kill at any moment leaves the previous epoch
or this one, never a mix; captioning.training.trainer.write_checkpoint), `current` (a link to it) and,
as links through `current`:
    model.keras    the best epoch by dev R@1+R@5+R@10 summed over both directions (rsum).
    model.json     {kind "vse++", feature_dim, embed_dim, word_dim, vocab_size, max_length,
                    margin, backbone, features_file, features_sha256, features_fingerprint,
                    tokenizer_sha256, cleaning, data_dir, epochs_trained, best_epoch,
                    best_dev_rsum, best_dev (both directions' R@K and ranks), layers}.
    history.csv    epoch, loss, max_violation (1 hardest negative, 0 warm-up), dev R@1/5/10 of
                   both directions, dev rsum, seconds, lr.
  inside the checkpoint only (for resuming):
    last.keras     the last finished epoch with its optimizer state.
    state.json     {epoch, best_epoch, best_dev_rsum, wait, stopped_early, history}.
  and beside it:
    settings.json  every argument plus derived values (feature_dim, vocab_size, counts).

Every training caption is one example per epoch; batches of --batch-size come from
length-sorted pools (captioning.data.inputs.plan_batches), so a batch is padded little. The loss (VSE++,
captioning/retrieval/vse.py) uses the other pairs of the batch as negatives: the hardest one, or
during --warmup-epochs the sum of all of them. Dev selection embeds the 1000 dev images and
their 5000 captions after every epoch and ranks them (captioning/retrieval/ranking.py).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

from captioning.retrieval import ranking

from captioning.retrieval import vse

from captioning.training import trainer
from captioning.data.inputs import encode_split, feature_matrix, load_text, plan_batches
from captioning.data.features import load_features
from captioning.training.trainer import seed_everything
from captioning.utils import (HelpFormatter, PipelineError, keras_verbose, read_json, run_cli,
                              save_settings, sha256_file)

# ---- settings (argparse defaults) --------------------------------------------------------------
FEATURES = "data/features.pkl"
DATA_DIR = "data"
OUTPUT_DIR = "models"
NAME = "vse"
BACKBONE = "auto"         # auto = from the features file's settings.json; else vgg16 | lite0 | ...
EPOCHS = 10               # upper bound, ~9-10 min of CPU time on Lite0 features; may stop sooner
BATCH_SIZE = 128          # pairs per batch = candidates for the hardest negative (VSE++: 128)
LEARNING_RATE = 1e-3      # Adam (VSE++: 2e-4 for 15 epochs; 1e-3 got further in our 10, on dev)
CLIPNORM = 2.0            # gradient norm clipping, as VSE++
WARMUP_EPOCHS = 1         # first epochs with summed negatives instead of the hardest
LR_DECAY_EPOCH = 8        # from this epoch (1-based) on the learning rate is 10x lower; 0 = never
PATIENCE = 3              # epochs without a better dev rsum before stopping
SEED = 1
MAX_MISSING = 0.01        # fraction of train+dev images allowed to lack features

RESUME_KEYS = ("embed_dim", "word_dim", "margin", "batch_size", "learning_rate", "clipnorm",
               "warmup_epochs", "lr_decay_epoch", "seed", "features_sha256", "tokenizer_sha256")
PUBLISHED = (vse.MODEL_FILE, vse.CONFIG_FILE, "history.csv")   # links through `current`
HISTORY_FIELDS = ["epoch", "loss", "max_violation", "dev_i2t_r1", "dev_i2t_r5", "dev_i2t_r10",
                  "dev_t2i_r1", "dev_t2i_r5", "dev_t2i_r10", "dev_rsum", "seconds", "lr"]


# ---- inputs ------------------------------------------------------------------------------------
def feature_provenance(features_path, backbone):
    """(backbone name, extractor fingerprint or None) of a features file.

    --backbone wins when given; else extract_features.py's `<stem>.settings.json` beside the file
    says it ("backbone", or a fingerprint naming vgg16). Unknown provenance is recorded as
    "unknown": such a model can still rank and search cached features, but search_images.py
    will not guess an extractor for raw photos.
    """
    settings_path = Path(features_path).with_name(Path(features_path).stem + ".settings.json")
    settings = read_json(settings_path) if settings_path.is_file() else {}
    fingerprint = settings.get("fingerprint")
    if backbone != "auto":
        return backbone, fingerprint
    if settings.get("backbone"):
        return settings["backbone"], fingerprint
    if fingerprint and "vgg16" in fingerprint:
        return "vgg16", fingerprint
    print(f"warning: the backbone of {features_path} is unknown (no settings.json beside it); "
          f"pass --backbone NAME so search_images.py can embed new photos", file=sys.stderr)
    return "unknown", fingerprint


def prepare_inputs(args):
    """(features matrix, train examples, dev examples, dev image rows, config)."""
    meta, tokenizer, descriptions, splits = load_text(args.data_dir)
    features = load_features(args.features)
    wanted = list(splits["train"]) + list(splits["dev"])
    matrix, row_of_id, missing = feature_matrix(features, wanted, args.max_missing, str(args.features))
    del features
    if missing:
        print(f"warning: {len(missing)} of {len(wanted)} train/dev images have no features; "
              f"skipped (first: {missing[0]})", file=sys.stderr)
    train = encode_split(splits["train"], row_of_id, descriptions, tokenizer, meta["max_length"])
    dev = encode_split(splits["dev"], row_of_id, descriptions, tokenizer, meta["max_length"])
    if not train or not dev:
        raise PipelineError(f"no training or dev captions with features ({args.data_dir})")
    backbone, fingerprint = feature_provenance(args.features, args.backbone)
    config = {"kind": vse.MODEL_KIND, "feature_dim": int(matrix.shape[1]),
              "embed_dim": args.embed_dim, "word_dim": args.word_dim,
              "vocab_size": meta["vocab_size"], "max_length": meta["max_length"],
              "margin": args.margin, "backbone": backbone,
              "features_file": str(Path(args.features).resolve()),
              "features_sha256": sha256_file(args.features), "features_fingerprint": fingerprint,
              "tokenizer_sha256": meta["tokenizer_sha256"], "cleaning": meta.get("cleaning"),
              "start_token": meta["start_token"], "end_token": meta["end_token"],
              "data_dir": str(Path(args.data_dir).resolve()), "layers": list(vse.LAYERS),
              "epochs_trained": 0, "best_epoch": None, "best_dev_rsum": None, "best_dev": None}
    return matrix, train, dev, config


def make_dataset(examples, features, batch_size, seed, first_epoch=0):
    """tf.data over length-bucketed batches: ({image_input, caption_input}, image rows).

    The image rows are the loss's y_true: they tell which pairs share an image (not negatives).
    A new shuffle (seed, epoch) every epoch; same seed, same batches.
    """
    import tensorflow as tf
    epoch = [first_epoch]
    lengths = [len(ids) for _, ids in examples]

    def generate():
        rng = np.random.default_rng([seed, epoch[0]])
        epoch[0] += 1
        for index in plan_batches(lengths, batch_size, rng):
            rows = np.array([examples[i][0] for i in index], np.int32)
            tokens = vse.pad_batch([examples[i][1] for i in index])
            yield {"image_input": features[rows], "caption_input": tokens}, rows

    n_batches = len(plan_batches(lengths, batch_size, np.random.default_rng(0)))
    signature = ({"image_input": tf.TensorSpec((None, features.shape[1]), tf.float32),
                  "caption_input": tf.TensorSpec((None, None), tf.int32)},
                 tf.TensorSpec((None,), tf.int32))
    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
    return dataset.apply(tf.data.experimental.assert_cardinality(n_batches)).prefetch(2)


# ---- dev evaluation ----------------------------------------------------------------------------
def rank_examples(encoders, features, examples):
    """ranking.evaluate of the images in `examples` against all their captions.

    encoders: (image encoder, text encoder) of the model (vse.image_encoder/text_encoder).
    """
    image_rows = sorted({row for row, _ in examples})
    column = {row: k for k, row in enumerate(image_rows)}
    images = vse.embed_images(encoders[0], features[image_rows])
    texts = vse.embed_captions(encoders[1], [ids for _, ids in examples])
    return ranking.evaluate(images @ texts.T, [column[row] for row, _ in examples])


# ---- training ----------------------------------------------------------------------------------
def make_keeper(run_dir, state, config, features, dev, warmup_epochs, patience, previous):
    """Keras callback: warm-up switch before each epoch; after it, dev ranks and one atomic
    checkpoint (previous: the checkpoint resumed from, or None)."""
    import keras

    class Keeper(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            # built once: they share the model's weights, and their compiled graphs are reused
            self.encoders = vse.image_encoder(self.model), vse.text_encoder(self.model)
            self.previous = previous

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.time()
            self.model.loss.max_violation.assign(0.0 if epoch < warmup_epochs else 1.0)

        def on_epoch_end(self, epoch, logs=None):
            dev_result = rank_examples(self.encoders, features, dev)
            a, s = dev_result["image_to_text"], dev_result["text_to_image"]
            lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            state["history"].append({
                "epoch": epoch + 1, "loss": round(float(logs["loss"]), 6),
                "max_violation": float(keras.ops.convert_to_numpy(self.model.loss.max_violation)),
                **{f"dev_{d}_r{k}": round(r[f"r{k}"], 4) for d, r in (("i2t", a), ("t2i", s))
                   for k in ranking.RECALL_AT},
                "dev_rsum": round(dev_result["rsum"], 4), "seconds": round(time.time() - self.started, 1),
                "lr": float(f"{lr:.6g}")})
            state["epoch"] = epoch + 1
            improved = state["best_dev_rsum"] is None or dev_result["rsum"] > state["best_dev_rsum"]
            if improved:
                state.update(best_dev_rsum=dev_result["rsum"], best_epoch=epoch + 1, wait=0,
                             best_dev=dev_result)
            else:
                state["wait"] += 1
            # warm-up epochs do not count towards patience: the loss changes after them
            if state["wait"] >= patience and epoch + 1 > warmup_epochs:
                state["stopped_early"] = True
                self.model.stop_training = True
            config.update(epochs_trained=state["epoch"], best_epoch=state["best_epoch"],
                          best_dev_rsum=state["best_dev_rsum"], best_dev=state["best_dev"])
            self.previous = trainer.write_checkpoint(
                run_dir, self.model, state, config, improved, self.previous,
                files={"history.csv": trainer.history_csv(state["history"], HISTORY_FIELDS)})
            print(f"epoch {epoch + 1}: loss {logs['loss']:.4f}  dev R@1/5/10 image->text "
                  f"{a['r1']:.1f}/{a['r5']:.1f}/{a['r10']:.1f}  text->image "
                  f"{s['r1']:.1f}/{s['r5']:.1f}/{s['r10']:.1f}  rsum {dev_result['rsum']:.1f}  "
                  f"({time.time() - self.started:.0f} s)  best epoch {state['best_epoch']}", flush=True)

    return Keeper()


def check_resumable(run_dir, args, config):
    """(checkpoint folder, its state) of an earlier run in run_dir with the same settings, else
    (None, None) / an error."""
    checkpoint = trainer.latest_checkpoint(run_dir)
    if checkpoint is None:
        return None, None
    old = read_json(run_dir / "settings.json")
    for key in RESUME_KEYS:
        if old.get(key) != (config[key] if key in config else getattr(args, key)):
            raise PipelineError(f"run folder holds a run with another {key} ({old.get(key)!r}); "
                                f"use another --name or remove it ({run_dir})")
    trainer.point_current(run_dir, checkpoint, PUBLISHED)     # repairs what a kill left half done
    trainer.tidy(run_dir, checkpoint, PUBLISHED)
    return checkpoint, read_json(checkpoint / trainer.STATE_FILE)


def train_run(args, run_dir, matrix, train, dev, config):
    """Train (or resume) the embedding in run_dir; returns the final state dict."""
    import keras
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(args.seed)
    checkpoint, state = check_resumable(run_dir, args, config)
    loss_class = vse.embedding_loss_class()
    if state is not None:
        if state["stopped_early"] or state["epoch"] >= args.epochs:
            print(f"{run_dir}: already trained {state['epoch']} epochs (best dev rsum "
                  f"{state['best_dev_rsum']:.1f}, epoch {state['best_epoch']}); nothing to do")
            return state
        model = keras.models.load_model(checkpoint / trainer.LAST_FILE)   # weights + optimizer state
        config.update(epochs_trained=state["epoch"], best_epoch=state["best_epoch"],
                      best_dev_rsum=state["best_dev_rsum"], best_dev=state["best_dev"])
        print(f"resuming {run_dir} after epoch {state['epoch']}", flush=True)
    else:
        state = {"epoch": 0, "best_dev_rsum": None, "best_epoch": None, "best_dev": None,
                 "wait": 0, "stopped_early": False, "history": []}
        train_rows = sorted({row for row, _ in train})
        model = vse.build_model(config["feature_dim"], config["vocab_size"], args.embed_dim,
                                      args.word_dim, matrix[train_rows].mean(axis=0),
                                      matrix[train_rows].var(axis=0))
        model.compile(optimizer=keras.optimizers.Adam(args.learning_rate, clipnorm=args.clipnorm),
                      loss=loss_class(args.margin), jit_compile=False)
    save_settings(run_dir / "settings.json", args, **{k: config[k] for k in (
        "feature_dim", "vocab_size", "max_length", "backbone", "features_sha256", "tokenizer_sha256")},
        train_captions=len(train), dev_captions=len(dev))
    def learning_rate(epoch, lr):
        # VSE++'s schedule: one 10x step down (epoch is 0-based here); set from the epoch
        # number, not the current value, so a resumed run gets the same rate
        late = args.lr_decay_epoch and epoch + 1 >= args.lr_decay_epoch
        return args.learning_rate * (0.1 if late else 1.0)

    model.fit(make_dataset(train, matrix, args.batch_size, args.seed, first_epoch=state["epoch"]),
              epochs=args.epochs, initial_epoch=state["epoch"], verbose=args.verbose, shuffle=False,
              callbacks=[keras.callbacks.LearningRateScheduler(learning_rate),
                         make_keeper(run_dir, state, config, matrix, dev, args.warmup_epochs,
                                     args.patience, checkpoint)])
    return state


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--features", type=Path, default=Path(FEATURES), help="features pickle")
    p.add_argument("--data-dir", type=Path, default=Path(DATA_DIR), help="prepare_text.py output folder")
    p.add_argument("--output-dir", type=Path, default=Path(OUTPUT_DIR), help="parent of run folders")
    p.add_argument("--name", default=NAME, help="run folder name")
    p.add_argument("--backbone", default=BACKBONE,
                   help="extractor that made --features (vgg16, lite0, ...); auto = its settings.json")
    p.add_argument("--embed-dim", type=int, default=vse.EMBED_DIM, help="joint space size = GRU units")
    p.add_argument("--word-dim", type=int, default=vse.WORD_DIM, help="word vector size")
    p.add_argument("--margin", type=float, default=vse.MARGIN, help="hinge margin")
    p.add_argument("--epochs", type=int, default=EPOCHS, help="total epochs (a rerun continues up to it)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="pairs per batch")
    p.add_argument("--learning-rate", type=float, default=LEARNING_RATE, help="Adam")
    p.add_argument("--clipnorm", type=float, default=CLIPNORM, help="gradient norm clipping")
    p.add_argument("--warmup-epochs", type=int, default=WARMUP_EPOCHS,
                   help="first epochs with summed negatives (VSE0) before the hardest negative")
    p.add_argument("--lr-decay-epoch", type=int, default=LR_DECAY_EPOCH,
                   help="epoch (1-based) from which the learning rate is 10x lower; 0 = never")
    p.add_argument("--patience", type=int, default=PATIENCE, help="early stopping, in epochs")
    p.add_argument("--seed", type=int, default=SEED, help="same seed, same weights")
    p.add_argument("--max-missing", type=float, default=MAX_MISSING,
                   help="largest fraction of train+dev images allowed to lack features")
    p.add_argument("--verbose", type=int, default=None, choices=(0, 1, 2),
                   help="Keras progress: 0 none, 1 bar, 2 a line per epoch (default: 1 on a terminal, else 2)")
    args = p.parse_args(argv)
    if args.verbose is None:
        args.verbose = keras_verbose()
    for name in ("embed_dim", "word_dim", "epochs", "batch_size", "patience"):
        if getattr(args, name) < 1:
            raise PipelineError(f"--{name.replace('_', '-')} must be at least 1")
    if args.batch_size < 2:
        raise PipelineError("--batch-size must be at least 2 (the other pairs are the negatives)")
    if args.warmup_epochs < 0 or args.lr_decay_epoch < 0 or args.margin <= 0 or not 0 <= args.max_missing <= 1:
        raise PipelineError("--warmup-epochs and --lr-decay-epoch must be >= 0, --margin > 0, "
                            "--max-missing in [0, 1]")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not args.features.is_file():
        raise PipelineError(f"missing features file {args.features}")
    run_dir = args.output_dir / args.name
    matrix, train, dev, config = prepare_inputs(args)
    print(f"{len(train)} training / {len(dev)} dev captions, feature_dim {config['feature_dim']} "
          f"(backbone {config['backbone']}), vocab {config['vocab_size']}", flush=True)
    state = train_run(args, run_dir, matrix, train, dev, config)
    best = state["best_dev"]
    print(f"best dev rsum {state['best_dev_rsum']:.1f} at epoch {state['best_epoch']} "
          f"(image->text R@1 {best['image_to_text']['r1']:.1f}, text->image R@1 "
          f"{best['text_to_image']['r1']:.1f}); model in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
