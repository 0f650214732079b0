"""What the web page asks of a trained captioner: per photo, the greedy caption and the
beam-search alternatives with their scores.

Owns: beam_alternatives, the n-best beam search whose best entry is the caption
captioning.inference.decoding.beam_search gives; WebCaptioner, a captioning.inference.captioner.Captioner (model,
vocabulary, image encoder, loaded once) plus the page's answer per photo and cached features for
dataset images.

Reads (once, when a WebCaptioner is made):
    a train.py run folder (model.keras, model.json) and prepare_text.py's tokenizer.json;
    the weights of the model's own image encoder (Captioner.default_encoder: VGG16 fc2 or
        EfficientNet-Lite0, told by model.json; weights imagenet | none | PATH), unless an
        encoder is given;
    optionally a features file and the image folder it was computed from: an upload whose bytes
        equal one of those images (same SHA-256) is captioned from its cached vector, the very
        vector evaluate_bleu.py used. A model whose features no encoder here computes still
        captions those dataset photos; other photos get a one-line refusal saying why.
Writes nothing.

The web app (captioning/apps/webapp.py) records each upload's SHA-256 in image.info[DIGEST_KEY].
"""
import numpy as np

from captioning.inference import decoding
from captioning.inference.captioner import WEIGHTS, Captioner
from captioning.data.features import load_features
from captioning.data.images import list_images, to_rgb
from captioning.utils import PipelineError, sha256_file

DIGEST_KEY = "sha256"    # image.info key holding the SHA-256 of the uploaded file's bytes
ENCODER_NAMES = {"vgg16": "VGG16 fc2", "lite0": "EfficientNet-Lite0", "lite2": "EfficientNet-Lite2"}   # shown on the page


def cached_features(features_path, images_dir, width):
    """{SHA-256 of an image file's bytes: (image id, float32 vector)} for the images of
    `images_dir` that have a vector in `features_path`; the vectors must be `width` wide."""
    features = load_features(features_path)
    found = next(iter(features.values()), np.zeros(width)).shape[0]
    if found != width:
        raise PipelineError(f"features are {found}-d but the model expects {width}-d ({features_path})")
    return {sha256_file(path): (path.stem, features[path.stem])
            for path in list_images(images_dir) if path.stem in features}


def rgb(image):
    """An uploaded PIL image -> RGB with its EXIF rotation applied: what images.open_rgb makes
    of a file, so a photo gets the caption generate_caption.py gives the same file."""
    from PIL import ImageOps
    return to_rgb(ImageOps.exif_transpose(image))


