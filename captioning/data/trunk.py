"""Trunk files: the lower part of EfficientNet-Lite for every image, cached for a trainable top.

`extract_features.py --trunk T.h5` runs the stem and the blocks before block K of the encoder
(captioning.encoders.efficientnet_lite.build_split) once per image; a captioner that fine-tunes
the top (blocks K.., the head) reads these maps instead of the photos. Layout (HDF5, h5py):

    /trunk          float16 (N, H, W, C)  row i: the lower part's output for image ids[i]
    /trunk_flipped  float16 (N, H, W, C)  only when `flips`: the same for the image mirrored
                                          left-right (a second view for augmentation)
    /ids            UTF-8 strings (N,)    image ids (file names without extension), row order
    root attributes:
        format_version  rowfile.FORMAT_VERSION
        backbone        "lite0"
        image_size      the network's input side in pixels (224 for Lite0)
        block           K: the top starts at this block (EncoderSplit.block)
        shape           [H, W, C] of one map (Lite0 at 224 px, K = 15: 7x7x192)
        fingerprint     the weights and preprocessing the maps depend on
                        (captioning.encoders.extract.features_fingerprint)
        flips           whether /trunk_flipped exists
        count           rows that are complete (N in a finished file)

Every dataset is chunked one row per chunk, so a batch reads only its own rows. Float16: Lite0
at K = 15 is 18.4 KiB an image (146 MiB for Flickr8k's 8091), at K = 11 (14x14x112) 42.9 KiB
(339 MiB); flips double it. Readers get float32 unless they ask for float16.

Writing (TrunkWriter, a captioning.data.rowfile.RowWriter): rows go to FILE.partial, `count`
moves only at commit() (the extraction's checkpoints), so a killed run resumes from its last
committed row; finish() renames FILE.partial to FILE in one step. A file made with other
settings is refused unless overwrite.
"""
from pathlib import Path
from typing import NamedTuple

import numpy as np

from captioning.data.rowfile import RowReader, RowWriter, check_layout, open_h5, to_float16
from captioning.utils import PipelineError

KIND = "trunk file"
READ_ROWS = 512          # rows per read in TrunkFile.rows (bounds the temporary copy)
VIEWS = ("trunk", "trunk_flipped")


class TrunkSpec(NamedTuple):
    """What a trunk's maps depend on; a reader and a resumed run compare all four."""
    backbone: str
    image_size: int
    block: int
    fingerprint: str

    def describe(self):
        return f"{self.backbone} at {self.image_size} px, block {self.block}"


