"""VGG16 (configuration D) built layer by layer, cut at its 4096-d fc2, and its weight loaders.

The network has exactly the layer names and weight shapes of keras.applications.VGG16
(block1_conv1 ... block5_pool, flatten, fc1, fc2, predictions), so the official Keras weights
file loads into it by layer name. Five max-pool layers take 224x224 down to 7x7, so flatten is
7*7*512 = 25088 wide (the course notes' extra pooling after block 5 would give 3*3*512 = 4608
and no official weights file would fit it).

Files read (resolve_weights / load_weights):
  "imagenet": Keras's cache `~/.keras/models/vgg16_weights_tf_dim_ordering_tf_kernels.h5`
      ($KERAS_HOME instead of ~/.keras if set), downloaded from IMAGENET_URL on first use and
      checked against IMAGENET_MD5 (the URL and hash keras.applications.VGG16 uses; 528 MB).
  PATH.h5: a legacy Keras HDF5 weights file (the official file's layout: root attribute
      `layer_names`, one group per layer with a `weight_names` attribute; a full-model `.h5` with a
      `model_weights` group also works). Loaded by layer name; any shape mismatch is an error.
      A Keras 3 `.weights.h5` file saved from this model also loads.
  PATH.json: the course's `vgg16_exported.json` (from `model.to_json()`); its layer
      names must match this network; the weights come from the `.h5` beside it with the same stem.
Files written (export_model): DIR/vgg16_exported.json (model.to_json() of the full model) and
  DIR/vgg16_exported.h5 (legacy HDF5 layout as above, loadable as PATH.json).
"""
import json
import os
import sys
from pathlib import Path

from captioning.utils import PipelineError, atomic_write

# -- defaults ---------------------------------------------------------------------------------
WEIGHTS = "imagenet"          # "imagenet", "none" (random, meaningless features) or a file path
SEED = 0                      # seeds the random initialisation, so --weights none is repeatable
EXPORT_NAME = "vgg16_exported"  # --export writes <DIR>/<EXPORT_NAME>.json and .h5 (course names)

# -- the network ------------------------------------------------------------------------------
IMAGE_SIZE = (224, 224)       # (height, width) VGG16 was trained at; flatten width depends on it
FEATURE_LAYER = "fc2"         # the 4096-d layer the captioner reads
# (block name, number of 3x3 conv layers, filters): VGG configuration D, 13 conv layers
BLOCKS = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))
FC_UNITS = 4096
CLASSES = 1000

# The official file keras.applications.VGG16(weights="imagenet") downloads: same name, URL and
# md5 as keras/src/applications/vgg16.py in Keras 3 (tests check they still agree).
IMAGENET_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels.h5"
IMAGENET_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/"
                "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels.h5")
IMAGENET_MD5 = "64373286793e3c8b2b4e3219cbf3544b"


def build_vgg16(seed=SEED):
    """The full VGG16 classifier (138,357,544 parameters), randomly initialised.

    Initialisers are keras.applications' defaults (Glorot-uniform kernels, zero biases) but
    seeded per layer, so the same seed always gives the same random network (--weights none runs
    and their resumes agree).
    """
    import keras
    from keras import layers

    def seeded(index):
        return dict(kernel_initializer=keras.initializers.GlorotUniform(seed=seed + index),
                    bias_initializer="zeros")

    inputs = keras.Input(shape=(*IMAGE_SIZE, 3), name="input_layer")
    x, index = inputs, 0
    for block, n_conv, filters in BLOCKS:
        for conv in range(1, n_conv + 1):
            x = layers.Conv2D(filters, (3, 3), activation="relu", padding="same",
                              name=f"block{block}_conv{conv}", **seeded(index))(x)
            index += 1
        x = layers.MaxPooling2D((2, 2), strides=(2, 2), name=f"block{block}_pool")(x)
    # 224 / 2**5 = 7: flatten is 7*7*512 = 25088 wide; no extra pooling here.
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(FC_UNITS, activation="relu", name="fc1", **seeded(index))(x)
    x = layers.Dense(FC_UNITS, activation="relu", name="fc2", **seeded(index + 1))(x)
    x = layers.Dense(CLASSES, activation="softmax", name="predictions", **seeded(index + 2))(x)
    return keras.Model(inputs, x, name="vgg16")


