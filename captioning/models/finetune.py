"""A grid captioner with a fine-tuned encoder top: grids = top(trunk), the top trained with it.

The captioner itself is the registry's attention or Transformer model, unchanged (input: the
7x7x1280 Lite0 grid), so decoding, step functions and model.keras loading are those of any grid
run. What fine-tuning adds lives beside it:

  the top        EfficientNet-Lite0's blocks from K on and its head (efficientnet_lite.build_split,
                 K = 15 by default: trunk (7, 7, 192) -> grid (7, 7, 1280)), built with the weights
                 the trunk file was made with, its convolutions trainable, its BatchNormalization
                 frozen (ImageNet statistics, inference mode) or trained (--top-batchnorm).
  the trunk      a trunk file of extract_features.py --trunk (captioning/data/trunk.py): the lower
                 part's maps of every image, cached; TrunkRows reads them a batch at a time.
  JointModel     used only for fitting: top -> reshape -> captioner, one loss, two Adam optimizers
                 (the captioner's --learning-rate, the top's own lower --top-learning-rate; Adam is
                 invariant to a gradient scale, so only a second optimizer lowers the top's steps).
  model.json     config["encoder_top"] = {backbone, image_size, block, fingerprint (the trunk
                 file's TrunkSpec), weights, seed, resize_filter (what the lower part was built
                 with), batchnorm, learning_rate, flips, file}; a frozen run has no such key.
  flips          a trunk file written with --flips: each epoch a seeded random half of the
                 training images is read mirrored, except those with "left" or "right" in a
                 caption (sided_images); the dev split is never mirrored.
  files          encoder_top.keras (the kept epoch's top, beside model.keras) and
                 encoder_top_last.keras (the newest epoch's, with its Adam state, beside
                 last.keras) in every checkpoint folder.
Decoding from cached maps runs top(trunk) then the captioner (model_features); new photos go
through the whole Lite0 network with the fine-tuned top copied in (captioning/inference/captioner.py).
Keras and TensorFlow are imported inside functions (heavy).
"""
import re
from pathlib import Path

import numpy as np

from captioning.data.grid_inputs import is_trunk_file
from captioning.data.inputs import check_missing
from captioning.data.trunk import TrunkFile, TrunkSpec
from captioning.encoders import efficientnet_lite
from captioning.encoders.extract import features_fingerprint
from captioning.utils import PipelineError

KEY = "encoder_top"                      # model.json's field of a fine-tuned run
TOP_FILE = "encoder_top.keras"           # the kept epoch's top (pairs with model.keras)
TOP_LAST_FILE = "encoder_top_last.keras" # the newest epoch's top + Adam state (pairs with last.keras)
TOP_LEARNING_RATE = 1e-4                 # Adam for the top: 10x below the captioner's 1e-3, so
                                         # the ImageNet features move, not get overwritten
BATCHNORM_CHOICES = ("frozen", "trained")
TOP_BATCHNORM = "trained"                # the default: above "frozen" on every dev measure
                                         # of one Flickr8k run each (docs/results.md)
PREDICT_ROWS = 64                        # trunk maps per top forward pass when encoding
WEIGHT_CHOICES = ("imagenet", "none")    # weights a top can be rebuilt from by a fingerprint


# ---- what a file is, what a model needs -------------------------------------------------------
def spec_of(config):
    """The TrunkSpec a fine-tuned model's trunk must have, or None for a frozen model."""
    record = config.get(KEY)
    if not record:
        return None
    return TrunkSpec(record["backbone"], int(record["image_size"]), int(record["block"]),
                     record["fingerprint"])


def describe(config, where):
    """'model X was trained with a fine-tuned lite0 top (trunk at 224 px, block 15)'."""
    spec = spec_of(config)
    return (f"model {where} was trained with a fine-tuned {spec.backbone} top (trunk at "
            f"{spec.image_size} px, block {spec.block})")


def check_input_kind(config, path, where):
    """One-line PipelineError unless `path` is the kind of file the model reads: a trunk file for
    a fine-tuned model, frozen features (a spatial grid file, a pickle, features.npy) otherwise."""
    trunk = is_trunk_file(path)
    if spec_of(config) is not None and not trunk:
        raise PipelineError(f"{describe(config, where)}; give a trunk file (extract_features.py "
                            f"--trunk), not {path} (frozen {'grids' if config.get('grid') else 'features'})")
    if spec_of(config) is None and trunk:
        with TrunkFile(path) as found:
            spec = found.spec
        raise PipelineError(f"model {where} was trained on frozen features; give its spatial grid "
                            f"or features file, not {path} (a trunk file of {spec.describe()}, "
                            f"for a fine-tuned top: train.py --finetune-top)")


