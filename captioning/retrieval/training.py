"""Training the VSE++ image-sentence embedding (train_retrieval.py): inputs, batches, one run.

Owns
  prepare_inputs   features pickle + prepare_text.py's files -> feature matrix (N, D) float32,
                   encoded train/dev captions [(row, ids)], model.json config.
  make_dataset     tf.data of length-bucketed batches ({image_input (B, D), caption_input (B, T)},
                   image rows (B,)); a new shuffle per (seed, epoch).
  rank_examples    dev ranks of a model (captioning.retrieval.ranking.evaluate).
  train_run        train (or resume) one run in its run folder (captioning.training.run_folder):
                   model.fit with a callback that switches the warm-up off, ranks the dev split
                   after every epoch and keeps the best epoch by rsum in one atomic checkpoint
                   (keep_epoch).
  train_run_workers  the same run on several workers (TF_CONFIG; captioning.training.distributed).
Files of the run folder: train_retrieval.py's docstring. Keras and TensorFlow are imported
inside functions (heavy).
"""
import sys
import time
from pathlib import Path

import numpy as np

from captioning.data.inputs import encode_split, load_text, plan_batches, pooled_rows
from captioning.retrieval import ranking, vse
from captioning.training.run_folder import LAST_FILE, RunFolder, Selection
from captioning.training.trainer import seed_everything
from captioning.utils import PipelineError, read_json, sha256_file

# ---- defaults (train_retrieval.py's argparse defaults come from here) ---------------------------
EPOCHS = 10               # upper bound, ~9-10 min of CPU time on Lite0 features; may stop sooner
BATCH_SIZE = 128          # pairs per batch = candidates for the hardest negative (VSE++: 128)
LEARNING_RATE = 1e-3      # Adam (VSE++: 2e-4 for 15 epochs; 1e-3 got further in our 10, on dev)
CLIPNORM = 2.0            # gradient norm clipping, as VSE++
WARMUP_EPOCHS = 1         # first epochs with summed negatives instead of the hardest
LR_DECAY_EPOCH = 8        # from this epoch (1-based) on the learning rate is 10x lower; 0 = never
PATIENCE = 3              # epochs without a better dev rsum before stopping
SEED = 1
MAX_MISSING = 0.01        # fraction of train+dev images allowed to lack features

# settings that must match for a rerun to resume the run in a folder
RESUME_KEYS = ("embed_dim", "word_dim", "margin", "batch_size", "learning_rate", "clipnorm",
               "warmup_epochs", "lr_decay_epoch", "seed", "features_sha256", "tokenizer_sha256")
HISTORY_FIELDS = ["epoch", "loss", "max_violation", "dev_i2t_r1", "dev_i2t_r5", "dev_i2t_r10",
                  "dev_t2i_r1", "dev_t2i_r5", "dev_t2i_r10", "dev_rsum", "seconds", "lr"]


# ---- inputs ------------------------------------------------------------------------------------
def feature_provenance(features_path, backbone):
    """(backbone name, extractor fingerprint or None) of a features file.

    backbone ("auto" or a name) wins when given; else extract_features.py's
    `<stem>.settings.json` beside the file says it ("backbone", or a fingerprint naming vgg16).
    Unknown provenance is recorded as "unknown": such a model can still rank and search cached
    features, but search_images.py will not guess an extractor for raw photos.
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
    """(features matrix, train examples, dev examples, config) from train_retrieval.py's
    namespace (features, data_dir, max_missing, backbone, embed_dim, word_dim, margin)."""
    meta, tokenizer, descriptions, splits = load_text(args.data_dir)
    wanted = list(splits["train"]) + list(splits["dev"])
    matrix, row_of_id, missing = pooled_rows(args.features, wanted, args.max_missing)
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


def pair_batch(examples, index, features):
    """({image_input (B, D), caption_input (B, T)}, image rows (B,)) of example indices `index`.

    The image rows are the loss's y_true: they tell which pairs share an image (not negatives).
    """
    rows = np.array([examples[i][0] for i in index], np.int32)
    tokens = vse.pad_batch([examples[i][1] for i in index])
    return {"image_input": features[rows], "caption_input": tokens}, rows


def batch_signature(features):
    """The tf.TensorSpec structure of pair_batch's batches."""
    import tensorflow as tf
    return ({"image_input": tf.TensorSpec((None, features.shape[1]), tf.float32),
             "caption_input": tf.TensorSpec((None, None), tf.int32)},
            tf.TensorSpec((None,), tf.int32))


def epoch_plan(examples, batch_size, seed, epoch):
    """The length-bucketed batches [example index arrays] of one epoch: a new shuffle per
    (seed, epoch); same seed, same batches."""
    return plan_batches([len(ids) for _, ids in examples], batch_size, np.random.default_rng([seed, epoch]))


