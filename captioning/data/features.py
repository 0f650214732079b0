"""Image-feature files: the tutorial's pooled `features.pkl`, read without running code.

Owns the format of features.pkl: a pickle of {image_id: numpy array (D,)}, image_id = the
image file name without its extension, D = the encoder's width (4096 for VGG16 fc2, 1280 for
EfficientNet-Lite0). The tutorial's (1, D) rows and float16 are accepted and come back as
float32 (D,). Writers use save_features (atomic).

Also reads the spatial grid files of extract_features.py --spatial (HDF5, float16 (N, H, W, C);
read_grids, read_rows reads either kind) and owns the check that features fit a model
(check_features: pooled (N, D) for merge/inject, grids (N, G, C) for attention/transformer,
one-line errors naming the file and both shapes).

Reading a pickle from elsewhere with plain pickle.load can execute any command stored in it.
load_features and load_pickle use SafeUnpickler, which resolves only the handful of globals a
dict of numpy arrays needs and refuses every other one with a one-line error naming the file.
"""
import io
import pickle
from pathlib import Path

import numpy as np

from captioning.data.spatial import SpatialFeatures
from captioning.utils import PipelineError, atomic_write, read_json

# (module, name) pairs a pickled dict/list of numpy arrays and scalars refers to. numpy 2 writes
# numpy._core.*, numpy 1 wrote numpy.core.*; both are accepted so old files keep loading.
_NUMPY_GLOBALS = {
    (module, name)
    for core in ("numpy.core", "numpy._core")
    for module, name in ((f"{core}.multiarray", "_reconstruct"), (f"{core}.multiarray", "scalar"),
                         (f"{core}.numeric", "_frombuffer"))
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
     ("_codecs", "encode")}   # protocol 2 stores bytes as latin-1 text; encode() only converts it


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that builds only dicts, lists, strings, numbers and numpy arrays."""

    def find_class(self, module, name):
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: only numpy arrays, "
                                     f"dicts, strings and numbers are allowed")


def load_pickle(path, what="pickle"):
    """Unpickle `path` with SafeUnpickler; any failure is a one-line PipelineError naming it."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{what} not found ({path})")
    try:
        with open(path, "rb") as handle:
            return SafeUnpickler(io.BufferedReader(handle)).load()
    except pickle.UnpicklingError as exc:
        raise PipelineError(f"not a safe {what}: {exc} ({path})") from None
    except (EOFError, AttributeError, ImportError, ValueError, TypeError, IndexError,
            KeyError, MemoryError) as exc:
        raise PipelineError(f"not a {what} ({path}: {exc!r})") from None


def load_features(path):
    """Read a features pickle -> {image_id: float32 array (D,)}; (1, D) and float16 are accepted.

    Raises PipelineError if the file is missing, unsafe, not a dict of arrays, or widths differ.
    """
    raw = load_pickle(path, "features file")
    if not isinstance(raw, dict):
        raise PipelineError(f"features file must hold a dict, got {type(raw).__name__} ({path})")
    features, width = {}, None
    for image_id, value in raw.items():
        array = np.asarray(value)
        if array.ndim == 2 and array.shape[0] == 1:
            array = array[0]
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.number):
            raise PipelineError(f"feature of {image_id} has shape {array.shape}, expected (D,) "
                                f"or (1, D) ({path})")
        if width is None:
            width = array.shape[0]
        elif array.shape[0] != width:
            raise PipelineError(f"ragged features: {image_id} is {array.shape[0]} wide, others "
                                f"{width} ({path})")
        features[str(image_id)] = array.astype(np.float32)
    return features


def save_features(path, features):
    """Atomically pickle {image_id: float32 (D,)}: readers see the old file or the complete new one."""
    with atomic_write(path, "wb") as handle:
        pickle.dump(features, handle, protocol=pickle.HIGHEST_PROTOCOL)


def recorded_backbone(path):
    """The backbone extract_features.py recorded beside a features file (<stem>.settings.json),
    or None for a file from elsewhere (e.g. the shared reference features)."""
    settings = Path(path).with_name(Path(path).stem + ".settings.json")
    if not settings.is_file():
        return None
    try:
        return read_json(settings).get("backbone")
    except (PipelineError, AttributeError):
        return None


# ---- spatial grids (extract_features.py --spatial G.h5) and which kind a model needs ----------
def is_spatial_file(path):
    """True for an HDF5 file (a spatial grid file); pickles and other files are False."""
    import h5py
    return Path(path).is_file() and h5py.is_hdf5(path)


def file_backbone(path):
    """The backbone recorded for a pooled or spatial features file (the spatial file's
    attribute, else <stem>.settings.json's), or None where none is (the shared reference
    pickle). Lite0 and Lite2 vectors are both 1280 wide: only this tells them apart."""
    if is_spatial_file(path):
        with SpatialFeatures(path) as grids:
            return grids.backbone
    return recorded_backbone(path)