def weights_of(spec, path=None):
    """(weights, seed, resize_filter) that rebuild the lower part a trunk file was made with,
    read from its fingerprint: ImageNet or random weights (the ones a top can be rebuilt from);
    anything else is a one-line PipelineError."""
    seed = re.search(r"random seed=(\d+)", spec.fingerprint)
    resize = re.search(r"resize=(\w+)", spec.fingerprint)
    seed, resize = int(seed.group(1)) if seed else efficientnet_lite.SEED, resize.group(1) if resize else ""
    for weights in WEIGHT_CHOICES:
        try:
            if features_fingerprint(spec.backbone, weights, seed, resize) == spec.fingerprint:
                return weights, seed, resize
        except PipelineError:       # e.g. no ImageNet checkpoint installed: not this one
            continue
    raise PipelineError(f"trunk file {path or ''} was made with weights a top cannot be rebuilt "
                        f"from ({spec.fingerprint}); extract it with --weights imagenet or none")


def encoder_record(spec, path, batchnorm, learning_rate, flips=False):
    """model.json's "encoder_top" for a run on the trunk file `path` of TrunkSpec `spec`;
    flips: the training images were mirrored (TrunkRows)."""
    weights, seed, resize = weights_of(spec, path)
    return {"backbone": spec.backbone, "image_size": spec.image_size, "block": spec.block,
            "fingerprint": spec.fingerprint, "weights": weights, "seed": seed,
            "resize_filter": resize, "batchnorm": batchnorm, "learning_rate": learning_rate,
            "flips": bool(flips), "file": TOP_FILE}


# ---- the top ----------------------------------------------------------------------------------
def build_top(record):
    """The top of model.json's encoder_top `record`: grid output (None, h, w, 1280), weights of
    the lower part's network, convolutions trainable, BatchNormalization as record["batchnorm"]."""
    split = efficientnet_lite.build_split(record["weights"], record["backbone"], int(record["block"]),
                                          output="spatial", seed=int(record["seed"]), quiet=True)
    efficientnet_lite.set_top_trainable(split.top, batchnorm=record["batchnorm"] == "trained")
    return split.top


def compile_top(top, learning_rate):
    """The top's own Adam (saved with it in encoder_top_last.keras, so a resume continues it)."""
    import keras
    top.compile(optimizer=keras.optimizers.Adam(learning_rate), jit_compile=False)
    top.optimizer.build(top.trainable_variables)
    return top


def top_grids(top, maps, rows=PREDICT_ROWS):
    """Trunk maps (n, h, w, c) -> float32 grids (n, G, C) of the top (inference mode), G = cells
    in row-major order as the spatial files store them."""
    maps = np.asarray(maps, np.float32)
    out = [np.asarray(top(maps[lo:lo + rows], training=False)) for lo in range(0, len(maps), rows)]
    if not out:
        shape = top.outputs[0].shape
        return np.zeros((0, int(shape[1]) * int(shape[2]), int(shape[3])), np.float32)
    grids = np.concatenate(out).astype(np.float32)
    return grids.reshape(len(grids), -1, grids.shape[-1])


def top_path(folder, last=False):
    """encoder_top.keras (or encoder_top_last.keras) of a checkpoint folder; a run folder whose
    model.keras is a copy (no symbolic links) holds it in its newest checkpoint."""
    name = TOP_LAST_FILE if last else TOP_FILE
    folder = Path(folder)
    if (folder / name).is_file():
        return folder / name
    checkpoints = sorted(p for p in folder.glob("checkpoint-*") if (p / name).is_file())
    if checkpoints:
        return checkpoints[-1] / name
    raise PipelineError(f"missing file {folder / name} (the fine-tuned encoder top of the model)")


def load_top(folder, last=False, compile=None):
    """The fine-tuned top saved beside model.keras (last: beside last.keras). compile (default:
    last) restores its Adam state, which only a resumed run needs."""
    from captioning.models.registry import load_keras
    return load_keras(top_path(folder, last), compile=last if compile is None else compile)


# ---- cached maps as model input ------------------------------------------------------------------
SIDED_WORDS = ("left", "right")          # a mirrored picture would contradict these captions


def sided_images(descriptions, ids):
    """The ids among `ids` with a caption naming a side (SIDED_WORDS): never mirrored."""
    return {i for i in ids if any(word in SIDED_WORDS for caption in descriptions.get(i, [])
                                  for word in caption.lower().split())}


