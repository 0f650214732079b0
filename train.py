"""Stage 4: train the caption model (merge or init-inject CNN+LSTM) on image features + captions.

Usage:
    python train.py --features ../shared/flickr8k/features_efficientnet_lite0.pkl \
        --data-dir data/ --output-dir models/ [--name NAME] [--epochs 20] [--mode sequence|pairs]
    python train.py ... --cv 5 --variants merge,inject --cv-epochs 3 --cv-subset 2000

Rerunning the same command after an interruption (Ctrl-C, crash, power cut) resumes from the
last finished epoch: weights, optimizer state, best-so-far and early-stopping counter.

Reads:
    --features   pickle {image_id: float array (D,) or (1, D)} (extract_features.py's layout);
                 D, the image input width, is taken from here (4096 VGG16 fc2, 1280 Lite0).
                 float16 is cast to float32. It is unpickled: only use files you trust.
    --data-dir   prepare_text.py's outputs: meta.json (vocab_size, max_length, sentinels,
                 tokenizer_sha256), tokenizer.json, descriptions.txt, splits.json.
Writes, into the run folder <output-dir>/<name> (name defaults to the variant, plus "-pairs"):
    model.keras     the best model so far: lowest dev loss, or highest dev BLEU-4 with --select-by bleu.
    model.json      {variant, mode, feature_dim, vocab_size, max_length, embed_dim, units,
                    dropout, start_token, end_token, pad_id, start_id, end_id, oov_token,
                    tokenizer_sha256, features_file, features_sha256, data_dir,
                    epochs_trained, best_epoch, best_val_loss, layers}: all a decoder needs.
    last.keras      the model after the last finished epoch (for resuming).
    state.json      {epoch (finished epochs), best_val_loss, best_epoch, wait (epochs without
                    improvement), stopped_early, history [...]}.
    history.csv     epoch,loss,val_loss,seconds,lr (losses = mean cross-entropy per predicted
                    word, nats; epoch 1 = first epoch).
    loss.png        training and dev loss per epoch.
    settings.json   every argument of the run plus derived values (feature_dim, vocab, sizes).
    cv.csv          (--cv only, in <output-dir>/<name>, name default "cv") variant,fold,
                    val_loss,best_epoch,seconds per fold, then a mean and a std row per variant.

The model (build_model). Inputs: image_input (B, feature_dim) float32 and caption_input (B, T)
int32 token ids (0 = padding). Layer names are fixed; a decoder rebuilds a one-step model from
them. Keras LSTM weights are [kernel (E, 4U), recurrent_kernel (U, 4U), bias (4U)], gate order
i, f, c, o, activation tanh, recurrent activation sigmoid.

  variant "merge" (the tutorial's, default):
    img = image_dense(image_dropout(image_input))           Dense(units, relu)     (B, U)
    seq = lstm(embed_dropout(embedding(caption_input)))     Embedding(V, E, mask_zero=True),
                                                            LSTM(units), zero initial state
    mode "sequence": lstm returns every step (B, T, U); img goes through image_expand
        (Reshape to (B, 1, U)) and `add` broadcasts it onto every step.
    mode "pairs": lstm returns the last step (B, U) (the tutorial's model) and `add` adds img.
    out = output(decoder_dense(add([img, seq])))            Dense(units, relu), Dense(V, softmax)

  variant "inject" (init-inject):
    h0 = c0 = image_dense(image_dropout(image_input))       Dense(units, relu)     (B, U)
    seq = lstm(embed_dropout(embedding(caption_input)), initial_state=[h0, c0],
               mask=caption_input != 0)                     (an unnamed not_equal op node)
    out = output(decoder_dense(seq))                        no image_expand / add layers.

  In "sequence" mode output[:, t] is the distribution of token t+1 given tokens 0..t
  (teacher forcing); the LSTM is causal, so running the model on a prefix and taking the last
  step also decodes correctly. In "pairs" mode the output (B, V) is the next word after the
  (pre-padded) prefix. Both modes have the same weights under the same layer names: a model
  trained in one mode can be rebuilt in the other (see rebuild_for_mode).

Training modes:
  sequence (default): whole captions, input = ids[:-1], target = ids[1:], one masked sparse
      cross-entropy over all real target words (padding targets masked out). Batches are
      drawn from length-sorted pools and trimmed to their longest caption (bucketing), so
      almost no work is spent on padding. No one-hot targets, no pair expansion.
  pairs: the tutorial's progressive loading - one photo per batch, all its (prefix -> next
      word) pairs, prefixes pre-padded to max_length. Same loss per predicted word; kept
      for comparison (benchmarks/bench_train.py) and ~20x slower.
"""
import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from captioning import text
from captioning.features import load_features
from captioning.utils import (PipelineError, atomic_write, read_json, run_cli, save_settings,
                            sha256_file, write_json)

