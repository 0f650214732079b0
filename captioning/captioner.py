"""A captioner that a long-running program (the web page) loads once and asks many times.

Owns: PIL images -> per image the greedy caption and the beam-search alternatives with their
scores; the n-best beam search (beam_alternatives), whose best entry is the caption
generate_caption.beam_search gives; VGG16 fc2 features of images already in memory, prepared
exactly as extract_features.load_image prepares files; cached features for dataset images.

Reads (once, when a Captioner is made):
    a train.py run folder (model.keras, model.json) and prepare_text.py's tokenizer.json;
    the VGG16 weights (imagenet | none | PATH, see vgg16_build.py), only when the model was
        trained on VGG16 fc2 features (feature_dim 4096);
    optionally a features file and the image folder it was computed from: an upload whose bytes
        equal one of those images (same SHA-256) is captioned from its cached vector. That is how
        a model trained on features no encoder here computes (the shared EfficientNet-Lite0 file)
        still captions dataset photos; other photos get a one-line refusal saying why.
Writes nothing.

The web app (captioning/webapp.py) records each upload's SHA-256 in image.info[DIGEST_KEY].
"""
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

import extract_features
import generate_caption as gc
import vgg16_build
from pipeline_utils import PipelineError, sha256_file

DIGEST_KEY = "sha256"    # image.info key holding the SHA-256 of the uploaded file's bytes
DECODE_BLAS_THREADS = 1  # a few images' decoding multiplies tiny matrices (beam x 256 by 256 x
                         # vocab); OpenBLAS's thread team costs more than it saves there: one
                         # thread used 10x less CPU per caption on a busy 2-core machine


# ---- encoders ---------------------------------------------------------------------------------
def vgg16_input(image, resize_filter=extract_features.RESIZE_FILTER):
    """PIL image -> float32 (224, 224, 3) for VGG16: the steps of extract_features.load_image
    (EXIF rotation, 8-bit RGB, whole-frame resize, BGR + ImageNet means), on an image in memory."""
    from keras.applications.vgg16 import preprocess_input
    from PIL import Image, ImageOps
    rgb = extract_features.to_rgb(ImageOps.exif_transpose(image))
    height, width = vgg16_build.IMAGE_SIZE
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), getattr(Image.Resampling, resize_filter.upper()))
    return preprocess_input(np.asarray(rgb, dtype=np.float32))


class VGG16Encoder:
    """VGG16 fc2 features of PIL images; the same numbers extract_features/generate_caption give.

    An encoder is anything with .name, .width (feature size), .describe() and
    __call__(list of PIL images) -> float32 (N, width); a Lite0 one can stand beside this.

    Batches are padded to min(N, extract_features.BATCH_SIZE) rows, as generate_caption.py does
    for N photos, so one photo costs one image's compute and gets the CLI's exact vector.
    """
    name = "VGG16 fc2"

    def __init__(self, weights=extract_features.WEIGHTS, seed=extract_features.SEED):
        model = extract_features.build_model(None if str(weights) == "none" else weights, seed)
        self.width = int(model.outputs[0].shape[-1])
        self.weights = str(weights)
        self._predict = extract_features.make_predict_fn(model)

    def describe(self):
        weights = "RANDOM weights: meaningless captions" if self.weights == "none" else \
            f"{self.weights} weights"
        return f"{self.name} ({weights})"

    def __call__(self, images):
        arrays = [vgg16_input(image) for image in images]
        batch = max(1, min(len(arrays), extract_features.BATCH_SIZE))
        out = []
        for lo in range(0, len(arrays), batch):
            x = np.stack(arrays[lo:lo + batch])
            n = len(x)
            if n < batch:
                x = np.concatenate([x, np.zeros((batch - n, *x.shape[1:]), x.dtype)])
            out.append(self._predict(x)[:n].reshape(n, -1))
        return np.concatenate(out).astype(np.float32)


def cached_features(features_path, images_dir, width):
    """{SHA-256 of an image file's bytes: (image id, float32 vector)} for the images of
    `images_dir` that have a vector in `features_path`; the vectors must be `width` wide."""
    features = extract_features.load_features(features_path)
    found = next(iter(features.values()), np.zeros(width)).shape[0]
    if found != width:
        raise PipelineError(f"features are {found}-d but the model expects {width}-d ({features_path})")
    return {sha256_file(path): (path.stem, features[path.stem])
            for path in extract_features.list_images(images_dir) if path.stem in features}


