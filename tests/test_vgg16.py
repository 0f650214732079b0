"""Tests of VGG16 (captioning/encoders/vgg16.py) and vgg16_build.py: architecture, parameter counts, weight files, offline errors.

VGG16 has 138M parameters (~550 MB, seconds to build), so each network is built once per module.
No test needs the internet; the ImageNet download is blocked to test the offline error.
"""
import hashlib
import inspect
import json
import socket

import h5py
import numpy as np
import pytest

import vgg16_build
from captioning.encoders import vgg16
from captioning.utils import PipelineError, run_cli


@pytest.fixture(scope="module")
def ours():
    """Our hand-built network (seed 0) and a snapshot of its initial weights (tests load others)."""
    model = vgg16.build_vgg16(seed=0)
    snapshot = {name: model.get_layer(name).get_weights()[0][:4, :4].copy()
                for name in ("block1_conv1", "fc2")}
    return model, snapshot


@pytest.fixture(scope="module")
def reference():
    import keras
    return keras.applications.VGG16(weights=None)


@pytest.fixture(scope="module")
def official_layout_h5(reference, tmp_path_factory):
    """Weights of the random keras.applications.VGG16 in the legacy HDF5 layout of the official
    file (root attrs layer_names/backend/keras_version, one group per layer with weight_names),
    written by Keras's own legacy writer."""
    from keras.src.legacy.saving import legacy_h5_format
    path = tmp_path_factory.mktemp("weights") / "vgg16_random_legacy.h5"
    with h5py.File(path, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, reference)
    return path


def structure(model):
    return [(layer.name, layer.__class__.__name__, [tuple(w.shape) for w in layer.weights],
             tuple(layer.output.shape)) for layer in model.layers
            if layer.__class__.__name__ != "InputLayer"]


def fc2_output(model, x):
    return np.asarray(vgg16.truncate_at(model, "fc2")(x, training=False))


@pytest.mark.slow
def test_same_layers_and_shapes_as_keras_applications(ours, reference):
    model, _ = ours
    assert structure(model) == structure(reference)
    assert [layer.name for layer in model.layers][-4:] == ["flatten", "fc1", "fc2", "predictions"]
    assert model.get_layer("flatten").output.shape[-1] == 7 * 7 * 512  # not the notes' 3x3x512


def test_parameter_counts_and_feature_width(ours):
    model, _ = ours
    extractor = vgg16.truncate_at(model, vgg16.FEATURE_LAYER)
    assert model.count_params() == 138_357_544
    assert extractor.count_params() == 134_260_544
    assert tuple(extractor.output.shape) == (None, 4096)
    assert vgg16.IMAGE_SIZE == (224, 224)


def test_imagenet_url_and_hash_are_the_ones_keras_uses():
    from keras.src.applications import vgg16 as keras_vgg16
    assert vgg16.IMAGENET_URL == keras_vgg16.WEIGHTS_PATH
    source = inspect.getsource(keras_vgg16.VGG16)
    assert f'"{vgg16.IMAGENET_FILE}"' in source
    assert f'file_hash="{vgg16.IMAGENET_MD5}"' in source


@pytest.mark.slow
def test_official_layout_file_loads_by_name_and_fc2_matches(ours, reference, official_layout_h5):
    model, _ = ours
    x = np.random.default_rng(0).uniform(-120, 150, (2, 224, 224, 3)).astype("float32")
    expected = fc2_output(reference, x)
    assert not np.allclose(fc2_output(model, x), expected, atol=1e-4)  # different random weights
    assert vgg16.load_weights(model, official_layout_h5) == str(official_layout_h5)
    assert np.allclose(fc2_output(model, x), expected, rtol=1e-4, atol=1e-5)
    assert np.array_equal(model.get_layer("fc1").get_weights()[0],
                          reference.get_layer("fc1").get_weights()[0])


@pytest.mark.slow
def test_export_pair_round_trips_and_keras_reads_it(ours, reference, tmp_path):
    model, _ = ours
    json_path, h5_path = vgg16.export_model(model, tmp_path)
    assert (json_path.name, h5_path.name) == ("vgg16_exported.json", "vgg16_exported.h5")
    with h5py.File(h5_path, "r") as handle:  # the legacy layout, as in the official file
        assert "block5_conv3" in vgg16.read_name_list(handle, "layer_names")
        assert vgg16.read_name_list(handle["fc2"], "weight_names") == ["fc2/kernel:0", "fc2/bias:0"]
    saved_bias = model.get_layer("fc2").get_weights()[1].copy()
    model.get_layer("fc2").set_weights([np.zeros_like(w) for w in model.get_layer("fc2").get_weights()])
    vgg16.load_weights(model, json_path)  # the course's .json/.h5 pair
    assert np.array_equal(model.get_layer("fc2").get_weights()[1], saved_bias)
    reference.load_weights(str(h5_path))  # Keras's own legacy loader reads our export too
    assert np.array_equal(reference.get_layer("fc2").get_weights()[1], saved_bias)


