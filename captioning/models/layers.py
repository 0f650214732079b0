"""The custom Keras layers of the grid captioners, and the inputs those captioners share.

Owns
  PositionEmbedding        a learned vector per position (grid cells, word positions)
  SoftAttentionLSTM        Show, Attend and Tell's decoder core (variant "attention")
  TransformerEncoderBlock  a pre-norm block over grid cells (variant "transformer")
  TransformerDecoderBlock  a pre-norm causal block over words that also attends to the grid
  attention_penalty        Xu et al.'s doubly stochastic penalty
  attend_projected         MultiHeadAttention on keys/values projected (and cached) beforehand
  grid_inputs              the three named inputs of both grid models

Each layer is registered with Keras as "captioning>ClassName": model.keras files store that name
and keras.models.load_model finds the class by it. Renaming a class or PACKAGE would make every
saved grid model unloadable (tests/test_models.py pins the names).

This module subclasses Keras' classes, so Keras is imported at its top: the model families
(attention.py, transformer.py) import it inside the functions that build or load a model, as the
package imports Keras itself, so that command lines start without TensorFlow.

Shapes: B captions (or images), T words, G grid cells, C channels, A annotation width,
d the transformer width, h heads, k = d / h the key width.
"""
import keras
from keras import layers, ops

PACKAGE = "captioning"   # Keras registry package of these layers (saved in model.keras: keep it)
LN_EPSILON = 1e-5        # every LayerNormalization (PyTorch's default, as nanoGPT)


def _register(cls):
    return keras.saving.register_keras_serializable(package=PACKAGE)(cls)


def grid_inputs(grid_size, grid_dim):
    """(image_input (B, G, C) float32, caption_input (B, T) int32, image_index (B,) int32).

    image_index[b] is the row of image_input that caption b describes: a training batch holds
    each image once with all its captions, so the grid is projected and encoded once per image.
    """
    return (keras.Input((grid_size, grid_dim), name="image_input", dtype="float32"),
            keras.Input((None,), name="caption_input", dtype="int32"),
            keras.Input((), name="image_index", dtype="int32"))


def attention_penalty(alphas, mask):
    """Xu et al.'s doubly stochastic penalty per caption: sum_i (1 - sum_t alpha_ti)^2.

    alphas (B, T, G): attention weights per word t over grid cells i; mask (B, T): 1 for the
    caption's real words (padding steps do not count). Returns (B,). keras.ops, any backend.
    """
    mask = ops.cast(mask, alphas.dtype)
    coverage = ops.sum(alphas * ops.expand_dims(mask, -1), axis=1)          # (B, G)
    return ops.sum(ops.square(1.0 - coverage), axis=-1)


def attend_projected(mha, query, key, value, scores=False):
    """MultiHeadAttention on already-projected keys/values (B, S, h, k).

    The same sublayers and the same private _compute_attention that MultiHeadAttention.call
    uses (as KerasHub's CachedMultiHeadAttention does); only the key/value projection is
    skipped, because the caller keeps it (the grid's once per image, the words' in a cache).
    query (B, T, d). Returns (output (B, T, d), weights (B, h, T, S) or None).
    """
    out, weights = mha._compute_attention(mha.query_dense(query), key, value,
                                          return_attention_scores=scores, training=False)
    return mha.output_dense(out), weights


@_register
class PositionEmbedding(layers.Layer):
    """Adds a learned vector per position: x[:, t] + table[start + t] (positions < length)."""

    def __init__(self, length, **kwargs):
        super().__init__(**kwargs)
        self.length = int(length)

    def build(self, input_shape):
        self.table = self.add_weight(shape=(self.length, int(input_shape[-1])),
                                     initializer="glorot_uniform", name="table")

    def call(self, x, start=0):
        """x (B, T, d) -> (B, T, d); start: the position of x[:, 0] (decoding one word at a time)."""
        width = ops.shape(x)[1]
        return x + ops.expand_dims(ops.slice(self.table, (start, 0), (width, self.table.shape[1])), 0)

    def get_config(self):
        return {**super().get_config(), "length": self.length}