def truncate_at(model, layer_name=FEATURE_LAYER):
    """A model sharing `model`'s layers and weights, ending at `layer_name` (fc2: 4096 wide)."""
    import keras
    return keras.Model(model.input, model.get_layer(layer_name).output,
                       name=f"{model.name}_{layer_name}")


def build_feature_extractor(weights=WEIGHTS, seed=SEED, cache_dir=None, quiet=False):
    """VGG16 ending at fc2: 134,260,544 parameters, output (None, 4096).

    weights: "imagenet" (official file via Keras's cache), None or "none" (random: the features
    mean nothing, a warning says so), or a path to a .h5 / .json as described in the module
    docstring. cache_dir: where the ImageNet file is cached (None = Keras's default).
    """
    path = resolve_weights(weights, cache_dir=cache_dir)  # fails fast, before the slow build
    model = build_vgg16(seed=seed)
    load_weights(model, path, quiet=quiet)
    return truncate_at(model, FEATURE_LAYER)


def resolve_weights(weights, cache_dir=None):
    """The weights file to load for a --weights value (None for random weights).

    "imagenet" → the official file in Keras's cache (downloaded if absent); a .json → the .h5
    beside it (checked later against the network); anything else must be an existing file.
    """
    if weights is None or str(weights).lower() == "none":
        return None
    if str(weights).lower() == "imagenet":
        return imagenet_weights_path(cache_dir)
    path = Path(weights)
    if not path.is_file():
        raise PipelineError(f"weights file not found ({path}); pass --weights imagenet, "
                            "none, or the path of a VGG16 .h5/.json file")
    return path


def load_weights(model, path, quiet=False):
    """Fill `model` (a build_vgg16() network) from resolve_weights()'s `path`; None = keep random.

    Returns a one-line description of where the weights came from.
    """
    if path is None:
        if not quiet:
            print("WARNING: VGG16 has RANDOM weights (--weights none): its features carry no "
                  "meaning; use them only for tests, timing and plumbing, never for captions.",
                  file=sys.stderr)
        return "random"
    path = Path(path)
    if path.suffix.lower() == ".json":
        path = check_exported_json(model, path)
    load_h5_by_name(model, path)
    return str(path)


def imagenet_weights_path(cache_dir=None):
    """Path of the official ImageNet file in Keras's cache, downloading it (528 MB) if absent.

    keras.utils.get_file checks the md5 of a cached or downloaded file, so a truncated download
    is never used. Offline with no cached copy: a PipelineError saying how to get the file.
    """
    import keras
    try:
        return Path(keras.utils.get_file(IMAGENET_FILE, IMAGENET_URL, cache_subdir="models",
                                         file_hash=IMAGENET_MD5, cache_dir=cache_dir))
    except Exception as exc:  # noqa: BLE001 - get_file raises bare Exception on network errors
        cache = Path(cache_dir or os.environ.get("KERAS_HOME", "~/.keras")).expanduser()
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PipelineError(
            f"cannot get the ImageNet VGG16 weights ({reason}); download {IMAGENET_URL} on a "
            f"machine with internet, put it at {cache / 'models' / IMAGENET_FILE} (md5 "
            f"{IMAGENET_MD5}), or pass --weights PATH to a local VGG16 .h5") from None


def check_exported_json(model, json_path):
    """Check a course `vgg16_exported.json` describes this network; return its `.h5` weights path.

    Compares layer names in order (the input layer aside), which catches the course notes' extra
    pooling layer before the weights are even read.
    """
    try:
        config = json.loads(Path(json_path).read_text(encoding="utf-8"))
        theirs = [layer["config"]["name"] for layer in config["config"]["layers"]
                  if layer["class_name"] != "InputLayer"]
    except (ValueError, KeyError, TypeError) as exc:
        raise PipelineError(f"not a Keras model JSON ({json_path}: {exc!r})") from None
    ours = [layer.name for layer in model.layers if layer.__class__.__name__ != "InputLayer"]
    if theirs != ours:
        extra = [name for name in theirs if name not in ours]
        missing = [name for name in ours if name not in theirs]
        raise PipelineError(f"{json_path} is not VGG16 configuration D (extra layers {extra}, "
                            f"missing layers {missing}; an extra pooling after block5 is the "
                            "course notes' 3x3x512 bug)")
    weights_path = Path(json_path).with_suffix(".h5")
    if not weights_path.is_file():
        raise PipelineError(f"weights file for {json_path} not found (expected {weights_path})")
    return weights_path


