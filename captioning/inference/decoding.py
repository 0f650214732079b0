"""Decoding: greedy and beam search over one step interface, the step of every variant, the course's loop.

Owns
  the step interface   step_fn(states, last_ids) -> (log_probs (N, V), new_states): the
                       next-word log-probabilities of N partial captions. `states` is a tuple of
                       numpy arrays whose first axis is the caption (beam search reorders them by
                       fancy indexing); init_fn(features (N, ...)) -> the states before startseq.
  STEP_BUILDERS        {variant: builder(model, config) -> (init_fn, step_fn)}; make_step_fn picks
                       one. A new variant registers its builder here (and its model builder in
                       models.VARIANTS).
  greedy_decode, beam_search, decode, caption_features (a feature matrix -> id lists, batched),
  tutorial_greedy (the course's re-run-the-prefix loop: the reference the fast path must equal),
  vocabulary / ids_to_words (ids <-> caption words).
Reads and writes no files. Imports captioning.utils, features (the input check) and grid_models
(the attention/transformer steps); TensorFlow is imported inside the step builders (heavy). Step builders find a model's layers by the names models.py gives them.

Rules shared by every decoder (decode picks greedy for beam 1, whatever alpha is). `max_length` is meta.json's: the most tokens in a caption
COUNTING startseq and endseq, so at most max_length - 1 tokens are generated after startseq. The
pad id, the OOV id and the start id are never generated (banned_ids). Greedy = the course's
loop: the most probable next word until endseq. Beam K keeps the K best partial captions per
image (by summed log-probability); a caption ending in endseq is finished when it ranks in the
image's top K; the result is the best finished caption by sum_logp / length**alpha (length =
generated tokens incl. endseq; alpha 0 = no normalisation), or the best unfinished one if none
finished by max_length. beam 1 with alpha 0 == greedy.

The merge/inject step (lstm_steps) is not a copy of the network's maths: it calls the trained
model's own layers (image_dense, embedding, the LSTM's cell, add, decoder_dense, output) on one
time step, compiled once with tf.function, and carries the LSTM state (h, c) between steps
instead of re-running the whole prefix. The tests check it against the Keras model run on whole
captions and against tutorial_greedy.
"""
import numpy as np

from captioning.models import grid_models
from captioning.data.features import check_features
from captioning.utils import PipelineError, progress as progress_bar

BEAM = 1             # 1 = greedy (the course's decoding)
ALPHA = 0.7          # beam length normalisation for beam >= 2: score = log p / length**ALPHA
                     # (0 = none); 0.7 was best on the dev split (README, Results)
BATCH_IMAGES = 1000  # images decoded together (memory: beam * batch * vocab floats per step)


# ---- decoding over a step function ------------------------------------------------------------
def take_states(states, index):
    """Select/reorder rows of every state array (the first axis is the partial caption)."""
    if isinstance(states, dict):
        return {key: np.asarray(value)[index] for key, value in states.items()}
    if isinstance(states, (tuple, list)):
        return type(states)(np.asarray(value)[index] for value in states)
    return np.asarray(states)[index]


def _rows(states):
    """Number of partial captions in `states` (the first axis of its first array)."""
    if isinstance(states, dict):
        states = next(iter(states.values()))
    elif isinstance(states, (tuple, list)):
        states = states[0]
    return len(np.asarray(states))


def _masked(log_probs, banned_ids):
    """Copy of log_probs (float64) with banned token ids at -inf so they are never chosen."""
    out = np.array(log_probs, dtype=np.float64)
    if len(banned_ids):
        out[:, list(banned_ids)] = -np.inf
    return out


def greedy_decode(step_fn, states, start_id, end_id, max_length, banned_ids=()):
    """Greedy decoding of N captions at once. Returns N lists of generated ids.

    Each list holds the tokens after startseq, ending with end_id if the caption finished;
    at most max_length - 1 tokens. Rows whose caption has ended drop out of later steps.
    """
    n = _rows(states)
    out = [[] for _ in range(n)]
    active = np.arange(n)
    last = np.full(n, start_id, dtype=np.int64)
    for _ in range(max_length - 1):
        if not len(active):
            break
        log_probs, states = step_fn(states, last)
        words = np.argmax(_masked(log_probs, banned_ids), axis=1)
        for row, word in zip(active, words):
            out[row].append(int(word))
        keep = np.flatnonzero(words != end_id)
        active, last = active[keep], words[keep]
        if len(keep) < len(words):
            states = take_states(states, keep)
    return out


