"""Variant "transformer": an encoder over the grid cells and a causal decoder over the words.

As in the Keras "image captioning" example, with pre-norm blocks (as nanoGPT). Owns the
model's options (OPTIONS), its builder (build from model.json's fields, or
build_transformer_model with explicit sizes) and its one-step decoder with a key/value cache
(step_fns, and attention_step_fns which also returns each word's attention over the grid).
captioning.models.registry lists them. The blocks are layers.TransformerEncoderBlock and
TransformerDecoderBlock; reads and writes no files. layers.py and Keras are imported inside the
functions (heavy; command lines start without them). PipelineError from captioning.utils.

Inputs and output as the attention model's (captioning/models/attention.py):
image_input (B, G, C) float32, caption_input (B, T) int32 (0 = padding), image_index (B,) int32;
"output" (B, T, V) softmax. Sizes: d = d_model, h = heads, k = d / h.

    memory = encoder_norm(encoder_block_i(grid_dropout(grid_position(grid_dense(image_input)))))
    y      = word_dropout(word_position(embedding(caption_input)))          (B, T, d)
    y      = decoder_block_j(y, memory, image_index)                         causal
    out    = softmax(logits(decoder_norm(y)))

Decoding: states (rows, k_0, v_0, k_1, v_1, ...): rows as in attention.py, then a key/value
cache of every decoder block's self-attention, (N, t, h, k) each; the cross-attention keys and
values of the grid are projected once per image by init_fn.
"""
import numpy as np

from captioning.utils import PipelineError

# ---- options and defaults (train.py's options; model.json records the values) -----------------
OPTIONS = {
    "d_model": 256,          # width of every word and grid cell vector
    "heads": 4,              # attention heads (key_dim = d_model / heads)
    "encoder_layers": 1,     # blocks over the grid cells
    "decoder_layers": 2,     # blocks over the words
    "ff_dim": 1024,          # hidden width of the feed-forward sublayers
    "dropout": 0.1,          # after every sublayer and on the inputs
}


# ---- the network, written once for training and decoding --------------------------------------
def _blocks(parts, prefix):
    """The layers named prefix_0, prefix_1, ... in order."""
    names = sorted((name for name in parts if name.startswith(prefix + "_")),
                   key=lambda name: int(name.rsplit("_", 1)[1]))
    return [parts[name] for name in names]


def _encode(parts, image, training=None):
    """Grid (B, G, C) -> memory (B, G, d): projection + learned cell positions + encoder blocks."""
    x = parts["grid_position"](parts["grid_dense"](image))
    x = parts["grid_dropout"](x, training=training)
    for block in _blocks(parts, "encoder_block"):
        x = block(x, training=training)
    return parts["encoder_norm"](x)


def _words(parts, tokens, start=0, training=None):
    """Token ids (B, T) at positions start.. -> word vectors (B, T, d) with their positions."""
    y = parts["word_position"](parts["embedding"](tokens), start=start)
    return parts["word_dropout"](y, training=training)


def build_transformer_model(grid_size, grid_dim, vocab_size, max_length,
                            d_model=OPTIONS["d_model"], heads=OPTIONS["heads"],
                            encoder_layers=OPTIONS["encoder_layers"],
                            decoder_layers=OPTIONS["decoder_layers"], ff_dim=OPTIONS["ff_dim"],
                            dropout=OPTIONS["dropout"]):
    """Transformer captioner for grids (grid_size G, grid_dim C); see the module docstring.

    Grid cells are projected to d_model and get a learned position vector each (grid_size of
    them); words get a learned position vector per position (max_length of them, meta.json's).
    Final LayerNorms, a linear "logits" layer and a softmax.
    """
    if d_model % heads:
        raise PipelineError(f"--d-model {d_model} must be a multiple of --heads {heads}")
    import keras
    from keras import layers
    from captioning.models.layers import (LN_EPSILON, PositionEmbedding, TransformerDecoderBlock,
                                          TransformerEncoderBlock, grid_inputs)
    image, tokens, index = grid_inputs(grid_size, grid_dim)
    parts = {
        "grid_dense": layers.Dense(d_model, name="grid_dense"),
        "grid_position": PositionEmbedding(grid_size, name="grid_position"),
        "grid_dropout": layers.Dropout(dropout, name="grid_dropout"),
        "encoder_norm": layers.LayerNormalization(epsilon=LN_EPSILON, name="encoder_norm"),
        "embedding": layers.Embedding(vocab_size, d_model, name="embedding"),
        "word_position": PositionEmbedding(max_length, name="word_position"),
        "word_dropout": layers.Dropout(dropout, name="word_dropout"),
        "decoder_norm": layers.LayerNormalization(epsilon=LN_EPSILON, name="decoder_norm"),
        "logits": layers.Dense(vocab_size, name="logits"),
    }
    for i in range(encoder_layers):
        parts[f"encoder_block_{i}"] = TransformerEncoderBlock(d_model, heads, ff_dim, dropout,
                                                              name=f"encoder_block_{i}")
    for i in range(decoder_layers):
        parts[f"decoder_block_{i}"] = TransformerDecoderBlock(d_model, heads, ff_dim, dropout,
                                                              name=f"decoder_block_{i}")
    memory = _encode(parts, image)
    y = _words(parts, tokens)
    for block in _blocks(parts, "decoder_block"):
        y = block(y, memory, index)
    logits = parts["logits"](parts["decoder_norm"](y))
    out = layers.Activation("softmax", name="output")(logits)
    return keras.Model({"image_input": image, "caption_input": tokens, "image_index": index}, out,
                       name="caption_transformer")


