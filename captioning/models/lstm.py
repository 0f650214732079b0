"""The two LSTM captioners on pooled features: "merge" (the tutorial's) and "inject".

Owns build_merge / build_inject (config, mode) -> keras.Model and their one-step decoder
lstm_steps (model, config) -> (init_fn, step_fn); captioning.models.registry lists them.
Reads and writes no files; imports nothing of the package. Keras and TensorFlow are imported
inside the functions (heavy, and not needed to read a config).

Inputs: image_input (B, D) float32 pooled features (D = config["feature_dim"]) and caption_input
(B, T) int32 token ids (0 = padding). Sizes: E = embed_dim, U = units, V = vocab_size. Keras
LSTM weights are [kernel (E, 4U), recurrent_kernel (U, 4U), bias (4U)], gate order i, f, c, o,
activation tanh, recurrent activation sigmoid. Decoders find layers by the names below.

  "merge" (the tutorial's, default):
    img = image_dense(image_dropout(image_input))           Dense(U, relu)     (B, U)
    seq = lstm(embed_dropout(embedding(caption_input)))     Embedding(V, E, mask_zero=True),
                                                            LSTM(U), zero initial state
    mode "sequence": lstm returns every step (B, T, U); img goes through image_expand
        (Reshape to (B, 1, U)) and `add` broadcasts it onto every step.
    mode "pairs": lstm returns the last step (B, U) (the tutorial's model) and `add` adds img.
    out = output(decoder_dense(add([img, seq])))            Dense(U, relu), Dense(V, softmax)

  "inject" (init-inject):
    h0 = c0 = image_dense(image_dropout(image_input))       Dense(U, relu)     (B, U)
    seq = lstm(embed_dropout(embedding(caption_input)), initial_state=[h0, c0],
               mask=caption_input != 0)                     (an unnamed not_equal op node)
    out = output(decoder_dense(seq))                        no image_expand / add layers.

  In "sequence" mode output[:, t] (B, T, V) is the distribution of token t+1 given tokens
  0..t (teacher forcing); the LSTM is causal, so running the model on a prefix and taking the
  last step also decodes correctly. In "pairs" mode the output (B, V) is the next word after
  the (pre-padded) prefix. Both modes have the same weights under the same layer names: a
  model trained in one mode can be rebuilt in the other (registry.rebuild_for_mode).

Decoding (lstm_steps) is not a copy of the network's maths: it calls the trained model's own
layers (image_dense, embedding, the LSTM's cell, add, decoder_dense, output) on one time step,
compiled once with tf.function, and carries the LSTM state (h, c) between steps instead of
re-running the whole prefix. The tests check it against the Keras model run on whole captions
and against decoding.tutorial_greedy.
"""
import numpy as np


# ---- builders ---------------------------------------------------------------------------------
def _inputs(config, mode):
    """The two named inputs. Only "pairs" mode fixes the caption length (the tutorial pads every
    prefix to max_length); "sequence" mode takes any length so batches can be trimmed."""
    import keras
    image = keras.Input((config["feature_dim"],), name="image_input", dtype="float32")
    length = None if mode == "sequence" else config["max_length"]
    tokens = keras.Input((length,), name="caption_input", dtype="int32")
    return image, tokens


def _image_vector(image, config):
    from keras import layers
    x = layers.Dropout(config["dropout"], name="image_dropout")(image)
    return layers.Dense(config["units"], activation="relu", name="image_dense")(x)


def _word_vectors(tokens, config):
    from keras import layers
    x = layers.Embedding(config["vocab_size"], config["embed_dim"], mask_zero=True,
                         name="embedding")(tokens)
    return layers.Dropout(config["dropout"], name="embed_dropout")(x)


def _head(x, config):
    from keras import layers
    x = layers.Dense(config["units"], activation="relu", name="decoder_dense")(x)
    return layers.Dense(config["vocab_size"], activation="softmax", name="output")(x)


def build_merge(config, mode):
    """The tutorial's merge model (see the module docstring); mode "sequence" or "pairs"."""
    import keras
    from keras import layers
    image, tokens = _inputs(config, mode)
    img = _image_vector(image, config)
    seq = layers.LSTM(config["units"], return_sequences=mode == "sequence", name="lstm")(
        _word_vectors(tokens, config))
    if mode == "sequence":
        img = layers.Reshape((1, config["units"]), name="image_expand")(img)
    out = _head(layers.Add(name="add")([img, seq]), config)
    return keras.Model({"image_input": image, "caption_input": tokens}, out, name="caption_merge")


def build_inject(config, mode):
    """Init-inject: the image vector is the LSTM's initial h and c (see the module docstring)."""
    import keras
    from keras import layers
    image, tokens = _inputs(config, mode)
    img = _image_vector(image, config)
    # Keras does not pass the embedding's mask on when initial_state is given: pass it by hand,
    # else pre-padded prefixes (pairs mode) would run the LSTM over the pads
    mask = keras.ops.not_equal(tokens, 0)
    seq = layers.LSTM(config["units"], return_sequences=mode == "sequence", name="lstm")(
        _word_vectors(tokens, config), mask=mask, initial_state=[img, img])
    return keras.Model({"image_input": image, "caption_input": tokens}, _head(seq, config),
                       name="caption_inject")


# ---- one-step decoding ------------------------------------------------------------------------
def lstm_steps(model, config):
    """(init_fn, step_fn) of a merge or inject model: the step interface of decoding.py.

    init_fn(features (N, D)) -> states (h, c, image), each (N, U);
    step_fn(states, last_ids (N,)) -> (log_probs (N, V), new states). Both run the model's own
    layers on one time step:
      init   image = image_dense(features); merge: h = c = 0 and image is kept for `add`;
             inject: h = c = image (the LSTM's initial state).
      step   h, c = lstm.cell(embedding(last_ids), (h, c));
             log p = log(output(decoder_dense(add([image, h]) if merge else h))).
    Dropout layers are left out: decoding is inference. config["variant"] picks merge or inject.
    """
    import tensorflow as tf
    get = model.get_layer
    image_dense, embedding, cell = get("image_dense"), get("embedding"), get("lstm").cell
    decoder_dense, output = get("decoder_dense"), get("output")
    merge = config.get("variant", "merge") == "merge"
    add = get("add") if merge else None

    @tf.function(reduce_retracing=True)
    def image_vector(features):
        return image_dense(features)

    @tf.function(reduce_retracing=True)
    def word_step(last_ids, h, c, image):
        # tf.identity drops the padding mask Keras attaches to the embedding's output (the
        # cell does not take masks; a last id is never padding)
        out, (h, c) = cell(tf.identity(embedding(last_ids)), [h, c])
        probs = output(decoder_dense(add([image, out]) if merge else out))
        # log of the model's own probabilities: the argmax is the one model.predict gives
        return tf.math.log(probs), h, c

    def init_fn(features):
        image = image_vector(np.asarray(features, dtype=np.float32)).numpy()
        if merge:
            zeros = np.zeros_like(image)
            return (zeros, zeros.copy(), image)
        return (image, image.copy(), image)

    def step_fn(states, last_ids):
        h, c, image = states
        log_probs, h, c = word_step(np.asarray(last_ids, dtype=np.int32), h, c, image)
        return log_probs.numpy(), (h.numpy(), c.numpy(), image)

    return init_fn, step_fn