# ---- n-best beam search -----------------------------------------------------------------------
def beam_alternatives(step_fn, states, start_id, end_id, max_length, beam, alpha=0.0, banned_ids=()):
    """The `beam` best captions of ONE image (`states` holds one row), best first.

    Returns [(ids, score, finished)], score = sum(log p) / length**alpha as in beam_search. The
    search is decoding.beam_search's (same live beams, same finishing rule), continued until no
    live caption can beat the beam-th best finished one rather than the best one, so the first
    entry is beam_search's answer and the rest are the runners-up it found. If no caption
    finished within max_length, the best truncated ones are returned (finished False).
    """
    if beam < 1:
        raise PipelineError(f"beam must be >= 1 (got {beam})")
    max_new = max_length - 1
    found = []                                     # (score, ids) of finished captions
    scores, tokens = np.zeros(1), [[]]
    last = np.array([start_id], dtype=np.int64)
    for t in range(1, max_new + 1):               # t = tokens after generating this one
        log_probs, states = step_fn(states, last)
        vocab = log_probs.shape[1]
        flat = (scores[:, None] + decoding._masked(log_probs, banned_ids)).reshape(-1)
        k = min(beam, flat.size)
        norm = 1.0 if alpha == 0 else t ** alpha
        for j in np.argpartition(-flat, k - 1)[:k]:       # endseq in the top k: finished
            if j % vocab == end_id and np.isfinite(flat[j]):
                found.append((flat[j] / norm, tokens[j // vocab] + [end_id]))
        live = flat.copy()
        live[end_id::vocab] = -np.inf
        top = np.argpartition(-live, k - 1)[:k]
        top = top[np.argsort(-live[top], kind="stable")]
        new_scores = live[top]
        # no live caption can beat the k-th finished one: scores only fall, and the most a longer
        # caption's normalisation can divide by is max_new**alpha (beam_search's bound)
        bound = new_scores[0] / (1.0 if alpha == 0 else max_new ** alpha)
        kth = sorted(s for s, _ in found)[-beam] if len(found) >= beam else -np.inf
        if t == max_new or bound <= kth or not np.isfinite(new_scores[0]):
            break
        keep = np.isfinite(new_scores)
        top, new_scores = top[keep], new_scores[keep]
        states = decoding.take_states(states, top // vocab)
        tokens = [tokens[j // vocab] + [int(j % vocab)] for j in top]
        scores, last = new_scores, (top % vocab).astype(np.int64)
    if found:   # stable sort: among equal scores the one found first (beam_search's) leads
        ranked = sorted(found, key=lambda item: -item[0])[:beam]
        return [([int(x) for x in ids], float(score), True) for score, ids in ranked]
    return [(tokens[j // vocab] + [int(j % vocab)], float(s / t ** alpha if alpha else s), False)
            for j, s in zip(top, new_scores) if np.isfinite(s)]


def attention(config, words, maps):
    """The page's attention block: {"grid": [H, W], "words": [...], "weights": one row-major
    list of H*W weights per word}, from Captioner.attention_maps' (L, H, W); None without maps."""
    if maps is None or not len(words):
        return None
    return {"grid": list(config["grid"]), "words": list(words),
            "weights": np.asarray(maps, np.float64).reshape(len(words), -1).round(5).tolist()}


# ---- the captioner ----------------------------------------------------------------------------
class WebCaptioner:
    """A Captioner with the page's answer per photo; everything is loaded when it is made.

    encoder: encode(list of PIL RGB images) -> float32 (N, D) (see captioning.inference.captioner); None
    = the model's own backbone with `weights`, or, when model.json cannot tell it, no encoder
    (only cached dataset images can then be captioned). Not thread-safe (a Keras model and the decoder
    state are shared): callers serialise calls; the web app holds a lock around each one.
    """

    def __init__(self, model_dir, data_dir=None, weights=WEIGHTS, alpha=decoding.ALPHA,
                 features=None, images=None, encoder=None):
        self.captioner = Captioner(model_dir, data_dir)
        self.model_dir, self.alpha, self.weights = str(model_dir), alpha, str(weights)
        width, backbone = self.captioner.feature_dim, self.captioner.backbone
        self.builds_encoder = encoder is None and backbone is not None
        if self.builds_encoder:
            encoder = self.captioner.default_encoder(weights)     # the model's own backbone
        self.no_encoder = None if encoder is not None else (
            f"no image encoder here gives the {width}-d features this model was trained on, so "
            f"only dataset images with cached features can be captioned")
        if encoder is not None:
            self.captioner.encode = encoder
            self.captioner.check_encoder()        # builds it now: the model is loaded once
        self.encoder_name = (ENCODER_NAMES.get(backbone, backbone) if self.builds_encoder else
                             getattr(encoder, "name", "the given encoder") if encoder is not None
                             else None)
        self.init_fn, self.step_fn = decoding.make_step_fn(self.captioner.model, self.captioner.config)
        if features is not None and images is None:
            raise PipelineError("cached features need the image folder they were computed from")
        self.cached = cached_features(features, images, width) if features is not None else {}

    def describe(self):
        """What the page shows about the loaded model."""
        c = self.captioner.config
        encoder = self.encoder_name
        if self.builds_encoder:
            encoder += (" (RANDOM weights: meaningless captions)" if self.weights == "none"
                        else f" ({self.weights} weights)")
        return {"model": self.model_dir, "variant": c.get("variant", "merge"),
                "feature_dim": c["feature_dim"], "vocab_size": c["vocab_size"],
                "max_length": c["max_length"], "alpha": self.alpha, "encoder": encoder,
                "no_encoder": self.no_encoder, "cached_images": len(self.cached)}

    def features(self, images):
        """(rows that have features, their matrix or None, row -> source label, {row: error})."""
        rows, sources, errors = {}, {}, {}
        for i, image in enumerate(images):
            digest = image.info.get(DIGEST_KEY)
            if digest in self.cached:
                image_id, rows[i] = self.cached[digest]
                sources[i] = f"cached features of dataset image {image_id}"
        todo = [i for i in range(len(images)) if i not in rows]
        if todo and self.no_encoder:
            errors.update({i: self.no_encoder for i in todo})
        elif todo:
            vectors = self.captioner.encode([rgb(images[i]) for i in todo])
            for i, vector in zip(todo, np.asarray(vectors, dtype=np.float32)):
                rows[i], sources[i] = vector, self.encoder_name
        order = sorted(rows)
        matrix = np.stack([rows[i] for i in order]) if order else None
        return order, matrix, sources, errors

    def caption(self, images, beam):
        """PIL images -> one dict per image: {"greedy": str, "beams": [(caption, score)],
        "finished": [bool per beam], "features": where the vector came from, "attention": the
        greedy caption's per-word weights for grid models (see attention()), else None} or
        {"error": str} for an image this model cannot caption."""
        order, matrix, sources, errors = self.features(images)
        out = [{"error": errors[i]} if i in errors else None for i in range(len(images))]
        if matrix is None:
            return out
        c, words = self.captioner, self.captioner.words
        greedy = decoding.greedy_decode(self.step_fn, self.init_fn(matrix), c.start_id, c.end_id,
                                        c.config["max_length"], c.banned)
        # beam 1 is greedy whatever alpha is (decoding.decode); beam search of width 1 with
        # alpha 0 is exactly greedy, and its summed log p is then normalised for the score column
        search_alpha = self.alpha if beam > 1 else 0.0
        maps = c.attention_maps(matrix, greedy) if c.config.get("grid") else None
        for row, i in enumerate(order):
            alternatives = beam_alternatives(self.step_fn, self.init_fn(matrix[row:row + 1]),
                                             c.start_id, c.end_id, c.config["max_length"], beam,
                                             search_alpha, c.banned)
            if beam == 1 and self.alpha:
                alternatives = [(ids, score / len(ids) ** self.alpha, done)
                                for ids, score, done in alternatives]
            out[i] = {"greedy": " ".join(words(greedy[row])),
                      "beams": [(" ".join(words(ids)), score) for ids, score, _ in alternatives],
                      "finished": [done for _, _, done in alternatives],
                      "features": sources[i], "attention": attention(c.config, words(greedy[row]),
                                                                       maps[row] if maps else None)}
        return out