def build(config, mode="sequence"):
    """The model of model.json's fields: grid [H, W], feature_dim (C), vocab_size, max_length
    and OPTIONS' keys. It trains on whole captions only (mode "sequence")."""
    height, width = config["grid"]
    return build_transformer_model(int(height) * int(width), config["feature_dim"],
                                   config["vocab_size"], config["max_length"],
                                   **{key: config[key] for key in OPTIONS})


# ---- one-step decoding ------------------------------------------------------------------------
def attention_step_fns(model):
    """(init_fn, step_fn) whose step also returns the word's attention over the grid cells.

    init_fn(grid (N, G, C)) -> states (rows (N,), k_0, v_0, ... each (N, 0, h, k));
    step_fn(states, last_ids (N,)) -> (log_probs (N, V), new states (caches one longer),
    weights (N, G): the last block's cross-attention, averaged over its heads).
    """
    import tensorflow as tf
    from keras import ops
    parts = {layer.name: layer for layer in model.layers}
    blocks = _blocks(parts, "decoder_block")
    heads = blocks[0].heads
    key_dim = blocks[0].d_model // heads
    cells, width = (int(s) for s in model.get_layer("image_input").output.shape[1:])
    spec = tf.TensorSpec
    cache = [spec((None, None, heads, key_dim), tf.float32)] * (2 * len(blocks))
    memory = [spec((None, cells, heads, key_dim), tf.float32)] * (2 * len(blocks))

    # fixed input signatures: one trace whatever the batch and the caption length so far
    @tf.function(input_signature=[spec((None, cells, width), tf.float32)])
    def encode(grid):
        memory = _encode(parts, grid, training=False)
        return [kv for block in blocks for kv in block.project_memory(memory)]

    @tf.function(input_signature=[spec((None,), tf.int64), cache, spec((None,), tf.int32), memory])
    def step(rows, cache, last_ids, memory):
        position = ops.shape(cache[0])[1]
        y = _words(parts, ops.expand_dims(last_ids, 1), start=position, training=False)
        new_cache = []
        for i, block in enumerate(blocks):
            y, k, v, weights = block.step(y, cache[2 * i], cache[2 * i + 1],
                                          ops.take(memory[2 * i], rows, axis=0),
                                          ops.take(memory[2 * i + 1], rows, axis=0))
            new_cache += [k, v]
        logits = parts["logits"](parts["decoder_norm"](y[:, 0]))
        # the map of a word: the last block's cross-attention, averaged over its heads
        return ops.log_softmax(logits, axis=-1), new_cache, ops.mean(weights[:, :, 0], axis=1)

    batch = {}     # the grid keys/values of the images init_fn encoded last

    def init_fn(grid):
        batch["kv"] = encode(np.asarray(grid, dtype=np.float32))
        n = len(grid)
        empty = np.zeros((n, 0, heads, key_dim), np.float32)
        return (np.arange(n, dtype=np.int64),) + tuple(empty.copy() for _ in range(2 * len(blocks)))

    def step_fn(states, last_ids):
        rows, cache = states[0], list(states[1:])
        log_probs, cache, weights = step(rows, cache, np.asarray(last_ids, dtype=np.int32), batch["kv"])
        return log_probs.numpy(), (rows,) + tuple(x.numpy() for x in cache), weights.numpy()

    return init_fn, step_fn


def step_fns(model, config=None):
    """(init_fn, step_fn) of decoding's step interface: attention_step_fns without the weights."""
    init_fn, step_with_weights = attention_step_fns(model)
    return init_fn, lambda states, last_ids: step_with_weights(states, last_ids)[:2]
