"""Tests for captioning/models: the variant registry (one entry per family, everything else derived
from it), every family built from its defaults and decoded step by step, saved models that load
(the Keras names the files store are pinned), and the private Keras call the transformer uses."""
import inspect
import json
import zipfile

import numpy as np
import pytest

from captioning.inference import decoding
from captioning.models import attention, layers, lstm, registry, transformer
from captioning.models.loss import CaptionLoss
from captioning.utils import PipelineError

# tiny sizes of every family; H x W = 2 x 3 cells of C channels for the grid families
N, D, C, V, MAX_LENGTH = 4, 6, 5, 14, 7
GRID_HW = [2, 3]
SIZES = {
    "merge": dict(embed_dim=8, units=8, dropout=0.0),
    "inject": dict(embed_dim=8, units=8, dropout=0.0),
    "attention": dict(embed_dim=8, units=8, dropout=0.0, annotation_dim=6, attention_dim=4),
    "transformer": dict(d_model=8, heads=2, ff_dim=12, encoder_layers=1, decoder_layers=2,
                        dropout=0.0),
}


def config_of(variant, **sizes):
    """model.json's fields of a tiny model of `variant`."""
    grid = registry.VARIANTS[variant].inputs == registry.GRID
    return {"variant": variant, "mode": "sequence", "feature_dim": C if grid else D,
            "vocab_size": V, "max_length": MAX_LENGTH, **({"grid": GRID_HW} if grid else {}),
            **SIZES[variant], **sizes}


def inputs_of(variant, seed=0):
    """(model inputs dict, features (N, D) or grids (N, G, C), tokens (N, T)) of random data."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, V, size=(N, MAX_LENGTH - 1)).astype(np.int32)
    if registry.VARIANTS[variant].inputs == registry.GRID:
        features = rng.normal(size=(N, GRID_HW[0] * GRID_HW[1], C)).astype(np.float32)
        extra = {"image_index": np.arange(N, dtype=np.int32)}
    else:
        features, extra = rng.normal(size=(N, D)).astype(np.float32), {}
    return {"image_input": features, "caption_input": tokens, **extra}, features, tokens


def tiny_model(variant, seed=0):
    """A tiny model of `variant` with random weights (biases too), so no output is trivial."""
    import keras
    keras.utils.set_random_seed(seed)
    model = registry.build_from_config(config_of(variant))
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        layer.set_weights([rng.normal(0, 1 / np.sqrt(w.shape[0] if w.ndim > 1 else 4), w.shape)
                           .astype(np.float32) for w in layer.get_weights()])
    return model


def step_through(init_fn, step_fn, features, tokens):
    """log-probs (N, T, V) of feeding tokens[:, t] at step t, and the step's extra outputs."""
    states, log_probs, extras = init_fn(features), [], []
    for t in range(tokens.shape[1]):
        out = step_fn(states, tokens[:, t])
        log_probs.append(out[0])
        states = out[1]
        extras.append(out[2:])
    return np.stack(log_probs, axis=1), extras


# ---- the registry ------------------------------------------------------------------------------
def test_one_entry_per_family_and_everything_derived_from_it():
    assert list(registry.VARIANTS) == ["merge", "inject", "attention", "transformer"]
    for name, variant in registry.VARIANTS.items():
        assert isinstance(variant, registry.Variant)
        assert variant.inputs in (registry.POOLED, registry.GRID)
        assert callable(variant.build) and callable(variant.steps)
        assert registry.OPTIONS[name] == variant.options
        assert (variant.attention_steps is None) == (variant.inputs == registry.POOLED)
    assert registry.GRID_VARIANTS == ("attention", "transformer")
    # the family modules hold their own options; the registry's entry adds the shared LSTM sizes
    assert registry.OPTIONS["attention"] == {**registry.LSTM_OPTIONS, **attention.OPTIONS}
    assert registry.OPTIONS["transformer"] == transformer.OPTIONS
    assert registry.OPTIONS["merge"] == {"embed_dim": registry.EMBED_DIM, "units": registry.UNITS,
                                         "dropout": registry.DROPOUT}
    assert registry.VARIANTS["inject"].steps is lstm.lstm_steps