# ---- settings (argparse defaults) ----
FEATURES = "data/features.pkl"  # extract_features.py default output; ../shared/... for real features
DATA_DIR = "data"               # prepare_text.py's output folder
OUTPUT_DIR = "models"           # run folders go here
VARIANT = "merge"               # merge | inject
MODE = "sequence"               # sequence (fast, default) | pairs (the tutorial's)
EMBED_DIM = 256                 # word vector size
UNITS = 256                     # LSTM units = image_dense and decoder_dense width
DROPOUT = 0.5                   # on the image vector and on the word vectors
EPOCHS = 20                     # upper bound; early stopping usually ends sooner
BATCH_SIZE = 64                 # captions per batch (sequence mode); pairs mode: one photo
LEARNING_RATE = 1e-3            # Adam
LABEL_SMOOTHING = 0.0           # 0 = plain cross-entropy (the tutorial)
PATIENCE = 3                    # epochs without dev-loss improvement before stopping
SELECT_BY = "loss"              # which epoch model.keras keeps: lowest dev "loss" or highest dev "bleu"
SEED = 1                        # same seed, same data, same weights
MAX_MISSING = 0.01              # fraction of split images without features we tolerate
BUCKET_POOL = 20                # batches per length-sorted pool: bigger = less padding, less random
CV_VARIANTS = "merge,inject"
CV_EPOCHS = 3
CV_SUBSET = 0                   # 0 = all training images

VARIANTS = ("merge", "inject")
MODES = ("sequence", "pairs")
MODEL_FILE, LAST_FILE, STATE_FILE, CONFIG_FILE = "model.keras", "last.keras", "state.json", "model.json"
# settings that must match for a rerun to resume the run in a folder
RESUME_KEYS = ("variant", "mode", "embed_dim", "units", "dropout", "batch_size", "learning_rate",
               "label_smoothing", "seed", "features_sha256", "tokenizer_sha256", "select_by")


# ---------------------------------------------------------------- inputs

def load_feature_dict(path):
    """{image_id: float32 (D,)} via load_features (validates (D,)/(1, D))."""
    return load_features(path)


def feature_matrix(features, ids, max_missing, where):
    """Stack the features of `ids` into one float32 (N, D) matrix.

    Returns (matrix, row_of_id, missing_ids). A value of another width than the first one
    (ragged file) or not (D,)/(1, D) is a PipelineError; so is a fraction of ids without
    features above `max_missing` (those images are skipped otherwise, and reported).
    """
    missing = [i for i in ids if i not in features]
    present = [i for i in ids if i in features]
    if not present:
        raise PipelineError(f"features file has none of the {len(ids)} images of the split ({where})")
    if len(missing) > max_missing * len(ids):
        raise PipelineError(f"{len(missing)} of {len(ids)} split images have no features, "
                            f"more than --max-missing {max_missing:g} (first: {missing[0]}) ({where})")
    width = None
    rows = []
    for image_id in present:
        vec = np.asarray(features[image_id])
        if vec.ndim == 2 and vec.shape[0] == 1:
            vec = vec[0]
        if vec.ndim != 1:
            raise PipelineError(f"feature of {image_id} has shape {vec.shape}, expected (D,) or (1, D) ({where})")
        if width is None:
            width = vec.shape[0]
        elif vec.shape[0] != width:
            raise PipelineError(f"ragged features: {image_id} has width {vec.shape[0]}, "
                                f"{present[0]} has {width} ({where})")
        rows.append(vec.astype(np.float32))
    return np.stack(rows), {i: r for r, i in enumerate(present)}, missing


