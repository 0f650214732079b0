"""Tests for the grid captioners (captioning/models/attention.py and transformer.py, grid_inputs.py,
the grid checks of features.py): decoding through the step functions equals the re-run-the-whole-prefix loop,
the doubly stochastic penalty on a hand-made alpha matrix, batches, files and bad input."""
import json

from pathlib import Path

import numpy as np
import pytest

from captioning.inference import attention_maps

from captioning.inference import decoding

from captioning.data import grid_inputs

from captioning.models import attention, layers, registry
from captioning.data.features import check_features, load_features, read_grids, read_rows
from learnable_data import CAPTIONS, FEATURE_DIM, TRAIN_ARGS, make_learnable
from captioning.data.spatial import SpatialWriter
from captioning.utils import PipelineError

# A learnable toy task: 12 images of G=6 cells x C=5 channels; one cell is "hot" and decides
# the caption: startseq <word of the cell> <colour of the channel> endseq.
G, C, V, MAX_LENGTH = 6, 5, 16, 6
PAD, START, END = 0, 1, 2
BANNED = (PAD, START)
OPTIONS = {
    "attention": dict(embed_dim=12, units=16, dropout=0.0, annotation_dim=10, attention_dim=8),
    "transformer": dict(d_model=16, heads=2, ff_dim=24, encoder_layers=1, decoder_layers=2,
                        dropout=0.0),
}


def toy_data(n=12, seed=0):
    rng = np.random.default_rng(seed)
    grid = rng.normal(0, 0.1, size=(n, G, C)).astype(np.float32)
    captions = []
    for i in range(n):
        cell, channel = i % G, i // G
        grid[i, cell, channel] += 3.0
        captions.append([START, 3 + cell, 3 + G + channel, END])
    return grid, np.array(captions, dtype=np.int32)


def grid_config(variant):
    """model.json's fields of a toy model (G = 2 x 3 cells)."""
    return {"variant": variant, "grid": [2, 3], "feature_dim": C, "vocab_size": V,
            "max_length": MAX_LENGTH, **OPTIONS[variant]}


def train_toy(variant, steps=150):
    import keras
    keras.utils.set_random_seed(3)
    grid, captions = toy_data()
    model = registry.build_from_config(grid_config(variant))
    registry.compile_model(model, learning_rate=0.02)
    inputs = {"image_input": grid, "caption_input": captions[:, :-1],
              "image_index": np.arange(len(grid), dtype=np.int32)}
    for _ in range(steps):     # one batch: train_on_batch avoids fit's per-epoch overhead
        model.train_on_batch(inputs, captions[:, 1:])
    return model


@pytest.fixture(scope="module", params=registry.GRID_VARIANTS)
def trained(request):
    return request.param, train_toy(request.param)


# ---- decoding ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_greedy_through_the_step_equals_the_prefix_loop(trained):
    variant, model = trained
    grid, captions = toy_data()
    init_fn, step_fn = decoding.make_step_fn(model, {"variant": variant})
    ref_init, ref_step = decoding.prefix_step_fns(model, grid)
    fast = decoding.greedy_decode(step_fn, init_fn(grid), START, END, MAX_LENGTH, BANNED)
    slow = decoding.greedy_decode(ref_step, ref_init(grid), START, END, MAX_LENGTH, BANNED)
    assert fast == slow
    # the course's one-predict-per-word loop (bench_grid's baseline) takes grid models too
    course = [decoding.tutorial_greedy(model, g, START, END, MAX_LENGTH, BANNED) for g in grid[:3]]
    assert course == fast[:3]
    # the model learned the task, so the comparison is between real captions, not noise
    assert fast == [list(c[1:]) for c in captions]


@pytest.mark.slow
def test_beam_through_the_step_equals_beam_over_the_prefix_loop(trained):
    variant, model = trained
    grid, _ = toy_data()
    noisy = grid + np.random.default_rng(5).normal(0, 1.0, grid.shape).astype(np.float32)
    init_fn, step_fn = decoding.make_step_fn(model, {"variant": variant})
    ref_init, ref_step = decoding.prefix_step_fns(model, noisy)
    fast = decoding.beam_search(step_fn, init_fn(noisy), START, END, MAX_LENGTH, 3, 0.7, BANNED)
    slow = decoding.beam_search(ref_step, ref_init(noisy), START, END, MAX_LENGTH, 3, 0.7, BANNED)
    assert fast == slow


