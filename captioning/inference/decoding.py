"""Decoding: greedy and beam search over one step interface, and the course's re-run-the-prefix loop.

Owns
  the step interface   step_fn(states, last_ids) -> (log_probs (N, V), new_states): the
                       next-word log-probabilities of N partial captions. `states` is a tuple of
                       numpy arrays whose first axis is the caption (beam search reorders them by
                       fancy indexing; tuples may nest, as an ensemble's do: inference/ensemble.py);
                       init_fn(features (N, ...)) -> the states before startseq.
  make_step_fn         (init_fn, step_fn) of a model: its family's step builder, from
                       captioning.models.registry.VARIANTS (each builder lives beside its model).
  greedy_decode, beam_search, decode, caption_features (a feature matrix -> id lists, batched),
  attention_weights (each generated word's attention over the grid, for maps),
  tutorial_greedy (the course's re-run-the-prefix loop: the reference the fast path must equal)
  and prefix_step_fns (the same as a step interface, for grid models),
  vocabulary / ids_to_words (ids <-> caption words).
Reads and writes no files. Imports captioning.utils, data.features (the input check) and
models.registry (the families).

Rules shared by every decoder (decode picks greedy for beam 1, whatever alpha is). `max_length`
is meta.json's: the most tokens in a caption COUNTING startseq and endseq, so at most
max_length - 1 tokens are generated after startseq. The pad id, the OOV id and the start id are
never generated (banned_ids). Greedy = the course's loop: the most probable next word until
endseq. Beam K keeps the K best partial captions per image (by summed log-probability); a
caption ending in endseq is finished when it ranks in the image's top K; the result is the best
finished caption by sum_logp / length**alpha (length = generated tokens incl. endseq; alpha 0 =
no normalisation), or the best unfinished one if none finished by max_length. beam 1 with
alpha 0 == greedy.
"""
import numpy as np

from captioning.data.features import check_features
from captioning.models import registry
from captioning.utils import PipelineError, progress as progress_bar

BEAM = 1             # 1 = greedy (the course's decoding)
ALPHA = 0.7          # beam length normalisation for beam >= 2: score = log p / length**ALPHA
                     # (0 = none); 0.7 was best on the dev split (README, Results)
BATCH_IMAGES = 1000  # images decoded together (memory: beam * batch * vocab floats per step)


# ---- decoding over a step function ------------------------------------------------------------
def take_states(states, index):
    """Select/reorder rows of every state array (the first axis is the partial caption).
    Tuples, lists and dicts may nest (an ensemble's states are its members' states), so every
    array at any depth is reordered the same way."""
    if isinstance(states, dict):
        return {key: take_states(value, index) for key, value in states.items()}
    if isinstance(states, (tuple, list)):
        return type(states)(take_states(value, index) for value in states)
    return np.asarray(states)[index]