def load_text(data_dir):
    """meta, tokenizer, descriptions, splits from prepare_text's folder, cross-checked."""
    data_dir = Path(data_dir)
    meta = text.load_meta(data_dir)  # checks tokenizer.json's sha256 against meta.json
    tokenizer = text.load_tokenizer(data_dir / "tokenizer.json")
    ids = tokenizer["word_index"].values()
    if max(ids) + 1 != meta["vocab_size"]:
        raise PipelineError(f"tokenizer.json has ids up to {max(ids)} but meta.json says "
                            f"vocab_size {meta['vocab_size']} ({data_dir})")
    for key in ("start_token", "end_token"):
        if meta[key] not in tokenizer["word_index"]:
            raise PipelineError(f"{key} {meta[key]!r} of meta.json is not in tokenizer.json ({data_dir})")
    descriptions = text.load_descriptions(data_dir / "descriptions.txt")
    splits = text.load_splits(data_dir)
    return meta, tokenizer, descriptions, splits


def encode_split(image_ids, row_of_id, descriptions, tokenizer, max_length):
    """[(feature row, int32 ids incl. sentinels)] for every caption of every image with features.

    Captions longer than max_length (possible on dev/test) are cut to max_length tokens.
    """
    examples = []
    for image_id in image_ids:
        if image_id not in row_of_id:
            continue
        for caption in descriptions.get(image_id, []):
            ids = text.encode_caption(tokenizer, caption)[:max_length]
            examples.append((row_of_id[image_id], np.asarray(ids, dtype=np.int32)))
    return examples


# ---------------------------------------------------------------- batches

def plan_batches(lengths, batch_size, rng=None, pool=BUCKET_POOL):
    """Split example indices into batches of similar length (bucketing).

    With an rng (training): shuffle, sort each pool of pool*batch_size examples by length, cut
    into batches, shuffle the batch order. Without (evaluation): sort everything by length.
    """
    lengths = np.asarray(lengths)
    if rng is None:
        order = np.argsort(lengths, kind="stable")
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    order = rng.permutation(len(lengths))
    batches = []
    step = batch_size * pool
    for start in range(0, len(order), step):
        chunk = order[start:start + step]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def sequence_batch(examples, index, features):
    """Teacher-forcing batch trimmed to its longest caption: inputs ids[:-1], targets ids[1:]."""
    width = max(len(examples[i][1]) for i in index) - 1
    tokens = np.zeros((len(index), width), np.int32)
    targets = np.zeros((len(index), width), np.int32)
    for row, i in enumerate(index):
        ids = examples[i][1]
        tokens[row, :len(ids) - 1] = ids[:-1]
        targets[row, :len(ids) - 1] = ids[1:]
    image = features[[examples[i][0] for i in index]]
    return {"image_input": image, "caption_input": tokens}, targets


def pair_batch(examples, index, features, max_length):
    """The tutorial's create_sequences: every (prefix -> next word) pair, prefixes pre-padded."""
    n_pairs = sum(len(examples[i][1]) - 1 for i in index)
    tokens = np.zeros((n_pairs, max_length), np.int32)
    targets = np.zeros((n_pairs,), np.int32)
    rows = np.zeros((n_pairs,), np.int64)
    k = 0
    for i in index:
        row, ids = examples[i]
        for t in range(1, len(ids)):
            tokens[k, max_length - t:] = ids[:t]   # pre-padding, as keras pad_sequences
            targets[k] = ids[t]
            rows[k] = row
            k += 1
    return {"image_input": features[rows], "caption_input": tokens}, targets


def photo_batches(examples, rng=None):
    """Pairs mode: one batch per photo (the tutorial's progressive loading), photo order shuffled."""
    by_row = {}
    for i, (row, _) in enumerate(examples):
        by_row.setdefault(row, []).append(i)
    groups = [np.asarray(v) for _, v in sorted(by_row.items())]
    if rng is not None:
        groups = [groups[i] for i in rng.permutation(len(groups))]
    return groups


