"""Spatial feature files: the last convolutional grid of every image, for attention models.

Owns the HDF5 layout that `extract_features.py --spatial FILE.h5` writes (with h5py):

    /features   float16 (N, H, W, C)  row i is the grid of image ids[i]; one row per chunk
    /ids        UTF-8 strings (N,)    image ids (file names without extension), in row order
    root attributes:
        format_version  FORMAT_VERSION
        backbone        "vgg16" | "lite0"
        layer           the layer the grid is taken from ("block5_conv3" | "head_relu")
        grid            [H, W]: 14x14 for VGG16 block5_conv3, 7x7 for Lite0
        width           C: 512 for VGG16, 1280 for Lite0
        fingerprint     the weights and preprocessing the grids depend on (as in the pooled
                        features' settings.json); a run only resumes a file with the same one
        count           rows that are complete (N in a finished file)

Float16 halves the size (Lite0: 125 KB per image, ~1 GB for Flickr8k's 8091; VGG16: 200 KB,
~1.6 GB); readers get float32. Rows are in the order they were computed (sorted by file name
for an uninterrupted run): look rows up by id, never by position from elsewhere.

Writing (SpatialWriter): rows go to FILE.partial as they are computed, but `count` only moves at
commit(), which extract_features calls whenever it checkpoints its pickle, so after a kill the
two files resume from the same images. finish() renames FILE.partial to FILE in one step:
readers see the old file or the complete new one. Extending a finished file (more images in the
folder) works on a copy of it, so FILE stays valid until the new one replaces it.
"""
import os
import shutil
from pathlib import Path

import numpy as np

from captioning.utils import PipelineError

FORMAT_VERSION = 1
DTYPE = np.float16
READ_ROWS = 512          # rows per read in SpatialFeatures.rows (bounds the temporary copy)


def partial_path(path):
    path = Path(path)
    return path.with_name(path.name + ".partial")


def _open_h5(path, mode):
    import h5py
    try:
        return h5py.File(path, mode)
    except OSError as exc:
        raise PipelineError(f"unreadable spatial features file ({path}: {str(exc).splitlines()[0]}); "
                            "delete it or pass --overwrite") from None


def _check_layout(handle, path):
    """(ids, count) of an open file, after checking its datasets agree; PipelineError if not."""
    try:
        count = int(handle.attrs["count"])
        if count == 0 and "ids" not in handle:   # created, no batch finished yet
            return [], 0
        ids = [i.decode("utf8") if isinstance(i, bytes) else str(i) for i in handle["ids"][:count]]
        rows = handle["features"].shape[0]
    except (KeyError, ValueError, TypeError) as exc:
        raise PipelineError(f"not a spatial features file ({path}: {exc!r})") from None
    if handle.attrs.get("format_version") != FORMAT_VERSION or len(ids) != count or rows < count:
        raise PipelineError(f"not a spatial features file ({path}: format "
                            f"{handle.attrs.get('format_version')}, {count} rows recorded, "
                            f"{len(ids)} ids, {rows} grids)")
    return ids, count


