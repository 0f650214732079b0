"""The two captioners that read a spatial grid per image: soft attention and a Transformer.

Owns the model maths of variants "attention" (Show, Attend and Tell, Xu et al. 2015, soft
attention) and "transformer" (an encoder over the grid cells and a causal decoder over words,
as in the Keras "image captioning" example), their one-step decoders for greedy/beam search,
and the per-word attention weights for maps (captioning.data.features checks that a features array
is a grid of the size a model was built for). Reads and writes no files: callers save and load
the Keras models (the custom layers below are registered, so keras.models.load_model restores
them). Imports captioning.utils only; Keras and TensorFlow inside functions (heavy).

Inputs of both training models (layer names fixed, decoders look layers up by name):
    image_input    (B, G, C) float32: G grid cells of C channels, e.g. EfficientNet-Lite0
                   7x7x1280 -> G 49, C 1280; VGG16 block5_conv3 14x14x512 -> G 196, C 512.
                   G and C come from the features file; the model records them in its input.
    caption_input  (B, T) int32 token ids, 0 = padding after the caption (any T).
    image_index    (B,) int32: the row of image_input that caption b describes. Training
                   batches hold each image once with all its captions (grid_data), so the
                   grid projection, the encoder and the cross-attention keys/values run once
                   per image instead of once per caption (5x less of the model's largest cost).
Output "output": (B, T, V) softmax; output[:, t] is the distribution of token t+1 given
tokens 0..t (teacher forcing). Both decoders are causal, so running the model on a prefix and
taking the last step is the course's re-run-the-prefix decoding (prefix_greedy, the reference).

Decoding (grid_step_fns) follows the project's step interface: init_fn(grid (N, G, C)) -> states,
step_fn(states, last_ids) -> (log_probs (N, V), new_states), states a tuple of numpy arrays whose
first axis is the partial caption. Each caption's image is carried as its row number into the
batch that init_fn encoded (kept by the closure), so beam search reorders an int per caption
instead of copying grids. The step calls the very layers of the training model (one source of
truth for the maths), compiled with tf.function.
    attention:   states (rows, h, c): the LSTM state is carried.
    transformer: states (rows, k_0, v_0, k_1, v_1, ...): a key/value cache of every decoder
                 block's self-attention, (N, t, heads, key_dim) each; the cross-attention keys
                 and values of the grid are projected once per image by init_fn.
"""
import numpy as np

from captioning.utils import PipelineError

VARIANTS = ("attention", "transformer")

# ---- each variant's options and defaults (train.py's options; model.json records the values) ----
OPTIONS = {
    # plus embed_dim (word vectors and the deep output's width), units (LSTM) and dropout (on
    # the projected grid, the word vectors and the deep output), shared with merge/inject
    "attention": {
        "annotation_dim": 512,   # grid cells are projected to this width (the paper's a_i)
        "attention_dim": 256,    # width of the additive attention's hidden layer
        "penalty": 1.0,          # lambda of the doubly stochastic penalty (the paper's 1)
    },
    "transformer": {
        "d_model": 256,          # width of every word and grid cell vector
        "heads": 4,              # attention heads (key_dim = d_model / heads)
        "encoder_layers": 1,     # blocks over the grid cells
        "decoder_layers": 2,     # blocks over the words
        "ff_dim": 1024,          # hidden width of the feed-forward sublayers
        "dropout": 0.1,          # after every sublayer and on the inputs
    },
}
_A, _T = OPTIONS["attention"], OPTIONS["transformer"]

PACKAGE = "captioning"   # Keras registry package of the custom layers (saved in model.keras)


def _keras():
    """Keras and its TF backend are heavy imports: loaded on first use, not at import."""
    import keras
    return keras


# ---- the doubly stochastic attention penalty ---------------------------------------------
def attention_penalty(alphas, mask):
    """Xu et al.'s doubly stochastic penalty per caption: sum_i (1 - sum_t alpha_ti)^2.

    alphas (B, T, G): attention weights per word t over grid cells i; mask (B, T): 1 for the
    caption's real words (padding steps do not count). Returns (B,). keras.ops, any backend.
    """
    ops = _keras().ops
    mask = ops.cast(mask, alphas.dtype)
    coverage = ops.sum(alphas * ops.expand_dims(mask, -1), axis=1)          # (B, G)
    return ops.sum(ops.square(1.0 - coverage), axis=-1)


