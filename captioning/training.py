"""The training loop around a caption model: run folders, resume, best-epoch selection, history, CV.

Owns
  prepare_inputs   text + features -> feature matrix, encoded train/dev captions, model.json config.
  train_run        train (or resume) one run in its folder with model.fit and the Keeper callback.
  Keeper           after every epoch: history, best-epoch selection (lowest dev loss, or highest
                   dev BLEU-4 with a scorer), early stopping, the run folder's files.
  dev_bleu_scorer  greedy dev-split BLEU-4 of a model (train.py --select-by bleu).
  cross_validate   K folds over the training images per variant -> cv.csv.
Files of a run folder (<output-dir>/<name>): see train.py's docstring.
Imports captioning.data, decoding, metrics, models, text, utils; Keras/TensorFlow/matplotlib
inside functions (heavy).
"""
import csv
import sys
import time
from pathlib import Path

import numpy as np

from captioning import data, decoding, metrics, models, text
from captioning.features import load_features
from captioning.utils import PipelineError, atomic_write, read_json, save_settings, sha256_file, write_json

# ---- defaults (train.py's argparse defaults come from here) -----------------------------------
EPOCHS = 20                     # upper bound; early stopping usually ends sooner
BATCH_SIZE = 64                 # captions per batch (sequence mode); pairs mode: one photo
PATIENCE = 3                    # epochs without improvement before stopping
SELECT_BY = "loss"              # which epoch model.keras keeps: lowest dev "loss" or highest dev "bleu"
SEED = 1                        # same seed, same data, same weights
MAX_MISSING = 0.01              # fraction of split images without features we tolerate
CV_VARIANTS = "merge,inject"
CV_EPOCHS = 3
CV_SUBSET = 0                   # 0 = all training images

LAST_FILE, STATE_FILE = "last.keras", "state.json"
# settings that must match for a rerun to resume the run in a folder
RESUME_KEYS = ("variant", "mode", "embed_dim", "units", "dropout", "batch_size", "learning_rate",
               "label_smoothing", "seed", "features_sha256", "tokenizer_sha256", "select_by")


def seed_everything(seed):
    """Python, numpy, Keras and TF seeds plus deterministic TF kernels: same seed, same weights."""
    import keras
    import tensorflow as tf
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


# ---- inputs -----------------------------------------------------------------------------------
def prepare_inputs(args):
    """Everything training needs: (feature matrix, train examples, dev examples, config, row_of_id).

    args: train.py's namespace (features, data_dir, max_missing, fail_on_missing, variant, mode,
    embed_dim, units, dropout).
    """
    meta, tokenizer, descriptions, splits = data.load_text(args.data_dir)
    features = load_features(args.features)
    where = str(args.features)
    wanted = list(splits["train"]) + list(splits["dev"])
    matrix, row_of_id, missing = data.feature_matrix(features, wanted, args.max_missing, where)
    del features
    if missing:
        if args.fail_on_missing:
            raise PipelineError(f"{len(missing)} split images have no features (first: {missing[0]}) ({where})")
        print(f"warning: {len(missing)} of {len(wanted)} train/dev images have no features; "
              f"skipped (first: {missing[0]})", file=sys.stderr)
    max_length = meta["max_length"]
    train = data.encode_split(splits["train"], row_of_id, descriptions, tokenizer, max_length)
    dev = data.encode_split(splits["dev"], row_of_id, descriptions, tokenizer, max_length)
    if not train or not dev:
        raise PipelineError(f"no training or dev captions with features ({args.data_dir})")
    word_index = tokenizer["word_index"]
    config = {"variant": args.variant, "mode": args.mode, "feature_dim": int(matrix.shape[1]),
              "vocab_size": meta["vocab_size"], "max_length": max_length,
              "embed_dim": args.embed_dim, "units": args.units, "dropout": args.dropout,
              "start_token": meta["start_token"], "end_token": meta["end_token"],
              "pad_id": meta.get("pad_id", 0), "oov_token": meta.get("oov_token"),
              "start_id": word_index[meta["start_token"]], "end_id": word_index[meta["end_token"]],
              "tokenizer_sha256": meta["tokenizer_sha256"],
              "features_file": str(args.features), "features_sha256": sha256_file(args.features),
              "data_dir": str(Path(args.data_dir).resolve()),
              "epochs_trained": 0, "best_epoch": None, "best_val_loss": None}
    return matrix, train, dev, config, row_of_id


