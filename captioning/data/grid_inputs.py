"""Training batches for the grid captioners: each image once, with all of its captions.

Owns how (image row, caption ids) examples become teacher-forcing batches for the models of
captioning.models.grid_models: {"image_input": (M, G, C) float32, "caption_input": (B, T) int32,
"image_index": (B,) int32}, targets (B, T) int32. A batch holds whole images (about
batch_size captions in all), so the grid is projected and encoded once per image; images
are bucketed by their longest caption and every batch is cut to its longest caption.
The grids are not loaded: grid_matrix gives a GridRows over the spatial file of
extract_features.py --spatial (a plain HDF5 file, or the virtual dataset a merge of parts
writes), and each batch reads its own images (float16 as stored, cast to float32 per batch), so
memory does not grow with the dataset (COCO's Lite0 grids are ~15 GB); model_grid_rows
opens it for an already trained model (SCST), checked against its model.json. Nothing is written.
"""
from pathlib import Path

import numpy as np

from captioning.data.inputs import check_missing
from captioning.data.features import is_spatial_file, load_features, memmap_features
from captioning.data.spatial import READ_ROWS, SpatialFeatures
from captioning.data.trunk import TrunkFile
from captioning.utils import PipelineError

BUCKET_POOL = 20      # batches per length-sorted pool: bigger = less padding, less random


class GridRows:
    """The grids of a spatial file, read a batch at a time: rows[list of file rows] -> float16
    (n, G, C) in the order asked (G = H*W cells, row-major). Has shape (N, G, C), dtype and
    nbytes (on disk; never all in memory) like the array it stands for. The file stays open for
    the run; h5py's reads are thread-safe, so tf.data's generator thread and the dev scorer
    share it. Each read takes increasing unique rows (what h5py selects fastest), READ_ROWS at
    a time."""

    def __init__(self, path):
        self.spatial = SpatialFeatures(path)
        height, width = self.spatial.grid
        self.shape = (len(self.spatial.ids), height * width, self.spatial.width)
        self.dtype = np.dtype(np.float16)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, rows):
        if isinstance(rows, slice):
            rows = np.arange(self.shape[0])[rows]
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        unique, inverse = np.unique(rows, return_inverse=True)
        out = np.empty((len(unique), *self.shape[1:]), self.dtype)
        features = self.spatial.handle["features"]
        for lo in range(0, len(unique), READ_ROWS):
            chunk = unique[lo:lo + READ_ROWS]
            out[lo:lo + len(chunk)] = features[chunk].reshape(len(chunk), *self.shape[1:])
        return out[inverse.reshape(-1)]

    def close(self):
        self.spatial.close()


def is_trunk_file(path):
    """True for a trunk file (extract_features.py --trunk: HDF5 with the trunk attributes), which
    holds the lower part's maps, not grids; spatial files and pickles: False."""
    import h5py
    path = Path(path)
    if not path.is_file() or not h5py.is_hdf5(path):
        return False
    with h5py.File(path, "r") as handle:
        return "block" in handle.attrs and "fingerprint" in handle.attrs


def grid_matrix(path, ids, max_missing, variant):
    """Grids of `ids` in a spatial file -> (GridRows, row_of_id = each id's row in the file,
    missing ids, info), info = {"grid": [H, W], "backbone": the file's encoder}.

    Nothing but the ids is read here; batches read their images. A pooled features pickle is a
    one-line error naming the file and its shape, so is a trunk file (it trains a fine-tuned
    top: train.py --finetune-top); missing ids follow data.check_missing's rules.
    """
    if is_trunk_file(path):
        with TrunkFile(path) as trunk:
            made = trunk.spec.describe()
        raise PipelineError(f"trunk file {path} ({made}) given to the {variant} model on frozen "
                            f"grids: give a spatial grid file (extract_features.py --spatial), "
                            f"or train a fine-tuned top on it (train.py --finetune-top)")
    if not is_spatial_file(path):
        table = load_features(path)        # a pooled pickle: say so, with its shape
        width = len(next(iter(table.values()))) if table else 0
        raise PipelineError(f"pooled features {(len(table), width)} given to the {variant} model, "
                            f"which needs spatial grids (N, G, C) from extract_features.py "
                            f"--spatial ({path})")
    grids = GridRows(path)
    index = grids.spatial.index
    found = [i for i in ids if i in index]
    missing = check_missing(ids, found, max_missing, str(path))
    info = {"grid": list(grids.spatial.grid), "backbone": grids.spatial.backbone}
    return grids, {image_id: index[image_id] for image_id in found}, missing, info