@pytest.mark.slow
def test_decoding_registry_and_caption_features(trained):
    variant, model = trained
    grid, captions = toy_data()
    config = {"variant": variant, "grid": [2, 3], "feature_dim": C, "max_length": MAX_LENGTH}
    tokenizer = {"word_index": {"startseq": START, "endseq": END,
                                **{f"w{i}": i for i in range(3, V)}},
                 "start_token": "startseq", "end_token": "endseq", "pad_id": 0}
    ids = decoding.caption_features(model, config, tokenizer, grid, beam=1)
    assert ids == [list(c[1:]) for c in captions]
    with pytest.raises(PipelineError, match=r"pooled features \(12, 5\).*\(N, 6, 5\)"):
        decoding.caption_features(model, config, tokenizer, grid.mean(axis=1))


@pytest.mark.slow
def test_step_attention_weights_are_the_training_model_weights(trained):
    variant, model = trained
    grid, captions = toy_data()
    words = captions[:, 1:-1]
    maps = decoding.attention_weights(model, grid, words, START)
    assert maps.shape == (len(grid), words.shape[1], G)
    np.testing.assert_allclose(maps.sum(axis=-1), 1.0, atol=1e-5)
    if variant == "attention":   # the teacher-forced run's alphas: the decoder's third output
        import keras
        probe = keras.Model(model.inputs, model.get_layer("decoder").output[2])
        alphas = probe.predict_on_batch({"image_input": grid, "caption_input": captions[:, :-2],
                                         "image_index": np.arange(len(grid), dtype=np.int32)})
        np.testing.assert_allclose(maps, alphas, atol=1e-5)


@pytest.mark.slow
def test_saved_model_loads_with_the_same_outputs(trained, tmp_path):
    _, model = trained
    grid, captions = toy_data()
    inputs = {"image_input": grid, "caption_input": captions[:, :-1],
              "image_index": np.arange(len(grid), dtype=np.int32)}
    registry.save_keras(model, tmp_path / "model.keras")
    loaded = registry.load_keras(tmp_path / "model.keras", compile=False)
    np.testing.assert_allclose(loaded.predict_on_batch(inputs), model.predict_on_batch(inputs), atol=1e-6)
    # a fresh process that only loads (train.py resuming, generate_caption.py) has built no grid
    # model, so nothing registered the custom layers yet: load_keras must do it
    import subprocess
    import sys
    code = ("import sys; from captioning.models import registry; "
            "m = registry.load_keras(sys.argv[1], compile=False); print(m.count_params())")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model.keras")], text=True,
                          capture_output=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert done.returncode == 0 and done.stdout.split()[-1] == str(model.count_params()), done.stderr[-500:]


@pytest.mark.slow
def test_image_index_shares_one_grid_between_captions():
    _, model = "transformer", train_toy("transformer", steps=1)
    grid, captions = toy_data()
    once = model.predict_on_batch({"image_input": grid[:2], "caption_input": captions[[0, 0, 1], :-1],
                                   "image_index": np.array([0, 0, 1], np.int32)})
    each = model.predict_on_batch({"image_input": grid[[0, 0, 1]], "caption_input": captions[[0, 0, 1], :-1],
                                   "image_index": np.arange(3, dtype=np.int32)})
    np.testing.assert_allclose(once, each, atol=1e-6)


# ---- the doubly stochastic penalty ------------------------------------------------------------
def test_penalty_on_a_hand_made_alpha_matrix():
    import keras
    alphas = np.array([[[0.5, 0.25, 0.25],      # caption 1, word 1
                        [0.5, 0.5, 0.0]],       # caption 1, word 2
                       [[0.2, 0.2, 0.6],
                        [1.0, 0.0, 0.0]]], np.float32)
    mask = np.array([[1, 1], [1, 0]], np.float32)     # caption 2's second step is padding
    # caption 1: coverage (1, .75, .25) -> 0 + .0625 + .5625; caption 2: (.2, .2, .6) -> .64+.64+.16
    got = keras.ops.convert_to_numpy(layers.attention_penalty(alphas, mask))
    np.testing.assert_allclose(got, [0.625, 1.44], rtol=1e-6)


