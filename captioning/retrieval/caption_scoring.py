"""A trained captioner as a ranker: score (image, sentence) by the caption's log-likelihood.

Owns: load_captioner (a train.py run folder as a ranker, with its own tokenizer),
caption_scores (every image x every caption; fast for merge models), pair_scores (chosen
(image, caption) pairs, e.g. the embedding's top K of each caption for re-ranking) and
caption_scores_keras (any captioner, slow; the independent reference the tests compare
against). Only load_captioner reads files (the run folder and its tokenizer); the scorers take
the model and model.json config it returns (the layer names of captioning.models.registry:
image_dense, embedding, lstm, decoder_dense, output).

score(image, caption) = (1 / n) * sum_{t=1..n} log p(w_t | w_0..w_{t-1}, image), where w_0 is
startseq and w_1..w_n are the caption's words followed by endseq (n = words + 1): the
length-normalised log-likelihood, so long captions are not ranked last just for being long.

Why merge models are fast: in the merge model the image joins AFTER the LSTM
(softmax(out(relu(dec(h_t + img))))), so the LSTM states h_t of a caption are the same for
every image. They are computed once per caption; each (image, caption) pair then costs only
the two Dense layers and the softmax per word, batched as (images x captions x steps) tensors
in keras.ops (on a GPU when TensorFlow has one). Init-inject models put the image into the
LSTM's initial state, so they take the slow path: the whole Keras model per pair.
"""
from pathlib import Path

import numpy as np

from captioning.data.text import load_tokenizer
from captioning.models.registry import load_run, rebuild_for_mode
from captioning.utils import PipelineError, progress as progress_bar

PAIR_BUDGET = 2 ** 24   # floats of the (images x captions x steps x vocab) block, ~64 MB
CAPTION_CHUNK = 256     # captions per block (sorted by length, so a block is padded little)


def load_captioner(captioner_dir, width, backbone=None):
    """(keras model, model.json, tokenizer) of a train.py run folder whose features are `width`-d
    and, where both record one, made by `backbone` (the retrieval model's: Lite0 and Lite2
    vectors are both 1280 wide). Its tokenizer: tokenizer.json beside the model (a shipped
    model), else its data_dir's."""
    beside = Path(captioner_dir) / "tokenizer.json"
    tokenizer_path = beside if beside.is_file() else None
    model, config = load_run(captioner_dir, tokenizer_path)   # checks its tokenizer's sha256
    if config["feature_dim"] != width:
        raise PipelineError(f"captioner {captioner_dir} was trained on {config['feature_dim']}-d "
                            f"features, these are {width}-d")
    own = config.get("backbone")
    if own and backbone and "unknown" not in (own, backbone) and own != backbone:
        raise PipelineError(f"captioner {captioner_dir} was trained on {own} features but the "
                            f"retrieval model on {backbone} features")
    tokenizer = load_tokenizer(tokenizer_path or Path(config["data_dir"]) / "tokenizer.json")
    return model, config, tokenizer


def _targets(token_lists):
    """(inputs (M, T) = ids[:-1], targets (M, T) = ids[1:], lengths (M,)); 0 = padding."""
    width = max(len(ids) for ids in token_lists) - 1
    inputs = np.zeros((len(token_lists), width), np.int32)
    targets = np.zeros((len(token_lists), width), np.int32)
    for row, ids in enumerate(token_lists):
        if len(ids) < 2:
            raise PipelineError(f"caption {row} has {len(ids)} tokens; it needs startseq and at least endseq")
        inputs[row, :len(ids) - 1] = ids[:-1]
        targets[row, :len(ids) - 1] = ids[1:]
    return inputs, targets, np.array([len(ids) - 1 for ids in token_lists], np.float32)


