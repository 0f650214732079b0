"""Self-critical sequence training (SCST, Rennie et al. 2017): fine-tune a trained captioner on CIDEr-D.

Owns
  sample_decode       N captions sampled word by word from a step function (the fast decoder of
                      captioning.inference.decoding), seeded: the captions SCST reinforces.
  teacher_arrays      sampled captions -> (input ids, target ids) for one forward pass.
  caption_log_probs   the Keras model's log-probability of each whole caption (sum over its
                      tokens), from ONE batched forward pass on the sampled tokens; differentiable.
                      A grid model (attention, transformer) is fed as in training: each image's
                      grid once, and image_index naming the grid row of every caption.
  reward_references   the training captions as token ids ending in endseq (the CIDEr-D reward's
                      references), checked for empty captions.
  advantages          a sample's reward minus its baseline: the greedy caption's CIDEr-D
                      (Rennie et al. 2017) or the mean of the image's other samples (Luo 2020).
  Trainer             one epoch of SCST: per batch of images, the greedy caption and K samples
                      per image; rewards = CIDEr-D against the image's references (document
                      frequencies from the training references, computed once); loss =
                      -mean(advantage x log p(sample)); an Adam step. Pooled features (N, D) or
                      grids (N, G, C); a grid source (data.grid_inputs.GridRows) is read a batch
                      at a time (float16 on disk, float32 per batch).
  dev_scorer          dev-split CIDEr-D of greedy (or beam) captions with the COCO convention
                      (document frequencies from the dev references; pure-Python PTB-style
                      tokenisation of the original captions, as coco_metrics.score_captions(
                      java=False)) - the selection measure.
Reads and writes no files (captioning.training.scst_run keeps the run folder). Imports coco_metrics,
decoding, registry, text, utils; TensorFlow inside the functions that need it (heavy).

Why endseq is part of every reward caption (references and samples): without it a caption cut
off mid-phrase ("a dog runs in the") can score as well as a finished one, and SCST learns to
stop early or trail off; with it, only captions that end where the references end match the
last n-grams.
Why the forward pass runs without dropout (training=False): the samples come from the decoder,
which has no dropout, so the log-probabilities must be those of the same distribution.
The attention model's doubly stochastic attention penalty (layers.SoftAttentionLSTM adds it only
in training mode) is therefore not part of the SCST loss, and is left out on purpose: it shapes
where a model learns to look during cross-entropy training, which SCST starts from; adding it
would need a training-mode pass (dropout on, so log p no longer that of the sampler) and a
weight against CIDEr-D advantages that has no counterpart in the reward.
"""
import time

import numpy as np

from captioning.inference import decoding

from captioning.data import text
from captioning.evaluation.coco_metrics import CiderD, python_tokenize
from captioning.models import registry
from captioning.utils import PipelineError

SAMPLES = 5              # sampled captions per image per update
BATCH_IMAGES = 50        # images per update (x SAMPLES sampled captions)
LEARNING_RATE = 5e-5     # Adam; SCST fine-tunes a trained model, so far below training's 1e-3
# What a sample's reward is compared with:
#   "greedy" the greedy caption's CIDEr-D (Rennie et al. 2017, the original SCST);
#   "mean"   the mean CIDEr-D of the image's other samples (Luo 2020, "A better variant of
#            self-critical sequence training"): zero-mean advantages per image.
# Default "mean": on the Flickr8k merge model (trained with label smoothing 0.1, so about one
# sampled word in ten comes from the smoothed tail) the greedy baseline was above nearly every
# sample (mean CIDEr-D 0.60 against 0.19), every advantage was negative, and dev CIDEr-D fell
# from 0.42 to 0.05 in three epochs (README, SCST).
BASELINES = ("mean", "greedy")
BASELINE = "mean"


# ---- sampling ---------------------------------------------------------------------------------
def _row_count(states):
    first = next(iter(states.values())) if isinstance(states, dict) else (
        states[0] if isinstance(states, (tuple, list)) else states)
    return len(np.asarray(first))


def sample_decode(step_fn, states, start_id, end_id, max_length, rng, banned_ids=()):
    """Sample one caption per row of `states` (ancestral sampling at temperature 1).

    Returns N lists of generated ids as greedy_decode does: the tokens after startseq, ending with
    end_id when the caption finished, at most max_length - 1 tokens; banned ids never drawn.
    rng: a numpy Generator (same seed, same captions).
    """
    n = _row_count(states)
    out = [[] for _ in range(n)]
    active = np.arange(n)
    last = np.full(n, start_id, dtype=np.int64)
    banned = list(banned_ids)
    for _ in range(max_length - 1):
        if not len(active):
            break
        log_probs, states = step_fn(states, last)
        log_probs = np.array(log_probs, dtype=np.float64)
        if banned:
            log_probs[:, banned] = -np.inf
        probs = np.exp(log_probs - log_probs.max(axis=1, keepdims=True))
        cdf = np.cumsum(probs, axis=1)
        # inverse-CDF draw: the first word whose cumulative probability exceeds u * total
        u = rng.random(len(active)) * cdf[:, -1]
        words = np.minimum((cdf <= u[:, None]).sum(axis=1), probs.shape[1] - 1)
        for row, word in zip(active, words):
            out[row].append(int(word))
        keep = np.flatnonzero(words != end_id)
        active, last = active[keep], words[keep]
        if len(keep) < len(words):
            states = decoding.take_states(states, keep)
    return out