# ---- custom layers ----------------------------------------------------------------------------
def _register(cls):
    return _keras().saving.register_keras_serializable(package=PACKAGE)(cls)


def layer_classes():
    """Define (once) and return the custom layer classes; Keras is imported only here."""
    if _LAYERS:
        return _LAYERS
    keras = _keras()
    ops, layers = keras.ops, keras.layers

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
            width = ops.shape(x)[1]
            return x + ops.expand_dims(ops.slice(self.table, (start, 0), (width, self.table.shape[1])), 0)

        def get_config(self):
            return {**super().get_config(), "length": self.length}

    @_register
    class SoftAttentionLSTM(layers.Layer):
        """Show, Attend and Tell's decoder core: an LSTM that attends over the annotations.

        For each word t (teacher forcing: the input word vectors):
            e_ti  = w . tanh(W_a a_i + b + W_h h_{t-1})          AdditiveAttention(use_scale)
            alpha = softmax_i(e_t)                               context z = sum_i alpha_ti a_i
            beta  = sigmoid(f_beta(h_{t-1}));  z <- beta * z     the paper's gating scalar
            h_t, c_t = LSTMCell([word_t, z], (h_{t-1}, c_{t-1}))
        with h_0, c_0 = tanh(Dense(mean_i a_i)) (two Dense layers). call returns the sequences
        (h_t, z_t, alpha_t); in training it adds penalty * sum of attention_penalty over the
        batch / number of real words to the loss (the paper's ratio to the summed caption
        cross-entropy, since our cross-entropy is a mean per word).
        """

        def __init__(self, units, attention_dim, penalty=_A["penalty"], **kwargs):
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
            """(keys (B, G, attention_dim), h0, c0) of the annotations (B, G, A)."""
            mean = ops.mean(annotations, axis=1)
            return self.key_dense(annotations), self.init_h(mean), self.init_c(mean)

        def step(self, word, h, c, keys, annotations):
            """One word: (h_t, c_t, gated context z_t (B, A), alpha_t (B, G))."""
            query = ops.expand_dims(self.query_dense(h), 1)
            context, alpha = self.attention([query, annotations, keys], return_attention_scores=True)
            context = self.gate_dense(h) * context[:, 0]
            _, (h, c) = self.cell(ops.concatenate([word, context], axis=-1), [h, c])
            return h, c, context, alpha[:, 0]

        def call(self, words, annotations, image_index, caption_mask, training=False):
            # per image, then each caption takes its image's rows
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

    def attend_projected(mha, query, key, value, scores=False):
        """MultiHeadAttention on already-projected keys/values (B, S, heads, key_dim).

        The same sublayers and _compute_attention that MultiHeadAttention.call uses (as KerasHub's
        CachedMultiHeadAttention does); only the projection of key/value is skipped because it
        is cached. Returns (output (B, T, d), weights (B, heads, T, S) or None).
        """
        out, weights = mha._compute_attention(mha.query_dense(query), key, value,
                                              return_attention_scores=scores, training=False)
        return mha.output_dense(out), weights

    def feed_forward(block, x, training):
        return block.ff_out(block.ff_dropout(block.ff_hidden(x), training=training))

    @_register
    class TransformerEncoderBlock(layers.Layer):
        """Pre-norm Transformer block over grid cells: x + MHA(LN x); x + FFN(LN x)."""

        def __init__(self, d_model, heads, ff_dim, dropout=0.0, **kwargs):
            super().__init__(**kwargs)
            self.d_model, self.heads, self.ff_dim, self.rate = int(d_model), int(heads), int(ff_dim), float(dropout)
            self.norm1 = layers.LayerNormalization(epsilon=1e-5, name="norm1")
            self.attention = layers.MultiHeadAttention(self.heads, self.d_model // self.heads, name="attention")
            self.norm2 = layers.LayerNormalization(epsilon=1e-5, name="norm2")
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

        def call(self, x, training=False):
            n = self.norm1(x)
            x = x + self.dropout(self.attention(n, n, training=training), training=training)
            return x + self.dropout(feed_forward(self, self.norm2(x), training), training=training)

        def get_config(self):
            return {**super().get_config(), "d_model": self.d_model, "heads": self.heads,
                    "ff_dim": self.ff_dim, "dropout": self.rate}

    @_register
    class TransformerDecoderBlock(TransformerEncoderBlock):
        """Pre-norm decoder block: causal self-attention, cross-attention to the grid, FFN.

        call(y, memory, image_index) runs whole captions (use_causal_mask) whose grids are
        memory[image_index]; step(y_t, ...) runs one position against cached keys/values. Both
        go through _block and attend to the grid through keys/values projected once per image
        (project_memory), so the wiring and the maths exist once.
        """

        def __init__(self, d_model, heads, ff_dim, dropout=0.0, **kwargs):
            super().__init__(d_model, heads, ff_dim, dropout, **kwargs)
            self.cross_norm = layers.LayerNormalization(epsilon=1e-5, name="cross_norm")
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
            y = y + self.dropout(feed_forward(self, self.norm2(y), training), training=training)
            return y, weights

        def call(self, y, memory, image_index, training=False):
            memory_k, memory_v = (ops.take(x, image_index, axis=0) for x in self.project_memory(memory))
            y, _ = self._block(
                y, lambda n: self.attention(n, n, use_causal_mask=True, training=training),
                lambda n: attend_projected(self.cross_attention, n, memory_k, memory_v), training)
            return y

        def project_memory(self, memory):
            """Cross-attention keys and values of the grid, (B, G, heads, key_dim) each."""
            return self.cross_attention.key_dense(memory), self.cross_attention.value_dense(memory)

        def step(self, y, past_k, past_v, memory_k, memory_v):
            """One position y (N, 1, d) after cached (N, t, heads, key_dim) keys/values.

            Returns (y_out, k, v (with this position appended), cross weights (N, heads, 1, G)).
            Attending to every cached position is the causal mask of the last position.
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

    _LAYERS.update(PositionEmbedding=PositionEmbedding, SoftAttentionLSTM=SoftAttentionLSTM,
                   TransformerEncoderBlock=TransformerEncoderBlock,
                   TransformerDecoderBlock=TransformerDecoderBlock)
    return _LAYERS


_LAYERS = {}


# ---- the two networks, written once for training and decoding ---------------------------------
def _attention_annotations(parts, image, training=None):
    """a_i: the grid cells projected to annotation_dim (Dense relu), with dropout."""
    return parts["grid_dropout"](parts["grid_dense"](image), training=training)


def _deep_output(parts, words, h, context, training=None):
    """Xu et al.'s deep output: logits = L_o(E y_{t-1} + L_h h_t + L_z z_t)."""
    keras = _keras()
    hidden = keras.ops.add(keras.ops.add(words, parts["deep_h"](h)), parts["deep_z"](context))
    return parts["logits"](parts["deep_dropout"](hidden, training=training))


def _transformer_encode(parts, image, training=None):
    """Grid (B, G, C) -> memory (B, G, d): projection + learned cell positions + encoder blocks."""
    x = parts["grid_position"](parts["grid_dense"](image))
    x = parts["grid_dropout"](x, training=training)
    for block in _blocks(parts, "encoder_block"):
        x = block(x, training=training)
    return parts["encoder_norm"](x)


def _transformer_words(parts, tokens, start=0, training=None):
    y = parts["word_position"](parts["embedding"](tokens), start=start)
    return parts["word_dropout"](y, training=training)


def _blocks(parts, prefix):
    blocks = sorted((name for name in parts if name.startswith(prefix + "_")),
                    key=lambda name: int(name.rsplit("_", 1)[1]))
    return [parts[name] for name in blocks]


def _parts(model):
    """{layer name: layer} of a built or loaded model."""
    return {layer.name: layer for layer in model.layers}


def _inputs(grid_size, grid_dim):
    keras = _keras()
    return (keras.Input((grid_size, grid_dim), name="image_input", dtype="float32"),
            keras.Input((None,), name="caption_input", dtype="int32"),
            keras.Input((), name="image_index", dtype="int32"))


def build_attention_model(grid_size, grid_dim, vocab_size, embed_dim, units, dropout,
                          annotation_dim=_A["annotation_dim"], attention_dim=_A["attention_dim"],
                          penalty=_A["penalty"]):
    """Show, Attend and Tell (soft) for grids (grid_size, grid_dim); see SoftAttentionLSTM.

    Departures from the paper, each to fit 2 CPU cores: the grid is first projected to
    annotation_dim (Dense relu; Lite0's 1280 channels would make the LSTM input 5x wider), and
    the LSTM is one layer of `units`.
    """
    keras = _keras()
    layers = keras.layers
    classes = layer_classes()
    image, tokens, index = _inputs(grid_size, grid_dim)
    parts = {
        "grid_dense": layers.Dense(annotation_dim, activation="relu", name="grid_dense"),
        "grid_dropout": layers.Dropout(dropout, name="grid_dropout"),
        "embedding": layers.Embedding(vocab_size, embed_dim, name="embedding"),
        "embed_dropout": layers.Dropout(dropout, name="embed_dropout"),
        "decoder": classes["SoftAttentionLSTM"](units, attention_dim, penalty, name="decoder"),
        "deep_h": layers.Dense(embed_dim, name="deep_h"),
        "deep_z": layers.Dense(embed_dim, name="deep_z"),
        "deep_dropout": layers.Dropout(dropout, name="deep_dropout"),
        "logits": layers.Dense(vocab_size, name="logits"),
    }
    annotations = _attention_annotations(parts, image)
    words = parts["embed_dropout"](parts["embedding"](tokens))
    mask = keras.ops.not_equal(tokens, 0)
    hs, contexts, _ = parts["decoder"](words, annotations, index, mask)
    logits = _deep_output(parts, words, hs, contexts)
    out = layers.Activation("softmax", name="output")(logits)
    return keras.Model({"image_input": image, "caption_input": tokens, "image_index": index}, out,
                       name="caption_attention")


def build_transformer_model(grid_size, grid_dim, vocab_size, max_length, d_model=_T["d_model"],
                            heads=_T["heads"], encoder_layers=_T["encoder_layers"],
                            decoder_layers=_T["decoder_layers"], ff_dim=_T["ff_dim"],
                            dropout=_T["dropout"]):
    """Transformer captioner: encoder blocks over the grid cells, causal decoder over words.

    Grid cells are projected to d_model and get a learned position vector each (grid_size of
    them); words get a learned position vector per position (max_length of them, meta.json's).
    Pre-norm blocks (as nanoGPT), final LayerNorms, a linear "logits" layer and a softmax.
    """
    if d_model % heads:
        raise PipelineError(f"--d-model {d_model} must be a multiple of --heads {heads}")
    keras = _keras()
    layers = keras.layers
    classes = layer_classes()
    image, tokens, index = _inputs(grid_size, grid_dim)
    parts = {
        "grid_dense": layers.Dense(d_model, name="grid_dense"),
        "grid_position": classes["PositionEmbedding"](grid_size, name="grid_position"),
        "grid_dropout": layers.Dropout(dropout, name="grid_dropout"),
        "encoder_norm": layers.LayerNormalization(epsilon=1e-5, name="encoder_norm"),
        "embedding": layers.Embedding(vocab_size, d_model, name="embedding"),
        "word_position": classes["PositionEmbedding"](max_length, name="word_position"),
        "word_dropout": layers.Dropout(dropout, name="word_dropout"),
        "decoder_norm": layers.LayerNormalization(epsilon=1e-5, name="decoder_norm"),
        "logits": layers.Dense(vocab_size, name="logits"),
    }
    for i in range(encoder_layers):
        parts[f"encoder_block_{i}"] = classes["TransformerEncoderBlock"](
            d_model, heads, ff_dim, dropout, name=f"encoder_block_{i}")
    for i in range(decoder_layers):
        parts[f"decoder_block_{i}"] = classes["TransformerDecoderBlock"](
            d_model, heads, ff_dim, dropout, name=f"decoder_block_{i}")
    memory = _transformer_encode(parts, image)
    y = _transformer_words(parts, tokens)
    for block in _blocks(parts, "decoder_block"):
        y = block(y, memory, index)
    logits = parts["logits"](parts["decoder_norm"](y))
    out = layers.Activation("softmax", name="output")(logits)
    return keras.Model({"image_input": image, "caption_input": tokens, "image_index": index}, out,
                       name="caption_transformer")


def build_grid_model(variant, grid_size, grid_dim, vocab_size, max_length, **options):
    """build_attention_model or build_transformer_model by name; options are their keywords."""
    if variant == "attention":
        return build_attention_model(grid_size, grid_dim, vocab_size, **options)
    if variant == "transformer":
        return build_transformer_model(grid_size, grid_dim, vocab_size, max_length, **options)
    raise PipelineError(f"unknown grid variant {variant!r} (choose from {', '.join(VARIANTS)})")


def grid_cells(config):
    """G, the number of grid cells, from model.json's "grid" [H, W]."""
    height, width = config["grid"]
    return int(height) * int(width)


def build_from_config(config, mode="sequence"):
    """The grid model of model.json's fields: variant, grid [H, W], feature_dim (C),
    vocab_size, max_length and the variant's OPTIONS (missing ones take their defaults;
    attention also embed_dim, units, dropout)."""
    variant = config["variant"]
    if not config.get("grid"):
        raise PipelineError(f"the {variant} model reads a spatial grid per image: model.json needs "
                            f"its grid [H, W] (train it on extract_features.py --spatial grids)")
    if mode != "sequence":
        raise PipelineError(f"the {variant} model trains on whole captions only (mode "
                            f"'sequence'), not {mode!r}")
    options = {key: config.get(key, default) for key, default in OPTIONS[variant].items()}
    if variant == "attention":
        options.update(embed_dim=config["embed_dim"], units=config["units"], dropout=config["dropout"])
    return build_grid_model(variant, grid_cells(config), config["feature_dim"],
                            config["vocab_size"], config["max_length"], **options)


def model_variant(model):
    """'attention' or 'transformer' from a built/loaded model's layers."""
    names = {layer.name for layer in model.layers}
    if "decoder" in names:
        return "attention"
    if "decoder_block_0" in names:
        return "transformer"
    raise PipelineError(f"model {model.name!r} is neither an attention nor a transformer captioner")


# ---- one-step decoding ------------------------------------------------------------------------
def _attention_stepper(parts, grid_shape):
    import tensorflow as tf
    keras = _keras()
    ops = keras.ops
    decoder = parts["decoder"]
    cells, width = grid_shape
    spec = tf.TensorSpec
    state = spec((None, decoder.units), tf.float32)
    memory = (spec((None, cells, decoder.attention_dim), tf.float32),
              spec((None, cells, parts["grid_dense"].units), tf.float32))

    # fixed input signatures: one trace whatever the batch (greedy drops finished rows)
    @tf.function(input_signature=[spec((None, cells, width), tf.float32)])
    def encode(grid):
        annotations = _attention_annotations(parts, grid, training=False)
        keys, h, c = decoder.encode(annotations)
        return keys, annotations, h, c

    @tf.function(input_signature=[spec((None,), tf.int64), state, state, spec((None,), tf.int32),
                                  *memory])
    def step(rows, h, c, last_ids, keys, annotations):
        keys, annotations = ops.take(keys, rows, axis=0), ops.take(annotations, rows, axis=0)
        words = parts["embedding"](last_ids)
        h, c, context, alpha = decoder.step(words, h, c, keys, annotations)
        logits = _deep_output(parts, words, h, context, training=False)
        return ops.log_softmax(logits, axis=-1), h, c, alpha

    batch = {}

    def init_fn(grid):
        keys, annotations, h, c = encode(np.asarray(grid, dtype=np.float32))
        batch.update(keys=keys, annotations=annotations)
        return np.arange(len(h), dtype=np.int64), h.numpy(), c.numpy()

    def raw_step(states, last_ids):
        rows, h, c = states
        log_probs, h, c, alpha = step(rows, h, c, np.asarray(last_ids, dtype=np.int32),
                                      batch["keys"], batch["annotations"])
        return log_probs.numpy(), (rows, h.numpy(), c.numpy()), alpha.numpy()

    return init_fn, raw_step


def _transformer_stepper(parts, grid_shape):
    import tensorflow as tf
    keras = _keras()
    ops = keras.ops
    blocks = _blocks(parts, "decoder_block")
    heads = blocks[0].heads
    key_dim = blocks[0].d_model // heads
    cells, width = grid_shape
    spec = tf.TensorSpec
    cache = [spec((None, None, heads, key_dim), tf.float32)] * (2 * len(blocks))
    memory = [spec((None, cells, heads, key_dim), tf.float32)] * (2 * len(blocks))

    # fixed input signatures: one trace whatever the batch and the caption length so far
    @tf.function(input_signature=[spec((None, cells, width), tf.float32)])
    def encode(grid):
        memory = _transformer_encode(parts, grid, training=False)
        return [kv for block in blocks for kv in block.project_memory(memory)]

    @tf.function(input_signature=[spec((None,), tf.int64), cache, spec((None,), tf.int32), memory])
    def step(rows, cache, last_ids, memory):
        position = ops.shape(cache[0])[1]
        y = _transformer_words(parts, ops.expand_dims(last_ids, 1), start=position, training=False)
        new_cache = []
        for i, block in enumerate(blocks):
            y, k, v, weights = block.step(y, cache[2 * i], cache[2 * i + 1],
                                          ops.take(memory[2 * i], rows, axis=0),
                                          ops.take(memory[2 * i + 1], rows, axis=0))
            new_cache += [k, v]
        logits = parts["logits"](parts["decoder_norm"](y[:, 0]))
        # the map of a word: the last block's cross-attention, averaged over its heads
        return ops.log_softmax(logits, axis=-1), new_cache, ops.mean(weights[:, :, 0], axis=1)

    batch = {}

    def init_fn(grid):
        batch["kv"] = encode(np.asarray(grid, dtype=np.float32))
        n = len(grid)
        empty = np.zeros((n, 0, heads, key_dim), np.float32)
        return (np.arange(n, dtype=np.int64),) + tuple(empty.copy() for _ in range(2 * len(blocks)))

    def raw_step(states, last_ids):
        rows, cache = states[0], list(states[1:])
        log_probs, cache, weights = step(rows, cache, np.asarray(last_ids, dtype=np.int32), batch["kv"])
        return log_probs.numpy(), (rows,) + tuple(x.numpy() for x in cache), weights.numpy()

    return init_fn, raw_step


def raw_step_fns(model):
    """(init_fn, raw_step) where raw_step also returns the step's attention weights (N, G)."""
    parts = _parts(model)
    variant = model_variant(model)
    shape = tuple(int(s) for s in model.get_layer("image_input").output.shape[1:])
    return (_attention_stepper if variant == "attention" else _transformer_stepper)(parts, shape)


def grid_step_fns(model, config=None):
    """(init_fn(grid (N, G, C)) -> states, step_fn(states, last_ids) -> (log_probs, states)).

    The signature of decoding.STEP_BUILDERS; the variant is read from the model's layers."""
    init_fn, raw_step = raw_step_fns(model)

    def step_fn(states, last_ids):
        log_probs, states, _ = raw_step(states, last_ids)
        return log_probs, states

    return init_fn, step_fn


def attention_weights(model, grid, ids, start_id):
    """Per-word attention over the grid for captions already decoded: (N, len(ids[0]), G).

    ids: (N, L) generated ids (after startseq); the weights of word t are those the model used
    while predicting it (fed startseq, ids[:t]). For maps: reshape G to the grid's rows x cols.
    """
    ids = np.asarray(ids, dtype=np.int64)
    init_fn, raw_step = raw_step_fns(model)
    states = init_fn(grid)
    last = np.full(len(ids), start_id, dtype=np.int64)
    maps = []
    for t in range(ids.shape[1]):
        _, states, weights = raw_step(states, last)
        maps.append(weights)
        last = ids[:, t]
    return np.stack(maps, axis=1)


def prefix_step_fns(model, grid):
    """(init_fn, step_fn) of the step interface that keep no state but the tokens: every step
    re-runs the whole training model on (grid, prefix) for all rows at once and takes the last
    position. The reference the carried-state steps are tested against, and the alternative to
    the key/value cache that benchmarks/bench_grid.py times. init_fn takes image rows of `grid`."""
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


def prefix_greedy(model, grid, start_id, end_id, max_length, banned_ids=(), batch=64):
    """The re-run-the-whole-prefix loop, N images at once: the reference decoder for tests.

    Every step runs the full training model (encoder included) on (grid, startseq + words so
    far) and takes the last position's distribution; no state is carried. Returns N lists of
    generated ids, with the same rules as greedy decoding (banned ids never chosen, at most
    max_length - 1 tokens, a caption stops at end_id).
    """
    grid = np.asarray(grid, dtype=np.float32)
    out = []
    for lo in range(0, len(grid), batch):
        images = grid[lo:lo + batch]
        prefix = np.full((len(images), 1), start_id, dtype=np.int32)
        done = np.zeros(len(images), bool)
        captions = [[] for _ in images]
        for _ in range(max_length - 1):
            probs = model.predict_on_batch({"image_input": images, "caption_input": prefix,
                                            "image_index": np.arange(len(images), dtype=np.int32)})
            probs = np.array(probs[:, -1], dtype=np.float64)
            probs[:, list(banned_ids)] = -1.0
            words = np.argmax(probs, axis=1)
            for row in np.flatnonzero(~done):
                captions[row].append(int(words[row]))
            done |= words == end_id
            if done.all():
                break
            prefix = np.concatenate([prefix, words[:, None].astype(np.int32)], axis=1)
        out.extend(captions)
    return out
