"""Spatial feature files: the last convolutional grid of every image, for attention models.

Owns the HDF5 layout that `extract_features.py --spatial FILE.h5` writes (with h5py):

    /features   float16 (N, H, W, C)  row i is the grid of image ids[i]; one row per chunk
    /ids        UTF-8 strings (N,)    image ids (file names without extension), in row order
    root attributes:
        format_version  rowfile.FORMAT_VERSION
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

Writing (SpatialWriter, a captioning.data.rowfile.RowWriter): rows go to FILE.partial, `count`
moves only at commit() (the pickle's checkpoints), and finish() renames FILE.partial to FILE in
one step, so after a kill the two files resume from the same images.
"""
from pathlib import Path

import numpy as np

from captioning.data.rowfile import RowReader, RowWriter, check_layout, open_h5, to_float16
from captioning.utils import PipelineError

KIND = "spatial features file"
VIEWS = ("features",)
READ_ROWS = 512          # rows per read in SpatialFeatures.rows (bounds the temporary copy)


class SpatialFeatures(RowReader):
    """Read a finished spatial file: `with SpatialFeatures(path) as grids:` then grids.ids,
    grids.grid (H, W), grids.width (C), grids.backbone, grids[image_id] -> float32 (H, W, C),
    grids.rows(ids) -> float32 (n, H, W, C). Rows are read from disk on demand."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise PipelineError(f"spatial features file not found ({self.path})")
        self.handle = open_h5(self.path, "r", KIND)
        self.ids, _ = check_layout(self.handle, self.path, KIND, VIEWS)
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


class SpatialWriter(RowWriter):
    """Append grids to FILE.partial, commit them with the pickle's checkpoints, finish by rename
    (rowfile.RowWriter: done, append, commit, finish, close). A file with another fingerprint
    is refused unless overwrite."""
    kind = KIND

    def __init__(self, path, fingerprint, backbone, layer, overwrite=False):
        self.fingerprint, self.backbone, self.layer = fingerprint, backbone, layer
        super().__init__(path, VIEWS, overwrite)

    def check_source(self, handle, source):
        saved = handle.attrs.get("fingerprint")
        if saved != self.fingerprint:
            raise PipelineError(f"{source} was made with other settings ({saved}); pass "
                                "--overwrite to replace it or choose another --spatial file")

    def header(self):
        return {"backbone": self.backbone, "layer": self.layer, "fingerprint": self.fingerprint}

    def shape_attrs(self, shape):
        return {"grid": list(shape[:2]), "width": int(shape[2])}

    def append(self, grids):
        """Write {image_id: (H, W, C) array} for ids not yet done (kept once commit() runs)."""
        new = self.new(grids)
        if new:
            self.write([i for i, _ in new], [to_float16([g for _, g in new], new[0][0], self.path, "grid")])
