"""The variant registry (one entry per model family) and a run folder's model files.

Owns
  VARIANTS      {name: Variant}: per family, the input it reads (pooled features (N, D) or
                spatial grids (N, G, C)), its builder from model.json's fields, its step
                builder for decoding and its size options with their defaults. Adding a family
                is its module plus one entry here: train.py's --variant choices, GRID_VARIANTS,
                OPTIONS, build_from_config and decoding.make_step_fn all read VARIANTS.
  build_from_config, build_model, rebuild_for_mode, layer_names: models from a config;
                model_variant: a built or loaded model's family (from its name).
  compile_model  Adam + the caption loss (loss.CaptionLoss).
  the run folder's model files: model.keras (the kept model) + model.json (all a decoder needs),
                read back by load_run / load_captioner, which accept the folder or its model.keras.
The families: merge and inject (lstm.py), attention (attention.py), transformer (transformer.py);
their Keras layers are in layers.py. Reads model.keras, model.json, tokenizer.json (its sha256
must match model.json's); writes .keras files atomically (save_keras). Imports captioning.utils,
data.text and the family modules; layers.py and loss.py subclass Keras' classes, so they are
imported inside the functions that compile or load a model (command lines start without Keras).
"""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from captioning.data import text
from captioning.models import attention, lstm, transformer
from captioning.utils import PipelineError, read_json

# ---- defaults (train.py's argparse defaults come from here) -----------------------------------
EMBED_DIM = 256          # word vector size (merge, inject, attention)
UNITS = 256              # LSTM units = image_dense and decoder_dense width (merge, inject, attention)
DROPOUT = 0.5            # on the image vector and on the word vectors (merge, inject, attention)
LEARNING_RATE = 1e-3     # Adam
LABEL_SMOOTHING = 0.0    # 0 = plain cross-entropy (the tutorial)
MODE = "sequence"        # sequence (whole captions, fast) | pairs (the tutorial's prefix pairs)
MODES = ("sequence", "pairs")

MODEL_FILE, CONFIG_FILE = "model.keras", "model.json"
POOLED, GRID = "pooled", "grid"       # a family's input: features (N, D) | grids (N, G, C)
LSTM_OPTIONS = {"embed_dim": EMBED_DIM, "units": UNITS, "dropout": DROPOUT}


# ---- the registry -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One model family.

    inputs           POOLED: features (N, D) | GRID: spatial grids (N, G, C), model.json "grid" [H, W]
    build            build(config, mode) -> keras.Model; config holds model.json's fields
                     (feature_dim, vocab_size, max_length, and `options`' keys), mode is MODES'
    steps            steps(model, config) -> (init_fn, step_fn), decoding.py's step interface
    options          {model.json size field: default}; train.py's options of the family
    pairs            also trains on the tutorial's prefix pairs (mode "pairs")
    attention_steps  attention_steps(model) -> (init_fn, step_fn) whose step_fn also returns
                     the word's attention over the grid cells (N, G); None without attention
    """
    inputs: str
    build: Callable
    steps: Callable
    options: dict
    pairs: bool = False
    attention_steps: Optional[Callable] = None


VARIANTS = {
    "merge": Variant(POOLED, lstm.build_merge, lstm.lstm_steps, LSTM_OPTIONS, pairs=True),
    "inject": Variant(POOLED, lstm.build_inject, lstm.lstm_steps, LSTM_OPTIONS, pairs=True),
    "attention": Variant(GRID, attention.build, attention.step_fns,
                         {**LSTM_OPTIONS, **attention.OPTIONS},
                         attention_steps=attention.attention_step_fns),
    "transformer": Variant(GRID, transformer.build, transformer.step_fns, transformer.OPTIONS,
                           attention_steps=transformer.attention_step_fns),
}
GRID_VARIANTS = tuple(name for name, variant in VARIANTS.items() if variant.inputs == GRID)
OPTIONS = {name: dict(variant.options) for name, variant in VARIANTS.items()}


# ---- models from a config ---------------------------------------------------------------------
def build_from_config(config, mode=None):
    """The model of config["variant"] in `mode` (default: config["mode"], else MODE).

    config: model.json's fields; size options it lacks take the family's defaults.
    """
    mode = mode or config.get("mode", MODE)
    name = config.get("variant")
    if name not in VARIANTS:
        raise PipelineError(f"unknown variant {name!r} (choose from {', '.join(VARIANTS)})")
    if mode not in MODES:
        raise PipelineError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
    variant = VARIANTS[name]
    if variant.inputs == GRID and not config.get("grid"):
        raise PipelineError(f"the {name} model reads a spatial grid per image: model.json needs "
                            f"its grid [H, W] (train it on extract_features.py --spatial grids)")
    if mode == "pairs" and not variant.pairs:
        raise PipelineError(f"the {name} model trains on whole captions only (mode "
                            f"'sequence'), not {mode!r}")
    return variant.build({**variant.options, **config}, mode)


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


def model_variant(model):
    """The family of a built or loaded model: every builder names its model caption_<family>."""
    name = model.name.removeprefix("caption_")
    if name not in VARIANTS:
        raise PipelineError(f"model {model.name!r} is none of the captioners "
                            f"(caption_ + {', '.join(VARIANTS)})")
    return name


# ---- compiling --------------------------------------------------------------------------------
def compile_model(model, learning_rate=LEARNING_RATE, label_smoothing=LABEL_SMOOTHING,
                  words_per_row=None):
    """Adam + CaptionLoss (words_per_row: see loss.CaptionLoss; data.words_per_row gives it)."""
    import keras
    from captioning.models.loss import CaptionLoss
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=CaptionLoss(label_smoothing, words_per_row), jit_compile=False)
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
    """keras.models.load_model with the package's Keras classes registered first: importing
    layers.py and loss.py registers them by name (a fresh process that only loads needs this)."""
    import keras
    from captioning.models import layers, loss  # noqa: F401 (imported to register their classes)
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