def make_dataset(examples, features, mode, batch_size, max_length, seed=None, first_epoch=0):
    """tf.data pipeline over Python-built batches; a new shuffle (seed + epoch) every epoch.

    seed None = evaluation order (fixed). Shapes are (None, None) so trimmed batches of any
    length pass; cardinality is set so the Keras progress bar knows the epoch length.
    """
    import tensorflow as tf
    feature_dim = features.shape[1]
    epoch = [first_epoch]

    def plan():
        rng = None if seed is None else np.random.default_rng([seed, epoch[0]])
        epoch[0] += 1
        if mode == "pairs":
            return photo_batches(examples, rng)
        return plan_batches([len(ids) for _, ids in examples], batch_size, rng)

    def generate():
        for index in plan():
            if mode == "pairs":
                yield pair_batch(examples, index, features, max_length)
            else:
                yield sequence_batch(examples, index, features)

    n_batches = len(plan())
    epoch[0] = first_epoch
    target_shape = (None,) if mode == "pairs" else (None, None)
    signature = ({"image_input": tf.TensorSpec((None, feature_dim), tf.float32),
                  "caption_input": tf.TensorSpec((None, None), tf.int32)},
                 tf.TensorSpec(target_shape, tf.int32))
    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(n_batches))
    return dataset.prefetch(2)


# ---------------------------------------------------------------- model

def build_model(variant, feature_dim, vocab_size, max_length, embed_dim=EMBED_DIM, units=UNITS,
                dropout=DROPOUT, mode=MODE):
    """The caption model; see the module docstring for the exact wiring and layer names.

    max_length only fixes the token input length in "pairs" mode (the tutorial pads every
    prefix to it); "sequence" mode accepts any length so batches can be trimmed.
    """
    import keras
    from keras import layers
    if variant not in VARIANTS:
        raise PipelineError(f"unknown variant {variant!r} (choose from {', '.join(VARIANTS)})")
    if mode not in MODES:
        raise PipelineError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
    sequence = mode == "sequence"
    image = keras.Input((feature_dim,), name="image_input", dtype="float32")
    tokens = keras.Input((None if sequence else max_length,), name="caption_input", dtype="int32")
    img = layers.Dropout(dropout, name="image_dropout")(image)
    img = layers.Dense(units, activation="relu", name="image_dense")(img)
    words = layers.Embedding(vocab_size, embed_dim, mask_zero=True, name="embedding")(tokens)
    words = layers.Dropout(dropout, name="embed_dropout")(words)
    lstm = layers.LSTM(units, return_sequences=sequence, name="lstm")
    if variant == "merge":
        seq = lstm(words)
        if sequence:
            img = layers.Reshape((1, units), name="image_expand")(img)
        x = layers.Add(name="add")([img, seq])
    else:
        # Keras does not pass the embedding's mask on when initial_state is given: pass it
        # by hand, else pre-padded prefixes (pairs mode) would run the LSTM over the pads
        mask = keras.ops.not_equal(tokens, 0)
        x = lstm(words, mask=mask, initial_state=[img, img])
    x = layers.Dense(units, activation="relu", name="decoder_dense")(x)
    out = layers.Dense(vocab_size, activation="softmax", name="output")(x)
    return keras.Model({"image_input": image, "caption_input": tokens}, out, name=f"caption_{variant}")


def rebuild_for_mode(model, config, mode):
    """The same weights in a model of the other mode (layers matched by name)."""
    other = build_model(config["variant"], config["feature_dim"], config["vocab_size"],
                        config["max_length"], config["embed_dim"], config["units"],
                        config["dropout"], mode)
    for layer in other.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    return other