@_register
class SoftAttentionLSTM(layers.Layer):
    """Show, Attend and Tell's decoder core: an LSTM that attends over the annotations a_i.

    For each word t (teacher forcing: the input word vectors):
        e_ti  = w . tanh(W_a a_i + b + W_h h_{t-1})          AdditiveAttention(use_scale)
        alpha = softmax_i(e_t)                               context z = sum_i alpha_ti a_i
        beta  = sigmoid(f_beta(h_{t-1}));  z <- beta * z     the paper's gating scalar
        h_t, c_t = LSTMCell([word_t, z], (h_{t-1}, c_{t-1}))
    with h_0, c_0 = tanh(Dense(mean_i a_i)) (two Dense layers). call returns the sequences
    (h_t, z_t, alpha_t); in training it adds penalty * the summed attention_penalty of the
    batch / its number of real words to the loss (the paper's ratio to the summed caption
    cross-entropy, since our cross-entropy is a mean per word).
    """

    def __init__(self, units, attention_dim, penalty=1.0, **kwargs):
        super().__init__(**kwargs)
        self.units, self.attention_dim, self.penalty = int(units), int(attention_dim), float(penalty)
        self.key_dense = layers.Dense(self.attention_dim, name="key_dense")
        self.query_dense = layers.Dense(self.attention_dim, use_bias=False, name="query_dense")
        self.attention = layers.AdditiveAttention(use_scale=True, name="additive_attention")
        self.gate_dense = layers.Dense(1, activation="sigmoid", name="gate_dense")
        self.init_h = layers.Dense(self.units, activation="tanh", name="init_h")
        self.init_c = layers.Dense(self.units, activation="tanh", name="init_c")
        self.cell = layers.LSTMCell(self.units, name="lstm_cell")

    def build(self, words_shape, annotations_shape, image_index_shape=None, caption_mask_shape=None):
        # every sublayer is built here: variables cannot be created inside the scan loop
        width = int(annotations_shape[-1])
        self.key_dense.build((None, None, width))
        self.query_dense.build((None, self.units))
        self.attention.build([(None, 1, self.attention_dim), (None, None, width),
                              (None, None, self.attention_dim)])
        self.gate_dense.build((None, self.units))
        self.init_h.build((None, width))
        self.init_c.build((None, width))
        self.cell.build((None, int(words_shape[-1]) + width))

    def encode(self, annotations):
        """annotations (B, G, A) -> (keys (B, G, attention_dim), h0 (B, units), c0 (B, units))."""
        mean = ops.mean(annotations, axis=1)
        return self.key_dense(annotations), self.init_h(mean), self.init_c(mean)

    def step(self, word, h, c, keys, annotations):
        """One word (B, E) -> (h_t, c_t (B, units), gated context z_t (B, A), alpha_t (B, G))."""
        query = ops.expand_dims(self.query_dense(h), 1)
        context, alpha = self.attention([query, annotations, keys], return_attention_scores=True)
        context = self.gate_dense(h) * context[:, 0]
        _, (h, c) = self.cell(ops.concatenate([word, context], axis=-1), [h, c])
        return h, c, context, alpha[:, 0]

    def call(self, words, annotations, image_index, caption_mask, training=False):
        """words (B, T, E), annotations (M, G, A) per image, image_index (B,), caption_mask (B, T)
        -> (hs (B, T, units), contexts (B, T, A), alphas (B, T, G))."""
        # encoded once per image, then each caption takes its image's rows
        keys, h, c = (ops.take(x, image_index, axis=0) for x in self.encode(annotations))
        annotations = ops.take(annotations, image_index, axis=0)
        batch, cells, width = ops.shape(annotations)[0], ops.shape(annotations)[1], annotations.shape[-1]
        # keras.ops.scan on TF stacks outputs shaped like the carry, so the carry holds the
        # outputs too: (h, c, z, alpha), each step's value being the new carry
        init = (h, c, ops.zeros((batch, width), h.dtype), ops.zeros((batch, cells), h.dtype))

        def body(carry, word):
            out = self.step(word, carry[0], carry[1], keys, annotations)
            return out, out

        _, (hs, _, contexts, alphas) = ops.scan(body, init, ops.transpose(words, (1, 0, 2)))
        hs, contexts, alphas = (ops.transpose(x, (1, 0, 2)) for x in (hs, contexts, alphas))
        if training and self.penalty:
            mask = ops.cast(caption_mask, alphas.dtype)
            self.add_loss(self.penalty * ops.sum(attention_penalty(alphas, mask))
                          / ops.maximum(ops.sum(mask), 1.0))
        return hs, contexts, alphas

    def compute_output_shape(self, words_shape, annotations_shape, image_index_shape=None,
                             caption_mask_shape=None):
        b, t = words_shape[0], words_shape[1]
        return (b, t, self.units), (b, t, annotations_shape[-1]), (b, t, annotations_shape[1])

    def get_config(self):
        return {**super().get_config(), "units": self.units,
                "attention_dim": self.attention_dim, "penalty": self.penalty}


