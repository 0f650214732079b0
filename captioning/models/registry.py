"""Caption models: one builder per variant, the caption loss, compiling, and the run folder's model files.

Owns
  VARIANTS      the registry {name: builder}; builder(config, mode) -> keras.Model. `config` holds
                model.json's fields (feature_dim, vocab_size, max_length, embed_dim, units,
                dropout, and whatever a variant adds); `mode` is "sequence" or "pairs". A new
                variant adds its builder here and its step builder to decoding.STEP_BUILDERS.
  the wiring and layer names of merge and inject (below); decoders find layers by these names.
                The grid variants "attention" and "transformer" (spatial grid inputs) live in
                captioning/models/grid_models.py and are registered here under their names.
  CaptionLoss   masked sparse cross-entropy, every predicted word weighing the same (caption_loss_class).
  the run folder's model files: model.keras (the kept model) + model.json (all a decoder needs),
                read back by load_run / load_captioner, which accept the folder or its model.keras.
Reads  model.keras, model.json, tokenizer.json (its sha256 must match model.json's).
Writes .keras files atomically (save_keras).
Imports captioning.utils, text and grid_models only; Keras is imported inside the functions
that build or load models (heavy, and not needed to read a config).

The models. Inputs: image_input (B, feature_dim) float32 and caption_input (B, T) int32 token
ids (0 = padding). Keras LSTM weights are [kernel (E, 4U), recurrent_kernel (U, 4U), bias (4U)],
gate order i, f, c, o, activation tanh, recurrent activation sigmoid.

  "merge" (the tutorial's, default):
    img = image_dense(image_dropout(image_input))           Dense(units, relu)     (B, U)
    seq = lstm(embed_dropout(embedding(caption_input)))     Embedding(V, E, mask_zero=True),
                                                            LSTM(units), zero initial state
    mode "sequence": lstm returns every step (B, T, U); img goes through image_expand
        (Reshape to (B, 1, U)) and `add` broadcasts it onto every step.
    mode "pairs": lstm returns the last step (B, U) (the tutorial's model) and `add` adds img.
    out = output(decoder_dense(add([img, seq])))            Dense(units, relu), Dense(V, softmax)

  "inject" (init-inject):
    h0 = c0 = image_dense(image_dropout(image_input))       Dense(units, relu)     (B, U)
    seq = lstm(embed_dropout(embedding(caption_input)), initial_state=[h0, c0],
               mask=caption_input != 0)                     (an unnamed not_equal op node)
    out = output(decoder_dense(seq))                        no image_expand / add layers.

  In "sequence" mode output[:, t] is the distribution of token t+1 given tokens 0..t (teacher
  forcing); the LSTM is causal, so running the model on a prefix and taking the last step also
  decodes correctly. In "pairs" mode the output (B, V) is the next word after the (pre-padded)
  prefix. Both modes have the same weights under the same layer names: a model trained in one
  mode can be rebuilt in the other (rebuild_for_mode).
"""
import functools
import os
from pathlib import Path

from captioning.models import grid_models

from captioning.data import text
from captioning.utils import PipelineError, read_json

# ---- defaults (train.py's argparse defaults come from here) -----------------------------------
EMBED_DIM = 256          # word vector size
UNITS = 256              # LSTM units = image_dense and decoder_dense width
DROPOUT = 0.5            # on the image vector and on the word vectors
LEARNING_RATE = 1e-3     # Adam
LABEL_SMOOTHING = 0.0    # 0 = plain cross-entropy (the tutorial)
MODE = "sequence"        # sequence (whole captions, fast) | pairs (the tutorial's prefix pairs)
MODES = ("sequence", "pairs")

MODEL_FILE, CONFIG_FILE = "model.keras", "model.json"
LOSS_PACKAGE = "caption_train"   # the registered name saved inside every model.keras: keep it


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


def build_merge(config, mode=MODE):
    """The tutorial's merge model (see the module docstring)."""
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


def build_inject(config, mode=MODE):
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


VARIANTS = {"merge": build_merge, "inject": build_inject,
            "attention": grid_models.build_from_config, "transformer": grid_models.build_from_config}
GRID_VARIANTS = grid_models.VARIANTS   # these take spatial grids (N, G, C), the others (N, D)


def build_from_config(config, mode=None):
    """The model of config["variant"], in `mode` (default: config["mode"])."""
    mode = mode or config.get("mode", MODE)
    if config.get("variant") not in VARIANTS:
        raise PipelineError(f"unknown variant {config.get('variant')!r} "
                            f"(choose from {', '.join(VARIANTS)})")
    if mode not in MODES:
        raise PipelineError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
    return VARIANTS[config["variant"]](config, mode)


def build_model(variant, feature_dim, vocab_size, max_length, embed_dim=EMBED_DIM, units=UNITS,
                dropout=DROPOUT, mode=MODE):
    """build_from_config with the common sizes as arguments."""
    return build_from_config({"variant": variant, "feature_dim": feature_dim,
                              "vocab_size": vocab_size, "max_length": max_length,
                              "embed_dim": embed_dim, "units": units, "dropout": dropout}, mode)


def rebuild_for_mode(model, config, mode):
    """The same weights in a model of the other mode (layers matched by name)."""
    other = build_from_config(config, mode)
    for layer in other.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    return other


def layer_names(model):
    """Names of the model's named layers, in order (recorded in model.json for a reader)."""
    return [layer.name for layer in model.layers if not layer.name.startswith(("not_equal", "tf."))]