def model_grid_rows(path, ids, config, model_dir):
    """Grids of `ids` for a trained grid model -> (GridRows, row_of_id), every id required.

    config: the model's model.json (variant, grid [H, W], feature_dim C). A pooled features
    file (pickle or features.npy), or grids of another H x W or width than the model was
    trained on, is a one-line PipelineError naming the file's shape, the model's and both
    paths; an id missing from the file is data.check_missing's error. A model with a
    fine-tuned encoder top (model.json "encoder_top") is refused: no file holds its grids (its
    top makes them from a trunk file: captioning/training/scst_run.py's tuned_rows).
    """
    variant = config.get("variant")
    if config.get("encoder_top"):      # its grids are top(trunk) of its own top: not in a file
        raise PipelineError(f"the {variant} model ({model_dir}) was trained with a fine-tuned "
                            f"encoder top: its grids are that top's output over a trunk file, "
                            f"not a spatial file's ({path})")
    height, width = (int(s) for s in config["grid"])
    wanted = (height, width, int(config["feature_dim"]))
    needs = f"the {variant} model ({model_dir}), which was trained on grids (N, {', '.join(map(str, wanted))})"
    if not is_spatial_file(path):
        if str(path).endswith(".npy"):
            shape = memmap_features(path)[0].shape
        else:
            table = load_features(path)
            shape = (len(table), len(next(iter(table.values()))) if table else 0)
        raise PipelineError(f"pooled features {tuple(shape)} given to {needs} from "
                            f"extract_features.py --spatial ({path})")
    grids, row_of_id, _, info = grid_matrix(path, ids, 0.0, variant)
    found = (*info["grid"], grids.shape[-1])
    if tuple(found) != wanted:
        grids.close()
        raise PipelineError(f"spatial grids {(len(grids), *found)} given to {needs} ({path})")
    return grids, row_of_id

def group_by_image(examples):
    """[(row, ids)] -> (rows (M,), [[example index, ...] per row]) in first-seen order."""
    groups = {}
    for i, (row, _) in enumerate(examples):
        groups.setdefault(row, []).append(i)
    rows = np.fromiter(groups, dtype=np.int64, count=len(groups))
    return rows, [np.asarray(v) for v in groups.values()]


def plan_image_batches(examples, batch_size, rng=None, pool=BUCKET_POOL):
    """Lists of example indices, each the captions of whole images, about batch_size of them.

    With an rng (training): shuffle the images, sort each pool of about pool*batch_size
    captions' images by their longest caption, cut into batches, shuffle the batch order.
    Without (evaluation): all images sorted by their longest caption.
    """
    _, groups = group_by_image(examples)
    longest = np.array([max(len(examples[i][1]) for i in g) for g in groups])
    sizes = np.array([len(g) for g in groups])
    images_per_batch = max(1, int(round(batch_size / sizes.mean())))
    if rng is None:
        order = np.argsort(longest, kind="stable")
        chunks = [order]
    else:
        order = rng.permutation(len(groups))
        step = images_per_batch * pool
        chunks = [order[s:s + step] for s in range(0, len(order), step)]
        chunks = [c[np.argsort(longest[c], kind="stable")] for c in chunks]
    batches = [np.concatenate([groups[g] for g in chunk[s:s + images_per_batch]])
               for chunk in chunks for s in range(0, len(chunk), images_per_batch)]
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def grid_batch(examples, index, grid):
    """Teacher-forcing batch for example indices `index`: inputs ids[:-1], targets ids[1:]."""
    rows, image_index = np.unique([examples[i][0] for i in index], return_inverse=True)
    width = max(len(examples[i][1]) for i in index) - 1
    tokens = np.zeros((len(index), width), np.int32)
    targets = np.zeros((len(index), width), np.int32)
    for k, i in enumerate(index):
        ids = examples[i][1]
        tokens[k, :len(ids) - 1] = ids[:-1]
        targets[k, :len(ids) - 1] = ids[1:]
    inputs = {"image_input": np.asarray(grid[rows], dtype=np.float32), "caption_input": tokens,
              "image_index": image_index.astype(np.int32)}
    return inputs, targets


def make_grid_dataset(examples, grid, batch_size, seed=None, first_epoch=0):
    """tf.data pipeline over grid_batch; a new shuffle (seed + epoch) every epoch.

    seed None = evaluation order (fixed). Cardinality is set so Keras knows the epoch length.
    A `grid` with epoch_view(seed, epoch) (finetune.TrunkRows of a trunk file with flips) is
    read through that epoch's view in training.
    """
    import tensorflow as tf
    epoch = [first_epoch]

    def plan():
        rng = None if seed is None else np.random.default_rng([seed, epoch[0]])
        epoch[0] += 1
        return plan_image_batches(examples, batch_size, rng)

    def generate():
        # a reader with per-epoch views (a trunk file's flips: finetune.TrunkRows) gives this
        # epoch's; evaluation (seed None) always reads the plain maps
        source = grid.epoch_view(seed, epoch[0]) if seed is not None and hasattr(grid, "epoch_view") else grid
        for index in plan():
            yield grid_batch(examples, index, source)

    n_batches = len(plan())
    epoch[0] = first_epoch
    signature = ({"image_input": tf.TensorSpec((None,) + tuple(grid.shape[1:]), tf.float32),
                  "caption_input": tf.TensorSpec((None, None), tf.int32),
                  "image_index": tf.TensorSpec((None,), tf.int32)},
                 tf.TensorSpec((None, None), tf.int32))
    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(n_batches))
    return dataset.prefetch(2)
