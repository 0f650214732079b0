"""Resumable HDF5 row files: what the spatial grid files (spatial.py) and the trunk files
(trunk.py) share. One row per image, written so that a kill at any moment loses nothing
committed and never leaves a half-written FILE.

Layout common to both (each module documents its own datasets and attributes):

    /<view>     float16 (N, *shape), one row per chunk (a batch reads only its own rows), for
                each of the file's views ("features"; "trunk" and "trunk_flipped")
    /ids        UTF-8 strings (N,): image ids (file names without extension), in row order
    root attributes: format_version FORMAT_VERSION, count (rows that are complete: N in a
                finished file), and the kind's own (backbone, fingerprint, ...)

Writing (RowWriter): rows go to FILE.partial as they are computed, but `count` only moves at
commit(), which the extraction calls whenever it checkpoints its pickle, so after a kill every
file resumes from the same images. finish() renames FILE.partial to FILE in one step: readers
see the old file or the complete new one. Extending a finished file (more images in the folder)
works on a copy of it, so FILE stays valid until the new one replaces it.
"""
import os
import shutil
from pathlib import Path

import numpy as np

from captioning.utils import PipelineError

FORMAT_VERSION = 1
DTYPE = np.float16


def partial_path(path):
    path = Path(path)
    return path.with_name(path.name + ".partial")


def open_h5(path, mode, kind):
    """h5py.File(path, mode); an unreadable file is a one-line PipelineError naming `kind`."""
    import h5py   # only the grid and trunk paths need h5py: importing the package stays light
    try:
        return h5py.File(path, mode)
    except OSError as exc:
        raise PipelineError(f"unreadable {kind} ({path}: {str(exc).splitlines()[0]}); "
                            "delete it or pass --overwrite") from None


def check_layout(handle, path, kind, views):
    """(ids, count) of an open row file, after checking that /ids and every dataset in `views`
    hold the `count` committed rows; a one-line PipelineError naming `kind` if not."""
    try:
        count = int(handle.attrs["count"])
        if count == 0 and "ids" not in handle:   # created, no batch finished yet
            return [], 0
        ids = [i.decode("utf8") if isinstance(i, bytes) else str(i) for i in handle["ids"][:count]]
        rows = min(handle[view].shape[0] for view in views)
    except (KeyError, ValueError, TypeError) as exc:
        raise PipelineError(f"not a {kind} ({path}: {exc!r})") from None
    if handle.attrs.get("format_version") != FORMAT_VERSION or len(ids) != count or rows < count:
        raise PipelineError(f"not a {kind} ({path}: format {handle.attrs.get('format_version')}, "
                            f"{count} rows recorded, {len(ids)} ids, {rows} rows stored)")
    return ids, count


def to_float16(arrays, first_id, path, what):
    """np.stack(arrays) as float16; values past float16's range are refused (they would be inf)."""
    with np.errstate(over="ignore"):
        stacked = np.stack(arrays).astype(DTYPE)
    if not np.isfinite(stacked).all():
        raise PipelineError(f"{what} values beyond float16's range (+-65504) for {first_id} "
                            f"and others; cannot store them in {path}")
    return stacked


class RowReader:
    """A finished row file open for reading as `self.handle`; closes on leaving a with-block."""

    def close(self):
        self.handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RowWriter:
    """Append rows to FILE.partial, commit them with the extraction's checkpoints, finish by rename.

    A subclass sets `kind` (the file's name in messages) and defines check_source(handle,
    source) (raise unless an existing file was made with the same settings), header() (the
    root attributes of a new file) and shape_attrs(shape) (those written with the first row).
    It sets its own settings before calling RowWriter.__init__, which runs check_source.

    done: the ids already committed (in FILE.partial, or in a finished FILE with the same
    settings); the caller computes only the others. Nothing is opened for writing until the
    first row, so a run with nothing new leaves a finished FILE untouched.
    """
    kind = "row file"

    def __init__(self, path, views, overwrite=False):
        self.path, self.partial, self.views = Path(path), partial_path(path), tuple(views)
        if overwrite and self.partial.exists():
            self.partial.unlink()
        source = self.partial if self.partial.exists() else (
            self.path if self.path.is_file() and not overwrite else None)
        self.ids, self.rows, self.handle = [], 0, None
        if source is not None:
            with open_h5(source, "r", self.kind) as handle:
                self.check_source(handle, source)
                self.ids, self.rows = check_layout(handle, source, self.kind, self.views)
        self.done = set(self.ids)

    def check_source(self, handle, source):
        raise NotImplementedError

    def header(self):
        raise NotImplementedError

    def shape_attrs(self, shape):
        raise NotImplementedError

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
            self.handle = open_h5(self.partial, "r+", self.kind)
        else:
            self.handle = open_h5(self.partial, "w", self.kind)
            self.handle.attrs.update(format_version=FORMAT_VERSION, count=0, **self.header())
        return self.handle

    def _datasets(self, shape):
        import h5py
        handle = self._open()
        if "ids" not in handle:
            for view in self.views:
                handle.create_dataset(view, shape=(0, *shape), dtype=DTYPE,
                                      maxshape=(None, *shape), chunks=(1, *shape))
            handle.create_dataset("ids", shape=(0,), dtype=h5py.string_dtype("utf-8"),
                                  maxshape=(None,), chunks=(1024,))
            handle.attrs.update(self.shape_attrs(shape))
        stored = handle[self.views[0]].shape[1:]
        if stored != tuple(shape):
            raise PipelineError(f"{self.partial} holds rows of shape {stored}, this model makes "
                                f"{tuple(shape)}; pass --overwrite")
        return [handle[view] for view in self.views], handle["ids"]

    def new(self, rows):
        """The (id, value) pairs of the {image_id: value} `rows` not done yet, in their order."""
        return [(i, value) for i, value in rows.items() if i not in self.done]

    def write(self, new_ids, arrays):
        """Append rows: `new_ids` and one float16 (n, *shape) array per view (kept at commit())."""
        datasets, ids = self._datasets(arrays[0].shape[1:])
        end = self.rows + len(new_ids)
        for dataset, values in zip(datasets, arrays):
            dataset.resize(end, axis=0)   # rows past `count` left by a killed run are overwritten
            dataset[self.rows:end] = values
        ids.resize(end, axis=0)
        ids[self.rows:end] = list(new_ids)
        self.rows = end
        self.ids.extend(new_ids)
        self.done.update(new_ids)

    def commit(self):
        """Make every appended row part of the file (a resumed run keeps them)."""
        if self.handle is not None:
            self.handle.attrs["count"] = self.rows
            self.handle.flush()

    def finish(self):
        """Put the complete file in place (one rename); returns the number of rows. A finished
        FILE with nothing new is left as it is; a partial file is trimmed to its committed
        rows, closed, and renamed to FILE."""
        if self.handle is None and not self.partial.exists():
            if not self.path.is_file():
                raise PipelineError(f"nothing to write to {self.path}")
            return self.rows
        handle = self._open()
        if "ids" in handle:
            for view in (*self.views, "ids"):
                handle[view].resize(self.rows, axis=0)
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