@_register
class TransformerEncoderBlock(layers.Layer):
    """Pre-norm Transformer block over grid cells: x + MHA(LN x); x + FFN(LN x). (B, G, d) -> same."""

    def __init__(self, d_model, heads, ff_dim, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.d_model, self.heads, self.ff_dim, self.rate = int(d_model), int(heads), int(ff_dim), float(dropout)
        self.norm1 = layers.LayerNormalization(epsilon=LN_EPSILON, name="norm1")
        self.attention = layers.MultiHeadAttention(self.heads, self.d_model // self.heads, name="attention")
        self.norm2 = layers.LayerNormalization(epsilon=LN_EPSILON, name="norm2")
        self.ff_hidden = layers.Dense(self.ff_dim, activation="relu", name="ff_hidden")
        self.ff_out = layers.Dense(self.d_model, name="ff_out")
        self.dropout = layers.Dropout(self.rate)
        self.ff_dropout = layers.Dropout(self.rate)

    def build(self, x_shape):
        shape = (None, None, self.d_model)
        self.norm1.build(shape)
        self.attention.build(shape, shape)
        self.norm2.build(shape)
        self.ff_hidden.build(shape)
        self.ff_out.build((None, None, self.ff_dim))

    def feed_forward(self, x, training):
        return self.ff_out(self.ff_dropout(self.ff_hidden(x), training=training))

    def call(self, x, training=False):
        n = self.norm1(x)
        x = x + self.dropout(self.attention(n, n, training=training), training=training)
        return x + self.dropout(self.feed_forward(self.norm2(x), training), training=training)

    def get_config(self):
        return {**super().get_config(), "d_model": self.d_model, "heads": self.heads,
                "ff_dim": self.ff_dim, "dropout": self.rate}


@_register
class TransformerDecoderBlock(TransformerEncoderBlock):
    """Pre-norm decoder block: causal self-attention, cross-attention to the grid, FFN.

    call(y, memory, image_index) runs whole captions (use_causal_mask) whose grids are
    memory[image_index]; step(y_t, ...) runs one position against cached keys/values. Both go
    through _block and attend to the grid through keys/values projected once per image
    (project_memory), so the wiring and the maths exist once.
    """

    def __init__(self, d_model, heads, ff_dim, dropout=0.0, **kwargs):
        super().__init__(d_model, heads, ff_dim, dropout, **kwargs)
        self.cross_norm = layers.LayerNormalization(epsilon=LN_EPSILON, name="cross_norm")
        self.cross_attention = layers.MultiHeadAttention(self.heads, self.d_model // self.heads,
                                                         name="cross_attention")

    def build(self, y_shape, memory_shape=None, image_index_shape=None):
        super().build(y_shape)
        shape = (None, None, self.d_model)
        self.cross_norm.build(shape)
        self.cross_attention.build(shape, shape)

    def _block(self, y, self_attend, cross_attend, training):
        y = y + self.dropout(self_attend(self.norm1(y)), training=training)
        context, weights = cross_attend(self.cross_norm(y))
        y = y + self.dropout(context, training=training)
        y = y + self.dropout(self.feed_forward(self.norm2(y), training), training=training)
        return y, weights

    def call(self, y, memory, image_index, training=False):
        """y (B, T, d) words, memory (M, G, d) per image, image_index (B,) -> (B, T, d)."""
        memory_k, memory_v = (ops.take(x, image_index, axis=0) for x in self.project_memory(memory))
        y, _ = self._block(
            y, lambda n: self.attention(n, n, use_causal_mask=True, training=training),
            lambda n: attend_projected(self.cross_attention, n, memory_k, memory_v), training)
        return y

    def project_memory(self, memory):
        """Cross-attention keys and values of the grid memory (M, G, d): (M, G, h, k) each."""
        return self.cross_attention.key_dense(memory), self.cross_attention.value_dense(memory)

    def step(self, y, past_k, past_v, memory_k, memory_v):
        """One position y (N, 1, d) after cached (N, t, h, k) keys/values.

        Returns (y_out (N, 1, d), k, v (N, t+1, h, k) with this position appended, cross
        weights (N, h, 1, G)). Attending to every cached position is the causal mask of the
        last position.
        """
        cache = {}

        def self_attend(n):
            cache["k"] = ops.concatenate([past_k, self.attention.key_dense(n)], axis=1)
            cache["v"] = ops.concatenate([past_v, self.attention.value_dense(n)], axis=1)
            return attend_projected(self.attention, n, cache["k"], cache["v"])[0]

        y, weights = self._block(
            y, self_attend,
            lambda n: attend_projected(self.cross_attention, n, memory_k, memory_v, scores=True),
            False)
        return y, cache["k"], cache["v"], weights