class SpatialFeatures:
    """Read a finished spatial file: `with SpatialFeatures(path) as grids:` then grids.ids,
    grids.grid (H, W), grids.width (C), grids.backbone, grids[image_id] -> float32 (H, W, C),
    grids.rows(ids) -> float32 (n, H, W, C). Rows are read from disk on demand."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise PipelineError(f"spatial features file not found ({self.path})")
        self.handle = _open_h5(self.path, "r")
        self.ids, _ = _check_layout(self.handle, self.path)
        self.index = {image_id: row for row, image_id in enumerate(self.ids)}
        attrs = self.handle.attrs
        self.grid, self.width = tuple(int(v) for v in attrs["grid"]), int(attrs["width"])
        self.backbone, self.layer = str(attrs["backbone"]), str(attrs["layer"])
        self.fingerprint = str(attrs["fingerprint"])

    def __getitem__(self, image_id):
        if image_id not in self.index:
            raise PipelineError(f"image {image_id} not in {self.path}")
        return self.handle["features"][self.index[image_id]].astype(np.float32)

    def rows(self, image_ids, dtype=np.float32):
        """Grids of image_ids -> `dtype` (n, H, W, C) (float16: the stored values, half the
        memory). Read READ_ROWS file rows at a time in file order (h5py reads increasing row
        lists), then put back in the order asked."""
        missing = [i for i in image_ids if i not in self.index]
        if missing:
            raise PipelineError(f"image {missing[0]} not in {self.path}")
        out = np.empty((len(image_ids), *self.grid, self.width), dtype=dtype)
        order = np.argsort([self.index[i] for i in image_ids], kind="stable")
        for lo in range(0, len(order), READ_ROWS):
            chunk = order[lo:lo + READ_ROWS]
            out[chunk] = self.handle["features"][[self.index[image_ids[k]] for k in chunk]]
        return out

    def close(self):
        self.handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SpatialWriter:
    """Append grids to FILE.partial, commit them with the pickle's checkpoints, finish by rename.

    done: the ids whose grids are already committed (in FILE.partial, or in a finished FILE with
    the same fingerprint); the caller computes only what is missing. Nothing is opened for
    writing until the first append, so a run with nothing new leaves a finished FILE untouched.
    """

    def __init__(self, path, fingerprint, backbone, layer, overwrite=False):
        self.path, self.partial = Path(path), partial_path(path)
        self.fingerprint, self.backbone, self.layer = fingerprint, backbone, layer
        if overwrite and self.partial.exists():
            self.partial.unlink()
        source = self.partial if self.partial.exists() else (
            self.path if self.path.is_file() and not overwrite else None)
        self.ids, self.rows, self.handle = [], 0, None
        if source is not None:
            with _open_h5(source, "r") as handle:
                saved = handle.attrs.get("fingerprint")
                if saved != fingerprint:
                    raise PipelineError(f"{source} was made with other settings ({saved}); pass "
                                        "--overwrite to replace it or choose another --spatial file")
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
            self.handle.attrs.update(format_version=FORMAT_VERSION, backbone=self.backbone,
                                     layer=self.layer, fingerprint=self.fingerprint, count=0)
        return self.handle

    def _datasets(self, grid_shape):
        import h5py
        handle = self._open()
        if "features" not in handle:
            handle.create_dataset("features", shape=(0, *grid_shape), dtype=DTYPE,
                                  maxshape=(None, *grid_shape), chunks=(1, *grid_shape))
            handle.create_dataset("ids", shape=(0,), dtype=h5py.string_dtype("utf-8"),
                                  maxshape=(None,), chunks=(1024,))
            handle.attrs.update(grid=list(grid_shape[:2]), width=int(grid_shape[2]))
        features = handle["features"]
        if features.shape[1:] != tuple(grid_shape):
            raise PipelineError(f"{self.partial} holds grids of shape {features.shape[1:]}, this "
                                f"model makes {tuple(grid_shape)}; pass --overwrite")
        return features, handle["ids"]

    def append(self, grids):
        """Write {image_id: (H, W, C) array} for ids not yet done (kept once commit() runs)."""
        new = [(i, g) for i, g in grids.items() if i not in self.done]
        if not new:
            return
        stacked = np.stack([g for _, g in new]).astype(DTYPE)
        if not np.isfinite(stacked).all():
            raise PipelineError(f"grid values beyond float16's range (+-65504) for {new[0][0]} "
                                f"and others; cannot store them in {self.path}")
        features, ids = self._datasets(stacked.shape[1:])
        end = self.rows + len(new)
        features.resize(end, axis=0)   # rows past `count` left by a killed run are overwritten
        ids.resize(end, axis=0)
        features[self.rows:end] = stacked
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
        """Put the complete file in place (one rename); returns the number of rows.

        A finished FILE with nothing new is left as it is; a partial file is trimmed to its
        committed rows, closed, and renamed to FILE.
        """
        if self.handle is None and not self.partial.exists():
            if not self.path.is_file():
                raise PipelineError(f"no grids to write to {self.path}")
            return self.rows
        handle = self._open()
        if "features" in handle:
            handle["features"].resize(self.rows, axis=0)
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