def caption_loss_class():
    """Masked sparse cross-entropy on probabilities, mean over real (non-pad) target words.

    Returned per element already divided by the batch's count of real targets, with
    reduction "sum", so a batch's loss is exactly the mean over its predicted words whatever
    its padding (Keras' own sample weights would divide by B*T instead). Targets equal to 0
    (padding) are masked. label_smoothing eps: (1-eps)*NLL + eps*mean_v(-log p_v).
    """
    import keras
    from keras import ops

    @keras.saving.register_keras_serializable(package="caption_train")
    class CaptionLoss(keras.losses.Loss):
        def __init__(self, label_smoothing=0.0, name="caption_loss", reduction="sum", **kwargs):
            super().__init__(name=name, reduction="sum", **kwargs)
            self.label_smoothing = float(label_smoothing)

        def call(self, y_true, y_pred):
            y_true = ops.cast(y_true, "int32")
            # Keras' own sparse CE reuses the softmax's logits (fused, stable) when it can
            loss = keras.losses.sparse_categorical_crossentropy(y_true, y_pred)
            if self.label_smoothing:
                mean_log_p = ops.mean(ops.log(ops.clip(y_pred, 1e-7, 1.0)), axis=-1)
                loss = (1 - self.label_smoothing) * loss - self.label_smoothing * mean_log_p
            mask = ops.cast(ops.not_equal(y_true, 0), loss.dtype)
            return loss * mask / ops.maximum(ops.sum(mask), 1.0)

        def get_config(self):
            return {"label_smoothing": self.label_smoothing, "name": self.name}

    return CaptionLoss


def compile_model(model, learning_rate=LEARNING_RATE, label_smoothing=LABEL_SMOOTHING):
    import keras
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=caption_loss_class()(label_smoothing), jit_compile=False)
    return model


def load_captioner(model_dir, tokenizer_path=None):
    """(keras model, config dict) of a run folder: model.keras (best) + model.json.

    tokenizer_path (file or data folder; default the data_dir recorded in model.json): its
    tokenizer.json must have the sha256 the model was trained with, else PipelineError - ids
    would decode to the wrong words.
    """
    import keras
    model_dir = Path(model_dir)
    config = read_json(model_dir / CONFIG_FILE)
    if not (model_dir / MODEL_FILE).is_file():
        raise PipelineError(f"missing file {model_dir / MODEL_FILE}")
    tok = Path(tokenizer_path if tokenizer_path is not None else config["data_dir"])
    if tok.is_dir():
        tok = tok / "tokenizer.json"
    if not tok.is_file():
        raise PipelineError(f"cannot check the vocabulary: missing file {tok} (pass the tokenizer)")
    if sha256_file(tok) != config["tokenizer_sha256"]:
        raise PipelineError(f"tokenizer {tok} is not the one model {model_dir} was trained with")
    caption_loss_class()  # registers the loss so the compiled model deserialises
    model = keras.models.load_model(model_dir / MODEL_FILE, compile=False)
    return model, config


# ---------------------------------------------------------------- training