def make_dataset(examples, features, batch_size, seed, first_epoch=0):
    """tf.data over epoch_plan's batches of pair_batch, the next epoch's plan at each pass."""
    import tensorflow as tf
    epoch = [first_epoch]

    def generate():
        plan = epoch_plan(examples, batch_size, seed, epoch[0])
        epoch[0] += 1
        for index in plan:
            yield pair_batch(examples, index, features)

    n_batches = len(epoch_plan(examples, batch_size, seed, 0))
    dataset = tf.data.Dataset.from_generator(generate, output_signature=batch_signature(features))
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


# ---- one run -----------------------------------------------------------------------------------
def keep_epoch(folder, state, config, model, encoders, features, dev, warmup_epochs, epoch, loss, started):
    """After epoch `epoch` (0-based) with training loss `loss`: dev ranks, the history row, the
    selection by rsum (folder.record), one atomic checkpoint (folder.save), the progress line.
    Returns True when the run stops early."""
    import keras
    dev_result = rank_examples(encoders, features, dev)
    a, s = dev_result["image_to_text"], dev_result["text_to_image"]
    lr = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
    row = {"epoch": epoch + 1, "loss": round(float(loss), 6),
           "max_violation": float(keras.ops.convert_to_numpy(model.loss.max_violation)),
           **{f"dev_{d}_r{k}": round(r[f"r{k}"], 4) for d, r in (("i2t", a), ("t2i", s))
              for k in ranking.RECALL_AT},
           "dev_rsum": round(dev_result["rsum"], 4),
           "seconds": round(time.time() - started, 1), "lr": float(f"{lr:.6g}")}
    # warm-up epochs do not count towards patience: the loss changes after them
    improved = folder.record(state, row, dev_result["rsum"], best={"best_dev": dev_result},
                             can_stop=epoch + 1 > warmup_epochs)
    config.update(epochs_trained=state["epoch"], best_epoch=state["best_epoch"],
                  best_dev_rsum=state["best_dev_rsum"], best_dev=state["best_dev"])
    folder.save(model, state, config, improved)
    print(f"epoch {epoch + 1}: loss {loss:.4f}  dev R@1/5/10 image->text "
          f"{a['r1']:.1f}/{a['r5']:.1f}/{a['r10']:.1f}  text->image "
          f"{s['r1']:.1f}/{s['r5']:.1f}/{s['r10']:.1f}  rsum {dev_result['rsum']:.1f}  "
          f"({time.time() - started:.0f} s)  best epoch {state['best_epoch']}", flush=True)
    return bool(state["stopped_early"])