# ---- n-best beam search -----------------------------------------------------------------------
def beam_alternatives(step_fn, states, start_id, end_id, max_length, beam, alpha=0.0, banned_ids=()):
    """The `beam` best captions of ONE image (`states` holds one row), best first.

    Returns [(ids, score, finished)], score = sum(log p) / length**alpha as in beam_search. The
    search is generate_caption.beam_search's (same live beams, same finishing rule), continued
    until no live caption can beat the beam-th best finished one rather than the best one, so the
    first entry is beam_search's answer and the rest are the runners-up it found. If no caption
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
        flat = (scores[:, None] + gc._masked(log_probs, banned_ids)).reshape(-1)
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
        states = gc.take_states(states, top // vocab)
        tokens = [tokens[j // vocab] + [int(j % vocab)] for j in top]
        scores, last = new_scores, (top % vocab).astype(np.int64)
    if found:   # stable sort: among equal scores the one found first (beam_search's) leads
        ranked = sorted(found, key=lambda item: -item[0])[:beam]
        return [([int(x) for x in ids], float(score), True) for score, ids in ranked]
    return [(tokens[j // vocab] + [int(j % vocab)], float(s / t ** alpha if alpha else s), False)
            for j, s in zip(top, new_scores) if np.isfinite(s)]


# ---- the captioner ----------------------------------------------------------------------------
class Captioner:
    """A trained model, its encoder and its vocabulary, loaded once; `caption` does the work.

    Not thread-safe (Keras models and the numpy state are shared): callers serialise calls
    (the web app holds a lock around each one).
    """

    def __init__(self, model_dir, data_dir, weights=extract_features.WEIGHTS, alpha=gc.ALPHA,
                 features=None, images=None, encoder=None):
        self.model_dir = str(model_dir)
        if not (Path(model_dir) / "model.json").is_file():
            raise PipelineError(f"no trained model at {model_dir} (missing model.json)")
        model, self.config, tokenizer = gc.load_captioner(model_dir, data_dir)
        self.id_to_word, self.start_id, self.end_id, self.banned = gc.vocabulary(tokenizer)
        self.init_fn, self.step_fn = gc.numpy_step_fns(model, self.config.get("variant", "merge"))
        self.alpha = alpha
        width = self.config["feature_dim"]
        self.encoder, self.no_encoder = encoder, None
        if encoder is None and width == vgg16_build.FC_UNITS:
            self.encoder = VGG16Encoder(weights)
        elif encoder is None:
            self.no_encoder = (f"this model was trained on {width}-d features and the VGG16 fc2 "
                               f"encoder gives {vgg16_build.FC_UNITS}-d, so only dataset images "
                               f"with cached features can be captioned")
        if self.encoder is not None and self.encoder.width != width:
            raise PipelineError(f"the encoder gives {self.encoder.width}-d features but the model "
                                f"expects {width}-d ({model_dir})")
        if features is not None and images is None:
            raise PipelineError("cached features need the image folder they were computed from")
        self.cached = cached_features(features, images, width) if features is not None else {}

    def describe(self):
        """What the page shows about the loaded model."""
        c = self.config
        return {"model": self.model_dir, "variant": c.get("variant", "merge"),
                "feature_dim": c["feature_dim"], "vocab_size": c["vocab_size"],
                "max_length": c["max_length"], "alpha": self.alpha,
                "encoder": self.encoder.describe() if self.encoder is not None else None,
                "no_encoder": self.no_encoder, "cached_images": len(self.cached)}

    def words(self, ids):
        return " ".join(gc.ids_to_words(self.id_to_word, ids, self.end_id))

    def features(self, images):
        """(matrix of the images that have features, their row -> source label, {row: error})."""
        digests = [image.info.get(DIGEST_KEY) for image in images]
        rows, sources, errors = {}, {}, {}
        for i, digest in enumerate(digests):
            if digest in self.cached:
                image_id, rows[i] = self.cached[digest]
                sources[i] = f"cached features of dataset image {image_id}"
        todo = [i for i in range(len(images)) if i not in rows]
        if todo and self.encoder is None:
            errors.update({i: self.no_encoder for i in todo})
        elif todo:
            for i, vector in zip(todo, self.encoder([images[i] for i in todo])):
                rows[i], sources[i] = vector, self.encoder.name
        order = sorted(rows)
        matrix = np.stack([rows[i] for i in order]) if order else None
        return order, matrix, sources, errors

    def caption(self, images, beam):
        """PIL images -> one dict per image: {"greedy": str, "beams": [(caption, score)],
        "finished": [bool per beam], "features": where the vector came from, "attention": None}
        or {"error": str} for an image this model cannot caption."""
        order, matrix, sources, errors = self.features(images)
        out = [{"error": errors[i]} if i in errors else None for i in range(len(images))]
        if matrix is None:
            return out
        with threadpool_limits(limits=DECODE_BLAS_THREADS, user_api="blas"):
            self.decode(matrix, order, sources, beam, out)
        return out

    def decode(self, matrix, order, sources, beam, out):
        """Fill out[i] for the images i of `order` (rows of `matrix`)."""
        max_length = self.config["max_length"]
        greedy = gc.greedy_decode(self.step_fn, self.init_fn(matrix), self.start_id, self.end_id,
                                  max_length, self.banned)
        for row, i in enumerate(order):
            alternatives = beam_alternatives(self.step_fn, self.init_fn(matrix[row:row + 1]),
                                             self.start_id, self.end_id, max_length, beam,
                                             self.alpha, self.banned)
            out[i] = {"greedy": self.words(greedy[row]),
                      "beams": [(self.words(ids), score) for ids, score, _ in alternatives],
                      "finished": [done for _, _, done in alternatives],
                      "features": sources[i], "attention": None}