@pytest.mark.slow
def test_penalty_is_added_in_training_only():
    import keras
    grid, captions = toy_data(4)
    inputs = {"image_input": grid, "caption_input": captions[:, :-1],
              "image_index": np.arange(4, dtype=np.int32)}
    losses = {}
    for penalty in (0.0, 10.0):
        keras.utils.set_random_seed(0)
        model = attention.build_attention_model(G, C, V, **dict(OPTIONS["attention"], penalty=penalty))
        registry.compile_model(model, learning_rate=0.0)
        model(inputs, training=True)
        added = sum(float(x) for x in model.losses)    # read now: the next call resets them
        alphas = keras.Model(model.inputs, model.get_layer("decoder").output[2]).predict_on_batch(inputs)
        # penalty * sum over captions / real words (4 captions x 3 words, no padding)
        expected = penalty * layers.attention_penalty(alphas, np.ones((4, 3))).numpy().sum() / 12
        np.testing.assert_allclose(added, expected, rtol=1e-4)
        losses[penalty] = (model.train_on_batch(inputs, captions[:, 1:]),
                           model.evaluate(inputs, captions[:, 1:], verbose=0))
    assert losses[10.0][0] > losses[0.0][0] + 1.0          # training loss carries the penalty
    assert losses[10.0][1] == pytest.approx(losses[0.0][1])  # dev loss is cross-entropy only


# ---- model registry ---------------------------------------------------------------------------
def test_registry_builds_grid_models_from_model_json_fields():
    config = {"variant": "transformer", "grid": [2, 3], "feature_dim": C, "vocab_size": V,
              "max_length": MAX_LENGTH, "d_model": 8, "heads": 2}
    model = registry.build_from_config(config)
    assert model.get_layer("image_input").output.shape[1:] == (G, C)
    assert model.get_layer("decoder_block_0").heads == 2
    assert "decoder_block_1" in {layer.name for layer in model.layers}   # default 2 blocks
    with pytest.raises(PipelineError, match="whole captions only"):
        registry.build_from_config(config, "pairs")


# ---- bad input --------------------------------------------------------------------------------
def test_feature_shape_errors_name_the_file_and_both_shapes():
    grid_config = {"variant": "attention", "grid": [7, 7], "feature_dim": 1280}
    with pytest.raises(PipelineError) as err:
        check_features((8091, 1280), grid_config, "data/features.pkl")
    assert str(err.value).count("\n") == 0
    for part in ("pooled features (8091, 1280)", "(N, 49, 1280)", "data/features.pkl"):
        assert part in str(err.value)
    with pytest.raises(PipelineError, match=r"\(1000, 196, 512\).*\(N, 49, 1280\).*vgg\.h5"):
        check_features((1000, 196, 512), grid_config, "vgg.h5")
    with pytest.raises(PipelineError, match=r"spatial grids \(5, 49, 1280\).*merge.*\(N, 1280\).*g\.h5"):
        check_features((5, 49, 1280), {"variant": "merge", "feature_dim": 1280}, "g.h5")
    check_features((3, 49, 1280), grid_config, "ok")
    check_features((3, 1280), {"variant": "merge", "feature_dim": 1280}, "ok")


def write_spatial(path, ids, grids):
    """A spatial file as extract_features.py --spatial writes it."""
    writer = SpatialWriter(path, "test", "lite0", "head_relu")
    writer.append(dict(zip(ids, grids)))
    writer.finish()


def test_read_grids_in_the_asked_order(tmp_path):
    grids = np.arange(4 * 2 * 3 * 2, dtype=np.float32).reshape(4, 2, 3, 2)
    write_spatial(tmp_path / "g.h5", ["a", "b", "c", "d"], grids)
    found, out, info = read_grids(tmp_path / "g.h5", ["c", "x", "a"], dtype=np.float16)
    assert found == ["c", "a"] and info == {"grid": [2, 3], "backbone": "lite0"}
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, grids[[2, 0]].reshape(2, 6, 2))
    assert out[0, 4, 1] == grids[2, 1, 1, 1]          # cell h*W + w
    found, out, hw = read_rows(tmp_path / "g.h5", ["b"])
    assert out.dtype == np.float32 and out.shape == (1, 6, 2) and hw == [2, 3]
    (tmp_path / "p.pkl").write_bytes(b"not hdf5")
    with pytest.raises(PipelineError, match="not a spatial features file.*p.pkl"):
        read_grids(tmp_path / "p.pkl", ["a"])


# ---- batches ----------------------------------------------------------------------------------
def examples_with_captions(lengths_per_image):
    return [(row, np.arange(1, n + 1, dtype=np.int32))
            for row, lengths in enumerate(lengths_per_image) for n in lengths]


def test_image_batches_hold_whole_images_and_every_caption_once():
    rng = np.random.default_rng(0)
    examples = examples_with_captions([list(rng.integers(3, 15, size=5)) for _ in range(40)])
    for plan_rng in (None, np.random.default_rng(1)):
        batches = grid_inputs.plan_image_batches(examples, batch_size=10, rng=plan_rng)
        flat = np.concatenate(batches)
        assert sorted(flat) == list(range(len(examples)))
        for batch in batches:
            rows = {examples[i][0] for i in batch}
            assert len(batch) == 5 * len(rows) == 10     # 2 whole images of 5 captions
    longest = [max(len(examples[i][1]) for i in b) for b in grid_inputs.plan_image_batches(examples, 10)]
    assert longest == sorted(longest)                    # evaluation order: by longest caption