def test_json_with_extra_pooling_is_refused(ours, tmp_path):
    model, _ = ours
    config = json.loads(model.to_json())
    layers = config["config"]["layers"]
    index = next(i for i, layer in enumerate(layers) if layer["config"]["name"] == "block5_pool")
    extra = json.loads(json.dumps(layers[index]))
    extra["config"]["name"] = "block6_pool"
    layers.insert(index + 1, extra)
    path = tmp_path / "vgg16_exported.json"
    path.write_text(json.dumps(config))
    with pytest.raises(PipelineError, match="block6_pool.*3x3x512"):
        vgg16.load_weights(model, path)


def test_wrong_shapes_and_missing_layers_are_one_line_errors(ours, tmp_path):
    model, _ = ours
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as handle:
        handle.attrs["layer_names"] = [b"block1_conv1"]
        group = handle.create_group("block1_conv1")
        group.attrs["weight_names"] = [b"block1_conv1_W_1:0", b"block1_conv1_b_1:0"]
        group["block1_conv1_W_1:0"] = np.zeros((3, 3, 3, 32), "float32")
        group["block1_conv1_b_1:0"] = np.zeros((32,), "float32")
    with pytest.raises(PipelineError, match=r"block1_conv1 have shapes .*\(3, 3, 3, 32\)"):
        vgg16.load_weights(model, path)
    with h5py.File(path, "w") as handle:
        handle.attrs["layer_names"] = [b"block1_conv1"]
        group = handle.create_group("block1_conv1")
        group.attrs["weight_names"] = [b"k", b"b"]
        group["k"], group["b"] = np.zeros((3, 3, 3, 64), "float32"), np.zeros((64,), "float32")
    with pytest.raises(PipelineError, match="layer block1_conv2 missing"):
        vgg16.load_weights(model, path)
    with pytest.raises(PipelineError, match="weights file not found"):
        vgg16.resolve_weights(tmp_path / "nope.h5")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to resolve a host name or open a connection fails, as on an offline machine."""
    def refuse(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known (network blocked by the test)")
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_imagenet_offline_without_cache_is_a_one_line_error(no_network, tmp_path, capsys):
    with pytest.raises(PipelineError) as info:
        vgg16.resolve_weights("imagenet", cache_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message and "--weights PATH" in message and vgg16.IMAGENET_URL in message
    assert str(tmp_path / "models" / vgg16.IMAGENET_FILE) in message
    # the CLI: exit 1, one `error:` line, no traceback, fails before building the network
    code = run_cli(vgg16_build.main, ["--weights", "imagenet", "--cache-dir", str(tmp_path)])
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(error_lines) == 1 and "Traceback" not in err
    assert not (tmp_path / "models" / vgg16.IMAGENET_FILE).exists()


@pytest.mark.slow
def test_imagenet_uses_the_cached_file_offline(no_network, official_layout_h5, tmp_path, monkeypatch):
    # Stand-in for the real file: our legacy file in the cache, with its own md5 as the
    # "published" hash, so keras.utils.get_file finds, checks and returns it without the network.
    md5 = hashlib.md5(official_layout_h5.read_bytes()).hexdigest()
    monkeypatch.setattr(vgg16, "IMAGENET_MD5", md5)
    cached = tmp_path / "models" / vgg16.IMAGENET_FILE
    cached.parent.mkdir()
    cached.symlink_to(official_layout_h5)
    assert vgg16.resolve_weights("imagenet", cache_dir=tmp_path) == cached


@pytest.mark.slow
def test_cli_random_weights_warns_and_is_seeded(ours, monkeypatch, capsys):
    _, snapshot = ours
    built = []
    original = vgg16.build_vgg16
    monkeypatch.setattr(vgg16_build, "build_vgg16", lambda seed: built.append(original(seed)) or built[-1])
    assert vgg16_build.main(["--weights", "none"]) == 0
    out, err = capsys.readouterr()
    assert "RANDOM weights" in err
    assert "138,357,544 parameters" in out and "134,260,544 parameters, output (None, 4096)" in out
    for name, values in snapshot.items():  # same seed, same random network
        assert np.array_equal(built[0].get_layer(name).get_weights()[0][:4, :4], values)
