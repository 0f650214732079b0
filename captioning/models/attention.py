"""Variant "attention": Show, Attend and Tell (Xu et al. 2015, soft attention) over a spatial grid.

Owns the model's options (OPTIONS), its builder (build from model.json's fields, or
build_attention_model with explicit sizes) and its one-step decoder (step_fns, and
attention_step_fns which also returns each word's attention). captioning.models.registry lists
them. The decoder core is layers.SoftAttentionLSTM; reads and writes no files. layers.py and
Keras are imported inside the functions (heavy; command lines start without them).

Inputs (layer names fixed, decoders look layers up by name):
    image_input    (B, G, C) float32: G grid cells of C channels, e.g. EfficientNet-Lite0
                   7x7x1280 -> G 49, C 1280; VGG16 block5_conv3 14x14x512 -> G 196, C 512.
    caption_input  (B, T) int32 token ids, 0 = padding after the caption (any T).
    image_index    (B,) int32: the row of image_input that caption b describes.
Output "output": (B, T, V) softmax; output[:, t] is the distribution of token t+1 given
tokens 0..t (teacher forcing).

    a   = grid_dropout(grid_dense(image_input))          Dense(annotation_dim, relu)  (B, G, A)
    y   = embed_dropout(embedding(caption_input))        Embedding(V, embed_dim)      (B, T, E)
    h, z, alpha = decoder(y, a, image_index, mask)       SoftAttentionLSTM(units)
    out = softmax(logits(deep_dropout(y + deep_h(h) + deep_z(z))))    the paper's deep output

Decoding carries the LSTM state: states (rows, h, c), rows being each caption's image in the
batch init_fn encoded (kept by the closure, so beam search reorders an int per caption instead
of copying grids). The step calls the training model's own layers, compiled with tf.function.
"""
import numpy as np

# ---- options and defaults (train.py's options; model.json records the values) -----------------
# plus embed_dim (word vectors and the deep output's width), units (LSTM) and dropout (on the
# projected grid, the word vectors and the deep output), shared with merge/inject
OPTIONS = {
    "annotation_dim": 512,   # grid cells are projected to this width (the paper's a_i)
    "attention_dim": 256,    # width of the additive attention's hidden layer
    "penalty": 1.0,          # lambda of the doubly stochastic penalty (the paper's 1)
}


# ---- the network, written once for training and decoding --------------------------------------
def _annotations(parts, image, training=None):
    """a_i: the grid cells (B, G, C) projected to annotation_dim (Dense relu), with dropout."""
    return parts["grid_dropout"](parts["grid_dense"](image), training=training)


def _deep_output(parts, words, h, context, training=None):
    """Xu et al.'s deep output: logits = L_o(E y_{t-1} + L_h h_t + L_z z_t), (..., V)."""
    from keras import ops
    hidden = ops.add(ops.add(words, parts["deep_h"](h)), parts["deep_z"](context))
    return parts["logits"](parts["deep_dropout"](hidden, training=training))


def build_attention_model(grid_size, grid_dim, vocab_size, embed_dim, units, dropout,
                          annotation_dim=OPTIONS["annotation_dim"],
                          attention_dim=OPTIONS["attention_dim"], penalty=OPTIONS["penalty"]):
    """Show, Attend and Tell (soft) for grids (grid_size G, grid_dim C); see the module docstring.

    Departures from the paper, each to fit 2 CPU cores: the grid is first projected to
    annotation_dim (Dense relu; Lite0's 1280 channels would make the LSTM input 5x wider), and
    the LSTM is one layer of `units`.
    """
    import keras
    from keras import layers
    from captioning.models.layers import SoftAttentionLSTM, grid_inputs
    image, tokens, index = grid_inputs(grid_size, grid_dim)
    parts = {
        "grid_dense": layers.Dense(annotation_dim, activation="relu", name="grid_dense"),
        "grid_dropout": layers.Dropout(dropout, name="grid_dropout"),
        "embedding": layers.Embedding(vocab_size, embed_dim, name="embedding"),
        "embed_dropout": layers.Dropout(dropout, name="embed_dropout"),
        "decoder": SoftAttentionLSTM(units, attention_dim, penalty, name="decoder"),
        "deep_h": layers.Dense(embed_dim, name="deep_h"),
        "deep_z": layers.Dense(embed_dim, name="deep_z"),
        "deep_dropout": layers.Dropout(dropout, name="deep_dropout"),
        "logits": layers.Dense(vocab_size, name="logits"),
    }
    annotations = _annotations(parts, image)
    words = parts["embed_dropout"](parts["embedding"](tokens))
    mask = keras.ops.not_equal(tokens, 0)
    hs, contexts, _ = parts["decoder"](words, annotations, index, mask)
    logits = _deep_output(parts, words, hs, contexts)
    out = layers.Activation("softmax", name="output")(logits)
    return keras.Model({"image_input": image, "caption_input": tokens, "image_index": index}, out,
                       name="caption_attention")


def build(config, mode="sequence"):
    """The model of model.json's fields: grid [H, W], feature_dim (C), vocab_size, embed_dim,
    units, dropout and OPTIONS' keys. It trains on whole captions only (mode "sequence")."""
    height, width = config["grid"]
    return build_attention_model(
        int(height) * int(width), config["feature_dim"], config["vocab_size"], config["embed_dim"],
        config["units"], config["dropout"], **{key: config[key] for key in OPTIONS})


# ---- one-step decoding ------------------------------------------------------------------------
def attention_step_fns(model):
    """(init_fn, step_fn) whose step also returns the word's attention over the grid cells.

    init_fn(grid (N, G, C)) -> states (rows (N,), h (N, U), c (N, U));
    step_fn(states, last_ids (N,)) -> (log_probs (N, V), new states, alpha (N, G)).
    """
    import tensorflow as tf
    from keras import ops
    parts = {layer.name: layer for layer in model.layers}
    decoder = parts["decoder"]
    cells, width = (int(s) for s in model.get_layer("image_input").output.shape[1:])
    spec = tf.TensorSpec
    state = spec((None, decoder.units), tf.float32)
    memory = (spec((None, cells, decoder.attention_dim), tf.float32),
              spec((None, cells, parts["grid_dense"].units), tf.float32))

    # fixed input signatures: one trace whatever the batch (greedy drops finished rows)
    @tf.function(input_signature=[spec((None, cells, width), tf.float32)])
    def encode(grid):
        annotations = _annotations(parts, grid, training=False)
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

    batch = {}     # the keys and annotations of the images init_fn encoded last

    def init_fn(grid):
        keys, annotations, h, c = encode(np.asarray(grid, dtype=np.float32))
        batch.update(keys=keys, annotations=annotations)
        return np.arange(len(h), dtype=np.int64), h.numpy(), c.numpy()

    def step_fn(states, last_ids):
        rows, h, c = states
        log_probs, h, c, alpha = step(rows, h, c, np.asarray(last_ids, dtype=np.int32),
                                      batch["keys"], batch["annotations"])
        return log_probs.numpy(), (rows, h.numpy(), c.numpy()), alpha.numpy()

    return init_fn, step_fn


def step_fns(model, config=None):
    """(init_fn, step_fn) of decoding's step interface: attention_step_fns without the weights."""
    init_fn, step_with_weights = attention_step_fns(model)
    return init_fn, lambda states, last_ids: step_with_weights(states, last_ids)[:2]
