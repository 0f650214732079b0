"""The VSE++ joint image-sentence embedding (Faghri et al. 2018) in Keras, and its helpers.

Owns: the model (build_model, the encoders cut from it, load_embedding), the hinge triplet loss
with in-batch negatives (contrastive_loss, EmbeddingLoss), turning captions and free-text
queries into token ids (encode_query), and embedding feature matrices and captions in batches.
Reads: a run folder written by train_retrieval.py (model.keras + model.json), tokenizer.json.
Writes: nothing itself (train_retrieval.py writes the run folder).

The model, layer names fixed (the encoders are cut out of the joint model by these names):
    image_input (B, D) float32, D = the features file's width
      -> image_standardize  Normalization with the training features' mean and variance (stored
                            in the model, so raw features go in at search time)
      -> image_project      Dense(d), linear
      -> image_l2           UnitNormalization: the image embedding, unit L2 norm
    caption_input (B, T) int32 token ids of prepare_text's tokenizer, 0 = padding (post-padded)
      -> embedding          Embedding(vocab_size, word_dim, mask_zero=True)
      -> gru                GRU(d), final state at the last real token (the mask skips padding)
      -> text_l2            UnitNormalization: the sentence embedding
    joint = Concatenate([image_l2, text_l2]) (B, 2d): the training output; the loss splits it.
The score of an (image, sentence) pair is the inner product of the embeddings = their cosine.

The loss (VSE++), for a batch of B matching pairs (image i, caption i), S = I T^T (B, B):
    to captions: c_t[i, j] = max(0, margin + S[i, j] - S[i, i])   image i, wrong caption j
    to images:   c_i[i, j] = max(0, margin + S[j, i] - S[i, i])   caption i, wrong image j
    hardest negative (max violation): loss_i = max_j c_t[i, j] + max_j c_i[i, j]
    summed negatives (VSE0, the warm-up): loss_i = sum_j c_t[i, j] + sum_j c_i[i, j]
Pairs whose two items belong to the same image (another caption of image i in the batch) are
not negatives and are masked out; the batch loss is the mean of loss_i.
"""
from pathlib import Path

import numpy as np

from captioning.data.text import clean_caption, encode_caption, load_tokenizer, model_tokenizer_path
from captioning.utils import PipelineError, read_json

# ---- settings (train_retrieval.py's defaults) --------------------------------------------------
EMBED_DIM = 512      # joint space size d (= GRU units); VSE++ uses 1024, 3x the CPU time per epoch
WORD_DIM = 300       # word vector size, as VSE++
MARGIN = 0.2         # hinge margin, as VSE++
EMBED_BATCH = 512    # rows per forward pass when embedding many images or captions

MODEL_FILE, CONFIG_FILE = "model.keras", "model.json"
MODEL_KIND = "vse++"
LAYERS = ("image_input", "image_standardize", "image_project", "image_l2", "caption_input",
          "embedding", "gru", "text_l2", "joint")


# ---- model -------------------------------------------------------------------------------------
def build_model(feature_dim, vocab_size, embed_dim=EMBED_DIM, word_dim=WORD_DIM,
                feature_mean=None, feature_variance=None):
    """The joint model (see the module docstring). feature_mean/variance: (D,) training statistics
    (default 0 and 1, i.e. no standardisation)."""
    import keras
    from keras import layers
    mean = np.zeros(feature_dim, np.float32) if feature_mean is None else np.asarray(feature_mean, np.float32)
    variance = (np.ones(feature_dim, np.float32) if feature_variance is None
                else np.asarray(feature_variance, np.float32))
    image = keras.Input((feature_dim,), name="image_input", dtype="float32")
    tokens = keras.Input((None,), name="caption_input", dtype="int32")
    x = layers.Normalization(mean=mean, variance=variance, name="image_standardize")(image)
    x = layers.Dense(embed_dim, name="image_project")(x)
    image_emb = layers.UnitNormalization(name="image_l2")(x)
    words = layers.Embedding(vocab_size, word_dim, mask_zero=True, name="embedding")(tokens)
    text_emb = layers.UnitNormalization(name="text_l2")(layers.GRU(embed_dim, name="gru")(words))
    joint = layers.Concatenate(name="joint")([image_emb, text_emb])
    return keras.Model({"image_input": image, "caption_input": tokens}, joint, name="vse")


def image_encoder(model):
    """image features (B, D) -> embeddings (B, d), sharing the joint model's weights."""
    import keras
    return keras.Model(model.get_layer("image_input").output, model.get_layer("image_l2").output)


def text_encoder(model):
    """token ids (B, T) -> embeddings (B, d), sharing the joint model's weights."""
    import keras
    return keras.Model(model.get_layer("caption_input").output, model.get_layer("text_l2").output)


# ---- loss --------------------------------------------------------------------------------------
def contrastive_loss(image_emb, text_emb, image_ids, margin=MARGIN, max_violation=1.0):
    """Per-pair VSE++ loss (B,) in keras.ops (see the module docstring).

    max_violation: 1.0 = hardest negative, 0.0 = summed negatives (a float, or a variable so a
    callback can switch it between epochs without rebuilding the training graph).
    """
    from keras import ops
    scores = ops.matmul(image_emb, ops.transpose(text_emb))          # S[i, j] = <image i, text j>
    positive = ops.diagonal(scores)
    ids = ops.reshape(ops.cast(image_ids, "int32"), (-1,))
    negative = ops.cast(ops.not_equal(ids[:, None], ids[None, :]), scores.dtype)
    to_captions = ops.relu(margin + scores - positive[:, None]) * negative   # row i: image i
    to_images = ops.relu(margin + ops.transpose(scores) - positive[:, None]) * negative  # row i: caption i
    hardest = ops.max(to_captions, axis=1) + ops.max(to_images, axis=1)
    summed = ops.sum(to_captions, axis=1) + ops.sum(to_images, axis=1)
    return max_violation * hardest + (1.0 - max_violation) * summed