def caption_scores(model, config, features, token_lists, pair_budget=PAIR_BUDGET,
                   caption_chunk=CAPTION_CHUNK, progress=False):
    """(images, captions) float32 matrix of length-normalised log-likelihoods (merge models).

    features (N, D); token_lists: M id lists, each [startseq, ..., endseq]. Other variants fall
    back to caption_scores_keras.
    """
    import keras
    from keras import ops
    if config.get("mode", "sequence") != "sequence":
        model = rebuild_for_mode(model, config, "sequence")   # same weights, every step out
    if config.get("variant", "merge") != "merge":
        return caption_scores_keras(model, features, token_lists)
    features = np.asarray(features, np.float32)
    lstm_states = keras.Model(model.get_layer("caption_input").output, model.get_layer("lstm").output)
    images = np.asarray(model.get_layer("image_dense")(features, training=False))   # (N, U)
    dec_w, dec_b = model.get_layer("decoder_dense").get_weights()
    out_w, out_b = model.get_layer("output").get_weights()
    decoder_activation = keras.activations.get(model.get_layer("decoder_dense").get_config()["activation"])
    vocab = out_w.shape[1]

    scores = np.zeros((len(features), len(token_lists)), np.float32)
    order = np.argsort([len(ids) for ids in token_lists], kind="stable")
    chunks = [order[lo:lo + caption_chunk] for lo in range(0, len(order), caption_chunk)]
    if progress:
        chunks = progress_bar(chunks, desc="captioner scores", unit="chunk")   # only on a terminal
    for rows in chunks:
        inputs, targets, lengths = _targets([token_lists[i] for i in rows])
        hidden = np.asarray(lstm_states(inputs, training=False))             # (c, T, U)
        mask = (targets > 0).astype(np.float32)
        c, width = targets.shape
        step = max(1, pair_budget // (c * width * vocab))                     # images per block
        for lo in range(0, len(images), step):
            img = images[lo:lo + step]                                        # (m, U)
            x = ops.convert_to_tensor(hidden)[None] + ops.convert_to_tensor(img)[:, None, None]
            x = decoder_activation(ops.matmul(x, dec_w) + dec_b)
            log_p = ops.log_softmax(ops.matmul(x, out_w) + out_b, axis=-1)   # (m, c, T, V)
            picked = ops.take_along_axis(
                log_p, ops.broadcast_to(ops.convert_to_tensor(targets)[None, :, :, None],
                                        (len(img), c, width, 1)), axis=-1)[..., 0]
            total = ops.sum(picked * mask[None], axis=-1)                     # (m, c)
            scores[lo:lo + len(img), rows] = ops.convert_to_numpy(total) / lengths[None]
    return scores


def pair_scores(model, config, features, token_lists, image_rows, caption_rows,
                pair_budget=PAIR_BUDGET, caption_chunk=CAPTION_CHUNK, progress=False):
    """float32 (P,): the score of each pair (features[image_rows[p]], token_lists[caption_rows[p]]).

    The same numbers as caption_scores at those entries, at the cost of the pairs asked for
    only: re-ranking each caption's top 20 of Flickr8k's 1000 test images scores 2% of the
    full matrix. Merge models share each caption's LSTM states among its pairs; other variants
    run the whole Keras model per pair.
    """
    import keras
    from keras import ops
    image_rows = np.asarray(image_rows, np.int64)
    caption_rows = np.asarray(caption_rows, np.int64)
    if image_rows.shape != caption_rows.shape or image_rows.ndim != 1:
        raise ValueError("image_rows and caption_rows must be 1-d and of one length")
    out = np.zeros(len(image_rows), np.float32)
    if not len(out):
        return out
    if config.get("mode", "sequence") != "sequence":
        model = rebuild_for_mode(model, config, "sequence")
    features = np.asarray(features, np.float32)
    if config.get("variant", "merge") != "merge":
        inputs, targets, lengths = _targets(token_lists)
        return _keras_pairs(model, features, inputs, targets, lengths, image_rows, caption_rows)
    lstm_states = keras.Model(model.get_layer("caption_input").output, model.get_layer("lstm").output)
    dec_w, dec_b = model.get_layer("decoder_dense").get_weights()
    out_w, out_b = model.get_layer("output").get_weights()
    decoder_activation = keras.activations.get(model.get_layer("decoder_dense").get_config()["activation"])
    vocab = out_w.shape[1]
    wanted = np.unique(caption_rows)
    order = wanted[np.argsort([len(token_lists[i]) for i in wanted], kind="stable")]
    chunks = [order[lo:lo + caption_chunk] for lo in range(0, len(order), caption_chunk)]
    if progress:
        chunks = progress_bar(chunks, desc="re-rank scores", unit="chunk")   # only on a terminal
    by_caption = np.argsort(caption_rows, kind="stable")
    sorted_captions = caption_rows[by_caption]
    for rows in chunks:
        inputs, targets, lengths = _targets([token_lists[i] for i in rows])
        hidden = np.asarray(lstm_states(inputs, training=False))             # (c, T, U)
        local = {int(r): k for k, r in enumerate(rows)}
        # the pairs of this chunk's captions
        lo = np.searchsorted(sorted_captions, rows, side="left")
        hi = np.searchsorted(sorted_captions, rows, side="right")
        pairs = np.concatenate([by_caption[a:b] for a, b in zip(lo, hi)])
        cap_local = np.array([local[int(r)] for r in caption_rows[pairs]], np.int64)
        width = targets.shape[1]
        step = max(1, pair_budget // (width * vocab))                         # pairs per block
        for start in range(0, len(pairs), step):
            block, caps = pairs[start:start + step], cap_local[start:start + step]
            img = np.asarray(model.get_layer("image_dense")(features[image_rows[block]], training=False))
            x = decoder_activation(ops.matmul(ops.convert_to_tensor(hidden[caps]) + img[:, None], dec_w) + dec_b)
            log_p = ops.log_softmax(ops.matmul(x, out_w) + out_b, axis=-1)    # (b, T, V)
            picked = ops.take_along_axis(log_p, ops.convert_to_tensor(targets[caps])[..., None], axis=-1)[..., 0]
            total = ops.sum(picked * (targets[caps] > 0).astype(np.float32), axis=-1)
            out[block] = ops.convert_to_numpy(total) / lengths[caps]
    return out


def _keras_pairs(model, features, inputs, targets, lengths, image_rows, caption_rows, batch=256):
    """Scores (P,) of pairs through the whole sequence-mode Keras model, `batch` pairs per call."""
    out = np.zeros(len(image_rows), np.float32)
    for lo in range(0, len(image_rows), batch):
        img_rows, cap_rows = image_rows[lo:lo + batch], caption_rows[lo:lo + batch]
        probs = np.asarray(model({"image_input": features[img_rows], "caption_input": inputs[cap_rows]},
                                 training=False), dtype=np.float64)         # (b, T, V)
        if probs.ndim != 3:
            raise PipelineError("caption_scores_keras needs a sequence-mode captioner (output (B, T, V))")
        picked = np.take_along_axis(probs, targets[cap_rows][..., None], axis=-1)[..., 0]
        log_p = np.where(targets[cap_rows] > 0, np.log(np.maximum(picked, 1e-30)), 0.0)
        out[lo:lo + batch] = log_p.sum(axis=1) / lengths[cap_rows]
    return out


def caption_scores_keras(model, features, token_lists, batch=256):
    """The same scores from the whole Keras model, one (image, caption) pair per row.

    Works for every variant in mode "sequence" (caption_scores rebuilds a pairs-mode model
    first); costs a full forward pass per pair.
    """
    features = np.asarray(features, np.float32)
    inputs, targets, lengths = _targets(token_lists)
    img_rows, cap_rows = (x.ravel() for x in np.meshgrid(np.arange(len(features)),
                                                          np.arange(len(token_lists)), indexing="ij"))
    scores = _keras_pairs(model, features, inputs, targets, lengths, img_rows, cap_rows, batch)
    return scores.reshape(len(features), len(token_lists))