class TrunkRows:
    """The maps of a trunk file, read a batch at a time: rows[list of file rows] -> float32
    (n, h, w, c). Has shape (N, h, w, c) like the array it stands for, so the grid batches
    (captioning.data.grid_inputs) carry trunk maps instead of grids, unchanged.

    Flips (a file written with --flips): `flippable` (bool per file row, None = no
    augmentation) marks the images that may be mirrored; epoch_view(seed, epoch) is this
    reader with a seeded random half of them read from the flipped view for that epoch (the
    same seed and epoch, the same half: a resumed run mirrors what an uninterrupted one would).
    """

    def __init__(self, trunk, flippable=None, flipped=None):
        self.trunk, self.flippable, self.flipped = trunk, flippable, flipped
        self.shape = (len(trunk), *trunk.shape)
        self.dtype = np.dtype(np.float32)

    def epoch_view(self, seed, epoch):
        if self.flippable is None:
            return self
        candidates = np.flatnonzero(self.flippable)
        rng = np.random.default_rng([seed, epoch, 2])       # 2: apart from the batch plan's draws
        flipped = np.zeros(len(self.flippable), bool)
        flipped[rng.permutation(candidates)[:len(candidates) // 2]] = True
        return TrunkRows(self.trunk, self.flippable, flipped)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, rows):
        if isinstance(rows, slice):
            rows = np.arange(self.shape[0])[rows]
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        ids = [self.trunk.ids[int(r)] for r in rows]
        return self.trunk.rows(ids, flipped=False if self.flipped is None else self.flipped[rows])

    def close(self):
        self.trunk.close()


def trunk_matrix(path, ids, max_missing, variant, grid):
    """Training input of a fine-tuned run: (TrunkRows, row_of_id, missing ids, info), info =
    {"grid": [H, W] of the top's output, "backbone", "spec", "flips": the file has the flipped
    view}; a file that is not a trunk file is a one-line error naming it."""
    if not is_trunk_file(path):
        raise PipelineError(f"--finetune-top trains the {variant} model on a trunk file "
                            f"(extract_features.py --trunk), not {path} (frozen "
                            f"{'grids' if grid else 'features'})")
    trunk = TrunkFile(path)
    found = [i for i in ids if i in trunk.index]
    missing = check_missing(ids, found, max_missing, str(path))
    spec = trunk.spec
    side = -(-efficientnet_lite.image_size(spec.backbone) // 32)   # the network's stride 32, "same" padding
    info = {"grid": [side, side], "backbone": spec.backbone, "spec": spec, "flips": trunk.flips}
    return TrunkRows(trunk), {i: trunk.index[i] for i in found}, missing, info


def model_features(config, top, path, ids, where):
    """(found ids, float32 grids (n, G, C)) of a fine-tuned model from the trunk file `path`:
    the file checked (check_input_kind, then TrunkFile's spec check), the top run over the maps."""
    check_input_kind(config, path, where)
    with TrunkFile(path, expect=spec_of(config)) as trunk:
        found = [i for i in ids if i in trunk.index]
        maps = trunk.rows(found)
    return found, top_grids(top, maps)


def file_ids(path, ids):
    """The `ids` present in a features file of any kind (trunk, spatial, pickle, features.npy),
    in the order asked; only a trunk file's ids are read, the others' rows too (read_rows)."""
    if is_trunk_file(path):
        with TrunkFile(path) as trunk:
            return [i for i in ids if i in trunk.index]
    from captioning.data.features import read_rows
    return read_rows(path, ids)[0]


# ---- joint training ------------------------------------------------------------------------------
def joint_model(top, captioner, config):
    """A keras.Model for fit only: trunk maps -> top -> (N, G, C) -> captioner, the captioner's
    loss (plus its attention penalty), gradients split between the captioner's optimizer and
    the top's (each compiled on its own model). Saves nothing itself: the checkpoint saves the
    two models (captioning.training.trainer)."""
    import keras
    import tensorflow as tf
    from keras import ops

    cells, width = int(np.prod(config["grid"])), int(config["feature_dim"])

    class JointModel(keras.Model):
        def __init__(self):
            super().__init__(name="finetune_joint")
            self.top, self.captioner = top, captioner

        def call(self, inputs, training=False):
            grid = ops.reshape(self.top(inputs["image_input"], training=training), (-1, cells, width))
            return self.captioner({**inputs, "image_input": grid}, training=training)

        def encode_grids(self, maps):
            return top_grids(self.top, maps)

        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self._compute_loss(x=x, y=y, y_pred=y_pred, training=True)
            self._loss_tracker.update_state(loss, sample_weight=tf.shape(x["caption_input"])[0])
            mine, theirs = self.captioner.trainable_variables, self.top.trainable_variables
            gradients = tape.gradient(loss, mine + theirs)
            self.captioner.optimizer.apply_gradients(zip(gradients[:len(mine)], mine))
            self.top.optimizer.apply_gradients(zip(gradients[len(mine):], theirs))
            return self.compute_metrics(x, y, y_pred)

    joint = JointModel()
    joint.compile(optimizer=captioner.optimizer, loss=captioner.loss, jit_compile=False)
    for model in (captioner, top):
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
    return joint
