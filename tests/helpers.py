"""Helpers shared by several test files (the tests import them from here, never from each other).

  tiny captioners    random_captioner (a merge/inject network with random, peaked weights),
                     make_tiny_run (data/sample's text prepared, a random merge model saved as
                     train.py would, random features for every captioned image) and
                     make_beams_finish (that model changed so its beams finish at several lengths).
  the table          a hand-written next-word probability table and its step function, for the
                     decoders: exact captions follow from the table by hand.
  legacy pickles     a torch-free writer of legacy PyTorch checkpoints (the opcodes torch.save emits).
  run folders        what a reader of a run folder sees (names, link targets, sizes).
  FIXTURE            tests/fixtures/karpathy_coco_tiny.json, a Karpathy-split JSON in COCO's layout.
"""
import collections
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np

from captioning.data import text
from captioning.data.features import save_features
from captioning.encoders.torch_checkpoint import LEGACY_MAGIC, LEGACY_PROTOCOL
from captioning.models import registry
from captioning.utils import sha256_file, write_json

# A Karpathy-format JSON in COCO's layout (filepath train2014/val2014, one restval image)
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "karpathy_coco_tiny.json"


# ---- tiny captioners --------------------------------------------------------------------------
def random_captioner(variant, mode, feature_dim=16, vocab=40, max_length=10, units=8, seed=0):
    """A train.build_model network with random weights, zero biases and kernels of std
    3/sqrt(fan_in) (6/sqrt(fan_in) for the output layer): varied, peaked distributions, so
    float rounding between the one-step and the whole-caption computation cannot flip an argmax."""
    import keras
    keras.utils.set_random_seed(seed)
    model = registry.build_model(variant, feature_dim, vocab, max_length, embed_dim=8, units=units,
                              dropout=0.5, mode=mode)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        gain = 6.0 if layer.name == "output" else 3.0
        layer.set_weights([np.zeros_like(w) if w.ndim == 1 else
                           rng.normal(0, gain / np.sqrt(w.shape[0]), w.shape).astype(np.float32)
                           for w in layer.get_weights()])
    return model


SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


def make_tiny_run(root, feature_dim=16):
    """prepare_text.py on data/sample, a random merge model saved as train.py would, random
    features for every captioned image. Returns (data_dir, model_dir, features_path, ids)."""
    data_dir, model_dir = root / "data", root / "model"
    outputs, _ = text.prepare(SAMPLE / "Flickr8k_text")
    text.write_outputs(data_dir, outputs)
    meta = text.load_meta(data_dir)
    model = random_captioner("merge", "sequence", feature_dim, meta["vocab_size"], meta["max_length"])
    model_dir.mkdir()
    model.save(model_dir / registry.MODEL_FILE)
    write_json(model_dir / "model.json", {
        "variant": "merge", "mode": "sequence", "feature_dim": feature_dim,
        "vocab_size": meta["vocab_size"], "max_length": meta["max_length"], "embed_dim": 8,
        "units": 8, "dropout": 0.5, "start_token": meta["start_token"],
        "end_token": meta["end_token"], "pad_id": 0,
        "tokenizer_sha256": sha256_file(data_dir / "tokenizer.json"), "data_dir": str(data_dir)})
    splits = text.load_splits(data_dir)
    ids = sorted(i for part in splits.values() for i in part)
    rng = np.random.default_rng(0)
    features = root / "features.pkl"
    save_features(features, {i: rng.normal(size=feature_dim).astype(np.float32)
                                              for i in ids})
    return data_dir, model_dir, features, ids


def make_beams_finish(model_dir, end_id):
    """Flatter next-word distributions and a raised endseq bias in make_tiny_run's model, so its
    beams finish at several lengths (with its own peaked weights almost nothing finishes within
    max_length): n-best lists of more than one caption, for consensus re-ranking."""
    import keras
    model = keras.saving.load_model(model_dir / registry.MODEL_FILE, compile=False)
    kernel, bias = model.get_layer("output").get_weights()
    bias[end_id] = 2.0
    model.get_layer("output").set_weights([kernel * 0.2, bias])
    model.save(model_dir / registry.MODEL_FILE)


# ---- a hand-written next-word table -----------------------------------------------------------
WORDS = ["<pad>", "startseq", "endseq", "<unk>", "a", "the", "one", "dog", "cat", "runs",
         "sleeps", "endless", "weekend"]


ID = {w: i for i, w in enumerate(WORDS)}


PAD, START, END, UNK = 0, ID["startseq"], ID["endseq"], ID["<unk>"]


BANNED = [PAD, START, UNK]


UNLISTED = 1e-9     # probability of every word a row of the table does not list


