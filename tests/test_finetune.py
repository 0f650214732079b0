"""Tests of the fine-tuned encoder top (captioning/models/finetune.py, train.py --finetune-top):
a grid captioner trained on top(trunk) with the top's convolutions trainable; checkpoints,
resume, decoding from trunk files, new photos through the whole network, one-line refusals.

The trunk files here are synthetic (TrunkWriter with the learnable data's kind codes) with
the random-weights fingerprint, so the top is Lite0's blocks 15.. with seeded random weights:
nothing to download, and the maps need not come from photos (random lower blocks shrink real
maps below float16's range, see tests/test_extract_features.py). The photo test uses the
installed ImageNet weights and real trunk maps extracted from small pictures.
"""
import json

import numpy as np
import pytest

from captioning.data.trunk import TrunkSpec, TrunkWriter
from captioning.encoders.extract import features_fingerprint
from captioning.models import finetune, registry
from captioning.utils import PipelineError, run_cli
from learnable_data import CAPTIONS, TRAIN_ARGS, make_learnable

SPEC = TrunkSpec("lite0", 224, 15, features_fingerprint("lite0", "none", 0, "bilinear"))
TRUNK_SHAPE = (7, 7, 192)
ATTENTION_ARGS = ["--variant", "attention", "--annotation-dim", "16", "--attention-dim", "8",
                  "--top-learning-rate", "0.001"]


def write_trunk(path, ids, spec=SPEC, seed=1, flips=False):
    """Synthetic maps: kind k's code (+2) in channels 16k..16k+15 of every cell, noise N(0, 0.5);
    with flips also the map mirrored left-right as the flipped view."""
    rng = np.random.default_rng(seed)
    writer = TrunkWriter(path, spec, flips=flips)
    maps = {}
    for image_id in ids:
        kind = list(CAPTIONS).index(image_id.split("_")[1])
        values = rng.normal(0, 0.5, TRUNK_SHAPE).astype(np.float32)
        values[..., 16 * kind:16 * kind + 16] += 2.0
        maps[image_id] = np.stack([values, values[:, ::-1]]) if flips else values
    writer.append(maps)
    writer.finish()
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    features, data_dir, splits = make_learnable(root)
    ids = [i for part in splits.values() for i in part]
    return root, features, data_dir, splits, write_trunk(root / "trunk.h5", ids, flips=True)


def train_args(data, output, epochs, *extra):
    root, _, data_dir, _, trunk = data
    return ["--features", str(trunk), "--data-dir", str(data_dir), "--output-dir", str(output),
            "--epochs", str(epochs), "--finetune-top", *TRAIN_ARGS, *ATTENTION_ARGS, *extra]


def keras_weights(path):
    return [np.asarray(w) for w in registry.load_keras(path, compile=False).weights]


@pytest.fixture(scope="module")
def tuned(data):
    """attention + fine-tuned top, 2 epochs, the epoch kept by dev BLEU-4, the trunk's flipped
    view mixed in."""
    import train
    root = data[0]
    assert train.main(train_args(data, root / "models", 2, "--select-by", "bleu", "--top-batchnorm", "frozen")) == 0
    return root / "models" / "attention"


@pytest.mark.slow
def test_training_changes_the_top_but_not_frozen_batchnorm(data, tuned):
    config = registry.read_config(tuned)
    assert config["encoder_top"] == {
        "backbone": "lite0", "image_size": 224, "block": 15, "fingerprint": SPEC.fingerprint,
        "weights": "none", "seed": 0, "resize_filter": "bilinear", "batchnorm": "frozen",
        "learning_rate": 0.001, "flips": True, "file": "encoder_top.keras"}
    assert config["grid"] == [7, 7] and config["feature_dim"] == 1280
    start = finetune.build_top(config["encoder_top"])
    checkpoint = tuned / "current"
    trained = registry.load_keras(checkpoint / finetune.TOP_LAST_FILE, compile=False)
    moved = still = 0
    for layer in start.layers:
        if not layer.weights:
            continue
        before, after = layer.get_weights(), trained.get_layer(layer.name).get_weights()
        same = all(np.array_equal(a, b) for a, b in zip(before, after))
        if type(layer).__name__ == "BatchNormalization":
            assert same, layer.name           # gamma, beta and the ImageNet statistics
            still += 1
        else:
            moved += not same
    assert moved == 4 and still == 4          # expand, depthwise, project, head convolutions
    state = json.loads((checkpoint / "state.json").read_text())
    kept = checkpoint / finetune.TOP_FILE     # the kept epoch's top pairs with model.keras
    if state["best_epoch"] == 2:
        assert kept.samefile(checkpoint / finetune.TOP_LAST_FILE)
    else:
        assert not kept.samefile(checkpoint / finetune.TOP_LAST_FILE)