def test_train_py_choices_and_defaults_come_from_the_registry():
    import train
    args = train.parse_args(["--features", "f.pkl"])
    assert args.annotation_dim == attention.OPTIONS["annotation_dim"]
    assert args.d_model == transformer.OPTIONS["d_model"]
    assert args.transformer_dropout == transformer.OPTIONS["dropout"]
    assert args.embed_dim == registry.EMBED_DIM
    with pytest.raises(SystemExit):
        train.parse_args(["--features", "f.pkl", "--variant", "no_such_family"])


def test_build_from_config_errors():
    with pytest.raises(PipelineError, match="unknown variant 'rnn'.*merge, inject, attention, transformer"):
        registry.build_from_config({"variant": "rnn"})
    with pytest.raises(PipelineError, match="unknown mode 'words'"):
        registry.build_from_config(config_of("merge"), "words")
    with pytest.raises(PipelineError, match="attention model reads a spatial grid.*grid \\[H, W\\]"):
        registry.build_from_config(dict(config_of("attention"), grid=None))
    with pytest.raises(PipelineError, match="transformer model trains on whole captions only"):
        registry.build_from_config(config_of("transformer"), "pairs")
    with pytest.raises(PipelineError, match="--d-model 8 must be a multiple of --heads 3"):
        registry.build_from_config(config_of("transformer", heads=3))
    with pytest.raises(PipelineError, match="no decoder for variant 'rnn'"):
        decoding.make_step_fn(None, {"variant": "rnn"})


def test_missing_size_fields_take_the_family_defaults():
    config = config_of("transformer")
    del config["ff_dim"], config["decoder_layers"]
    model = registry.build_from_config(config)
    block = model.get_layer("decoder_block_1")            # the default is 2 decoder blocks
    assert block.ff_dim == transformer.OPTIONS["ff_dim"]
    assert "decoder_block_2" not in {layer.name for layer in model.layers}


# ---- every family: built from the registry, decoded through it --------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("variant", list(registry.VARIANTS))
def test_the_step_function_equals_the_teacher_forced_model(variant):
    """Feeding the tokens one step at a time gives the model's own next-word distributions."""
    model = tiny_model(variant)
    assert registry.model_variant(model) == variant
    inputs, features, tokens = inputs_of(variant)
    expected = np.asarray(model.predict_on_batch(inputs))                  # (N, T, V)
    log_probs, _ = step_through(*decoding.make_step_fn(model, config_of(variant)), features, tokens)
    np.testing.assert_allclose(np.exp(log_probs), expected, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("variant", registry.GRID_VARIANTS)
def test_attention_steps_are_the_decoding_steps_plus_weights(variant):
    model = tiny_model(variant)
    _, features, tokens = inputs_of(variant)
    plain, _ = step_through(*registry.VARIANTS[variant].steps(model, config_of(variant)), features, tokens)
    weighted, extras = step_through(*registry.VARIANTS[variant].attention_steps(model), features, tokens)
    np.testing.assert_array_equal(plain, weighted)
    weights = np.stack([extra[0] for extra in extras], axis=1)              # (N, T, G)
    assert weights.shape == (N, tokens.shape[1], GRID_HW[0] * GRID_HW[1])
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, atol=1e-5)
    # attention_weights: the weights of each generated word, fed startseq then the words before it
    start = 1
    fed = np.concatenate([np.full((N, 1), start, np.int32), tokens[:, :-1]], axis=1)
    _, extras = step_through(*registry.VARIANTS[variant].attention_steps(model), features, fed)
    np.testing.assert_array_equal(decoding.attention_weights(model, features, tokens, start),
                                  np.stack([extra[0] for extra in extras], axis=1))


# ---- saved models load, with the names the files store ----------------------------------------
LAYER_NAMES = {layers.PositionEmbedding: "captioning>PositionEmbedding",
               layers.SoftAttentionLSTM: "captioning>SoftAttentionLSTM",
               layers.TransformerEncoderBlock: "captioning>TransformerEncoderBlock",
               layers.TransformerDecoderBlock: "captioning>TransformerDecoderBlock"}