def embedding_loss_class():
    """The Keras Loss wrapping contrastive_loss; y_true = image ids, y_pred = the joint output."""
    import keras

    @keras.saving.register_keras_serializable(package="retrieval")
    class EmbeddingLoss(keras.losses.Loss):
        def __init__(self, margin=MARGIN, name="vse_loss", **kwargs):
            kwargs.pop("reduction", None)
            super().__init__(name=name, reduction="sum_over_batch_size", **kwargs)
            self.margin = float(margin)
            # 1 = hardest negative; set to 0 during the warm-up epochs by train_retrieval.py
            self.max_violation = keras.Variable(1.0, trainable=False, name="max_violation")

        def call(self, y_true, y_pred):
            from keras import ops
            half = ops.shape(y_pred)[-1] // 2
            return contrastive_loss(y_pred[:, :half], y_pred[:, half:], y_true, self.margin,
                                    self.max_violation)

        def get_config(self):
            return {"margin": self.margin, "name": self.name}

    return EmbeddingLoss


# ---- text --------------------------------------------------------------------------------------
def encode_query(text, tokenizer, max_length):
    """A free-text query -> (token ids incl. sentinels, [unknown words]).

    The query is cleaned the way the training captions were (tokenizer["cleaning"]). An empty
    query, or one whose words are all unknown to the vocabulary, is a PipelineError that says
    so (and names the unknown words); some unknown words are returned for a warning.
    """
    words = clean_caption(text, tokenizer.get("cleaning", "default")).split()
    if not words:
        raise PipelineError(f"empty query {text!r}: no words left after cleaning")
    index = tokenizer["word_index"]
    unknown = [w for w in words if w not in index]
    if len(unknown) == len(words):
        raise PipelineError(f"no word of the query is in the model's vocabulary "
                            f"(unknown: {', '.join(unknown)})")
    return encode_caption(tokenizer, " ".join(words))[:max_length], unknown


def pad_batch(token_lists):
    """Post-padded int32 (B, longest) matrix of id lists (0 = padding, masked by the model)."""
    width = max(len(ids) for ids in token_lists)
    out = np.zeros((len(token_lists), width), np.int32)
    for row, ids in enumerate(token_lists):
        out[row, :len(ids)] = ids
    return out


def embed_images(encoder, features, batch=EMBED_BATCH):
    """(N, D) features -> (N, d) float32 embeddings.

    predict_on_batch runs a compiled graph: for one search query it takes ~10 ms where an
    eager encoder(x) call of the GRU takes ~200 ms on a 2-core CPU.
    """
    features = np.asarray(features, np.float32)
    parts = [np.asarray(encoder.predict_on_batch(features[lo:lo + batch]))
             for lo in range(0, len(features), batch)]
    return np.concatenate(parts) if parts else np.zeros((0, encoder.outputs[0].shape[-1]), np.float32)


def embed_captions(encoder, token_lists, batch=EMBED_BATCH):
    """Id lists -> (N, d) float32 embeddings, in the given order.

    Captions are embedded in length order, so each batch is padded only to its own longest.
    """
    order = np.argsort([len(ids) for ids in token_lists], kind="stable")
    out = np.zeros((len(token_lists), encoder.outputs[0].shape[-1]), np.float32)
    for lo in range(0, len(order), batch):
        rows = order[lo:lo + batch]
        out[rows] = np.asarray(encoder.predict_on_batch(pad_batch([token_lists[i] for i in rows])))
    return out


# ---- loading a trained embedding ---------------------------------------------------------------
def load_embedding(model_dir, tokenizer_path=None):
    """(keras joint model, model.json config, tokenizer) of a train_retrieval.py run folder.

    tokenizer_path: tokenizer.json or the folder holding it (default: a tokenizer.json beside
    the model, as a shipped model has, else the data_dir recorded in model.json). Its sha256
    must be the one the model was trained with, else PipelineError.
    """
    import keras
    model_dir = Path(model_dir)
    config = read_json(model_dir / CONFIG_FILE)
    if config.get("kind") != MODEL_KIND:
        raise PipelineError(f"{model_dir} is not a retrieval model (model.json kind "
                            f"{config.get('kind')!r}, expected {MODEL_KIND!r})")
    if not (model_dir / MODEL_FILE).is_file():
        raise PipelineError(f"missing file {model_dir / MODEL_FILE}")
    if tokenizer_path is None and (model_dir / "tokenizer.json").is_file():
        tokenizer_path = model_dir / "tokenizer.json"
    tok = model_tokenizer_path(config, tokenizer_path, model_dir, "pass --data-dir")
    embedding_loss_class()  # registered, so a checkpoint saved with its loss deserialises
    model = keras.models.load_model(model_dir / MODEL_FILE, compile=False)
    return model, config, load_tokenizer(tok)
