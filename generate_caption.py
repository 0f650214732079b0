"""Stage 5: caption photos with a trained captioner — greedy or beam search, fast.

Usage:
    python generate_caption.py photo.jpg [more.jpg | a_folder/ ...] --model models/RUN
    python generate_caption.py photos/ --model models/RUN --beam 3 --weights none
    python generate_caption.py --features data/features.pkl --ids 1000268201_693b08cb0e --model models/RUN

Prints one line per image, `<name>\\t<caption>`, the caption without startseq/endseq. A missing
or corrupt image prints `error: ... (<path>)` on stderr, the other images are still captioned,
and the exit code is 1 at the end.

Reads:
    --model DIR       train.py's run folder: model.keras + model.json (feature_dim, vocab_size,
                      max_length, start_token, end_token, pad_id, tokenizer_sha256, ...).
    --data-dir DIR    prepare_text.py's tokenizer.json + meta.json (the vocabulary the model
                      was trained with; a mismatch is a one-line error).
    images            JPEG/PNG files or folders (every image in a folder, sorted), run through
                      the VGG16 fc2 extractor (extract_features.py; --weights imagenet|none|PATH).
                      A model trained on other features (e.g. the shared 1280-d EfficientNet-Lite0
                      file) cannot caption raw images this way: use --features/--ids.
    --features FILE   a features.pkl ({image_id: vector}) with --ids: caption cached features.
Writes: nothing (stdout only).

Decoding (importable, plain functions; see greedy_decode / beam_search):
    A step function `step_fn(states, last_token_ids) -> (log_probs (N, V), new_states)` gives
    the next-word distribution of N partial captions. `states` is a tuple of numpy arrays whose
    first axis is the caption (beam search reorders them with fancy indexing).
    `max_length` is meta.json's: the most tokens in a caption COUNTING startseq and endseq, so
    at most max_length - 1 tokens are generated after startseq. The pad id, the OOV id and the
    start id are never generated. Greedy = the course's loop; beam K keeps the K best partial
    captions per image (by summed log-probability); a caption ending in endseq is finished when
    it ranks in the image's top K; the result is the best finished caption by
    sum_logp / length**alpha (length = generated tokens incl. endseq; alpha 0 = no
    normalisation), or the best unfinished one if none finished by max_length. beam 1 ==
    greedy (when alpha is 0).
    The fast step (numpy_step_fns) re-implements the trained network's one-step computation in
    numpy from the Keras weights, carrying the LSTM state (h, c) between steps instead of
    re-running the whole prefix; it gives the same captions as the course's re-run-the-prefix
    loop (tutorial_greedy), which the tests check.
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np

import extract_features
from captioning import text
from captioning.features import load_features
from captioning.images import list_images
from captioning.utils import PipelineError, read_json, run_cli

# ---- settings (argparse defaults) -------------------------------------------------------------
MODEL_DIR = "models/merge"
DATA_DIR = "data"
BEAM = 1                 # 1 = greedy (the course's decoding)
ALPHA = 0.7              # beam length normalisation: score = log p / length**ALPHA (0 = none);
                         # 0.7 was best on the dev split (README, Results); no effect when greedy
WEIGHTS = "imagenet"     # VGG16 weights for raw images: imagenet | none | path to a .h5/.keras
BATCH_IMAGES = 1000      # images decoded together (memory: beam * batch * vocab floats per step)


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
    """greedy_decode for beam 1 (and alpha 0), else beam_search."""
    if beam == 1 and alpha == 0:
        return greedy_decode(step_fn, states, start_id, end_id, max_length, banned_ids)
    return beam_search(step_fn, states, start_id, end_id, max_length, beam, alpha, banned_ids)


# ---- the trained network's step, in numpy -----------------------------------------------------
def _activation(name):
    functions = {"linear": lambda x: x, None: lambda x: x, "relu": lambda x: np.maximum(x, 0),
                 "tanh": np.tanh, "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x))}
    if name not in functions:
        raise PipelineError(f"activation {name!r} is not supported by the numpy decoder")
    return functions[name]


def _dense(layer):
    """(weights, bias, activation function) of a keras Dense layer, float32."""
    kernel, bias = (np.asarray(w, dtype=np.float32) for w in layer.get_weights())
    return kernel, bias, _activation(layer.get_config().get("activation"))


def _log_softmax(logits):
    logits = logits - logits.max(axis=1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def numpy_step_fns(model, variant="merge"):
    """(init_fn, step_fn) for the captioner built by train.build_model, from its named layers.

    init_fn(features (N, D)) -> states; step_fn as in the module docstring. The LSTM step follows
    Keras' LSTM: z = x W + h U + b split into gates in the order i, f, c, o;
    c' = f*c + i*tanh(zc) (activation), h' = o*tanh(c') (recurrent_activation sigmoid for i,f,o).
    merge:  image_dense(features) is added to the LSTM output h at every step ("add").
    inject: image_dense(features) is the LSTM's initial h and c (init-inject); no add.
    """
    get = model.get_layer
    emb = np.asarray(get("embedding").get_weights()[0], dtype=np.float32)
    lstm = get("lstm")
    w_x, w_h, b = (np.asarray(w, dtype=np.float32) for w in lstm.get_weights())
    lstm_cfg = lstm.get_config()
    act = _activation(lstm_cfg.get("activation", "tanh"))
    rec = _activation(lstm_cfg.get("recurrent_activation", "sigmoid"))
    units = w_h.shape[0]
    img_w, img_b, img_act = _dense(get("image_dense"))
    dec_w, dec_b, dec_act = _dense(get("decoder_dense"))
    out_w, out_b = (np.asarray(w, dtype=np.float32) for w in get("output").get_weights())
    if get("output").get_config().get("activation") != "softmax":
        raise PipelineError("the numpy decoder expects a softmax output layer named 'output'")

    def init_fn(features):
        image = img_act(np.asarray(features, dtype=np.float32) @ img_w + img_b)
        if variant == "inject":
            return (image.copy(), image.copy(), image)
        zeros = np.zeros((len(image), units), dtype=np.float32)
        return (zeros, zeros.copy(), image)

    def step_fn(states, last_ids):
        h, c, image = states
        z = emb[last_ids] @ w_x + h @ w_h + b
        i, f, g, o = (z[:, k * units:(k + 1) * units] for k in range(4))
        c = rec(f) * c + rec(i) * act(g)
        h = rec(o) * act(c)
        merged = h + image if variant == "merge" else h
        hidden = dec_act(merged @ dec_w + dec_b)
        return _log_softmax(hidden @ out_w + out_b), (h, c, image)

    return init_fn, step_fn


# ---- the course's loop (reference and benchmark baseline) -------------------------------------
def tutorial_greedy(model, photo, start_id, end_id, max_length, banned_ids=()):
    """The course's generate_desc: one model.predict per word on the whole padded prefix.

    Returns the generated ids (as greedy_decode). A sequence-mode model (output (1, T, V),
    caption input of any length) gets the prefix post-padded to max_length and is read at the
    last real position; a pairs-mode model (output (1, V), input fixed at max_length) gets the
    tutorial's pre-padded prefix. Padding is masked (mask_zero), so both equal the carried-state
    decoder up to float rounding.
    """
    width = model.get_layer("caption_input").output.shape[1] or max_length
    sequence = len(model.outputs[0].shape) == 3
    photo = np.asarray(photo, dtype=np.float32).reshape(1, -1)
    prefix, out = [start_id], []
    for _ in range(max_length - 1):
        used = prefix[-width:]
        seq = np.zeros((1, width), dtype=np.int32)
        if sequence:
            seq[0, :len(used)] = used
        else:
            seq[0, width - len(used):] = used
        probs = np.asarray(model.predict({"image_input": photo, "caption_input": seq}, verbose=0))
        probs = np.array(probs[0, len(used) - 1] if sequence else probs[0], dtype=np.float64)
        probs[list(banned_ids)] = -1.0
        word = int(np.argmax(probs))
        out.append(word)
        if word == end_id:
            break
        prefix.append(word)
    return out


# ---- vocabulary and model loading -------------------------------------------------------------
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


def load_captioner(model_dir, data_dir):
    """(keras model, model.json config, tokenizer) with the vocabulary checked against data_dir."""
    import train
    model_dir, data_dir = Path(model_dir), Path(data_dir)
    tokenizer = text.load_tokenizer(data_dir / "tokenizer.json")
    tok_vocab = max(tokenizer["word_index"].values()) + 1
    config = read_json(model_dir / "model.json")
    if config.get("vocab_size") != tok_vocab:
        raise PipelineError(f"model vocabulary ({config.get('vocab_size')} ids) does not match the "
                            f"tokenizer ({tok_vocab} ids); use the data dir the model was trained "
                            f"with ({model_dir / 'model.json'})")
    model, config = train.load_captioner(model_dir, data_dir / "tokenizer.json")  # checks sha256
    out_width = model.get_layer("output").get_weights()[1].shape[0]
    if out_width != tok_vocab:
        raise PipelineError(f"model outputs {out_width} words but the tokenizer has {tok_vocab} "
                            f"ids ({model_dir / 'model.keras'})")
    return model, config, tokenizer


def caption_features(model, config, tokenizer, features, beam=BEAM, alpha=ALPHA,
                     batch_images=BATCH_IMAGES, progress=False):
    """Decode captions for a (N, D) feature matrix -> N lists of generated ids (incl. endseq)."""
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or features.shape[1] != config["feature_dim"]:
        raise PipelineError(f"features have width {features.shape[-1]} but the model expects "
                            f"{config['feature_dim']}")
    _, start_id, end_id, banned = vocabulary(tokenizer)
    init_fn, step_fn = numpy_step_fns(model, config.get("variant", "merge"))
    out = []
    starts = range(0, len(features), batch_images)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc=f"decoding (beam {beam})", unit="batch")
    for lo in starts:
        states = init_fn(features[lo:lo + batch_images])
        out.extend(decode(step_fn, states, start_id, end_id, config["max_length"], beam, alpha, banned))
    return out


def generate_caption(model, tokenizer, photo, max_length, beam=BEAM, alpha=ALPHA, variant="merge"):
    """The course's function: one feature vector -> caption string (no startseq/endseq)."""
    id_to_word, start_id, end_id, banned = vocabulary(tokenizer)
    init_fn, step_fn = numpy_step_fns(model, variant)
    states = init_fn(np.asarray(photo, dtype=np.float32).reshape(1, -1))
    ids = decode(step_fn, states, start_id, end_id, max_length, beam, alpha, banned)[0]
    return " ".join(ids_to_words(id_to_word, ids, end_id))


# ---- command line -----------------------------------------------------------------------------
def expand_inputs(paths):
    """Files and folders -> (image paths, [(path, reason)] for the ones that do not exist)."""
    images, missing = [], []
    for path in map(Path, paths):
        if path.is_dir():
            found = list_images(path)
            images.extend(found)
            if not found:
                missing.append((path, "no images in folder"))
        elif path.is_file():
            images.append(path)
        else:
            missing.append((path, "no such file or folder"))
    return images, missing


def features_for_images(paths, weights, feature_dim):
    """fc2 features of image files -> ({id: vec}, [(path, reason)]); checks the width first."""
    import vgg16_build
    extractor = vgg16_build.build_feature_extractor(weights=None if weights == "none" else weights)
    width = int(extractor.outputs[0].shape[-1])
    if width != feature_dim:
        raise PipelineError(f"the model was trained on {feature_dim}-d features but the VGG16 fc2 "
                            f"extractor gives {width}-d; caption cached features of the same kind "
                            f"with --features FILE --ids ID ... instead")
    # extract pads every batch to batch_size rows: a few photos need not cost a full batch
    batch = max(1, min(len(paths), extract_features.BATCH_SIZE))
    return extract_features.extract(extractor, paths, batch_size=batch)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("images", nargs="*", help="image files or folders")
    parser.add_argument("--model", default=MODEL_DIR, help="train.py run folder")
    parser.add_argument("--data-dir", default=DATA_DIR, help="prepare_text.py output folder")
    parser.add_argument("--beam", type=int, default=BEAM, help="beam width (1 = greedy)")
    parser.add_argument("--alpha", type=float, default=ALPHA, help="beam length normalisation exponent")
    parser.add_argument("--weights", default=WEIGHTS, help="VGG16 weights: imagenet | none | PATH")
    parser.add_argument("--features", default=None, help="cached features.pkl (use with --ids)")
    parser.add_argument("--ids", nargs="*", default=[], help="image ids to caption from --features")
    args = parser.parse_args(argv)
    if args.beam < 1:
        parser.error("--beam must be >= 1")
    if not args.images and not args.ids:
        parser.error("give image files/folders, or --features FILE --ids ID ...")
    if args.ids and not args.features:
        parser.error("--ids needs --features")
    return args


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    model, config, tokenizer = load_captioner(args.model, args.data_dir)
    failures = []
    names, vectors = [], []
    if args.ids:
        cached = load_features(args.features)
        for image_id in args.ids:
            if image_id in cached:
                names.append(image_id)
                vectors.append(cached[image_id])
            else:
                failures.append((image_id, f"id not in {args.features}"))
    if args.images:
        paths, missing = expand_inputs(args.images)
        failures.extend(missing)
        if paths:
            feats, bad = features_for_images(paths, args.weights, config["feature_dim"])
            failures.extend(bad)
            skipped = {str(p) for p, _ in bad}       # e.g. a second file with the same id
            for path in paths:
                if path.stem in feats and str(path) not in skipped:
                    names.append(str(path))
                    vectors.append(feats[path.stem])
    for where, reason in failures:
        print(f"error: {reason} ({where})", file=sys.stderr)
    if vectors:
        id_to_word, _, end_id, _ = vocabulary(tokenizer)
        captions = caption_features(model, config, tokenizer, np.stack(vectors), args.beam, args.alpha)
        for name, ids in zip(names, captions):
            print(f"{name}\t{' '.join(ids_to_words(id_to_word, ids, end_id))}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