def check_backbone(config, path, where):
    """-> the file's recorded backbone (file_backbone; None where unrecorded). One-line
    PipelineError when both the model (model.json "backbone") and the file record a backbone
    and they differ; an unrecorded side passes (shapes are checked elsewhere)."""
    model, made = config.get("backbone"), file_backbone(path)
    if model and made and model != "unknown" and model != made:
        raise PipelineError(f"{path} holds {made} features but model {where} was trained on "
                            f"{model} features")
    return made


def read_grids(path, ids, dtype=np.float32):
    """Grids of the `ids` found in a spatial file -> (found ids, array (n, G, C), info), info =
    {"grid": [H, W], "backbone": the encoder recorded in the file}.

    G = H*W cells in row-major order (row h, column w is cell h*W + w). The array is `dtype`:
    float16 keeps the file's values and half the memory (training), float32 for decoding.
    Ids not in the file are left out of `found`. The file is read by captioning.data.spatial (its
    layout checks give the one-line errors).
    """
    path = Path(path)
    if not is_spatial_file(path):
        raise PipelineError(f"not a spatial features file (HDF5 from extract_features.py "
                            f"--spatial) ({path})")
    with SpatialFeatures(path) as grids:
        found = [i for i in ids if i in grids.index]
        out = grids.rows(found, dtype=dtype)
        height, width = grids.grid
        info = {"grid": [height, width], "backbone": grids.backbone}
    return found, out.reshape(len(found), height * width, grids.width), info


def memmap_features(path):
    """features.npy -> (read-only memory map float32 (N, D), ids (N,) from <stem>.ids.txt);
    one-line PipelineErrors for a missing or malformed file or an id list of another length."""
    path = Path(path)
    ids_path = path.with_suffix(".ids.txt")
    if not path.is_file():
        raise PipelineError(f"features file not found ({path})")
    try:
        matrix = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as exc:
        raise PipelineError(f"not a .npy features file ({path}: {exc})") from None
    if matrix.ndim != 2 or matrix.dtype != np.float32:
        raise PipelineError(f"features.npy must be float32 (N, D), got {matrix.dtype} "
                            f"{matrix.shape} ({path})")
    if not ids_path.is_file():
        raise PipelineError(f"missing the id list of {path.name} ({ids_path})")
    ids = ids_path.read_text(encoding="utf-8").splitlines()
    if len(ids) != matrix.shape[0]:
        raise PipelineError(f"{ids_path} lists {len(ids)} ids for {matrix.shape[0]} rows ({path})")
    return matrix, ids


def read_rows(path, ids):
    """Features of `ids` from any kind of features file -> (found ids, float32 array, grid or None).

    A pooled pickle or features.npy gives (n, D) and grid None (from features.npy only the rows
    of `ids` are read); a spatial file gives (n, G, C) and [H, W].
    """
    if Path(path).suffix == ".npy":
        mapped, file_ids = memmap_features(path)
        row = {image_id: r for r, image_id in enumerate(file_ids)}
        found = [i for i in ids if i in row]
        return found, np.asarray(mapped[[row[i] for i in found]], np.float32).reshape(len(found), -1), None
    if is_spatial_file(path):
        found, grids, info = read_grids(path, ids)
        return found, grids, info["grid"]
    table = load_features(path)
    found = [i for i in ids if i in table]
    width = len(next(iter(table.values()))) if table else 0
    matrix = np.stack([table[i] for i in found]) if found else np.zeros((0, width), np.float32)
    return found, matrix, None


def model_input_shape(config):
    """The per-image features a model of model.json `config` takes: (D,) pooled, or (G, C)
    for a grid model (config has "grid" [H, W]; C = feature_dim)."""
    if config.get("grid"):
        height, width = config["grid"]
        return (int(height) * int(width), int(config["feature_dim"]))
    if config.get("feature_shape"):         # a model that states its own per-image shape
        return tuple(int(s) for s in config["feature_shape"])
    return (int(config["feature_dim"]),)


def check_features(shape, config, where):
    """One-line PipelineError naming `where` and both shapes unless features of `shape`
    (N, ...) fit the model of `config`: pooled (N, D) for merge/inject, (N, G, C) for grids."""
    shape, expected = tuple(int(s) for s in shape), model_input_shape(config)
    if shape[1:] == expected:
        return
    variant = config.get("variant", "merge")
    wanted = "(N, " + ", ".join(str(s) for s in expected) + ")"
    if len(expected) == 2 and len(shape) == 2:
        raise PipelineError(f"pooled features {shape} given to the {variant} model, which needs "
                            f"spatial grids {wanted} (extract_features.py --spatial) ({where})")
    if len(expected) == 1 and len(shape) == 3:
        raise PipelineError(f"spatial grids {shape} given to the {variant} model, which needs "
                            f"pooled features {wanted} ({where})")
    raise PipelineError(f"features of shape {shape} do not fit the {variant} model, which was "
                        f"trained on {wanted} ({where})")