def test_grid_batch_inputs_targets_and_index():
    examples = [(4, np.array([1, 7, 2])), (1, np.array([1, 5, 6, 2])), (4, np.array([1, 8, 9, 3, 2]))]
    grid = np.arange(6 * 2 * 3, dtype=np.float16).reshape(6, 2, 3)
    inputs, targets = grid_inputs.grid_batch(examples, [0, 1, 2], grid)
    assert inputs["image_input"].dtype == np.float32
    np.testing.assert_array_equal(inputs["image_input"], grid[[1, 4]])
    np.testing.assert_array_equal(inputs["image_index"], [1, 0, 1])
    np.testing.assert_array_equal(inputs["caption_input"], [[1, 7, 0, 0], [1, 5, 6, 0], [1, 8, 9, 3]])
    np.testing.assert_array_equal(targets, [[7, 2, 0, 0], [5, 6, 2, 0], [8, 9, 3, 2]])


# ---- the stage scripts on a learnable grid dataset --------------------------------------------
GRID_HW = (2, 2)      # the kind's code sits in one cell of a 2x2 grid, noise elsewhere


def make_learnable_grids(root):
    """learnable_data's dataset plus its grids: kind k's code in cell k, the rest noise."""
    features_path, data_dir, splits = make_learnable(root)
    rng = np.random.default_rng(1)
    grids = {}
    for image_id, vector in load_features(features_path).items():
        grid = rng.normal(0, 0.3, (*GRID_HW, FEATURE_DIM)).astype(np.float32)
        kind = list(CAPTIONS).index(image_id.split("_")[1])
        grid.reshape(-1, FEATURE_DIM)[kind] = vector
        grids[image_id] = grid
    write_spatial(root / "grids.h5", list(grids), np.stack(list(grids.values())))
    return features_path, root / "grids.h5", data_dir, splits


GRID_TRAIN_ARGS = {"attention": ["--annotation-dim", "16", "--attention-dim", "8"],
                   "transformer": ["--d-model", "16", "--heads", "2", "--ff-dim", "32",
                                   "--decoder-layers", "1", "--transformer-dropout", "0.0"]}


@pytest.fixture(scope="module")
def learnt(tmp_path_factory):
    """Both grid variants trained by train.py on the learnable grids (8 epochs)."""
    import train
    root = tmp_path_factory.mktemp("learnable")
    features, grids, data_dir, splits = make_learnable_grids(root)
    for variant in registry.GRID_VARIANTS:
        assert train.main(["--variant", variant, "--features", str(grids), "--data-dir", str(data_dir),
                           "--output-dir", str(root / "models"), "--epochs", "8", *TRAIN_ARGS,
                           *GRID_TRAIN_ARGS[variant]]) == 0
    return root, features, grids, data_dir, splits