@pytest.mark.slow
def test_resume_after_epoch_one_equals_an_uninterrupted_run(data, tuned):
    import train
    root = data[0]
    same = ("--select-by", "bleu", "--top-batchnorm", "frozen")     # the settings of `tuned`
    assert train.main(train_args(data, root / "split", 1, *same)) == 0
    assert train.main(train_args(data, root / "split", 2, *same)) == 0
    whole, resumed = tuned / "current", root / "split" / "attention" / "current"
    for name in ("last.keras", finetune.TOP_LAST_FILE, "model.keras", finetune.TOP_FILE):
        for a, b in zip(keras_weights(whole / name), keras_weights(resumed / name)):
            np.testing.assert_array_equal(a, b)
    rows = [json.loads((d / "state.json").read_text())["history"] for d in (whole, resumed)]
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]]
    assert [r["dev_bleu4"] for r in rows[0]] == [r["dev_bleu4"] for r in rows[1]]


@pytest.mark.slow
def test_decoding_from_the_trunk_file_runs_the_top_then_the_captioner(data, tuned, capsys):
    import evaluate_bleu
    import generate_caption
    from captioning.data.trunk import TrunkFile
    from captioning.inference import decoding
    from captioning.inference.captioner import Captioner
    root, _, data_dir, splits, trunk = data
    ids = splits["test"]
    captioner = Captioner(tuned, data_dir)
    found, grids = captioner.read_features(trunk, ids + ["absent"])
    with TrunkFile(trunk) as cached:
        maps = cached.rows(ids)
    top = registry.load_keras(tuned / "current" / finetune.TOP_FILE, compile=False)
    assert found == ids and grids.shape == (len(ids), 49, 1280)
    np.testing.assert_allclose(grids, np.asarray(top(maps)).reshape(len(ids), 49, 1280), rtol=1e-5,
                               atol=1e-6)
    model, config = registry.load_run(tuned, data_dir)
    expected = [" ".join(captioner.words(x)) for x in decoding.caption_features(
        model, config, captioner.tokenizer, grids, beam=1)]
    capsys.readouterr()
    assert generate_caption.main(["--ids", *ids, "--features", str(trunk), "--model", str(tuned),
                                  "--data-dir", str(data_dir), "--beam", "1"]) == 0
    lines = dict(line.split("\t") for line in capsys.readouterr().out.strip().splitlines())
    assert lines == dict(zip(ids, expected))
    out = root / "results"
    assert evaluate_bleu.main(["--features", str(trunk), "--data-dir", str(data_dir), "--model",
                               str(tuned), "--split", "test", "--beam", "1", "--output", str(out),
                               "--java", "no"]) == 0
    rows = (out / "captions.tsv").read_text().strip().splitlines()[1:]
    assert {r.split("\t")[0]: r.split("\t")[1] for r in rows} == dict(zip(ids, expected))