def read_name_list(group, name):
    """A list-of-strings HDF5 attribute; Keras splits long ones into name0, name1, ... chunks."""
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values, chunk = [], 0
        while f"{name}{chunk}" in group.attrs:
            values.extend(group.attrs[f"{name}{chunk}"])
            chunk += 1
    return [v.decode("utf8") if hasattr(v, "decode") else str(v) for v in values]


def load_h5_by_name(model, path):
    """Load a legacy-layout Keras .h5 (e.g. the official VGG16 file) into `model` by layer name.

    Every layer of `model` that has weights must be in the file with the same number and shapes
    of arrays; layers only in the file are ignored. A file without the legacy `layer_names`
    attribute is handed to Keras 3's own loader (.weights.h5).
    """
    import h5py
    try:
        with h5py.File(path, "r") as handle:
            group = handle["model_weights"] if "model_weights" in handle else handle
            if not read_name_list(group, "layer_names"):
                return load_keras3_weights(model, path)
            in_file = set(read_name_list(group, "layer_names"))
            for layer in model.layers:
                if not layer.weights:
                    continue
                if layer.name not in in_file:
                    raise PipelineError(f"layer {layer.name} missing from weights file ({path})")
                layer_group = group[layer.name]
                values = [layer_group[name][()] for name in read_name_list(layer_group, "weight_names")]
                check_shapes(layer, values, path)
                layer.set_weights(values)
    except OSError as exc:
        raise PipelineError(f"cannot read HDF5 weights ({path}: {exc})") from None


def check_shapes(layer, values, path):
    """Raise a PipelineError naming the layer if the file's arrays do not fit it."""
    expected = [tuple(w.shape) for w in layer.weights]
    got = [tuple(v.shape) for v in values]
    if expected != got:
        hint = ""
        if layer.name == "fc1" and got and got[0][0] == 3 * 3 * 512:
            hint = "; 4608 = 3x3x512 rows: the file comes from a model with the extra-pooling bug"
        raise PipelineError(f"weights for layer {layer.name} have shapes {got}, expected "
                            f"{expected} ({path}){hint}")


def load_keras3_weights(model, path):
    """Keras 3 native `.weights.h5` (saved from this same architecture)."""
    try:
        model.load_weights(str(path))
    except Exception as exc:  # noqa: BLE001 - Keras raises ValueError/KeyError/... here
        raise PipelineError(f"cannot load weights ({path}: not the legacy Keras layout, and "
                            f"Keras 3 says: {str(exc).splitlines()[0]})") from None


def export_model(model, out_dir, name=EXPORT_NAME):
    """Write the course pair: <out_dir>/<name>.json (model.to_json()) and <name>.h5 (legacy layout).

    The .h5 has the official file's layout (root attrs layer_names/backend/keras_version, one group
    per layer with weight_names `<layer>/kernel:0`, `<layer>/bias:0`), written atomically.
    """
    import h5py
    import keras
    out_dir = Path(out_dir)
    json_path, h5_path = out_dir / f"{name}.json", out_dir / f"{name}.h5"
    with atomic_write(h5_path, "w+b") as raw, h5py.File(raw, "w") as handle:
        handle.attrs["layer_names"] = [layer.name.encode("utf8") for layer in model.layers]
        handle.attrs["backend"] = keras.backend.backend().encode("utf8")
        handle.attrs["keras_version"] = keras.__version__.encode("utf8")
        for layer in model.layers:
            group = handle.create_group(layer.name)
            names = [f"{layer.name}/{w.name}:0" for w in layer.weights]
            group.attrs["weight_names"] = [n.encode("utf8") for n in names]
            for weight_name, value in zip(names, layer.get_weights()):
                group.create_dataset(weight_name, data=value)
    with atomic_write(json_path) as handle:
        handle.write(model.to_json())
    return json_path, h5_path