# prefix (words after startseq) -> next-word probabilities. Caption probabilities:
#   greedy: a .40 -> endless .40 -> dog .60 -> endseq 1      = .096   "a endless dog"
#   the .35 -> dog .90 -> endseq .55                          = .17325 "the dog"
#   the .35 -> dog .90 -> runs .45 -> endseq 1                = .14175 "the dog runs"
#   one .25 -> cat .95 -> sleeps 1 -> weekend 1 -> endseq 1   = .2375  "one cat sleeps weekend"
TABLE = {
    (): {"a": .40, "the": .35, "one": .25},
    ("a",): {"dog": .30, "cat": .30, "endless": .40},
    ("a", "endless"): {"dog": .60, "endseq": .40},
    ("a", "endless", "dog"): {"endseq": 1.0},
    ("the",): {"dog": .90, "cat": .10},
    ("the", "dog"): {"runs": .45, "endseq": .55},
    ("the", "dog", "runs"): {"endseq": 1.0},
    ("one",): {"cat": .95, "dog": .05},
    ("one", "cat"): {"sleeps": 1.0},
    ("one", "cat", "sleeps"): {"weekend": 1.0},
    ("one", "cat", "sleeps", "weekend"): {"endseq": 1.0},
    # the most likely next tokens are pad and <unk>: the decoder must skip them
    ("the", "cat"): {"<pad>": .5, "<unk>": .3, "startseq": .1, "sleeps": .06, "runs": .04},
    ("the", "cat", "sleeps"): {"endseq": 1.0},
}


def table_step(states, last_ids, table=None):
    """step_fn over TABLE; the state is the (N, t) array of tokens so far (startseq first)."""
    table = TABLE if table is None else table
    prefixes = np.concatenate([states, np.asarray(last_ids)[:, None]], axis=1)
    probs = np.full((len(prefixes), len(WORDS)), UNLISTED)
    for row, prefix in enumerate(prefixes):
        key = tuple(WORDS[i] for i in prefix[2:])          # drop the pad seed and startseq
        for word, p in table.get(key, {}).items():
            probs[row, ID[word]] = p
    return np.log(probs / probs.sum(axis=1, keepdims=True)), prefixes


def caption(ids):
    return " ".join(WORDS[i] for i in ids if i != END)


# -- a torch-free writer of legacy checkpoints -------------------------------------------------
class Global:
    """A `module.name` reference written as a GLOBAL opcode, whether or not it is importable."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle only saves callables as reduce functions
        raise AssertionError("never called")


class Call:
    """Pickles as REDUCE: `func(*args)` at load time."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class Storage:
    """A torch storage: persisted by id, its raw bytes written after the pickles."""

    def __init__(self, key, storage_type, values):
        self.key, self.type, self.values = key, storage_type, np.asarray(values)


def tensor(storage, offset, size, stride):
    """What torch.save writes for a tensor: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""
    return Call(Global("torch._utils", "_rebuild_tensor_v2"), storage, offset, tuple(size),
                tuple(stride), False, collections.OrderedDict())


class LegacyPickler(pickle._Pickler):  # the pure-Python pickler lets save() be extended
    def __init__(self, handle, storages):
        super().__init__(handle, protocol=2)
        self.storages = storages

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            return
        super().save(obj, save_persistent_id)

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            self.storages.setdefault(obj.key, obj)
            return ("storage", Global("torch", obj.type), obj.key, "cpu", obj.values.size, None)
        return None


def legacy_bytes(state, magic=LEGACY_MAGIC):
    """The bytes torch.save(state, f, _use_new_zipfile_serialization=False) would write."""
    out, storages = io.BytesIO(), {}
    for header in (magic, LEGACY_PROTOCOL, {"protocol_version": LEGACY_PROTOCOL,
                                            "little_endian": True,
                                            "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        LegacyPickler(out, storages).dump(header)
    LegacyPickler(out, storages).dump(state)
    pickle.dump(list(storages), out, protocol=2)
    for storage in storages.values():
        out.write(struct.pack("<q", storage.values.size))
        out.write(storage.values.tobytes())
    return out.getvalue()


def write_legacy_checkpoint(path, state, **kwargs):
    Path(path).write_bytes(legacy_bytes(state, **kwargs))
    return path


def small_state():
    """Views of one float storage (0..11), a long scalar, and a column of a matrix."""
    floats = Storage("100", "FloatStorage", np.arange(12, dtype="<f4"))
    longs = Storage("200", "LongStorage", np.array([7], dtype="<i8"))
    return collections.OrderedDict([
        ("a.weight", tensor(floats, 0, (3, 4), (4, 1))),
        ("a.transposed", tensor(floats, 0, (4, 3), (1, 4))),
        ("b.bias", tensor(floats, 2, (2,), (3,))),
        ("b.num_batches_tracked", tensor(longs, 0, (), ())),
    ])


# ---- run folders -----------------------------------------------------------------------------
def run_folder_listing(folder):
    """What a reader of the folder sees: names, link targets, sizes (a folder's state)."""
    return sorted((str(p.relative_to(folder)), os.readlink(p) if p.is_symlink() else p.stat().st_size
                   if p.is_file() else "dir") for p in folder.rglob("*"))