def beam_search(step_fn, states, start_id, end_id, max_length, beam=3, alpha=0.0,
                banned_ids=()):
    """Beam search for N captions at once (all images' beams in one step call).

    Returns N lists of generated ids (as greedy_decode). See the module docstring for the
    rules; beam=1 and alpha=0 give exactly greedy_decode's result.
    """
    if beam < 1:
        raise PipelineError(f"beam must be >= 1 (got {beam})")
    n = _rows(states)
    max_new = max_length - 1
    best = [None] * n                          # best finished caption per image (ids)
    best_score = np.full(n, -np.inf)           # its normalised score
    active = np.arange(n)                      # images still searching
    rows_per = 1                               # live partial captions per active image
    scores = np.zeros((n, 1))                  # summed log-probs of the live captions
    tokens = np.zeros((n, 1, 0), dtype=np.int64)
    last = np.full(n, start_id, dtype=np.int64)
    for t in range(1, max_new + 1):            # t = number of tokens after generating this one
        log_probs, states = step_fn(states, last)
        vocab = log_probs.shape[1]
        total = scores[:, :, None] + _masked(log_probs, banned_ids).reshape(len(active), rows_per, vocab)
        flat = total.reshape(len(active), rows_per * vocab)
        k = min(beam, flat.shape[1])
        top = np.argpartition(-flat, k - 1, axis=1)[:, :k]        # each image's top k
        # finished: an endseq extension that ranks in its image's top k
        is_end = (top % vocab) == end_id
        norm = 1.0 if alpha == 0 else t ** alpha
        for i, j in zip(*np.nonzero(is_end)):
            score = flat[i, top[i, j]] / norm
            image = active[i]
            if score > best_score[image]:
                best_score[image] = score
                best[image] = list(tokens[i, top[i, j] // vocab]) + [end_id]
        # live: the top k non-end extensions, best first
        live_flat = flat.copy()
        live_flat[:, end_id::vocab] = -np.inf
        live = np.argpartition(-live_flat, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(live_flat, live, axis=1), axis=1, kind="stable")
        live = np.take_along_axis(live, order, axis=1)
        new_scores = np.take_along_axis(live_flat, live, axis=1)
        parent, word = live // vocab, live % vocab
        # an image is done when no live caption can still beat its best finished one: scores
        # only fall, and the most a longer caption's normalisation can divide by is max_new**alpha
        bound = new_scores[:, 0] / (1.0 if alpha == 0 else max_new ** alpha)
        done = (bound <= best_score[active]) | ~np.isfinite(new_scores[:, 0])
        if t == max_new:
            done[:] = True
        for i in np.flatnonzero(done):
            image = active[i]
            if best[image] is None and np.isfinite(new_scores[i, 0]):   # never finished: truncated
                best[image] = list(tokens[i, parent[i, 0]]) + [int(word[i, 0])]
        keep = np.flatnonzero(~done)
        if not len(keep):
            break
        source_rows = (keep[:, None] * rows_per + parent[keep]).reshape(-1)
        states = take_states(states, source_rows)
        tokens = np.concatenate([tokens[keep[:, None], parent[keep]], word[keep][:, :, None]], axis=2)
        scores = new_scores[keep]
        last = word[keep].reshape(-1)
        active = active[keep]
        rows_per = k
    return [[int(x) for x in b] if b is not None else [] for b in best]


def decode(step_fn, states, start_id, end_id, max_length, beam=1, alpha=0.0, banned_ids=()):
    """greedy_decode for beam 1 (whatever alpha is: greedy means the course's argmax loop),
    beam_search with length normalisation alpha for beam >= 2."""
    if beam == 1:
        return greedy_decode(step_fn, states, start_id, end_id, max_length, banned_ids)
    return beam_search(step_fn, states, start_id, end_id, max_length, beam, alpha, banned_ids)


# ---- step functions of the trained networks ---------------------------------------------------
def lstm_steps(model, config):
    """(init_fn, step_fn) of a merge or inject model (models.build_merge / build_inject).

    Both run the model's own layers on one time step (see the module docstring):
      init   image = image_dense(features); merge: h = c = 0 and image is kept for `add`;
             inject: h = c = image (the LSTM's initial state).
      step   h, c = lstm.cell(embedding(last_ids), (h, c));
             log p = log(output(decoder_dense(add([image, h]) if merge else h))).
    Dropout layers are left out: decoding is inference.
    """
    import tensorflow as tf
    get = model.get_layer
    image_dense, embedding, cell = get("image_dense"), get("embedding"), get("lstm").cell
    decoder_dense, output = get("decoder_dense"), get("output")
    merge = config.get("variant", "merge") == "merge"
    add = get("add") if merge else None

    @tf.function(reduce_retracing=True)
    def image_vector(features):
        return image_dense(features)

    @tf.function(reduce_retracing=True)
    def word_step(last_ids, h, c, image):
        # tf.identity drops the padding mask Keras attaches to the embedding's output (the
        # cell does not take masks; a last id is never padding)
        out, (h, c) = cell(tf.identity(embedding(last_ids)), [h, c])
        probs = output(decoder_dense(add([image, out]) if merge else out))
        # log of the model's own probabilities: the argmax is the one model.predict gives
        return tf.math.log(probs), h, c

    def init_fn(features):
        image = image_vector(np.asarray(features, dtype=np.float32)).numpy()
        if merge:
            zeros = np.zeros_like(image)
            return (zeros, zeros.copy(), image)
        return (image, image.copy(), image)

    def step_fn(states, last_ids):
        h, c, image = states
        log_probs, h, c = word_step(np.asarray(last_ids, dtype=np.int32), h, c, image)
        return log_probs.numpy(), (h.numpy(), c.numpy(), image)

    return init_fn, step_fn


STEP_BUILDERS = {"merge": lstm_steps, "inject": lstm_steps,
                 "attention": grid_models.grid_step_fns, "transformer": grid_models.grid_step_fns}


def make_step_fn(model, config):
    """(init_fn, step_fn) for the model of config["variant"] (see STEP_BUILDERS)."""
    variant = config.get("variant", "merge")
    if variant not in STEP_BUILDERS:
        raise PipelineError(f"no decoder for variant {variant!r} (known: {', '.join(STEP_BUILDERS)})")
    return STEP_BUILDERS[variant](model, config)


# ---- the course's loop (reference and benchmark baseline) -------------------------------------
def tutorial_greedy(model, photo, start_id, end_id, max_length, banned_ids=()):
    """The course's generate_desc: one model.predict per word on the whole padded prefix.

    Returns the generated ids (as greedy_decode). A grid model (attention, transformer) gets
    its one image's grid (G, C) and image_index 0. A sequence-mode model (output (1, T, V),
    caption input of any length) gets the prefix post-padded to max_length and is read at the
    last real position; a pairs-mode model (output (1, V), input fixed at max_length) gets the
    tutorial's pre-padded prefix. Padding is masked (mask_zero), so both equal the carried-state
    decoder up to float rounding.
    """
    width = model.get_layer("caption_input").output.shape[1] or max_length
    sequence = len(model.outputs[0].shape) == 3
    grid = any(layer.name == "image_index" for layer in model.layers)   # captioning/models/grid_models.py
    photo = np.asarray(photo, dtype=np.float32)
    photo = photo.reshape(1, *photo.shape[-2:]) if grid else photo.reshape(1, -1)
    extra = {"image_index": np.zeros(1, np.int32)} if grid else {}
    prefix, out = [start_id], []
    for _ in range(max_length - 1):
        used = prefix[-width:]
        seq = np.zeros((1, width), dtype=np.int32)
        if sequence:
            seq[0, :len(used)] = used
        else:
            seq[0, width - len(used):] = used
        probs = np.asarray(model.predict({"image_input": photo, "caption_input": seq, **extra},
                                         verbose=0))
        probs = np.array(probs[0, len(used) - 1] if sequence else probs[0], dtype=np.float64)
        probs[list(banned_ids)] = -1.0
        word = int(np.argmax(probs))
        out.append(word)
        if word == end_id:
            break
        prefix.append(word)
    return out


# ---- vocabulary and whole feature matrices ----------------------------------------------------
def vocabulary(tokenizer):
    """(id_to_word array indexed by id, start_id, end_id, banned ids) from tokenizer.json."""
    index = tokenizer["word_index"]
    id_to_word = np.empty(max(index.values()) + 1, dtype=object)
    id_to_word[0] = ""
    for word, i in index.items():
        id_to_word[i] = word
    start_id, end_id = index[tokenizer["start_token"]], index[tokenizer["end_token"]]
    banned = [tokenizer.get("pad_id", 0), start_id]
    if tokenizer.get("oov_token"):
        banned.append(index[tokenizer["oov_token"]])
    return id_to_word, start_id, end_id, sorted(set(banned))


def ids_to_words(id_to_word, ids, end_id):
    """Generated ids -> caption words, without the final endseq."""
    ids = list(ids)
    if ids and ids[-1] == end_id:
        ids = ids[:-1]
    return [str(w) for w in id_to_word[np.asarray(ids, dtype=np.int64)]] if ids else []


def caption_features(model, config, tokenizer, features, beam=BEAM, alpha=ALPHA,
                     batch_images=BATCH_IMAGES, progress=False, step_fns=None):
    """Decode captions for (N, D) features, or (N, G, C) grids for the grid variants -> N lists
    of generated ids (incl. endseq). step_fns: make_step_fn(model, config), built here if not
    given; a caller that decodes again and again (a video, a web server) passes its own, since
    each build traces new tf.functions."""
    features = np.asarray(features, dtype=np.float32)
    check_features(features.shape, config, "the features to caption")
    _, start_id, end_id, banned = vocabulary(tokenizer)
    init_fn, step_fn = step_fns if step_fns is not None else make_step_fn(model, config)
    out = []
    starts = range(0, len(features), batch_images)
    if progress:
        starts = progress_bar(starts, desc=f"decoding (beam {beam})", unit="batch")
    for lo in starts:
        states = init_fn(features[lo:lo + batch_images])
        out.extend(decode(step_fn, states, start_id, end_id, config["max_length"], beam, alpha, banned))
    return out
