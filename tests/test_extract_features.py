"""Tests of extract_features.py on small image folders built in tmp_path with PIL.

Most tests inject a tiny Keras model (224x224x3 -> 6) so they run in seconds; one test runs the
real CLI with the real (random-weight) VGG16 on a few images.
"""
import io
import os
import pickle
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import extract_features
from captioning.encoders import extract as ef
from captioning.data import images
from captioning.utils import PipelineError, run_cli

SHARED_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "flickr8k" / "Flicker8k_Dataset"

MEANS_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)  # keras caffe-mode means


def vgg_pixel(r, g, b):
    """What a pixel of RGB colour (r, g, b) becomes after VGG16 preprocessing."""
    return np.array([b, g, r], dtype=np.float32) - MEANS_BGR


def noise(seed, size=(300, 200)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def jpeg_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def make_folder(folder):
    """Good images in every awkward mode, bad files with image extensions, and a stray .txt."""
    folder.mkdir(parents=True, exist_ok=True)
    noise(1).save(folder / "a_rgb.jpg", quality=90)
    noise(2, (224, 224)).save(folder / "b_exact.png")
    Image.new("L", (64, 48), 128).save(folder / "c_gray.png")
    Image.new("RGBA", (50, 50), (10, 20, 30, 0)).save(folder / "d_rgba.png")
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([200, 100, 50] * 256)
    palette.save(folder / "e_palette.gif")
    Image.new("CMYK", (30, 30), (0, 0, 0, 0)).save(folder / "f_cmyk.jpg")
    Image.fromarray(np.full((20, 20), 65535, np.uint16)).save(folder / "g_16bit.png")
    rotated = Image.new("RGB", (40, 20), (255, 0, 0))
    rotated.paste((0, 0, 255), (20, 0, 40, 20))      # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6                                 # "rotate 90 CW to display"
    rotated.save(folder / "h_exif.JPG", exif=exif, quality=95)
    (folder / "x_corrupt.jpg").write_bytes(os.urandom(2000))
    (folder / "y_truncated.jpg").write_bytes(jpeg_bytes(noise(3))[:1500])
    (folder / "z_empty.png").write_bytes(b"")
    (folder / "w_text.jpeg").write_text("not an image\n")
    (folder / "notes.txt").write_text("stray file, ignored\n")
    return folder


GOOD = ["a_rgb", "b_exact", "c_gray", "d_rgba", "e_palette", "f_cmyk", "g_16bit", "h_exif"]
BAD = ["w_text.jpeg", "x_corrupt.jpg", "y_truncated.jpg", "z_empty.png"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def tiny_model():
    """A cheap stand-in for VGG16: (224, 224, 3) -> (6,), seeded."""
    import keras
    inputs = keras.Input((224, 224, 3))
    x = keras.layers.AveragePooling2D(56)(inputs)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(6, kernel_initializer=keras.initializers.GlorotUniform(seed=1),
                                 bias_initializer="zeros")(x)
    return keras.Model(inputs, outputs)


def test_list_images_keeps_image_extensions_sorted(folder, tmp_path):
    names = [p.name for p in ef.list_images(folder)]
    assert names == sorted(names) and "notes.txt" not in names
    assert len(names) == len(GOOD) + len(BAD) and "h_exif.JPG" in names
    assert ef.list_images(tmp_path) == []
    with pytest.raises(PipelineError, match="image folder not found"):
        ef.list_images(tmp_path / "missing")


def test_every_mode_becomes_a_preprocessed_224_rgb_array(folder):
    arrays = {name: ef.load_image(next(folder.glob(name + ".*"))) for name in GOOD}
    for name, array in arrays.items():
        assert array.shape == (224, 224, 3) and array.dtype == np.float32, name
    assert np.allclose(arrays["c_gray"], vgg_pixel(128, 128, 128))
    assert np.allclose(arrays["d_rgba"], vgg_pixel(255, 255, 255))    # transparent -> white
    assert np.allclose(arrays["e_palette"], vgg_pixel(200, 100, 50))
    assert np.allclose(arrays["f_cmyk"], vgg_pixel(255, 255, 255), atol=2)
    assert np.allclose(arrays["g_16bit"], vgg_pixel(255, 255, 255))   # 65535 -> 255, not clipped junk
    # EXIF orientation 6: the left (red) half ends up on top, the blue half at the bottom
    top, bottom = arrays["h_exif"][20, 112], arrays["h_exif"][200, 112]
    assert np.allclose(top, vgg_pixel(255, 0, 0), atol=12)
    assert np.allclose(bottom, vgg_pixel(0, 0, 255), atol=12)


def pil_only(path, size=(224, 224)):
    from captioning.data import images
    return images.resize_rgb(images.open_rgb(path), size)


@pytest.mark.skipif(images.simplejpeg() is None, reason="simplejpeg is not installed")
def test_fast_jpeg_gives_pils_pixels_and_leaves_other_files_to_pil(folder, tmp_path, monkeypatch):
    kinds = {   # chroma subsampling 4:4:4, 4:2:2, 4:2:0; progressive; odd sizes; 224x224
        "s444": dict(subsampling=0), "s422": dict(subsampling=1), "s420": dict(subsampling=2),
        "prog": dict(progressive=True), "q60": dict(quality=60)}
    base = {"quality": 90}
    for i, (name, options) in enumerate(kinds.items()):
        noise(10 + i, (301 + i, 207 - i)).save(tmp_path / f"{name}.jpg", **{**base, **options})
    noise(20, (224, 224)).save(tmp_path / "exact.jpg", quality=85)
    for name in [*kinds, "exact"]:
        path = tmp_path / f"{name}.jpg"
        fast = images.fast_jpeg(path)
        with Image.open(path) as img:
            assert fast is not None and fast.shape == (img.height, img.width, 3), name
            assert np.array_equal(fast, np.asarray(img.convert("RGB"))), name
        assert np.array_equal(images.load_rgb(path, (224, 224)), pil_only(path)), name
    # PIL's business: turned by EXIF, CMYK, grayscale, not a JPEG, broken
    for name in ["h_exif.JPG", "f_cmyk.jpg", "b_exact.png", *BAD]:
        assert images.fast_jpeg(folder / name) is None, name
    Image.new("L", (30, 20), 90).save(tmp_path / "gray.jpg")
    assert images.fast_jpeg(tmp_path / "gray.jpg") is None
    monkeypatch.setattr(images, "simplejpeg", lambda: None)     # not installed: PIL does all
    assert images.fast_jpeg(tmp_path / "exact.jpg") is None
    assert np.array_equal(images.load_rgb(tmp_path / "s420.jpg", (224, 224)),
                          pil_only(tmp_path / "s420.jpg"))


@pytest.mark.skipif(images.simplejpeg() is None or not SHARED_IMAGES.is_dir(),
                    reason="needs simplejpeg and the shared Flickr8k images")
def test_fast_jpeg_equals_pil_on_shared_flickr8k_images():
    paths = ef.list_images(SHARED_IMAGES)[::40]      # 203 of the 8091 (all measured equal)
    for path in paths:
        fast = images.fast_jpeg(path)
        assert fast is not None and np.array_equal(fast, pil_only(path)), path.name


def test_224_images_are_not_resampled_and_others_use_the_filter(folder, tmp_path):
    from keras.applications.vgg16 import preprocess_input
    raw = np.asarray(Image.open(folder / "b_exact.png"), dtype=np.float32)
    assert np.array_equal(ef.load_image(folder / "b_exact.png"), preprocess_input(raw.copy()))
    checker = Image.fromarray((np.indices((448, 448)).sum(0) % 2 * 255).astype(np.uint8))
    checker.save(tmp_path / "checker.png")
    smooth = ef.load_image(tmp_path / "checker.png", "bilinear")
    nearest = ef.load_image(tmp_path / "checker.png", "nearest")
    assert np.allclose(smooth, vgg_pixel(127.5, 127.5, 127.5), atol=3)  # antialiased: grey
    assert not np.allclose(nearest, smooth, atol=50)                   # nearest aliases


@pytest.mark.parametrize("name", BAD)
def test_unreadable_files_raise_an_error_naming_them(folder, name):
    with pytest.raises(PipelineError, match=f"cannot read image \\({name}: "):
        ef.load_image(folder / name)


def test_load_features_accepts_old_layouts_and_rejects_bad_ones(tmp_path):
    path = tmp_path / "f.pkl"
    with open(path, "wb") as handle:
        pickle.dump({"a": np.ones((1, 5), np.float16), "b": np.arange(5, dtype=np.float64)}, handle)
    loaded = ef.load_features(path)
    assert sorted(loaded) == ["a", "b"]
    assert all(v.shape == (5,) and v.dtype == np.float32 for v in loaded.values())
    assert np.array_equal(loaded["b"], np.arange(5, dtype=np.float32))
    ef.save_features(tmp_path / "g.pkl", loaded)
    assert {k: v.tolist() for k, v in ef.load_features(tmp_path / "g.pkl").items()} == \
        {k: v.tolist() for k, v in loaded.items()}
    for bad, message in [([1, 2], "must hold a dict"),
                         ({"a": np.ones(5), "b": np.ones(6)}, "ragged"),
                         ({"a": np.ones((2, 5))}, "expected \\(D,\\)")]:
        with open(path, "wb") as handle:
            pickle.dump(bad, handle)
        with pytest.raises(PipelineError, match=message):
            ef.load_features(path)
    with pytest.raises(PipelineError, match="not found"):
        ef.load_features(tmp_path / "missing.pkl")


def test_extract_skips_bad_files_and_ignores_batch_layout(folder, tiny_model):
    paths = ef.list_images(folder)
    features, failures = ef.extract(tiny_model, paths, batch_size=3)
    assert sorted(features) == GOOD
    assert sorted(p.name for p, _ in failures) == BAD
    assert all(v.shape == (6,) and v.dtype == np.float32 for v in features.values())
    expected = np.asarray(tiny_model(ef.load_image(folder / "a_rgb.jpg")[None]))[0]
    assert np.allclose(features["a_rgb"], expected, atol=1e-5)
    other, _ = ef.extract(tiny_model, paths, batch_size=5, workers=1)
    assert all(np.allclose(features[k], other[k], atol=1e-5) for k in GOOD)


@pytest.fixture
def fake_vgg(monkeypatch, tiny_model):
    monkeypatch.setattr(ef, "build_model",
                        lambda weights, seed=0, backbone="vgg16", output="pooled": tiny_model)
    monkeypatch.setattr(extract_features, "RUNTIME", "tf")  # runtimes are tests/test_runtime.py's subject


def read_pickle(path):
    with open(path, "rb") as handle:
        return pickle.load(handle)


def test_cli_writes_features_and_summary(folder, tmp_path, fake_vgg, capsys):
    output = tmp_path / "out" / "features.pkl"
    assert extract_features.main(["--images", str(folder), "--output", str(output), "--weights", "none",
                    "--batch-size", "3"]) == 0
    out = capsys.readouterr().out
    assert "8 computed, 0 resumed, 4 skipped" in out
    for name in BAD:
        assert f"skipped {name}: cannot read image" in out
    features = read_pickle(output)
    assert sorted(features) == GOOD and all(v.shape == (6,) for v in features.values())
    settings = ef.read_json(tmp_path / "out" / "features.settings.json")
    assert settings["images"] == 8 and settings["feature_shape"] == [6]
    assert sorted(name for name, _ in settings["skipped"]) == BAD
    assert not (tmp_path / "out" / "features.pkl.partial").exists()


def test_killed_run_resumes_to_the_same_file(folder, tmp_path, fake_vgg, monkeypatch, capsys):
    common = ["--images", str(folder), "--weights", "none", "--batch-size", "2",
              "--checkpoint-every", "2"]
    full = tmp_path / "full.pkl"
    assert extract_features.main(common + ["--output", str(full)]) == 0

    # second run: SIGTERM (like `kill`) arrives during the third forward pass
    real_make = ef.make_predict_fn
    calls = []

    def make_killable(model, *args, **kwargs):
        predict = real_make(model, *args, **kwargs)

        def predict_then_maybe_die(batch):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return predict(batch)
        predict_then_maybe_die.description = predict.description
        return predict_then_maybe_die
    monkeypatch.setattr(ef, "make_predict_fn", make_killable)
    output = tmp_path / "resumed.pkl"
    assert run_cli(extract_features.main, common + ["--output", str(output)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not output.exists()
    checkpoint = read_pickle(tmp_path / "resumed.pkl.partial")
    assert sorted(checkpoint["features"]) == GOOD[:4]  # two finished batches of two were kept

    monkeypatch.setattr(ef, "make_predict_fn", real_make)
    assert extract_features.main(common + ["--output", str(output)]) == 0
    assert "4 computed, 4 resumed, 4 skipped" in capsys.readouterr().out
    a, b = read_pickle(full), read_pickle(output)
    assert sorted(a) == sorted(b) == GOOD
    assert all(np.array_equal(a[k], b[k]) for k in GOOD)
    assert not (tmp_path / "resumed.pkl.partial").exists()


def test_limit_then_full_equals_one_full_run(folder, tmp_path, fake_vgg, capsys):
    common = ["--images", str(folder), "--weights", "none", "--batch-size", "3"]
    assert extract_features.main(common + ["--output", str(tmp_path / "full.pkl")]) == 0
    assert extract_features.main(common + ["--output", str(tmp_path / "part.pkl"), "--limit", "5"]) == 0
    assert sorted(read_pickle(tmp_path / "part.pkl")) == GOOD[:5]
    assert extract_features.main(common + ["--output", str(tmp_path / "part.pkl")]) == 0
    assert "3 computed, 5 resumed" in capsys.readouterr().out
    a, b = read_pickle(tmp_path / "full.pkl"), read_pickle(tmp_path / "part.pkl")
    assert sorted(a) == sorted(b) and all(np.allclose(a[k], b[k], atol=1e-6) for k in a)
    # other settings never mix into the same file
    code = run_cli(extract_features.main, common + ["--output", str(tmp_path / "part.pkl"), "--seed", "1"])
    assert code == 1 and "--overwrite" in capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    for folder, message in [(tmp_path / "missing", "error: image folder not found"),
                            (tmp_path / "empty", "error: no image files")]:
        code = run_cli(extract_features.main, ["--images", str(folder), "--output", str(tmp_path / "f.pkl")])
        err = capsys.readouterr().err
        assert code == 1 and err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "f.pkl").exists()


@pytest.mark.slow
def test_real_cli_with_random_vgg16_end_to_end(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        noise(10 + i, (320, 240)).save(folder / f"photo{i}.jpg")
    Image.new("L", (100, 80), 90).save(folder / "photo3.png")
    output = tmp_path / "data" / "features.pkl"
    assert extract_features.main(["--images", str(folder), "--output", str(output), "--weights", "none",
                    "--batch-size", "2", "--runtime", "tf"]) == 0
    captured = capsys.readouterr()
    assert "RANDOM weights" in captured.err and "4 computed" in captured.out
    features = ef.load_features(output)
    assert sorted(features) == [f"photo{i}" for i in range(4)]
    stacked = np.stack(list(features.values()))
    assert stacked.shape == (4, 4096) and stacked.dtype == np.float32
    assert np.isfinite(stacked).all() and (stacked >= 0).all()  # fc2 is a ReLU layer
    assert len({row.tobytes() for row in stacked}) == 4          # different photos, different vectors


# -- --trunk: the lower part of EfficientNet-Lite, cached for a trainable top -------------------
def tiny_trunk(weights, seed=0, backbone="lite0", block=None, flips=False):
    """A cheap stand-in for build_trunk_model: (224, 224, 3) -> [means (3,), maps (7, 7, 3)]."""
    import keras
    image = keras.Input((224, 224, 3))
    lower = keras.Sequential([keras.layers.AveragePooling2D(32),
                              keras.layers.Conv2D(3, 1, kernel_initializer=keras.initializers.GlorotUniform(seed=2))])
    maps = lower(image)
    if flips:
        maps = keras.ops.stack([maps, lower(keras.ops.flip(image, axis=2))], axis=1)
    means = keras.ops.mean(maps, axis=tuple(range(1, len(maps.shape) - 1)))
    return keras.Model(image, [means, maps])


def read_trunk(path, flipped=False):
    from captioning.data.trunk import TrunkFile
    with TrunkFile(path) as trunk:
        return dict(zip(trunk.ids, trunk.rows(trunk.ids, flipped=flipped))), trunk.spec


def test_killed_trunk_run_resumes_to_the_same_file(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ef, "build_trunk_model", tiny_trunk)
    common = ["--images", str(folder), "--weights", "none", "--batch-size", "2",
              "--checkpoint-every", "2", "--runtime", "tf", "--flips"]
    full = tmp_path / "full.h5"
    assert extract_features.main(common + ["--trunk", str(full)]) == 0
    out = capsys.readouterr().out
    assert f"8 lite0 trunk maps, block 15, 7x7x192 (+ flipped) -> {full}; 8 computed" in out

    real_make, calls = ef.make_predict_fn, []

    def make_killable(model, *args, **kwargs):
        predict = real_make(model, *args, **kwargs)

        def predict_then_maybe_die(batch):
            calls.append(1)
            if len(calls) == 3:   # SIGTERM (like `kill`) during the third forward pass
                os.kill(os.getpid(), signal.SIGTERM)
            return predict(batch)
        predict_then_maybe_die.description = predict.description
        return predict_then_maybe_die
    monkeypatch.setattr(ef, "make_predict_fn", make_killable)
    output = tmp_path / "resumed.h5"
    assert run_cli(extract_features.main, common + ["--trunk", str(output)]) == 130
    assert not output.exists() and (tmp_path / "resumed.h5.partial").exists()
    assert not list(tmp_path.glob("*.pkl*"))          # the trunk file is its own checkpoint
    monkeypatch.setattr(ef, "make_predict_fn", real_make)
    capsys.readouterr()
    assert extract_features.main(common + ["--trunk", str(output)]) == 0
    assert "4 computed, 4 resumed, 4 skipped" in capsys.readouterr().out
    for flipped in (False, True):
        (a, spec), (b, _) = read_trunk(full, flipped), read_trunk(output, flipped)
        assert list(a) == list(b) == GOOD and all(np.array_equal(a[k], b[k]) for k in GOOD)
    assert spec.backbone == "lite0" and spec.image_size == 224 and spec.block == 15
    assert spec.fingerprint == ef.features_fingerprint("lite0", "none", 0, "bilinear")
    assert not (tmp_path / "resumed.h5.partial").exists()
    # another block or no flips never mixes into the same file
    for extra in (["--trunk-block", "12"], ["--seed", "3"]):
        assert run_cli(extract_features.main, common + ["--trunk", str(output)] + extra) == 1
        assert "other settings" in capsys.readouterr().err


def test_trunk_option_errors_are_one_line(folder, tmp_path, capsys):
    for extra, message in [(["--flips"], "--trunk-block and --flips only go with --trunk"),
                           (["--trunk", "t.h5", "--backbone", "vgg16"],
                            "--trunk needs an EfficientNet-Lite backbone (lite0 or lite2), not vgg16"),
                           (["--trunk", "t.h5", "--trunk-block", "17"], "split block 17 out of range"),
                           (["--trunk", "t.h5", "--spatial", "g.h5"], "--trunk takes a plain --images")]:
        code = run_cli(extract_features.main, ["--images", str(folder)] + extra)
        err = capsys.readouterr().err
        assert code == 1 and err.startswith(f"error: {message}") and err.count("\n") == 1, err


@pytest.mark.slow
def test_real_lite0_trunk_with_flips(folder, tmp_path):
    """Lite0 with its ImageNet weights cut at block 15: every stored map is lower(image) in
    float16, the flipped view lower(the mirrored image). (Random weights are no test here: their
    BatchNormalization layers hold no statistics, and by block 15 the maps shrink to ~1e-9,
    below float16's range.)"""
    from captioning.encoders import efficientnet_lite as el
    try:
        el.checkpoint_path("lite0")
    except PipelineError as exc:
        pytest.skip(str(exc))
    path = tmp_path / "trunk.h5"
    assert extract_features.main(["--images", str(folder), "--trunk", str(path), "--flips",
                                  "--batch-size", "4", "--runtime", "tf"]) == 0
    plain, spec = read_trunk(path)
    flipped, _ = read_trunk(path, flipped=True)
    assert list(plain) == GOOD and spec.block == 15
    lower = el.build_split("imagenet", "lite0", 15).lower
    x = np.stack([ef.load_image(p, backbone="lite0") for p in sorted(folder.glob("[a-h]_*"))])
    expected = np.asarray(lower(x))
    mirrored = np.asarray(lower(x[:, :, ::-1]))
    assert expected.shape == (8, 7, 7, 192)
    got, got_flipped = np.stack([plain[k] for k in GOOD]), np.stack([flipped[k] for k in GOOD])
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() < 2e-3 * scale            # float16 rounding only
    assert np.abs(got_flipped - mirrored).max() < 2e-3 * scale
    assert np.abs(got_flipped - expected).max() > 0.1 * scale     # a different view indeed