@pytest.mark.slow
@pytest.mark.parametrize("variant", registry.GRID_VARIANTS)
def test_train_and_caption_a_grid_model_from_the_command_line(learnt, variant, capsys):
    import evaluate_bleu
    import generate_caption
    root, _, grids, data_dir, splits = learnt
    config = registry.read_config(root / "models" / variant)
    assert config["grid"] == list(GRID_HW) and config["feature_dim"] == FEATURE_DIM
    capsys.readouterr()
    ids = splits["test"]
    assert generate_caption.main(["--ids", *ids, "--features", str(grids),
                                  "--model", str(root / "models" / variant),
                                  "--data-dir", str(data_dir)]) == 0
    lines = dict(line.split("\t") for line in capsys.readouterr().out.strip().splitlines())
    expected = {"dog": "a dog", "cat": "a cat sits on a red ball", "man": "a man rides a bike"}
    assert lines == {i: expected[i.split("_")[1]] for i in ids}
    out = root / f"results-{variant}"
    assert evaluate_bleu.main(["--features", str(grids), "--data-dir", str(data_dir), "--model",
                               str(root / "models" / variant), "--split", "test", "--beam", "3",
                               "--output", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["bleu"]["standard"]["bleu1"] > 0.5


@pytest.mark.slow
def test_pooled_file_to_a_grid_model_and_grids_to_merge_are_one_line_errors(learnt, capsys):
    import generate_caption
    import train
    from captioning.utils import run_cli
    root, features, grids, data_dir, _ = learnt
    args = ["--data-dir", str(data_dir), "--output-dir", str(root / "bad"), *TRAIN_ARGS]
    assert run_cli(train.main, ["--variant", "attention", "--features", str(features), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pooled features (36, 8)" in err and str(features) in err
    assert run_cli(train.main, ["--variant", "merge", "--features", str(grids), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "spatial grids (36, 2, 2, 8)" in err and str(grids) in err
    assert run_cli(generate_caption.main, ["--ids", "test_dog_0", "--features", str(features),
                                           "--model", str(root / "models" / "attention"),
                                           "--data-dir", str(data_dir)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "(1, 8)" in err and "(N, 4, 8)" in err and str(features) in err


@pytest.mark.slow
def test_attention_map_and_gallery_panels(learnt, tmp_path, capsys):
    import evaluate_bleu
    from captioning.evaluation.gallery import gallery_html
    import generate_caption
    from PIL import Image
    root, _, grids, data_dir, splits = learnt
    model = str(root / "models" / "attention")
    out = tmp_path / "map.png"
    assert generate_caption.main(["--ids", "test_cat_0", "--features", str(grids), "--model", model,
                                  "--data-dir", str(data_dir), "--attention-map", str(out)]) == 0
    words = capsys.readouterr().out.strip().split("\t")[1].split()
    assert words == "a cat sits on a red ball".split()
    with Image.open(out) as sheet:          # 7 words: rows of 6 panels, each word underneath
        assert sheet.size == (6 * attention_maps.PANEL, 2 * (attention_maps.PANEL + attention_maps.LABEL))
    images = tmp_path / "images"
    images.mkdir()
    for image_id in splits["test"]:
        Image.new("RGB", (32, 32), (200, 150, 100)).save(images / f"{image_id}.jpg")
    assert evaluate_bleu.main(["--features", str(grids), "--data-dir", str(data_dir), "--model", model,
                               "--output", str(tmp_path / "results"), "--images", str(images)]) == 0
    page = (tmp_path / "results" / "gallery.html").read_text()
    assert page.count("alt='attention per word'") == len(splits["test"])
    merge_page = gallery_html([("x", None, "a cat", ["a cat"])], "t")
    assert "attention per word" not in merge_page


def test_word_panels_light_the_attended_cell():
    from PIL import Image
    white = Image.new("RGB", (20, 20), (255, 255, 255))
    maps = np.zeros((2, 2, 2))
    maps[0, 0, 0] = 1.0          # word 1 looks top-left
    maps[1, 1, 1] = 0.5          # word 2 bottom-right (scaled to its own maximum)
    sheet = np.asarray(attention_maps.word_panels(white, ["top", "bottom"], maps, panel=40))
    assert sheet.shape == (40 + attention_maps.LABEL, 80, 3)
    floor = round(255 * attention_maps.FLOOR)
    assert sheet[2, 2, 0] == 255 and sheet[37, 37, 0] == floor          # panel 1 corners
    assert sheet[2, 42, 0] == floor and sheet[37, 77, 0] == 255         # panel 2 corners
    with pytest.raises(ValueError, match="one \\(H, W\\) map per word"):
        attention_maps.word_panels(None, ["a"], np.zeros((2, 2, 2)))


@pytest.mark.slow
def test_the_web_page_gets_the_attention_of_each_greedy_word(learnt):
    """serve.py's captioner returns, for a grid model, the greedy caption's per-word weights in
    the page's format, equal to Captioner.attention_maps."""
    from PIL import Image
    from captioning.inference.captioner import Captioner
    from captioning.apps.web_captioner import WebCaptioner
    root, _, grids, data_dir, splits = learnt
    image_id = [i for i in splits["test"] if "_cat" in i][0]
    grid = read_grids(grids, [image_id])[1].reshape(1, -1, FEATURE_DIM)

    def encoder(images):                     # stands in for the backbone: this image's grid
        return np.repeat(grid, len(images), axis=0)
    web = WebCaptioner(root / "models" / "attention", data_dir, encoder=encoder)
    answer = web.caption([Image.new("RGB", (32, 32))], beam=2)[0]
    assert answer["greedy"] == "a cat sits on a red ball"
    block = answer["attention"]
    assert block["grid"] == list(GRID_HW) and block["words"] == answer["greedy"].split()
    captioner = Captioner(root / "models" / "attention", data_dir)
    ids = captioner.caption_ids(grid)
    want = captioner.attention_maps(grid, ids)[0].reshape(len(block["words"]), -1)
    np.testing.assert_allclose(block["weights"], want, atol=1e-5)
    np.testing.assert_allclose(np.sum(block["weights"], axis=1), 1.0, atol=1e-4)