def make_keeper(folder, state, config, features, dev, warmup_epochs):
    """Keras callback: the warm-up switch before each epoch; after it, keep_epoch."""
    import keras

    class Keeper(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            # built once: they share the model's weights, and their compiled graphs are reused
            self.encoders = vse.image_encoder(self.model), vse.text_encoder(self.model)

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.time()
            self.model.loss.max_violation.assign(0.0 if epoch < warmup_epochs else 1.0)

        def on_epoch_end(self, epoch, logs=None):
            if keep_epoch(folder, state, config, self.model, self.encoders, features, dev,
                          warmup_epochs, epoch, logs["loss"], self.started):
                self.model.stop_training = True

    return Keeper()


def learning_rate(args, epoch):
    """VSE++'s schedule at `epoch` (0-based): one 10x step down from --lr-decay-epoch (1-based);
    set from the epoch number, not the current value, so a resumed run gets the same rate."""
    late = args.lr_decay_epoch and epoch + 1 >= args.lr_decay_epoch
    return args.learning_rate * (0.1 if late else 1.0)


def new_model(args, config, matrix, train):
    """The compiled, untrained embedding: standardisation from the training images' features,
    Adam with --clipnorm, the VSE++ loss."""
    import keras
    train_rows = sorted({row for row, _ in train})
    model = vse.build_model(config["feature_dim"], config["vocab_size"], args.embed_dim,
                            args.word_dim, matrix[train_rows].mean(axis=0), matrix[train_rows].var(axis=0))
    model.compile(optimizer=keras.optimizers.Adam(args.learning_rate, clipnorm=args.clipnorm),
                  loss=vse.embedding_loss_class()(args.margin), jit_compile=False)
    return model


def run_folder(run_dir, patience):
    """The RunFolder of an embedding run: keeps the highest dev rsum."""
    return RunFolder(run_dir, Selection("best_dev_rsum", higher=True, patience=patience), HISTORY_FIELDS)


def resume_settings(args, config):
    """The settings that must match for a rerun to continue a run folder's training."""
    return {key: config[key] if key in config else getattr(args, key) for key in RESUME_KEYS}


def train_run(args, run_dir, matrix, train, dev, config):
    """Train (or resume) the embedding in run_dir; returns the final state dict (state.json)."""
    import keras
    folder = run_folder(run_dir, args.patience)
    seed_everything(args.seed)
    state = folder.resume(resume_settings(args, config))
    vse.embedding_loss_class()      # registered before a checkpoint that uses it is loaded
    if state is not None:
        if folder.finished(state, args.epochs):
            print(f"{run_dir}: already trained {state['epoch']} epochs (best dev rsum "
                  f"{state['best_dev_rsum']:.1f}, epoch {state['best_epoch']}); nothing to do")
            return state
        model = keras.models.load_model(folder.checkpoint / LAST_FILE)   # weights + optimizer state
        config.update(epochs_trained=state["epoch"], best_epoch=state["best_epoch"],
                      best_dev_rsum=state["best_dev_rsum"], best_dev=state["best_dev"])
        print(f"resuming {run_dir} after epoch {state['epoch']}", flush=True)
    else:
        state = folder.new_state(best_dev=None)
        model = new_model(args, config, matrix, train)
    folder.write_settings(args, **{k: config[k] for k in (
        "feature_dim", "vocab_size", "max_length", "backbone", "features_sha256", "tokenizer_sha256")},
        train_captions=len(train), dev_captions=len(dev))
    model.fit(make_dataset(train, matrix, args.batch_size, args.seed, first_epoch=state["epoch"]),
              epochs=args.epochs, initial_epoch=state["epoch"], verbose=args.verbose, shuffle=False,
              callbacks=[keras.callbacks.LearningRateScheduler(lambda epoch, lr: learning_rate(args, epoch)),
                         make_keeper(folder, state, config, matrix, dev, args.warmup_epochs)])
    return state


def train_run_workers(workers, args, run_dir, matrix, train, dev, config):
    """train_run on several workers (captioning.training.distributed.Workers): --batch-size is
    the global batch and every other pair of it is a negative, as in one process (the outputs
    of all replicas are gathered for the loss); the same run folder, history, selection and
    resume. Every worker calls it; the chief alone ranks the dev split and reads and writes
    run_dir. Returns the final state on the chief, None on the others.
    """
    with workers.peers_watched():
        return _train_run_workers(workers, args, run_dir, matrix, train, dev, config)


def _train_run_workers(workers, args, run_dir, matrix, train, dev, config):
    import keras
    from captioning.training import distributed
    seed_everything(args.seed)
    settings = resume_settings(args, config)
    workers.check_settings({**settings, "epochs": args.epochs, "patience": args.patience,
                            "train_captions": len(train), "dev_captions": len(dev),
                            "cluster": list(workers.cluster.addresses)})
    run = {}     # the chief's: run folder and state

    def open_folder():
        folder = run_folder(run_dir, args.patience)
        state = folder.resume(settings)
        if state is None:
            state = folder.new_state(best_dev=None)
        else:
            config.update(epochs_trained=state["epoch"], best_epoch=state["best_epoch"],
                          best_dev_rsum=state["best_dev_rsum"], best_dev=state["best_dev"])
        run.update(folder=folder, state=state)
        return {"epoch": state["epoch"], "finished": folder.finished(state, args.epochs)}

    start = workers.on_chief(open_folder)
    if start["finished"]:
        if workers.is_chief:
            state = run["state"]
            print(f"{run_dir}: already trained {state['epoch']} epochs (best dev rsum "
                  f"{state['best_dev_rsum']:.1f}, epoch {state['best_epoch']}); nothing to do")
        return run.get("state")
    model = distributed.build_in_scope(workers, lambda: new_model(args, config, matrix, train))

    def load_checkpoint():
        folder = run["folder"]
        if start["epoch"]:
            distributed.copy_state(keras.models.load_model(folder.checkpoint / LAST_FILE), model)
            print(f"resuming {run_dir} after epoch {start['epoch']} on {workers.cluster.size} workers",
                  flush=True)
        folder.write_settings(args, **{k: config[k] for k in (
            "feature_dim", "vocab_size", "max_length", "backbone", "features_sha256", "tokenizer_sha256")},
            train_captions=len(train), dev_captions=len(dev), workers=workers.cluster.size)
        return True

    workers.on_chief(load_checkpoint)
    workers.broadcast_variables(model.variables + model.optimizer.variables)
    encoders = (vse.image_encoder(model), vse.text_encoder(model)) if workers.is_chief else None
    # the loss's own per-pair values over the global batch: calling the Keras loss would divide
    # its mean by the replicas (Keras' convention for a mean over one replica's batch)
    steps = distributed.ContrastiveSteps(workers, model,
                                         lambda joint, rows: keras.ops.mean(model.loss.call(rows, joint)))
    signature = batch_signature(matrix)
    for epoch in range(start["epoch"], args.epochs):
        started = time.time()
        model.loss.max_violation.assign(0.0 if epoch < args.warmup_epochs else 1.0)
        model.optimizer.learning_rate.assign(learning_rate(args, epoch))
        plan = epoch_plan(train, args.batch_size, args.seed, epoch)
        loss = steps.train_epoch(distributed.distribute(
            workers, plan, lambda index: pair_batch(train, index, matrix), signature))
        workers.check_in_step(model, f"after epoch {epoch + 1}")
        if workers.on_chief(lambda: keep_epoch(run["folder"], run["state"], config, model, encoders,
                                               matrix, dev, args.warmup_epochs, epoch, loss, started)):
            break
    workers.report(start["epoch"], epoch + 1)
    return run.get("state")
