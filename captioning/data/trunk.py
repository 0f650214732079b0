"""Trunk files: the lower part of EfficientNet-Lite for every image, cached for a trainable top.

`extract_features.py --trunk T.h5` runs the stem and the blocks before block K of the encoder
(captioning.encoders.efficientnet_lite.build_split) once per image; a captioner that fine-tunes
the top (blocks K.., the head) reads these maps instead of the photos. Layout (HDF5, h5py):

    /trunk          float16 (N, H, W, C)  row i: the lower part's output for image ids[i]
    /trunk_flipped  float16 (N, H, W, C)  only when `flips`: the same for the image mirrored
                                          left-right (a second view for augmentation)
    /ids            UTF-8 strings (N,)    image ids (file names without extension), row order
    root attributes:
        format_version  FORMAT_VERSION
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

Writing (TrunkWriter) follows captioning.data.spatial's SpatialWriter: rows go to FILE.partial,
`count` moves only at commit() (the extraction's checkpoints), so a killed run resumes from its
last committed row; finish() renames FILE.partial to FILE in one step. Extending a finished
file works on a copy of it. A file made with other settings is refused unless overwrite.
"""
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np

from captioning.utils import PipelineError

FORMAT_VERSION = 1
DTYPE = np.float16
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


def partial_path(path):
    path = Path(path)
    return path.with_name(path.name + ".partial")


def _open_h5(path, mode):
    import h5py
    try:
        return h5py.File(path, mode)
    except OSError as exc:
        raise PipelineError(f"unreadable trunk file ({path}: {str(exc).splitlines()[0]}); "
                            "delete it or pass --overwrite") from None