def seed_everything(seed):
    """Python, numpy, Keras and TF seeds plus deterministic TF kernels: same seed, same weights."""
    import keras
    import tensorflow as tf
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def save_keras(model, path):
    """model.save, atomically (Keras needs the .keras suffix, so the temp name keeps it)."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.keras")
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
                save_keras(self.model, run_dir / MODEL_FILE)
            else:
                state["wait"] += 1
            if state["wait"] >= patience:
                state["stopped_early"] = True
                self.model.stop_training = True
            config.update(epochs_trained=state["epoch"], best_epoch=state["best_epoch"],
                          best_val_loss=state["best_val_loss"],
                          best_dev_bleu4=state.get("best_dev_bleu4"))
            save_keras(self.model, run_dir / LAST_FILE)
            write_json(run_dir / CONFIG_FILE, config)
            write_history(run_dir, state["history"])
            write_json(run_dir / STATE_FILE, state)  # last: its epoch vouches for the files above
            bleu_text = f"  dev BLEU-4 {bleu4:.4f}" if scorer else ""
            print(f"epoch {epoch + 1}: loss {logs['loss']:.4f}  dev {val:.4f}{bleu_text}  "
                  f"best epoch {state['best_epoch']}", flush=True)

    return Keeper()


def prepare_inputs(args):
    """Everything training needs: text, features matrix, encoded train/dev examples, config."""
    meta, tokenizer, descriptions, splits = load_text(args.data_dir)
    features = load_feature_dict(args.features)
    where = str(args.features)
    wanted = list(splits["train"]) + list(splits["dev"])
    matrix, row_of_id, missing = feature_matrix(features, wanted, args.max_missing, where)
    del features
    if missing:
        if args.fail_on_missing:
            raise PipelineError(f"{len(missing)} split images have no features (first: {missing[0]}) ({where})")
        print(f"warning: {len(missing)} of {len(wanted)} train/dev images have no features; "
              f"skipped (first: {missing[0]})", file=sys.stderr)
    max_length = meta["max_length"]
    train = encode_split(splits["train"], row_of_id, descriptions, tokenizer, max_length)
    dev = encode_split(splits["dev"], row_of_id, descriptions, tokenizer, max_length)
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
              "epochs_trained": 0, "best_epoch": None, "best_val_loss": None,
              "layers": ["image_input", "caption_input", "image_dropout", "image_dense",
                         "embedding", "embed_dropout", "lstm"]
              + (["image_expand"] if args.variant == "merge" and args.mode == "sequence" else [])
              + (["add"] if args.variant == "merge" else []) + ["decoder_dense", "output"]}
    return matrix, train, dev, config, row_of_id


def dev_bleu_scorer(args, matrix, row_of_id):
    """A function model -> standard BLEU-4 of greedy captions for every dev image (--select-by bleu).

    Uses the fast batched decoder of generate_caption.py and the BLEU of evaluate_bleu.py
    (imported here, lazily, so that plain training never depends on the later stages). Costs
    a few seconds per epoch for the 1000 dev images. Why: dev loss keeps falling after the
    captions stop improving (blander, more generic words lower the loss), so the checkpoint
    with the best loss is often not the one that captions best.
    """
    import evaluate_bleu
    import generate_caption
    tokenizer = text.load_tokenizer(Path(args.data_dir) / "tokenizer.json")
    references = text.load_references(args.data_dir)
    ids = [i for i in text.load_splits(args.data_dir)["dev"] if i in row_of_id]
    dev_matrix = matrix[[row_of_id[i] for i in ids]]
    id_to_word, _, end_id, _ = generate_caption.vocabulary(tokenizer)

    def score(model, config):
        id_lists = generate_caption.caption_features(model, config, tokenizer, dev_matrix, beam=1)
        words = [generate_caption.ids_to_words(id_to_word, x, end_id) for x in id_lists]
        return evaluate_bleu.standard_bleu([references[i] for i in ids], words)["bleu4"]

    return score


def train_run(args, run_dir, matrix, train, dev, config, scorer=None):
    """Train (or resume) one run in run_dir. Returns the final state dict."""
    import keras
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
        caption_loss_class()
        model = keras.models.load_model(run_dir / LAST_FILE)  # weights + optimizer state
        config.update(epochs_trained=state["epoch"], best_epoch=state["best_epoch"],
                      best_val_loss=state["best_val_loss"])
        print(f"resuming {run_dir} after epoch {state['epoch']}", flush=True)
    else:
        state = {"epoch": 0, "best_val_loss": None, "best_epoch": None, "wait": 0,
                 "stopped_early": False, "history": []}
        model = build_model(args.variant, config["feature_dim"], config["vocab_size"],
                            config["max_length"], args.embed_dim, args.units, args.dropout, args.mode)
        compile_model(model, args.learning_rate, args.label_smoothing)
    save_settings(run_dir / "settings.json", args, **{k: config[k] for k in (
        "feature_dim", "vocab_size", "max_length", "features_sha256", "tokenizer_sha256")},
        train_captions=len(train), dev_captions=len(dev))
    train_ds = make_dataset(train, matrix, args.mode, args.batch_size, config["max_length"],
                            seed=args.seed, first_epoch=state["epoch"])
    dev_ds = make_dataset(dev, matrix, args.mode, args.batch_size, config["max_length"])
    model.fit(train_ds, validation_data=dev_ds, epochs=args.epochs, initial_epoch=state["epoch"],
              callbacks=[make_keeper(run_dir, state, config, args.patience, scorer)],
              verbose=args.verbose,
              shuffle=False)  # the dataset shuffles itself, seeded per epoch
    return state


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
            model = build_model(variant, config["feature_dim"], config["vocab_size"],
                                config["max_length"], args.embed_dim, args.units, args.dropout)
            compile_model(model, args.learning_rate, args.label_smoothing)
            started = time.time()
            hist = model.fit(make_dataset(fit_ex, matrix, "sequence", args.batch_size,
                                          config["max_length"], seed=args.seed),
                             validation_data=make_dataset(val_ex, matrix, "sequence",
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


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--features", type=Path, default=Path(FEATURES), help="features pickle")
    p.add_argument("--data-dir", type=Path, default=Path(DATA_DIR), help="prepare_text.py output folder")
    p.add_argument("--output-dir", type=Path, default=Path(OUTPUT_DIR), help="parent of run folders")
    p.add_argument("--name", default="", help="run folder name ('' = variant, +'-pairs'; 'cv' for --cv)")
    p.add_argument("--variant", choices=VARIANTS, default=VARIANT, help="model structure (see docstring)")
    p.add_argument("--mode", choices=MODES, default=MODE, help="sequence = whole captions; pairs = tutorial")
    p.add_argument("--embed-dim", type=int, default=EMBED_DIM, help="word vector size")
    p.add_argument("--units", type=int, default=UNITS, help="LSTM / dense width")
    p.add_argument("--dropout", type=float, default=DROPOUT, help="on image vector and word vectors")
    p.add_argument("--epochs", type=int, default=EPOCHS, help="total epochs (a rerun continues up to it)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="captions per batch (sequence mode)")
    p.add_argument("--learning-rate", type=float, default=LEARNING_RATE, help="Adam")
    p.add_argument("--label-smoothing", type=float, default=LABEL_SMOOTHING, help="0 = plain cross-entropy")
    p.add_argument("--patience", type=int, default=PATIENCE, help="early stopping, in epochs")
    p.add_argument("--select-by", choices=("loss", "bleu"), default=SELECT_BY,
                   help="keep the epoch with the lowest dev loss, or the highest dev BLEU-4 "
                        "(greedy, standard; a few seconds per epoch)")
    p.add_argument("--seed", type=int, default=SEED, help="same seed, same weights")
    p.add_argument("--max-missing", type=float, default=MAX_MISSING,
                   help="largest fraction of train+dev images allowed to lack features")
    p.add_argument("--fail-on-missing", action="store_true", help="any image without features is an error")
    p.add_argument("--cv", type=int, default=0, help="K-fold cross-validation instead of training (0 = off)")
    p.add_argument("--variants", default=CV_VARIANTS, help="variants compared by --cv")
    p.add_argument("--cv-epochs", type=int, default=CV_EPOCHS, help="epochs per fold")
    p.add_argument("--cv-subset", type=int, default=CV_SUBSET, help="training images used by --cv (0 = all)")
    p.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2), help="Keras progress: 1 = bar")
    args = p.parse_args(argv)
    for name in ("embed_dim", "units", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise PipelineError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.dropout < 1 or not 0 <= args.label_smoothing < 1 or not 0 <= args.max_missing <= 1:
        raise PipelineError("--dropout, --label-smoothing and --max-missing must be in [0, 1)")
    bad = [v for v in args.variants.split(",") if v.strip() and v.strip() not in VARIANTS]
    if bad:
        raise PipelineError(f"unknown variant {bad[0]!r} in --variants (choose from {', '.join(VARIANTS)})")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not args.features.is_file():
        raise PipelineError(f"missing features file {args.features}")
    name = args.name or ("cv" if args.cv else args.variant + ("-pairs" if args.mode == "pairs" else ""))
    run_dir = args.output_dir / name
    matrix, train, dev, config, row_of_id = prepare_inputs(args)
    print(f"{len(train)} training / {len(dev)} dev captions, feature_dim {config['feature_dim']}, "
          f"vocab {config['vocab_size']}, max_length {config['max_length']}", flush=True)
    if args.cv:
        cross_validate(args, run_dir, matrix, train, config)
        return 0
    scorer = dev_bleu_scorer(args, matrix, row_of_id) if args.select_by == "bleu" else None
    state = train_run(args, run_dir, matrix, train, dev, config, scorer)
    best = (f"dev BLEU-4 {state['best_dev_bleu4']:.4f}" if state.get("best_dev_bleu4") is not None
            else f"dev loss {state['best_val_loss']:.4f}")
    print(f"best {best} at epoch {state['best_epoch']}; model in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