@pytest.mark.slow
def test_scst_trains_a_fine_tuned_models_captioner_with_its_top_kept(data, tuned, tmp_path, capsys):
    import train_scst
    from captioning.inference.captioner import Captioner
    root, _, data_dir, splits, trunk = data
    argv = ["--init", str(tuned), "--features", str(trunk), "--data-dir", str(data_dir),
            "--output-dir", str(tmp_path), "--name", "tuned-scst", "--samples", "3", "--batch-images", "8",
            "--learning-rate", "0.01", "--epochs", "1"]
    assert run_cli(train_scst.main, argv) == 0
    run_dir = tmp_path / "tuned-scst"
    config = json.loads((run_dir / "model.json").read_text())
    init_config = json.loads((tuned / "model.json").read_text())
    assert config[finetune.KEY] == init_config[finetune.KEY] and config["scst"]["epochs_trained"] == 1
    # every checkpoint holds the init's top unchanged beside the SCST-trained captioner
    init_top = keras_weights(finetune.top_path(tuned))
    for name in (finetune.TOP_FILE, finetune.TOP_LAST_FILE):
        kept = keras_weights(run_dir / "current" / name)
        assert all(np.array_equal(x, y) for x, y in zip(init_top, kept))
    init = keras_weights(tuned / "current" / "model.keras")
    assert not all(np.array_equal(x, y) for x, y in zip(init, keras_weights(run_dir / "current" / "last.keras")))
    # the run folder is a fine-tuned model: it reads the trunk file through that top
    ids = splits["test"]
    found, grids = Captioner(run_dir, data_dir).read_features(trunk, ids)
    _, expected = Captioner(tuned, data_dir).read_features(trunk, ids)
    assert found == ids
    np.testing.assert_array_equal(grids, expected)
    # epoch 0 is the init model scored through the same top: a rerun of the same seed repeats it
    history = json.loads((run_dir / "current" / "state.json").read_text())["history"]
    assert run_cli(train_scst.main, argv[:9] + ["tuned-scst-2"] + argv[10:]) == 0
    again = json.loads((tmp_path / "tuned-scst-2" / "current" / "state.json").read_text())["history"]
    assert [r["dev_cider_d"] for r in again] == [r["dev_cider_d"] for r in history]
    # frozen grids given to it: one line naming both sides, no folder
    grids_file = write_spatial(tmp_path / "grids.h5", [i for part in splits.values() for i in part])
    capsys.readouterr()
    assert run_cli(train_scst.main, ["--init", str(tuned), "--features", str(grids_file), "--data-dir",
                                     str(data_dir), "--output-dir", str(tmp_path), "--name", "bad"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and not (tmp_path / "bad").exists()


def write_spatial(path, ids, shape=(7, 7, 1280)):
    from captioning.data.spatial import SpatialWriter
    writer = SpatialWriter(path, "test", "lite0", "head_relu")
    writer.append({i: np.zeros(shape, np.float32) for i in ids})
    writer.finish()
    return path


def one_line_error(main, argv, capsys):
    capsys.readouterr()
    assert run_cli(main, argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err[len("error: "):]


@pytest.mark.slow
def test_the_wrong_kind_of_features_is_a_one_line_error_naming_both(data, tuned, tmp_path, capsys):
    import evaluate_bleu
    import generate_caption
    import shutil
    root, features, data_dir, splits, trunk = data
    ids = splits["test"]
    grids = write_spatial(tmp_path / "grids.h5", ids)
    model_dir = registry.run_folder(tuned)
    for frozen, kind in ((grids, "grids"), (features, "features")):
        message = (f"model {model_dir} was trained with a fine-tuned lite0 top (trunk at 224 px, "
                   f"block 15); give a trunk file (extract_features.py --trunk), not {frozen} "
                   f"(frozen grids)")
        assert one_line_error(generate_caption.main, ["--ids", *ids, "--features", str(frozen),
                                                      "--model", str(tuned), "--data-dir",
                                                      str(data_dir)], capsys) == message
        assert one_line_error(evaluate_bleu.main, ["--features", str(frozen), "--model", str(tuned),
                                                   "--data-dir", str(data_dir), "--output",
                                                   str(tmp_path / "out")], capsys) == message
    # the same captioner without its top is a frozen model on 7x7x1280 grids
    frozen_dir = tmp_path / "frozen"
    frozen_dir.mkdir()
    shutil.copyfile(model_dir / "model.keras", frozen_dir / "model.keras")
    config = registry.read_config(tuned)
    del config["encoder_top"]
    (frozen_dir / "model.json").write_text(json.dumps(config))
    assert one_line_error(generate_caption.main, ["--ids", *ids, "--features", str(trunk), "--model",
                                                  str(frozen_dir), "--data-dir", str(data_dir)],
                          capsys) == (
        f"model {frozen_dir} was trained on frozen features; give its spatial grid or features "
        f"file, not {trunk} (a trunk file of lite0 at 224 px, block 15, for a fine-tuned top: "
        f"train.py --finetune-top)")
    # a trunk file of another block or other weights: TrunkFile's own error
    other = write_trunk(tmp_path / "k14.h5", ids, SPEC._replace(block=14))
    assert one_line_error(generate_caption.main, ["--ids", *ids, "--features", str(other), "--model",
                                                  str(tuned), "--data-dir", str(data_dir)],
                          capsys) == (f"trunk file {other} was made by lite0 at 224 px, block 14; "
                                      f"the model expects lite0 at 224 px, block 15")
    seeded = write_trunk(tmp_path / "seed3.h5", ids, SPEC._replace(
        fingerprint=features_fingerprint("lite0", "none", 3, "bilinear")))
    err = one_line_error(evaluate_bleu.main, ["--features", str(seeded), "--model", str(tuned),
                                              "--data-dir", str(data_dir), "--output",
                                              str(tmp_path / "out")], capsys)
    assert err.startswith(f"trunk file {seeded} was made with other weights or preprocessing "
                          f"(lite0 random seed=3;") and err.endswith(f"the model expects {SPEC.fingerprint}")
    # checkpoint averaging would lose the top: refused
    assert one_line_error(evaluate_bleu.main, ["--features", str(trunk), "--model", str(tuned),
                                               str(tuned), "--average-into", str(tmp_path / "avg"),
                                               "--data-dir", str(data_dir)], capsys) == (
        f"{tuned / 'model.keras'} has a fine-tuned encoder top: such models are not averaged (the average would "
        f"lose the top its grids came from)")
    # in an ensemble each member reads its own kind of file: the frozen copy finds no grids
    assert one_line_error(generate_caption.main, ["--ids", *ids, "--features", str(trunk), "--model",
                                                  str(tuned), str(frozen_dir), "--data-dir",
                                                  str(data_dir)], capsys).startswith(
        f"model {frozen_dir} was trained on frozen features; give its spatial grid or features file")


@pytest.mark.slow
def test_an_ensemble_takes_a_fine_tuned_member(data, tuned, tmp_path, capsys):
    """Each fine-tuned member reads its own top's grids of the trunk file, frozen members the
    other files; a model with itself captions exactly as the model alone."""
    import generate_caption
    import shutil
    root, features, data_dir, splits, trunk = data
    ids = splits["test"]
    grids = write_spatial(tmp_path / "grids.h5", ids)
    frozen_dir = tmp_path / "frozen"         # the captioner without its top, on the frozen grids
    frozen_dir.mkdir()
    shutil.copyfile(registry.run_folder(tuned) / "model.keras", frozen_dir / "model.keras")
    config = registry.read_config(tuned)
    del config["encoder_top"]
    (frozen_dir / "model.json").write_text(json.dumps(config))
    common = ["--ids", *ids, "--data-dir", str(data_dir), "--beam", "2"]
    capsys.readouterr()
    assert generate_caption.main([*common, "--features", str(trunk), "--model", str(tuned)]) == 0
    alone = capsys.readouterr().out
    assert len(alone.splitlines()) == len(ids)
    assert generate_caption.main([*common, "--features", str(trunk), "--model", str(tuned),
                                  str(tuned)]) == 0
    assert capsys.readouterr().out == alone
    # the mixed pair reads the trunk file through the top and the grid file as it is, in
    # either order of the files
    outs = []
    for files in ((trunk, grids), (grids, trunk)):
        assert generate_caption.main([*common, "--features", *map(str, files), "--model",
                                      str(tuned), str(frozen_dir)]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and len(outs[0].splitlines()) == len(ids)


def test_training_options_and_inputs_refused_in_one_line(tmp_path, capsys):
    import train
    features, data_dir, splits = make_learnable(tmp_path)
    ids = [i for part in splits.values() for i in part]
    trunk = write_trunk(tmp_path / "trunk.h5", ids)
    grids = write_spatial(tmp_path / "grids.h5", ids, (2, 2, 8))
    common = ["--data-dir", str(data_dir), "--output-dir", str(tmp_path / "models"), *TRAIN_ARGS]
    assert one_line_error(train.main, ["--variant", "merge", "--features", str(trunk),
                                       "--finetune-top", *common], capsys) == (
        "--finetune-top trains a grid captioner (attention, transformer) on top(trunk); merge "
        "reads pooled features")
    assert one_line_error(train.main, ["--variant", "attention", "--features", str(grids),
                                       "--finetune-top", *common], capsys) == (
        f"--finetune-top trains the attention model on a trunk file (extract_features.py "
        f"--trunk), not {grids} (frozen grids)")
    assert one_line_error(train.main, ["--variant", "transformer", "--features", str(trunk), *common],
                          capsys) == (
        f"trunk file {trunk} (lite0 at 224 px, block 15) given to the transformer model on frozen "
        f"grids: give a spatial grid file (extract_features.py --spatial), or train a fine-tuned "
        f"top on it (train.py --finetune-top)")
    assert one_line_error(train.main, ["--variant", "attention", "--features", str(trunk),
                                       "--finetune-top", "--top-learning-rate", "0", *common],
                          capsys) == "--top-learning-rate must be above 0"
    assert not (tmp_path / "models").exists()


def test_top_weights_come_from_the_trunk_fingerprint():
    assert finetune.weights_of(SPEC) == ("none", 0, "bilinear")
    seeded = SPEC._replace(fingerprint=features_fingerprint("lite0", "none", 7, "bicubic"))
    assert finetune.weights_of(seeded) == ("none", 7, "bicubic")
    with pytest.raises(PipelineError, match=r"^trunk file t\.h5 was made with weights a top cannot "
                                            r"be rebuilt from \(lite0 mine\.pth"):
        finetune.weights_of(SPEC._replace(fingerprint="lite0 mine.pth sha256=0; resize=bilinear"),
                            "t.h5")


def kind_picture(image_id, seed):
    """A picture whose colour tells its kind (dog red, cat green, man blue), with noise; the
    test images are larger than 224 px, so both paths resize them."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    side = 260 if image_id.startswith("test") else 224
    pixels = rng.integers(0, 90, (side, side, 3))
    pixels[..., list(CAPTIONS).index(image_id.split("_")[1])] += 160
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.mark.slow
def test_a_photo_through_the_whole_network_gets_the_trunk_paths_caption(tmp_path):
    """Captioner's photo encoder is Lite0 with the fine-tuned top copied in: its grids are the
    grids of the photo's trunk row through the top (up to the trunk's float16 rounding), and
    the captions are the same."""
    import extract_features
    import train
    from captioning.encoders import backbones, efficientnet_lite
    from captioning.inference import ensemble
    from captioning.inference.captioner import Captioner
    try:
        efficientnet_lite.checkpoint_path("lite0")
    except PipelineError as exc:
        pytest.skip(str(exc))
    features, data_dir, splits = make_learnable(tmp_path)
    folder = tmp_path / "images"
    folder.mkdir()
    pictures = {}
    for seed, image_id in enumerate(i for part in splits.values() for i in part):
        pictures[image_id] = kind_picture(image_id, seed)
        pictures[image_id].save(folder / f"{image_id}.png")
    trunk = tmp_path / "trunk.h5"
    assert extract_features.main(["--images", str(folder), "--trunk", str(trunk), "--runtime", "tf",
                                  "--batch-size", "12"]) == 0
    assert train.main(["--features", str(trunk), "--data-dir", str(data_dir), "--output-dir",
                       str(tmp_path / "models"), "--epochs", "1", "--finetune-top", *TRAIN_ARGS,
                       *ATTENTION_ARGS[:-1], "0.01"]) == 0
    captioner = Captioner(tmp_path / "models" / "attention", data_dir)
    assert captioner.config["encoder_top"]["weights"] == "imagenet"
    captioner.encode = captioner.default_encoder(runtime="tf")
    ids = splits["test"]
    images = [pictures[i] for i in ids]
    from_photos = captioner.encode_images(images)
    _, from_trunk = captioner.read_features(trunk, ids)
    scale = np.abs(from_trunk).max()
    assert np.abs(from_photos - from_trunk).max() < 1e-2 * scale        # float16 trunk rounding
    untouched = backbones.build("lite0", "imagenet", output="spatial", quiet=True)
    before = np.asarray(untouched(np.stack([efficientnet_lite.preprocess(
        np.asarray(p.resize((224, 224), 2), np.float32)) for p in images]))).reshape(from_photos.shape)
    assert np.abs(before - from_trunk).max() > 0.1 * scale               # the top did move
    assert captioner.caption_images(images, beam=1) == captioner.caption_features(from_trunk, beam=1)
    # in an ensemble a fine-tuned member's photos go through its own top: two copies of the
    # model share one encoder and caption as the model alone
    pair = ensemble.load_captioner([tmp_path / "models" / "attention"] * 2, data_dir)
    pair.encoders("imagenet")
    pair_grids = pair.encode_images(images)
    assert pair_grids[0] is pair_grids[1]
    assert np.abs(pair_grids[0] - from_photos).max() < 1e-3 * scale
    assert ([pair.words(x) for x in pair.caption_ids(pair_grids, beam=1)]
            == captioner.caption_words(pair_grids[0], beam=1))


def test_flips_mirror_a_seeded_half_of_the_allowed_training_images(tmp_path):
    from captioning.data import grid_inputs
    from captioning.data.trunk import TrunkFile
    ids = [f"train_{kind}_{n}" for kind in CAPTIONS for n in range(4)]
    path = write_trunk(tmp_path / "t.h5", ids, flips=True)
    descriptions = {i: ["startseq a dog runs endseq"] for i in ids}
    descriptions[ids[0]] = ["startseq a dog on the Left endseq"]
    descriptions[ids[5]] = ["startseq plain", "startseq a man turns right endseq"]
    assert finetune.sided_images(descriptions, ids) == {ids[0], ids[5]}
    rows = finetune.TrunkRows(TrunkFile(path))
    assert rows.epoch_view(1, 0) is rows                       # no flippable images: plain
    rows.flippable = np.ones(len(ids), bool)
    rows.flippable[[0, 5]] = False
    views = [rows.epoch_view(1, epoch).flipped for epoch in range(4)]
    for flipped in views:
        assert flipped.sum() == 5 and not flipped[[0, 5]].any()   # half of the 10 allowed
    np.testing.assert_array_equal(views[0], rows.epoch_view(1, 0).flipped)   # seeded
    assert len({tuple(v) for v in views}) > 1                 # another half each epoch
    plain, mirrored = rows[np.arange(len(ids))], rows.epoch_view(1, 0)[np.arange(len(ids))]
    for row, flipped in enumerate(views[0]):
        np.testing.assert_array_equal(mirrored[row], plain[row][:, ::-1] if flipped else plain[row])
    # training batches read the epoch's view, evaluation batches the plain maps
    examples = [(row, [1, 4, 2]) for row in range(len(ids))]
    for seed, expected in ((1, mirrored), (None, plain)):
        dataset = grid_inputs.make_grid_dataset(examples, rows, 4, seed=seed)
        seen = {}
        for order, (inputs, _) in zip(grid_inputs.plan_image_batches(
                examples, 4, None if seed is None else np.random.default_rng([seed, 0])), dataset):
            for k, row in enumerate(np.unique(order)):
                seen[row] = inputs["image_input"].numpy()[k]
        assert sorted(seen) == list(range(len(ids)))
        for row, value in seen.items():
            np.testing.assert_array_equal(value, expected[row])


@pytest.mark.slow
def test_trained_batchnorm_moves_its_statistics(data):
    import train
    root = data[0]
    assert train.main(train_args(data, root / "bn", 1, "--name", "bn")) == 0    # the default: trained
    config = registry.read_config(root / "bn" / "bn")
    assert config["encoder_top"]["batchnorm"] == "trained"
    start = finetune.build_top(config["encoder_top"])
    trained = finetune.load_top(root / "bn" / "bn" / "current")
    norms = [layer for layer in start.layers if type(layer).__name__ == "BatchNormalization"]
    assert len(norms) == 4 and all(layer.trainable for layer in norms)
    for layer in norms:     # gamma, beta, moving mean, moving variance: all four move
        after = trained.get_layer(layer.name).get_weights()
        assert all(not np.array_equal(a, b) for a, b in zip(layer.get_weights(), after)), layer.name


@pytest.mark.slow
def test_the_transformer_trains_with_a_fine_tuned_top_too(data, capsys):
    import generate_caption
    import train
    root, _, data_dir, splits, trunk = data
    argv = train_args(data, root / "tf", 1, "--select-by", "bleu")
    argv[argv.index("attention")] = "transformer"
    assert train.main(argv + ["--d-model", "16", "--heads", "2", "--ff-dim", "32",
                              "--decoder-layers", "1"]) == 0
    run = root / "tf" / "transformer"
    assert (run / "current" / finetune.TOP_FILE).is_file()
    capsys.readouterr()
    assert generate_caption.main(["--ids", *splits["test"], "--features", str(trunk), "--model",
                                  str(run), "--data-dir", str(data_dir)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == len(splits["test"])