# ---- the model's log-probability of whole captions --------------------------------------------
def teacher_arrays(id_lists, start_id):
    """Generated id lists -> (inputs, targets) int32 (N, T), post-padded with 0.

    inputs[i] = startseq + caption[:-1], targets[i] = caption: output step t of the sequence-mode
    model is the distribution of targets[:, t], exactly as in training (teacher forcing).
    """
    width = max(1, max((len(ids) for ids in id_lists), default=1))
    inputs = np.zeros((len(id_lists), width), dtype=np.int32)
    targets = np.zeros((len(id_lists), width), dtype=np.int32)
    for i, ids in enumerate(id_lists):
        if not ids:
            raise PipelineError("a sampled caption is empty (every caption has at least one token)")
        inputs[i, 0] = start_id
        inputs[i, 1:len(ids)] = ids[:-1]
        targets[i, :len(ids)] = ids
    return inputs, targets


def caption_log_probs(model, image, inputs, targets, image_index=None):
    """Sum over each caption's tokens of log p(token | image, previous tokens) -> (N,) tensor.

    One forward pass of the sequence-mode Keras model on the whole batch; padding targets (0)
    count nothing. Differentiable (call it under a GradientTape). Pooled models: image (N, D),
    one row per caption. Grid models: image (M, G, C), each image once, and image_index (N,)
    int32, the row of `image` caption n describes (the grid models' third input, as in training).
    """
    import tensorflow as tf
    feed = {"image_input": image, "caption_input": inputs}
    if image_index is not None:
        feed["image_index"] = image_index
    probs = model(feed, training=False)                                             # (N, T, V)
    picked = tf.gather(probs, targets, batch_dims=2)                                # (N, T)
    mask = tf.cast(tf.not_equal(targets, 0), picked.dtype)
    # 1e-30 only guards log(0) for a word the softmax underflowed to exactly zero
    return tf.reduce_sum(tf.math.log(tf.maximum(picked, 1e-30)) * mask, axis=1)


