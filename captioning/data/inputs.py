"""Training data: feature matrices, encoded captions, length-bucketed batches, tf.data pipelines.

Owns how prepare_text's outputs and a features dict become what a caption model trains on:
  load_text       meta.json, tokenizer.json, descriptions.txt, splits.json, cross-checked.
  feature_matrix  one float32 (N, D) matrix for a list of image ids (+ row of each id), from a
                  features dict (features.pkl, loaded whole: the course's Flickr8k format).
  pooled_rows     either of the two by the file's suffix (every trainer's entry point).
  mapped_matrix   the same for features.npy (extract_features.py --output X.npy or a merge of
                  parts): the read-only memory map itself, nothing read until a batch takes
                  its rows, so memory does not grow with the dataset.
  encode_split    [(feature row, int32 ids with startseq/endseq)] per caption.
  batches         "sequence" mode: whole captions, input ids[:-1] -> target ids[1:], drawn from
                  length-sorted pools and trimmed to their longest caption (bucketing), so
                  almost no work is spent on padding. "pairs" mode: the tutorial's progressive
                  loading - one photo per batch, all its (prefix -> next word) pairs, prefixes
                  pre-padded to max_length (keras.utils.pad_sequences).
  make_dataset    a tf.data pipeline over those batches, reshuffled per epoch from (seed, epoch).
Reads prepare_text.py's folder (through captioning.data.text) and features.npy with its
<stem>.ids.txt (one id per line, row order; captioning/encoders/shards.py writes both). Batches
index the matrix with lists of rows, which a numpy array and a memory map both take.
Writes nothing.
"""
from pathlib import Path

import numpy as np

from captioning.data import text
from captioning.data.features import load_features, memmap_features
from captioning.utils import PipelineError

BUCKET_POOL = 20   # batches per length-sorted pool: bigger = less padding, less random


def load_text(data_dir):
    """meta, tokenizer, descriptions, splits from prepare_text's folder, cross-checked."""
    data_dir = Path(data_dir)
    meta = text.load_meta(data_dir)  # checks tokenizer.json's sha256 against meta.json
    tokenizer = text.load_tokenizer(data_dir / "tokenizer.json")
    ids = tokenizer["word_index"].values()
    if max(ids) + 1 != meta["vocab_size"]:
        raise PipelineError(f"tokenizer.json has ids up to {max(ids)} but meta.json says "
                            f"vocab_size {meta['vocab_size']} ({data_dir})")
    for key in ("start_token", "end_token"):
        if meta[key] not in tokenizer["word_index"]:
            raise PipelineError(f"{key} {meta[key]!r} of meta.json is not in tokenizer.json ({data_dir})")
    descriptions = text.load_descriptions(data_dir / "descriptions.txt")
    splits = text.load_splits(data_dir)
    return meta, tokenizer, descriptions, splits


def check_missing(ids, present, max_missing, where):
    """The ids without features; PipelineError if none has any, or more than max_missing lack them."""
    found = set(present)
    missing = [i for i in ids if i not in found]
    if not present:
        raise PipelineError(f"features file has none of the {len(ids)} images of the split ({where})")
    if len(missing) > max_missing * len(ids):
        raise PipelineError(f"{len(missing)} of {len(ids)} split images have no features, "
                            f"more than --max-missing {max_missing:g} (first: {missing[0]}) ({where})")
    return missing


def feature_matrix(features, ids, max_missing, where):
    """Stack the features of `ids` into one float32 (N, D) matrix.

    Returns (matrix, row_of_id, missing_ids). A value of another width than the first one
    (ragged file) or not (D,)/(1, D) is a PipelineError; so is a fraction of ids without
    features above `max_missing` (those images are skipped otherwise, and reported).
    """
    present = [i for i in ids if i in features]
    missing = check_missing(ids, present, max_missing, where)
    width = None
    rows = []
    for image_id in present:
        vec = np.asarray(features[image_id])
        if vec.ndim == 2 and vec.shape[0] == 1:
            vec = vec[0]
        if vec.ndim != 1:
            raise PipelineError(f"feature of {image_id} has shape {vec.shape}, expected (D,) or (1, D) ({where})")
        if width is None:
            width = vec.shape[0]
        elif vec.shape[0] != width:
            raise PipelineError(f"ragged features: {image_id} has width {vec.shape[0]}, "
                                f"{present[0]} has {width} ({where})")
        rows.append(vec.astype(np.float32))
    return np.stack(rows), {i: r for r, i in enumerate(present)}, missing


def mapped_matrix(path, ids, max_missing, where):
    """feature_matrix for features.npy: (the memory map, row_of_id = each id's row in the file,
    missing ids). Batches copy out only their own rows."""
    matrix, file_ids = memmap_features(path)
    row_in_file = {image_id: row for row, image_id in enumerate(file_ids)}
    present = [i for i in ids if i in row_in_file]
    missing = check_missing(ids, present, max_missing, where)
    return matrix, {i: row_in_file[i] for i in present}, missing