def _rows(states):
    """Number of partial captions in `states` (the first axis of its first array, at any depth)."""
    while isinstance(states, (dict, tuple, list)):
        states = next(iter(states.values())) if isinstance(states, dict) else states[0]
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
                banned_ids=(), candidates=False):
    """Beam search for N captions at once (all images' beams in one step call).

    Returns N lists of generated ids (as greedy_decode). See the module docstring for the
    rules; beam=1 and alpha=0 give exactly greedy_decode's result. candidates=True returns,
    per image, every caption that finished before the search stopped, as [(ids, normalised
    score)] best first: the first is the plain result (an unfinished one, score -inf, if none
    finished). The n-best lists of consensus re-ranking (captioning/inference/consensus.py).
    """
    if beam < 1:
        raise PipelineError(f"beam must be >= 1 (got {beam})")
    n = _rows(states)
    max_new = max_length - 1
    best = [None] * n                          # best finished caption per image (ids)
    best_score = np.full(n, -np.inf)           # its normalised score
    finished = [[] for _ in range(n)]          # with candidates: every finished (ids, score)
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
            ids = [int(x) for x in tokens[i, top[i, j] // vocab]] + [end_id]
            if candidates:
                finished[image].append((ids, float(score)))
            if score > best_score[image]:
                best_score[image] = score
                best[image] = ids
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
    plain = [[int(x) for x in b] if b is not None else [] for b in best]     # truncated ones: numpy ints
    if not candidates:
        return plain
    # stable sort: of equal scores the earlier finished (shorter) comes first, as in `best`
    return [sorted(f, key=lambda c: -c[1]) if f else [(p, -np.inf)] for f, p in zip(finished, plain)]


def decode(step_fn, states, start_id, end_id, max_length, beam=1, alpha=0.0, banned_ids=(),
           candidates=False):
    """greedy_decode for beam 1 (whatever alpha is: greedy means the course's argmax loop),
    beam_search with length normalisation alpha for beam >= 2. candidates: beam_search's n-best
    lists (beam >= 2 only)."""
    if beam == 1:
        if candidates:
            raise PipelineError("candidate lists need beam search (beam >= 2)")
        return greedy_decode(step_fn, states, start_id, end_id, max_length, banned_ids)
    return beam_search(step_fn, states, start_id, end_id, max_length, beam, alpha, banned_ids, candidates)


# ---- step functions of the trained networks ---------------------------------------------------
def make_step_fn(model, config):
    """(init_fn, step_fn) for the model of config["variant"]: its registry entry's step builder."""
    variant = config.get("variant", "merge")
    if variant not in registry.VARIANTS:
        raise PipelineError(f"no decoder for variant {variant!r} (known: {', '.join(registry.VARIANTS)})")
    return registry.VARIANTS[variant].steps(model, config)


def attention_weights(model, grid, ids, start_id):
    """Per-word attention over the grid for captions already decoded: (N, len(ids[0]), G).

    grid (N, G, C); ids (N, L) generated ids (after startseq); the weights of word t are those
    the model used while predicting it (fed startseq, ids[:t]). For maps: reshape G to the
    grid's rows x cols. The family is read from the model (registry.model_variant).
    """
    name = registry.model_variant(model)
    if registry.VARIANTS[name].attention_steps is None:
        raise PipelineError(f"the {name} model has no attention over a grid")
    init_fn, step_fn = registry.VARIANTS[name].attention_steps(model)
    ids = np.asarray(ids, dtype=np.int64)
    states = init_fn(grid)
    last = np.full(len(ids), start_id, dtype=np.int64)
    maps = []
    for t in range(ids.shape[1]):
        _, states, weights = step_fn(states, last)
        maps.append(weights)
        last = ids[:, t]
    return np.stack(maps, axis=1)


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
    grid = any(layer.name == "image_index" for layer in model.layers)   # attention, transformer
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


def prefix_step_fns(model, grid):
    """(init_fn, step_fn) of the step interface for a grid model that keep no state but the
    tokens: every step re-runs the whole training model on (grid, prefix) for all rows at once
    and takes the last position. The reference the carried-state steps are tested against, and
    the alternative to the key/value cache that benchmarks/bench_grid.py times. init_fn takes
    image rows of `grid` (N, G, C); states are (rows (N,), tokens so far (N, t))."""
    def init_fn(images):
        return (np.arange(len(images)), np.zeros((len(images), 0), np.int32))

    def step_fn(states, last_ids):
        rows, tokens = states
        tokens = np.concatenate([tokens, np.asarray(last_ids, np.int32)[:, None]], axis=1)
        probs = model.predict_on_batch({"image_input": grid[rows], "caption_input": tokens,
                                        "image_index": np.arange(len(rows), dtype=np.int32)})
        with np.errstate(divide="ignore"):     # a probability of exactly 0 is log -inf
            return np.log(np.asarray(probs[:, -1], np.float64)), (rows, tokens)

    return init_fn, step_fn


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
                     batch_images=BATCH_IMAGES, progress=False, step_fns=None, candidates=False):
    """Decode captions for (N, D) features, or (N, G, C) grids for the grid variants -> N lists
    of generated ids (incl. endseq); with candidates, N n-best lists (beam_search). step_fns:
    make_step_fn(model, config), built here if not given; a caller that decodes again and again
    (a video, a web server) passes its own, since each build traces new tf.functions."""
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
        out.extend(decode(step_fn, states, start_id, end_id, config["max_length"], beam, alpha, banned,
                          candidates))
    return out