def dev_bleu_scorer(data_dir, matrix, row_of_id):
    """A function (model, config) -> standard BLEU-4 of greedy captions for every dev image.

    Why (train.py --select-by bleu): dev loss keeps falling after the captions stop improving
    (blander, more generic words lower the loss), so the checkpoint with the best loss is often
    not the one that captions best. Costs a few seconds per epoch for the 1000 dev images.
    """
    tokenizer = text.load_tokenizer(Path(data_dir) / "tokenizer.json")
    references = text.load_references(data_dir)
    ids = [i for i in text.load_splits(data_dir)["dev"] if i in row_of_id]
    dev_matrix = matrix[[row_of_id[i] for i in ids]]
    id_to_word, _, end_id, _ = decoding.vocabulary(tokenizer)

    def score(model, config):
        id_lists = decoding.caption_features(model, config, tokenizer, dev_matrix, beam=1)
        words = [decoding.ids_to_words(id_to_word, x, end_id) for x in id_lists]
        return metrics.standard_bleu([references[i] for i in ids], words)["bleu4"]

    return score


# ---- the run folder ---------------------------------------------------------------------------
def write_history(run_dir, history):
    """history.csv and loss.png from the list of per-epoch dicts."""
    fields = ["epoch", "loss", "val_loss", "dev_bleu4", "seconds", "lr"]
    with atomic_write(run_dir / "history.csv") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for row in history:
            writer.writerow({k: row.get(k) for k in fields})
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
    with atomic_write(run_dir / "loss.png", "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)


def make_keeper(run_dir, state, config, patience, scorer=None):
    """Keras callback: after each epoch save last.keras, state.json, history, best model.json.

    "Best" is the lowest dev loss, or with a scorer (--select-by bleu) the highest dev BLEU-4;
    early stopping counts epochs without improvement of the same measure.
    """
    import keras

    class Keeper(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.time()

        def on_epoch_end(self, epoch, logs=None):
            val = float(logs["val_loss"])
            bleu4 = round(float(scorer(self.model, config)), 6) if scorer else None
            lr = float(f"{float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)):.6g}")
            state["history"].append({"epoch": epoch + 1, "loss": round(float(logs["loss"]), 6),
                                     "val_loss": round(val, 6), "dev_bleu4": bleu4,
                                     "seconds": round(time.time() - self.started, 1), "lr": lr})
            state["epoch"] = epoch + 1
            if scorer:
                improved = state.get("best_dev_bleu4") is None or bleu4 > state["best_dev_bleu4"]
            else:
                improved = state["best_val_loss"] is None or val < state["best_val_loss"]
            if improved:
                state.update(best_val_loss=val, best_epoch=epoch + 1, wait=0, best_dev_bleu4=bleu4)
                models.save_keras(self.model, run_dir / models.MODEL_FILE)
            else:
                state["wait"] += 1
            if state["wait"] >= patience:
                state["stopped_early"] = True
                self.model.stop_training = True
            config.update(epochs_trained=state["epoch"], best_epoch=state["best_epoch"],
                          best_val_loss=state["best_val_loss"],
                          best_dev_bleu4=state.get("best_dev_bleu4"))
            models.save_keras(self.model, run_dir / LAST_FILE)
            write_json(run_dir / models.CONFIG_FILE, config)
            write_history(run_dir, state["history"])
            write_json(run_dir / STATE_FILE, state)  # last: its epoch vouches for the files above
            bleu_text = f"  dev BLEU-4 {bleu4:.4f}" if scorer else ""
            print(f"epoch {epoch + 1}: loss {logs['loss']:.4f}  dev {val:.4f}{bleu_text}  "
                  f"best epoch {state['best_epoch']}", flush=True)

    return Keeper()


def train_run(args, run_dir, matrix, train, dev, config, scorer=None):
    """Train (or resume) one run in run_dir. Returns the final state dict."""
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / STATE_FILE
    seed_everything(args.seed)
    if state_path.is_file() and (run_dir / LAST_FILE).is_file():
        state = read_json(state_path)
        old = read_json(run_dir / "settings.json")
        for key in RESUME_KEYS:
            if old.get(key) != (config.get(key) if key in config else getattr(args, key)):
                raise PipelineError(f"run folder holds a run with another {key} "
                                    f"({old.get(key)!r}); use another --name or remove it ({run_dir})")
        if state["stopped_early"] or state["epoch"] >= args.epochs:
            print(f"{run_dir}: already trained {state['epoch']} epochs "
                  f"(best dev loss {state['best_val_loss']:.4f}, epoch {state['best_epoch']}); nothing to do")
            return state
        model = models.load_keras(run_dir / LAST_FILE)  # weights + optimizer state
        config.update(epochs_trained=state["epoch"], best_epoch=state["best_epoch"],
                      best_val_loss=state["best_val_loss"])
        print(f"resuming {run_dir} after epoch {state['epoch']}", flush=True)
    else:
        state = {"epoch": 0, "best_val_loss": None, "best_epoch": None, "wait": 0,
                 "stopped_early": False, "history": []}
        model = models.build_from_config(config)
        models.compile_model(model, args.learning_rate, args.label_smoothing)
    config["layers"] = models.layer_names(model)
    save_settings(run_dir / "settings.json", args, **{k: config[k] for k in (
        "feature_dim", "vocab_size", "max_length", "features_sha256", "tokenizer_sha256")},
        train_captions=len(train), dev_captions=len(dev))
    train_ds = data.make_dataset(train, matrix, args.mode, args.batch_size, config["max_length"],
                                 seed=args.seed, first_epoch=state["epoch"])
    dev_ds = data.make_dataset(dev, matrix, args.mode, args.batch_size, config["max_length"])
    model.fit(train_ds, validation_data=dev_ds, epochs=args.epochs, initial_epoch=state["epoch"],
              callbacks=[make_keeper(run_dir, state, config, args.patience, scorer)],
              verbose=args.verbose,
              shuffle=False)  # the dataset shuffles itself, seeded per epoch
    return state


# ---- cross-validation -------------------------------------------------------------------------
def cross_validate(args, run_dir, matrix, train, config):
    """K folds over training images (dev/test untouched) per variant; writes cv.csv."""
    import keras
    rows_all = sorted({row for row, _ in train})
    rng = np.random.default_rng(args.seed)
    rows_all = [rows_all[i] for i in rng.permutation(len(rows_all))]
    if args.cv_subset:
        rows_all = rows_all[:args.cv_subset]
    if args.cv < 2 or args.cv > len(rows_all):
        raise PipelineError(f"--cv needs 2..{len(rows_all)} folds, got {args.cv}")
    fold_of = {row: k % args.cv for k, row in enumerate(rows_all)}
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    results = []
    for variant in variants:
        for fold in range(args.cv):
            seed_everything(args.seed)
            fit_ex = [e for e in train if e[0] in fold_of and fold_of[e[0]] != fold]
            val_ex = [e for e in train if fold_of.get(e[0]) == fold]
            model = models.build_from_config(dict(config, variant=variant), "sequence")
            models.compile_model(model, args.learning_rate, args.label_smoothing)
            started = time.time()
            hist = model.fit(data.make_dataset(fit_ex, matrix, "sequence", args.batch_size,
                                               config["max_length"], seed=args.seed),
                             validation_data=data.make_dataset(val_ex, matrix, "sequence",
                                                               args.batch_size, config["max_length"]),
                             epochs=args.cv_epochs, verbose=args.verbose, shuffle=False)
            val = hist.history["val_loss"]
            best = int(np.argmin(val))
            results.append({"variant": variant, "fold": fold, "val_loss": round(val[best], 6),
                            "best_epoch": best + 1, "seconds": round(time.time() - started, 1)})
            print(f"cv {variant} fold {fold + 1}/{args.cv}: val loss {val[best]:.4f} "
                  f"(epoch {best + 1}) {results[-1]['seconds']:.0f}s", flush=True)
            keras.backend.clear_session()
    summary = []
    print(f"\n{'variant':<10} {'val loss (mean ± std over ' + str(args.cv) + ' folds)':>40}")
    for variant in variants:
        losses = np.array([r["val_loss"] for r in results if r["variant"] == variant])
        mean, std = float(losses.mean()), float(losses.std(ddof=1))
        summary += [{"variant": variant, "fold": "mean", "val_loss": round(mean, 6)},
                    {"variant": variant, "fold": "std", "val_loss": round(std, 6)}]
        print(f"{variant:<10} {mean:>30.4f} ± {std:.4f}")
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(run_dir / "cv.csv") as handle:
        writer = csv.DictWriter(handle, fieldnames=["variant", "fold", "val_loss", "best_epoch", "seconds"],
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(results + summary)
    save_settings(run_dir / "settings.json", args, feature_dim=config["feature_dim"],
                  vocab_size=config["vocab_size"], images=len(rows_all))
    return results