def _spec_of(handle, path):
    attrs = handle.attrs
    try:
        return TrunkSpec(str(attrs["backbone"]), int(attrs["image_size"]), int(attrs["block"]),
                         str(attrs["fingerprint"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise PipelineError(f"not a trunk file ({path}: attribute {exc!r})") from None


def _views(handle):
    """The datasets a trunk file holds: the plain view, and the mirrored one with flips."""
    return VIEWS[:1 + bool(handle.attrs.get("flips"))]


def check_spec(found, expected, path):
    """One-line PipelineError unless the file's TrunkSpec `found` is `expected`."""
    if found[:3] != tuple(expected[:3]):
        raise PipelineError(f"trunk file {path} was made by {found.describe()}; the model "
                            f"expects {TrunkSpec(*expected).describe()}")
    if found.fingerprint != expected[3]:
        raise PipelineError(f"trunk file {path} was made with other weights or preprocessing "
                            f"({found.fingerprint}); the model expects {expected[3]}")


class TrunkFile(RowReader):
    """Read a finished trunk file: `with TrunkFile(path, expect=spec) as trunk:` then trunk.ids,
    trunk.spec, trunk.shape (H, W, C), trunk.flips, trunk[image_id] -> float32 (H, W, C),
    trunk.rows(ids, flipped) -> (n, H, W, C). Rows are read from disk on demand (one row per
    chunk), so a training run streams batches without loading the file.

    expect: a TrunkSpec (or 4-tuple) the file must match (check_spec), or None to accept any.
    """

    def __init__(self, path, expect=None):
        self.path = Path(path)
        if not self.path.is_file():
            raise PipelineError(f"trunk file not found ({self.path})")
        self.handle = open_h5(self.path, "r", KIND)
        try:
            self.spec = _spec_of(self.handle, self.path)
            if expect is not None:
                check_spec(self.spec, expect, self.path)
            self.ids, _ = check_layout(self.handle, self.path, KIND, _views(self.handle))
        except PipelineError:
            self.handle.close()
            raise
        self.index = {image_id: row for row, image_id in enumerate(self.ids)}
        self.flips = bool(self.handle.attrs["flips"])
        self.shape = tuple(int(v) for v in self.handle.attrs["shape"])

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, image_id):
        return self.rows([image_id])[0]

    def rows(self, image_ids, flipped=False, dtype=np.float32):
        """Maps of image_ids -> `dtype` (n, H, W, C) in the order asked. flipped: one bool for
        all, or one per id (a random mix of views is the usual augmentation); True needs a
        file written with flips. Read READ_ROWS rows at a time in file order (what h5py
        selects fastest)."""
        missing = [i for i in image_ids if i not in self.index]
        if missing:
            raise PipelineError(f"image {missing[0]} not in {self.path}")
        views = np.broadcast_to(np.asarray(flipped, dtype=bool), (len(image_ids),))
        if views.any() and not self.flips:
            raise PipelineError(f"trunk file {self.path} has no flipped view (extract it with "
                                "--flips)")
        out = np.empty((len(image_ids), *self.shape), dtype=dtype)
        file_rows = np.array([self.index[i] for i in image_ids], dtype=np.int64)
        for view in (False, True):
            wanted = np.flatnonzero(views == view)
            order = wanted[np.argsort(file_rows[wanted], kind="stable")]
            for lo in range(0, len(order), READ_ROWS):
                chunk = order[lo:lo + READ_ROWS]   # h5py reads unique increasing rows
                unique, inverse = np.unique(file_rows[chunk], return_inverse=True)
                out[chunk] = self.handle[VIEWS[view]][list(unique)][inverse]
        return out


class TrunkWriter(RowWriter):
    """Append maps to FILE.partial, commit them with the extraction's checkpoints, finish by
    rename: rowfile.RowWriter's interface (done, append, commit, finish, close), as
    captioning.data.spatial.SpatialWriter, so the same checkpointed extraction loop drives both.
    A file with another TrunkSpec or flips setting is refused unless overwrite."""
    kind = KIND

    def __init__(self, path, spec, flips=False, overwrite=False):
        self.spec, self.flips = TrunkSpec(*spec), bool(flips)
        super().__init__(path, VIEWS[:1 + self.flips], overwrite)

    def check_source(self, handle, source):
        found = _spec_of(handle, source)
        saved_flips = bool(handle.attrs.get("flips"))
        if found != self.spec or saved_flips != self.flips:
            raise PipelineError(
                f"{source} was made with other settings ({found.describe()}, flips "
                f"{saved_flips}, {found.fingerprint}); pass --overwrite to replace it "
                "or choose another --trunk file")

    def header(self):
        return {"backbone": self.spec.backbone, "image_size": self.spec.image_size,
                "block": self.spec.block, "fingerprint": self.spec.fingerprint, "flips": self.flips}

    def shape_attrs(self, shape):
        return {"shape": list(shape)}

    def append(self, maps):
        """Write {image_id: (H, W, C) array, or (2, H, W, C) [plain, flipped] with flips} for ids
        not yet done (kept once commit() runs)."""
        new = self.new(maps)
        if not new:
            return
        stacked = to_float16([m for _, m in new], new[0][0], self.path, "trunk")
        if self.flips != (stacked.ndim == 5):
            raise PipelineError(f"{self.path}: maps of shape {stacked.shape[1:]} do not match "
                                f"flips={self.flips}")
        self.write([i for i, _ in new], [stacked[:, v] for v in range(2)] if self.flips else [stacked])