def pooled_rows(path, ids, max_missing):
    """(float32 (N, D), row_of_id, missing ids) of a pooled features file: features.npy as its
    read-only memory map (mapped_matrix: rows read by the batches that take them, so memory does
    not grow with the dataset), a features pickle loaded whole (feature_matrix)."""
    if Path(path).suffix == ".npy":
        return mapped_matrix(path, ids, max_missing, str(path))
    return feature_matrix(load_features(path), ids, max_missing, str(path))


def encode_split(image_ids, row_of_id, descriptions, tokenizer, max_length):
    """[(feature row, int32 ids incl. sentinels)] for every caption of every image with features.

    Captions longer than max_length (possible on dev/test) are cut to max_length tokens.
    """
    examples = []
    for image_id in image_ids:
        if image_id not in row_of_id:
            continue
        for caption in descriptions.get(image_id, []):
            ids = text.encode_caption(tokenizer, caption)[:max_length]
            examples.append((row_of_id[image_id], np.asarray(ids, dtype=np.int32)))
    return examples


def words_per_row(examples, mode):
    """Mean predicted words per training row: per caption (len - 1) in "sequence" mode, 1 in
    "pairs" mode (a row is one prefix -> next word). The caption loss's constant."""
    if mode == "pairs":
        return 1.0
    return float(np.mean([len(ids) - 1 for _, ids in examples]))


# ---- batches ----------------------------------------------------------------------------------
def plan_batches(lengths, batch_size, rng=None, pool=BUCKET_POOL):
    """Split example indices into batches of similar length (bucketing).

    With an rng (training): shuffle, sort each pool of pool*batch_size examples by length, cut
    into batches, shuffle the batch order. Without (evaluation): sort everything by length.
    """
    lengths = np.asarray(lengths)
    if rng is None:
        order = np.argsort(lengths, kind="stable")
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    order = rng.permutation(len(lengths))
    batches = []
    step = batch_size * pool
    for start in range(0, len(order), step):
        chunk = order[start:start + step]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def sequence_batch(examples, index, features):
    """Teacher-forcing batch trimmed to its longest caption: inputs ids[:-1], targets ids[1:]."""
    from keras.utils import pad_sequences
    captions = [examples[i][1] for i in index]
    tokens = pad_sequences([ids[:-1] for ids in captions], padding="post", dtype="int32")
    targets = pad_sequences([ids[1:] for ids in captions], padding="post", dtype="int32")
    image = np.asarray(features[[examples[i][0] for i in index]], dtype=np.float32)
    return {"image_input": image, "caption_input": tokens}, targets


def pair_batch(examples, index, features, max_length):
    """The tutorial's create_sequences: every (prefix -> next word) pair, prefixes pre-padded."""
    from keras.utils import pad_sequences
    prefixes, targets, rows = [], [], []
    for i in index:
        row, ids = examples[i]
        for t in range(1, len(ids)):
            prefixes.append(ids[:t])
            targets.append(ids[t])
            rows.append(row)
    tokens = pad_sequences(prefixes, maxlen=max_length, dtype="int32")   # pre-padding, as the tutorial
    image = np.asarray(features[np.asarray(rows, dtype=np.int64)], dtype=np.float32)
    return ({"image_input": image, "caption_input": tokens},
            np.asarray(targets, dtype=np.int32))


def photo_batches(examples, rng=None):
    """Pairs mode: one batch per photo (the tutorial's progressive loading), photo order shuffled."""
    by_row = {}
    for i, (row, _) in enumerate(examples):
        by_row.setdefault(row, []).append(i)
    groups = [np.asarray(v) for _, v in sorted(by_row.items())]
    if rng is not None:
        groups = [groups[i] for i in rng.permutation(len(groups))]
    return groups


def make_dataset(examples, features, mode, batch_size, max_length, seed=None, first_epoch=0):
    """tf.data pipeline over Python-built batches; a new shuffle (seed + epoch) every epoch.

    seed None = evaluation order (fixed). Shapes are (None, None) so trimmed batches of any
    length pass; cardinality is set so the Keras progress bar knows the epoch length.
    """
    import tensorflow as tf
    feature_dim = features.shape[1]
    epoch = [first_epoch]

    def plan():
        rng = None if seed is None else np.random.default_rng([seed, epoch[0]])
        epoch[0] += 1
        if mode == "pairs":
            return photo_batches(examples, rng)
        return plan_batches([len(ids) for _, ids in examples], batch_size, rng)

    def generate():
        for index in plan():
            if mode == "pairs":
                yield pair_batch(examples, index, features, max_length)
            else:
                yield sequence_batch(examples, index, features)

    n_batches = len(plan())
    epoch[0] = first_epoch
    target_shape = (None,) if mode == "pairs" else (None, None)
    signature = ({"image_input": tf.TensorSpec((None, feature_dim), tf.float32),
                  "caption_input": tf.TensorSpec((None, None), tf.int32)},
                 tf.TensorSpec(target_shape, tf.int32))
    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(n_batches))
    return dataset.prefetch(2)