def _spec_of(handle, path):
    attrs = handle.attrs
    try:
        return TrunkSpec(str(attrs["backbone"]), int(attrs["image_size"]), int(attrs["block"]),
                         str(attrs["fingerprint"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise PipelineError(f"not a trunk file ({path}: attribute {exc!r})") from None


def _check_layout(handle, path):
    """(ids, count) of an open trunk file, after checking its datasets agree."""
    try:
        count, flips = int(handle.attrs["count"]), bool(handle.attrs["flips"])
        if count == 0 and "ids" not in handle:   # created, no batch finished yet
            return [], 0
        ids = [i.decode("utf8") if isinstance(i, bytes) else str(i) for i in handle["ids"][:count]]
        rows = [handle[view].shape[0] for view in VIEWS[:1 + flips]]
    except (KeyError, ValueError, TypeError) as exc:
        raise PipelineError(f"not a trunk file ({path}: {exc!r})") from None
    if handle.attrs.get("format_version") != FORMAT_VERSION or len(ids) != count \
            or min(rows) < count:
        raise PipelineError(f"not a trunk file ({path}: format "
                            f"{handle.attrs.get('format_version')}, {count} rows recorded, "
                            f"{len(ids)} ids, {min(rows)} maps)")
    return ids, count


def check_spec(found, expected, path):
    """One-line PipelineError unless the file's TrunkSpec `found` is `expected`."""
    if found[:3] != tuple(expected[:3]):
        raise PipelineError(f"trunk file {path} was made by {found.describe()}; the model "
                            f"expects {TrunkSpec(*expected).describe()}")
    if found.fingerprint != expected[3]:
        raise PipelineError(f"trunk file {path} was made with other weights or preprocessing "
                            f"({found.fingerprint}); the model expects {expected[3]}")


class TrunkFile:
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
        self.handle = _open_h5(self.path, "r")
        try:
            self.spec = _spec_of(self.handle, self.path)
            if expect is not None:
                check_spec(self.spec, expect, self.path)
            self.ids, _ = _check_layout(self.handle, self.path)
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

    def close(self):
        self.handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TrunkWriter:
    """Append maps to FILE.partial, commit them with the extraction's checkpoints, finish by
    rename. The interface of captioning.data.spatial.SpatialWriter (done, append, commit,
    finish, close), so the same checkpointed extraction loop drives both.

    done: the ids already committed (in FILE.partial, or in a finished FILE with the same
    settings); the caller computes only the others. Nothing is opened for writing until the
    first append, so a run with nothing new leaves a finished FILE untouched.
    """

    def __init__(self, path, spec, flips=False, overwrite=False):
        self.path, self.partial = Path(path), partial_path(path)
        self.spec, self.flips = TrunkSpec(*spec), bool(flips)
        if overwrite and self.partial.exists():
            self.partial.unlink()
        source = self.partial if self.partial.exists() else (
            self.path if self.path.is_file() and not overwrite else None)
        self.ids, self.rows, self.handle = [], 0, None
        if source is not None:
            with _open_h5(source, "r") as handle:
                found = _spec_of(handle, source)
                saved_flips = bool(handle.attrs.get("flips"))
                if found != self.spec or saved_flips != self.flips:
                    raise PipelineError(
                        f"{source} was made with other settings ({found.describe()}, flips "
                        f"{saved_flips}, {found.fingerprint}); pass --overwrite to replace it "
                        "or choose another --trunk file")
                self.ids, self.rows = _check_layout(handle, source)
        self.done = set(self.ids)

    def _open(self):
        """The partial file, open for appending: resumed, copied from FILE, or new."""
        if self.handle is not None:
            return self.handle
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.partial.exists() and self.rows:   # extending a finished FILE: work on a copy
            copy = self.partial.with_name(self.partial.name + ".copy")
            shutil.copyfile(self.path, copy)
            os.replace(copy, self.partial)
        if self.partial.exists():
            self.handle = _open_h5(self.partial, "r+")
        else:
            self.handle = _open_h5(self.partial, "w")
            self.handle.attrs.update(format_version=FORMAT_VERSION, backbone=self.spec.backbone,
                                     image_size=self.spec.image_size, block=self.spec.block,
                                     fingerprint=self.spec.fingerprint, flips=self.flips, count=0)
        return self.handle

    def _datasets(self, shape):
        import h5py
        handle = self._open()
        views = VIEWS[:1 + self.flips]
        if "ids" not in handle:
            for view in views:
                handle.create_dataset(view, shape=(0, *shape), dtype=DTYPE,
                                      maxshape=(None, *shape), chunks=(1, *shape))
            handle.create_dataset("ids", shape=(0,), dtype=h5py.string_dtype("utf-8"),
                                  maxshape=(None,), chunks=(1024,))
            handle.attrs["shape"] = list(shape)
        if handle[views[0]].shape[1:] != tuple(shape):
            raise PipelineError(f"{self.partial} holds maps of shape {handle[views[0]].shape[1:]}, "
                                f"this model makes {tuple(shape)}; pass --overwrite")
        return [handle[view] for view in views], handle["ids"]

    def append(self, maps):
        """Write {image_id: (H, W, C) array, or (2, H, W, C) [plain, flipped] with flips} for ids
        not yet done (kept once commit() runs)."""
        new = [(i, m) for i, m in maps.items() if i not in self.done]
        if not new:
            return
        with np.errstate(over="ignore"):   # too large values become inf: refused below
            stacked = np.stack([m for _, m in new]).astype(DTYPE)
        if self.flips != (stacked.ndim == 5):
            raise PipelineError(f"{self.path}: maps of shape {stacked.shape[1:]} do not match "
                                f"flips={self.flips}")
        if not np.isfinite(stacked).all():
            raise PipelineError(f"trunk values beyond float16's range (+-65504) for {new[0][0]} "
                                f"and others; cannot store them in {self.path}")
        views = [stacked[:, v] for v in range(2)] if self.flips else [stacked]
        datasets, ids = self._datasets(views[0].shape[1:])
        end = self.rows + len(new)
        for dataset, values in zip(datasets, views):
            dataset.resize(end, axis=0)   # rows past `count` left by a killed run are overwritten
            dataset[self.rows:end] = values
        ids.resize(end, axis=0)
        ids[self.rows:end] = [i for i, _ in new]
        self.rows = end
        self.ids.extend(i for i, _ in new)
        self.done.update(i for i, _ in new)

    def commit(self):
        """Make every appended row part of the file (a resumed run keeps them)."""
        if self.handle is not None:
            self.handle.attrs["count"] = self.rows
            self.handle.flush()

    def finish(self):
        """Put the complete file in place (one rename); returns the number of rows. A finished
        FILE with nothing new is left as it is."""
        if self.handle is None and not self.partial.exists():
            if not self.path.is_file():
                raise PipelineError(f"no maps to write to {self.path}")
            return self.rows
        handle = self._open()
        if "ids" in handle:
            for view in VIEWS[:1 + self.flips]:
                handle[view].resize(self.rows, axis=0)
            handle["ids"].resize(self.rows, axis=0)
        self.commit()
        handle.close()
        self.handle = None
        os.replace(self.partial, self.path)
        return self.rows

    def close(self):
        """Close without renaming (after an error or Ctrl-C: the partial file stays for a resume)."""
        if self.handle is not None:
            self.handle.close()
            self.handle = None
