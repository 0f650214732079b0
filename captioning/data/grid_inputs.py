"""Training batches for the grid captioners: each image once, with all of its captions.

Owns how (image row, caption ids) examples become teacher-forcing batches for the models of
captioning.models.grid_models: {"image_input": (M, G, C) float32, "caption_input": (B, T) int32,
"image_index": (B,) int32}, targets (B, T) int32. A batch holds whole images (about
batch_size captions in all), so the grid is projected and encoded once per image; images
are bucketed by their longest caption and every batch is cut to its longest caption.
The grid matrix stays in its file's dtype (float16 for ~1 GB of Lite0 grids) and only each
batch's images are cast to float32. grid_matrix reads the spatial file of
extract_features.py --spatial (through captioning.data.features); nothing is written.
"""
import numpy as np

from captioning.data.inputs import check_missing
from captioning.data.features import is_spatial_file, load_features, read_grids
from captioning.utils import PipelineError

BUCKET_POOL = 20      # batches per length-sorted pool: bigger = less padding, less random


def grid_matrix(path, ids, max_missing, variant):
    """Grids of `ids` from a spatial file -> (float16 (N, G, C), row_of_id, missing ids, info),
    info = {"grid": [H, W], "backbone": the file's encoder}.

    float16 as stored: Lite0's 7x7x1280 grids of Flickr8k's 7000 train+dev images are 0.9 GB so,
    1.8 GB as float32; batches cast their own images. A pooled features pickle is a one-line
    error naming the file and its shape; missing ids follow data.check_missing's rules.
    """
    if not is_spatial_file(path):
        table = load_features(path)        # a pooled pickle: say so, with its shape
        width = len(next(iter(table.values()))) if table else 0
        raise PipelineError(f"pooled features {(len(table), width)} given to the {variant} model, "
                            f"which needs spatial grids (N, G, C) from extract_features.py "
                            f"--spatial ({path})")
    found, matrix, info = read_grids(path, ids, dtype=np.float16)
    missing = check_missing(ids, found, max_missing, str(path))
    return matrix, {image_id: row for row, image_id in enumerate(found)}, missing, info


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
    """
    import tensorflow as tf
    epoch = [first_epoch]

    def plan():
        rng = None if seed is None else np.random.default_rng([seed, epoch[0]])
        epoch[0] += 1
        return plan_image_batches(examples, batch_size, rng)

    def generate():
        for index in plan():
            yield grid_batch(examples, index, grid)

    n_batches = len(plan())
    epoch[0] = first_epoch
    signature = ({"image_input": tf.TensorSpec((None,) + tuple(grid.shape[1:]), tf.float32),
                  "caption_input": tf.TensorSpec((None, None), tf.int32),
                  "image_index": tf.TensorSpec((None,), tf.int32)},
                 tf.TensorSpec((None, None), tf.int32))
    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(n_batches))
    return dataset.prefetch(2)