def make_update_fn(model, optimizer):
    """A compiled step (image, inputs, targets, advantage[, image_index]) -> (loss, log p): one
    Adam update of loss = -mean(advantage * log p(caption)), the REINFORCE gradient with a
    baseline. image_index for the grid models (caption_log_probs)."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def update(image, inputs, targets, advantage, image_index=None):
        with tf.GradientTape() as tape:
            log_p = caption_log_probs(model, image, inputs, targets, image_index)
            loss = -tf.reduce_mean(advantage * log_p)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss, log_p

    return update


# ---- rewards ----------------------------------------------------------------------------------
def reward_references(descriptions, ids, tokenizer, where="descriptions.txt"):
    """{image_id: [token ids of each cleaned caption, without startseq, with endseq]}.

    These are the captions the model was trained on, in its own vocabulary (rare words as the
    OOV id, which the decoder never emits). An image without captions or with an empty one is a
    one-line PipelineError naming it.
    """
    refs = {}
    for image_id in ids:
        captions = descriptions.get(image_id)
        if not captions:
            raise PipelineError(f"image {image_id} has no captions ({where})")
        for number, caption in enumerate(captions, start=1):
            if not caption.strip():
                raise PipelineError(f"image {image_id} has an empty caption (#{number}) ({where})")
        refs[image_id] = [text.encode_caption(tokenizer, c)[1:] for c in captions]
    return refs


# ---- one epoch --------------------------------------------------------------------------------
def advantages(sample_reward, greedy_reward, samples, baseline=BASELINE):
    """Per sample: its reward minus the baseline's. sample_reward (N*K,) grouped by image (the
    K samples of image j at rows j*K .. j*K+K-1); greedy_reward (N,)."""
    sample_reward = np.asarray(sample_reward, np.float64)
    if baseline == "greedy":
        return (sample_reward - np.repeat(greedy_reward, samples)).astype(np.float32)
    if baseline != "mean":
        raise PipelineError(f"unknown SCST baseline {baseline!r} (choose from {', '.join(BASELINES)})")
    if samples < 2:
        raise PipelineError("the mean baseline needs at least 2 samples per image")
    per_image = sample_reward.reshape(-1, samples)
    others = (per_image.sum(axis=1, keepdims=True) - per_image) / (samples - 1)
    return (per_image - others).reshape(-1).astype(np.float32)


def is_grid_model(config):
    """True for a family that reads spatial grids (N, G, C) (registry.VARIANTS' input kind)."""
    return registry.VARIANTS[config.get("variant", "merge")].inputs == registry.GRID


def feature_rows(matrix, rows):
    """float32 features of these rows of `matrix` (an array, a memory map or a GridRows, whose
    float16 grids are cast here, one batch at a time)."""
    return np.asarray(matrix[list(rows)], dtype=np.float32)


class Trainer:
    """SCST over a fixed set of training images. Built once: the reward's document frequencies
    (CiderD over the training references), the decoder's step function and the compiled update.
    matrix: pooled features (N, D) or grids (N, G, C), indexed by lists of row_of_id's rows."""

    def __init__(self, model, config, tokenizer, matrix, row_of_id, train_ids, references,
                 optimizer, samples=SAMPLES, batch_images=BATCH_IMAGES, baseline=BASELINE):
        self.model, self.config = model, config
        _, self.start_id, self.end_id, self.banned = decoding.vocabulary(tokenizer)
        self.matrix, self.row_of_id = matrix, row_of_id
        self.train_ids = list(train_ids)
        self.cider = CiderD(references)
        self.samples, self.batch_images, self.baseline = samples, batch_images, baseline
        self.init_fn, self.step_fn = decoding.make_step_fn(model, config)
        self.update = make_update_fn(model, optimizer)
        self.grid = is_grid_model(config)

    def batch(self, ids, rng):
        """One update on these images -> (mean sample reward, mean greedy reward, loss)."""
        features = feature_rows(self.matrix, [self.row_of_id[i] for i in ids])
        max_length = self.config["max_length"]
        states = self.init_fn(features)
        greedy = decoding.greedy_decode(self.step_fn, states, self.start_id, self.end_id,
                                        max_length, self.banned)
        repeat = np.repeat(np.arange(len(ids)), self.samples)
        sampled = sample_decode(self.step_fn, decoding.take_states(states, repeat), self.start_id,
                                self.end_id, max_length, rng, self.banned)
        sample_ids = [ids[j] for j in repeat]
        sample_reward = self.cider.scores(sample_ids, sampled)
        greedy_reward = self.cider.scores(ids, greedy)
        advantage = advantages(sample_reward, greedy_reward, self.samples, self.baseline)
        inputs, targets = teacher_arrays(sampled, self.start_id)
        if self.grid:     # each grid once; the K samples of image j point at row j
            loss, _ = self.update(features, inputs, targets, advantage, repeat.astype(np.int32))
        else:
            loss, _ = self.update(features[repeat], inputs, targets, advantage)
        return float(sample_reward.mean()), float(greedy_reward.mean()), float(loss)

    def epoch(self, rng, progress=None):
        """One pass over the training images in an order drawn from rng -> stats dict."""
        order = [self.train_ids[i] for i in rng.permutation(len(self.train_ids))]
        starts = range(0, len(order), self.batch_images)
        if progress:
            starts = progress(starts)
        wall, cpu = time.perf_counter(), time.process_time()
        totals = np.zeros(3)
        for lo in starts:
            ids = order[lo:lo + self.batch_images]
            totals += np.array(self.batch(ids, rng)) * len(ids)
        sample_reward, greedy_reward, loss = totals / len(order)
        return {"sample_reward": sample_reward, "greedy_reward": greedy_reward, "loss": loss,
                "seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu}


# ---- selection measure ------------------------------------------------------------------------
def dev_scorer(references, dev_ids, matrix, rows, tokenizer, beam=1, alpha=decoding.ALPHA):
    """A function (model, config) -> (dev CIDEr-D of the captions, their word lists).

    matrix, rows: the features (pooled (N, D) or GridRows grids) and each dev image's row in it,
    read decoding.BATCH_IMAGES images at a time. beam 1: greedy captions; beam >= 2: beam search
    with length normalisation alpha (decoding.decode's rules).
    COCO convention: document frequencies from the dev images' original captions, tokenised by
    coco_metrics.python_tokenize, so the number equals score_captions(..., java=False)["cider_d"].
    """
    for image_id in dev_ids:
        if not references.get(image_id):
            raise PipelineError(f"dev image {image_id} has no original captions (references.json)")
    # an original caption that tokenises to nothing is a one-line error from CiderD
    cider = CiderD({i: [python_tokenize(c) for c in references[i]] for i in dev_ids})
    id_to_word, _, end_id, _ = decoding.vocabulary(tokenizer)
    rows = list(rows)

    def score(model, config):
        step_fns = decoding.make_step_fn(model, config)
        id_lists = []
        for lo in range(0, len(rows), decoding.BATCH_IMAGES):
            features = feature_rows(matrix, rows[lo:lo + decoding.BATCH_IMAGES])
            id_lists.extend(decoding.caption_features(model, config, tokenizer, features, beam=beam,
                                                      alpha=alpha, step_fns=step_fns))
        words = [decoding.ids_to_words(id_to_word, x, end_id) for x in id_lists]
        return float(cider.scores(dev_ids, [python_tokenize(" ".join(w)) for w in words]).mean()), words

    return score