def test_the_registered_names_saved_models_refer_to_are_pinned():
    """model.keras files name these classes; a new name would make every saved model unloadable."""
    import keras
    for cls, name in {**LAYER_NAMES, CaptionLoss: "caption_train>CaptionLoss"}.items():
        assert keras.saving.get_registered_name(cls) == name
        assert keras.saving.get_registered_object(name) is cls


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(registry.VARIANTS))
def test_saved_and_reloaded_models_give_the_same_outputs_and_steps(variant, tmp_path):
    model = registry.compile_model(tiny_model(variant, seed=1), label_smoothing=0.1, words_per_row=3.0)
    inputs, features, tokens = inputs_of(variant, seed=2)
    model.train_on_batch(inputs, tokens)               # optimizer state and a trained loss saved too
    registry.save_keras(model, tmp_path / registry.MODEL_FILE)
    stored = json.loads(zipfile.ZipFile(tmp_path / registry.MODEL_FILE).read("config.json"))
    assert stored["compile_config"]["loss"]["registered_name"] == "caption_train>CaptionLoss"
    custom = {layer["registered_name"] for layer in stored["config"]["layers"]
              if ">" in (layer.get("registered_name") or "")}
    assert custom <= set(LAYER_NAMES.values())
    assert bool(custom) == (variant in registry.GRID_VARIANTS)
    loaded = registry.load_keras(tmp_path / registry.MODEL_FILE)
    assert loaded.loss.label_smoothing == 0.1 and loaded.loss.words_per_row == 3.0
    np.testing.assert_array_equal(loaded.predict_on_batch(inputs), model.predict_on_batch(inputs))
    config = config_of(variant)
    before, _ = step_through(*decoding.make_step_fn(model, config), features, tokens)
    after, _ = step_through(*decoding.make_step_fn(loaded, config), features, tokens)
    np.testing.assert_array_equal(after, before)


# ---- the private Keras call the transformer relies on -----------------------------------------
def test_multi_head_attention_private_compute_attention_is_as_the_code_expects():
    """layers.attend_projected calls MultiHeadAttention._compute_attention (private: a Keras
    upgrade may change it) on keys/values projected beforehand, and reads the layer's
    query_dense / key_dense / value_dense / output_dense. It must equal the public call."""
    import keras
    params = list(inspect.signature(keras.layers.MultiHeadAttention._compute_attention).parameters)
    assert params[:4] == ["self", "query", "key", "value"]
    assert {"return_attention_scores", "training"} <= set(params)
    keras.utils.set_random_seed(0)
    mha = keras.layers.MultiHeadAttention(2, 4)
    rng = np.random.default_rng(0)
    query = rng.normal(size=(3, 2, 8)).astype(np.float32)      # (B, T, d)
    memory = rng.normal(size=(3, 5, 8)).astype(np.float32)     # (B, S, d)
    expected, expected_weights = mha(query, memory, memory, return_attention_scores=True)
    key, value = mha.key_dense(memory), mha.value_dense(memory)   # (B, S, heads, key_dim)
    for scores in (True, False):
        out, weights = layers.attend_projected(mha, query, key, value, scores=scores)
        np.testing.assert_allclose(out, expected, atol=1e-5)
        if scores:
            assert weights.shape == (3, 2, 2, 5)                  # (B, heads, T, S)
            np.testing.assert_allclose(weights, expected_weights, atol=1e-6)


def test_train_py_defaults_are_the_best_recipe_and_the_tutorial_is_one_option_away():
    import train
    best = train.parse_args(["--features", "f.pkl"])
    assert (best.recipe, best.label_smoothing, best.select_by) == ("best", 0.1, "bleu")
    tutorial = train.parse_args(["--features", "f.pkl", "--recipe", "tutorial"])
    assert (tutorial.label_smoothing, tutorial.select_by) == (0.0, "loss")
    # an option given on the command line wins over its recipe
    mixed = train.parse_args(["--features", "f.pkl", "--recipe", "tutorial", "--select-by", "bleu"])
    assert (mixed.label_smoothing, mixed.select_by) == (0.0, "bleu")
    assert train.parse_args(["--features", "f.pkl", "--label-smoothing", "0"]).label_smoothing == 0.0