# ---- loss and compiling -----------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def caption_loss_class():
    """Masked sparse cross-entropy on probabilities; every predicted word weighs the same.

    Targets equal to 0 (padding) are masked. label_smoothing eps: (1-eps)*NLL + eps*mean_v(-log p_v).
    A batch's loss is its summed word losses divided by rows * words_per_row, where
    words_per_row is a constant of the training set (mean target words per caption; 1 in pairs
    mode). Why not the batch's own word count: length bucketing makes some batches all short
    captions, and a per-batch mean would give each word of a short batch several times the
    weight of a word in a long batch - on Flickr8k that is a pull towards ending captions
    early. With the constant, the epoch's gradient weighs all words alike, and the loss Keras
    reports (batch losses averaged by rows) is exactly the mean per predicted word, in nats.
    Without words_per_row (models saved before it existed) the batch's word count is used.
    Defined on first use (it needs Keras) and registered, so saved models that reference it load.
    """
    import keras
    from keras import ops

    @keras.saving.register_keras_serializable(package=LOSS_PACKAGE)
    class CaptionLoss(keras.losses.Loss):
        def __init__(self, label_smoothing=0.0, words_per_row=None, name="caption_loss",
                     reduction="sum", **kwargs):
            super().__init__(name=name, reduction="sum", **kwargs)
            self.label_smoothing = float(label_smoothing)
            self.words_per_row = float(words_per_row) if words_per_row else None

        def call(self, y_true, y_pred):
            y_true = ops.cast(y_true, "int32")
            # Keras' own sparse CE reuses the softmax's logits (fused, stable) when it can
            loss = keras.losses.sparse_categorical_crossentropy(y_true, y_pred)
            if self.label_smoothing:
                mean_log_p = ops.mean(ops.log(ops.clip(y_pred, 1e-7, 1.0)), axis=-1)
                loss = (1 - self.label_smoothing) * loss - self.label_smoothing * mean_log_p
            mask = ops.cast(ops.not_equal(y_true, 0), loss.dtype)
            if self.words_per_row:
                rows = ops.cast(ops.shape(y_true)[0], loss.dtype)
                return loss * mask / (rows * self.words_per_row)
            return loss * mask / ops.maximum(ops.sum(mask), 1.0)

        def get_config(self):
            return {"label_smoothing": self.label_smoothing, "words_per_row": self.words_per_row,
                    "name": self.name}

    return CaptionLoss


def compile_model(model, learning_rate=LEARNING_RATE, label_smoothing=LABEL_SMOOTHING,
                  words_per_row=None):
    """Adam + CaptionLoss (words_per_row: see caption_loss_class; data.words_per_row gives it)."""
    import keras
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=caption_loss_class()(label_smoothing, words_per_row), jit_compile=False)
    return model


# ---- model files ------------------------------------------------------------------------------
def save_keras(model, path):
    """model.save, atomically (Keras needs the .keras suffix, so the temp name keeps it)."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.keras")
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_keras(path, compile=True):
    """keras.models.load_model with the caption loss and the grid models' layers registered
    first (they register on first use; a fresh process that only loads needs this)."""
    import keras
    caption_loss_class()
    grid_models.layer_classes()
    return keras.models.load_model(path, compile=compile)


def run_folder(path):
    """The folder holding the model.keras + model.json pair: `path` may be the run folder or
    its model.keras. Links are resolved first (train.py publishes model.keras and model.json as
    links into its newest checkpoint), so both files are then read from the same epoch."""
    path = Path(path)
    model_file = path if path.suffix == ".keras" and not path.is_dir() else path / MODEL_FILE
    if not model_file.is_file():
        raise PipelineError(f"missing file {model_file}")
    return Path(os.path.realpath(model_file)).parent


def read_config(path):
    """model.json of a run folder (or of the folder of a model.keras path)."""
    return read_json(run_folder(path) / CONFIG_FILE)


def load_run(model_dir, tokenizer_path=None):
    """(keras model, config dict) of a run folder (or its model.keras): model.keras + model.json.

    tokenizer_path (file or data folder; default the data_dir recorded in model.json): its
    tokenizer.json must have the sha256 the model was trained with, else PipelineError - ids
    would decode to the wrong words.
    """
    model_dir = run_folder(model_dir)
    config = read_json(model_dir / CONFIG_FILE)
    if not (model_dir / MODEL_FILE).is_file():
        raise PipelineError(f"missing file {model_dir / MODEL_FILE}")
    text.model_tokenizer_path(config, tokenizer_path, model_dir)
    return load_keras(model_dir / MODEL_FILE, compile=False), config


def load_captioner(model_dir, data_dir):
    """(keras model, model.json config, tokenizer) of a run folder (or its model.keras), the
    vocabulary checked against data_dir's tokenizer.json (size, sha256, output width)."""
    data_dir = Path(data_dir)
    tokenizer = text.load_tokenizer(data_dir / "tokenizer.json")
    model_dir = run_folder(model_dir)
    tok_vocab = max(tokenizer["word_index"].values()) + 1
    config = read_json(model_dir / CONFIG_FILE)
    if config.get("vocab_size") != tok_vocab:
        raise PipelineError(f"model vocabulary ({config.get('vocab_size')} ids) does not match the "
                            f"tokenizer ({tok_vocab} ids); use the data dir the model was trained "
                            f"with ({model_dir / CONFIG_FILE})")
    model, config = load_run(model_dir, data_dir / "tokenizer.json")  # checks the sha256
    out_width = int(model.outputs[0].shape[-1])
    if out_width != tok_vocab:
        raise PipelineError(f"model outputs {out_width} words but the tokenizer has {tok_vocab} "
                            f"ids ({model_dir / MODEL_FILE})")
    return model, config, tokenizer
