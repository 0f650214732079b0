"""Tests of captioning/encoders/runtime.py and extract_features.py --runtime.

TF and OpenVINO must give the same features, within the tolerance `auto` itself demands
(runtime.PROBE_RTOL): max |openvino - tf| <= 1e-4 * max |tf|. The OpenVINO conversion cache
is checked against its manifest and against TF, and rebuilt when either disagrees; auto falls
back to TF; and no OpenVINO telemetry leaves the machine. Most tests use a tiny seeded conv
net; one converts the real (random-weight) VGG16 fc2 extractor. Tests that need OpenVINO are
skipped, with the reason, where the openvino package is not installed.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import extract_features
from captioning.encoders import extract as ef
from captioning.encoders import runtime
from captioning.utils import PipelineError, sha256_file

REPO = Path(__file__).resolve().parents[1]
needs_openvino = pytest.mark.skipif(not runtime.openvino_installed(),
                                    reason="openvino is not installed (pip install openvino)")


def tiny_net(seed, size=32):
    """(size, size, 3) -> (5,): conv, ReLU, global average pool, dense; seeded weights."""
    import keras
    init = keras.initializers.GlorotUniform
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", kernel_initializer=init(seed))(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5, kernel_initializer=init(seed + 100))(x)
    return keras.Model(inputs, outputs)


def images(n, size=32, scale=2.0, seed=7):
    return np.random.default_rng(seed).uniform(-scale, scale, (n, size, size, 3)).astype(np.float32)


def within_tolerance(actual, expected):
    """The tests' agreement rule, written out: max |a - e| <= 1e-4 * max |e|."""
    return np.abs(actual - expected).max() <= 1e-4 * np.abs(expected).max()


def only_conversion(cache):
    folders = [p for p in (cache / "openvino").iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


@pytest.fixture(scope="module")
def net():
    return tiny_net(1)


def test_unknown_runtime_is_an_error(net):
    with pytest.raises(PipelineError, match="unknown runtime 'onnx'"):
        runtime.make_predict_fn(net, "onnx")


def test_tf_runtime_is_the_keras_model(net):
    predict = runtime.make_predict_fn(net, "tf")
    x = images(3)
    assert predict.runtime == "tf" and predict.description.startswith("tf ")
    assert np.array_equal(predict(x), np.asarray(net(x, training=False)))


def test_auto_without_openvino_uses_tf_and_openvino_is_an_error(net, monkeypatch, capsys):
    monkeypatch.setattr(runtime, "openvino_installed", lambda: False)
    assert runtime.make_predict_fn(net, "auto").runtime == "tf"
    assert "openvino is not installed, using tf" in capsys.readouterr().err
    with pytest.raises(PipelineError, match="pip install openvino"):
        runtime.make_predict_fn(net, "openvino")


def test_auto_uses_tf_where_tensorflow_sees_a_gpu(net, monkeypatch, capsys):
    monkeypatch.setattr(runtime, "tf_sees_gpu", lambda: True)
    monkeypatch.setattr(runtime, "make_openvino_predict", None)  # would fail if it were tried
    assert runtime.make_predict_fn(net, "auto").runtime == "tf"
    assert "TensorFlow sees a GPU, using tf" in capsys.readouterr().err


@needs_openvino
def test_openvino_equals_tf_and_converts_once(net, tmp_path, capsys):
    x = images(5)
    expected = np.asarray(net(x, training=False))
    predict = runtime.make_predict_fn(net, "openvino", cache_dir=tmp_path, fingerprint="tiny 1")
    assert "converting the model to OpenVINO IR once" in capsys.readouterr().err
    assert predict.runtime == "openvino"
    assert "f32 THROUGHPUT for batches, LATENCY for one image" in predict.description
    got = predict(x)
    assert got.shape == (5, 5) and got.dtype == np.float32 and within_tolerance(got, expected)
    assert within_tolerance(predict(x[:1]), expected[:1])          # any batch size

    folder = only_conversion(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.bin", "model.xml"]
    assert manifest["sha256"] == {name: sha256_file(folder / name)
                                  for name in ("model.xml", "model.bin")}

    again = runtime.make_predict_fn(net, "auto", cache_dir=tmp_path, fingerprint="tiny 1")
    assert again.runtime == "openvino" and capsys.readouterr().err == ""  # cache used as is
    assert np.array_equal(again(x), got)
    # THROUGHPUT splits the batch over concurrent requests; an odd batch must come back whole
    split = runtime.make_predict_fn(net, "openvino", cache_dir=tmp_path, fingerprint="tiny 1",
                                    hint="THROUGHPUT")
    assert "THROUGHPUT" in split.description and within_tolerance(split(x), expected)


@needs_openvino
def test_compiled_with_f32_unpinned_threads(net, tmp_path):
    # f32: exact (bf16 moves VGG16's fc2 ~1e-2); unpinned: decoder threads share the cores
    runtime.make_predict_fn(net, "openvino", cache_dir=tmp_path, fingerprint="tiny 1")
    data, problem = runtime.read_cache(only_conversion(tmp_path))
    assert problem is None
    compiled = runtime.compile_ir(runtime.import_openvino(), data, "LATENCY")
    assert compiled.get_property("ENABLE_CPU_PINNING") is False
    assert compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"
    assert str(compiled.get_property("PERFORMANCE_HINT")) == "LATENCY"


@needs_openvino
def test_auto_hint_compiles_throughput_for_batches_latency_for_one_image(net, tmp_path,
                                                                          monkeypatch):
    compiled = []
    real_compile = runtime.compile_ir
    monkeypatch.setattr(runtime, "compile_ir",
                        lambda ov, data, hint: compiled.append(hint) or real_compile(ov, data, hint))
    predict = runtime.make_predict_fn(net, "openvino", cache_dir=tmp_path, fingerprint="tiny 1")
    assert compiled == ["THROUGHPUT"]                   # the probe is a batch of PROBE_IMAGES
    x = images(5)
    expected = np.asarray(net(x, training=False))
    assert within_tolerance(predict(x), expected) and compiled == ["THROUGHPUT"]
    assert within_tolerance(predict(x[:1]), expected[:1])
    assert compiled == ["THROUGHPUT", "LATENCY"]        # compiled once, on first use
    assert within_tolerance(predict(x[2:3]), expected[2:3]) and len(compiled) == 2
    with pytest.raises(PipelineError, match="unknown OpenVINO hint 'FAST'"):
        runtime.make_predict_fn(net, "openvino", cache_dir=tmp_path, fingerprint="tiny 1",
                                hint="FAST")


@needs_openvino
def test_throughput_runs_pieces_on_a_request_pool_and_keeps_every_batch_in_order(
        net, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "CHUNK", 2)
    predict = runtime.make_predict_fn(net, "openvino", cache_dir=tmp_path, fingerprint="tiny 1",
                                      hint="THROUGHPUT")
    batches = [images(n, seed=n) for n in (7, 5, 9, 1, 0)]
    expected = [np.asarray(net(x, training=False)) if len(x) else None for x in batches]
    pending = [predict.submit(x) for x in batches]        # all queued before any is read
    assert [len(p.pieces) for p in pending] == [4, 3, 5, 1, 0]   # pieces of CHUNK images
    for x, p, e in zip(batches, pending, expected):
        got = p.result()
        assert got.shape == (len(x), 5) and p.done()
        assert len(x) == 0 or within_tolerance(got, e)
    # several threads at once (the web page): each gets its own batch's rows
    import threading
    results = {}

    def caller(i):
        results[i] = [predict(batches[i % 3]) for _ in range(3)]
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    [t.start() for t in threads], [t.join() for t in threads]
    for i, outs in results.items():
        assert all(within_tolerance(o, expected[i % 3]) for o in outs)


def test_a_plain_function_is_submitted_as_a_finished_future():
    submit = runtime.submitter(lambda batch: batch * 2)
    future = submit(np.ones(3))
    assert future.done() and list(future.result()) == [2.0, 2.0, 2.0]


def test_extract_gathers_the_next_batch_while_one_runs(tmp_path):
    """extract() submits batch k+1 before it reads batch k's output (OpenVINO works on k
    meanwhile); outputs still reach on_batch in order, each with its own images."""
    events = []

    def head(array):           # which batch: its first image's Lite0-scaled first pixel
        return round(float(array[0, 0]) if array.ndim == 2 else float(array[0, 0, 0, 0]), 4)

    class Running:             # a Future whose forward pass has not finished
        def __init__(self, batch):
            self.value = batch[:, 0, 0, :1].copy()   # "feature": each image's first value

        def done(self):
            return False

        def result(self):
            events.append(("read", head(self.value)))
            return self.value

    def submit(batch):
        events.append(("submit", head(batch)))
        return Running(batch)

    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((224, 224, 3), 10 * i, np.uint8)).save(paths[-1])
    seen = []
    features, failures = ef.extract(
        None, paths, batch_size=2, backbone="lite0",
        predict=runtime.Predictor(None, "test", "test", submit=submit),
        on_batch=lambda new, failed, grids: seen.append(sorted(new)))
    a, b, c = (round((10 * i - 127) / 128, 4) for i in (0, 2, 4))   # heads of the 3 batches
    assert events == [("submit", a), ("submit", b), ("read", a), ("submit", c), ("read", b),
                      ("read", c)]
    assert seen == [["0", "1"], ["2", "3"], ["4"]] and failures == []
    assert {k: round(float(v[0]), 4) for k, v in features.items()} == {
        str(i): round((10 * i - 127) / 128, 4) for i in range(5)}


def test_one_decoding_thread_on_a_cpu_every_core_beside_a_gpu(monkeypatch):
    on = lambda runtime_name: runtime.Predictor(None, runtime_name, runtime_name)  # noqa: E731
    monkeypatch.setattr(ef, "tf_sees_gpu", lambda: False)
    assert ef.decode_threads(on("tf")) == ef.decode_threads(on("openvino")) == ef.WORKERS == 1
    monkeypatch.setattr(ef, "tf_sees_gpu", lambda: True)
    assert ef.decode_threads(on("tf")) == os.cpu_count()
    assert ef.decode_threads(on("openvino")) == 1     # OpenVINO runs on the CPU regardless


def test_bench_extract_runtimes_runs_the_runtime_benchmark(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(extract_features.__file__).parent / "benchmarks"))
    import bench_extract
    import bench_runtime
    calls = []
    monkeypatch.setattr(bench_runtime, "main", lambda argv: calls.append(argv) or 0)
    assert bench_extract.main(["--runtimes", "--backbone", "lite0", "--n-images", "8",
                               "--rounds", "2", "--images", "somewhere"]) == 0
    assert calls == [["--backbone", "lite0", "--images", "somewhere", "--n-images", "8",
                      "--rounds", "2", "--batch-size", str(ef.BATCH_SIZE),
                      "--workers", str(ef.WORKERS)]]


@needs_openvino
def test_two_output_model_gives_both_outputs_in_order(tmp_path):
    """Pooled vector and spatial grid from one pass (extract_features --spatial's models)."""
    import keras
    inputs = keras.Input((32, 32, 3))
    grid = keras.layers.Conv2D(6, 3, strides=2, activation="relu",
                               kernel_initializer=keras.initializers.GlorotUniform(3))(inputs)
    pooled = keras.layers.Dense(4, kernel_initializer=keras.initializers.GlorotUniform(4))(
        keras.layers.GlobalAveragePooling2D()(grid))
    model = keras.Model(inputs, [pooled, grid])
    x = images(3)
    expected = runtime.make_predict_fn(model, "tf")(x)
    assert [e.shape for e in expected] == [(3, 4), (3, 15, 15, 6)]
    for hint in ("LATENCY", "THROUGHPUT", "AUTO"):
        got = runtime.make_predict_fn(model, "openvino", cache_dir=tmp_path, hint=hint)(x)
        assert [g.shape for g in got] == [(3, 4), (3, 15, 15, 6)]
        assert all(within_tolerance(g, e) for g, e in zip(got, expected))


def truncate_bin(folder):
    path = folder / "model.bin"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_xml(folder):
    path = folder / "model.xml"
    path.write_text(path.read_text().replace("<net ", "<net  ", 1))


def drop_manifest(folder):
    (folder / "manifest.json").unlink()


@needs_openvino
@pytest.mark.parametrize("damage, message", [
    (truncate_bin, "corrupt (model.bin: checksum differs from manifest.json)"),
    (edit_xml, "corrupt (model.xml: checksum differs from manifest.json)"),
    (drop_manifest, "incomplete (manifest.json missing or unreadable)"),
])
def test_damaged_cache_is_detected_and_rebuilt(net, tmp_path, capsys, damage, message):
    runtime.make_predict_fn(net, "openvino", cache_dir=tmp_path)   # fingerprint: weights hash
    folder = only_conversion(tmp_path)
    weights = sha256_file(folder / "model.bin")
    capsys.readouterr()
    damage(folder)
    predict = runtime.make_predict_fn(net, "openvino", cache_dir=tmp_path)
    err = capsys.readouterr().err
    assert f"OpenVINO cache {folder} is {message}; rebuilding it" in err
    assert "converting the model to OpenVINO IR once" in err
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["sha256"] == {name: sha256_file(folder / name)
                                  for name in ("model.xml", "model.bin")}
    assert manifest["sha256"]["model.bin"] == weights  # the same weights again (the XML's
    # internal tensor names are not the same from one export to the next)
    x = images(4)
    assert within_tolerance(predict(x), np.asarray(net(x, training=False)))


@needs_openvino
def test_cache_of_other_weights_under_the_same_fingerprint_is_rebuilt(tmp_path, capsys):
    first, second = tiny_net(1), tiny_net(2)
    x = images(3)
    assert not within_tolerance(np.asarray(first(x)), np.asarray(second(x)))  # really differ
    runtime.make_predict_fn(first, "openvino", cache_dir=tmp_path, fingerprint="same name")
    capsys.readouterr()
    predict = runtime.make_predict_fn(second, "openvino", cache_dir=tmp_path,
                                      fingerprint="same name")
    assert "disagrees with TF" in capsys.readouterr().err
    assert within_tolerance(predict(x), np.asarray(second(x, training=False)))
    assert runtime.make_predict_fn(second, "openvino", cache_dir=tmp_path,
                                   fingerprint="same name").runtime == "openvino"
    assert capsys.readouterr().err == ""                       # the rebuilt cache now holds


@needs_openvino
def test_auto_falls_back_to_tf_when_openvino_disagrees(net, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runtime, "PROBE_RTOL", -1.0)  # no error is small enough: always "differs"
    predict = runtime.make_predict_fn(net, "auto", cache_dir=tmp_path)
    assert predict.runtime == "tf"
    assert "runtime auto: using tf (OpenVINO's output differs from TF's" in capsys.readouterr().err
    with pytest.raises(PipelineError, match="differs from TF's on the probe batch"):
        runtime.make_predict_fn(net, "openvino", cache_dir=tmp_path)


@needs_openvino
def test_a_failing_winograd_rewrite_is_one_line_and_auto_falls_back(net, tmp_path,
                                                                     monkeypatch, capsys):
    def broken(model, opset):
        raise RuntimeError("unexpected node\nsecond line")
    monkeypatch.setattr(runtime.winograd, "rewrite", broken)
    predict = runtime.make_predict_fn(net, "auto", cache_dir=tmp_path)
    assert predict.runtime == "tf"
    assert ("runtime auto: using tf (cannot convert the model to OpenVINO (unexpected node))"
            in capsys.readouterr().err)
    assert not any((tmp_path / "openvino").iterdir())   # no half-made conversion is left


@needs_openvino
def test_unwritable_cache_root_converts_in_a_temporary_folder(net, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    predict = runtime.make_predict_fn(net, "openvino", cache_dir=blocker)
    assert predict.runtime == "openvino" and "not kept" in capsys.readouterr().err
    x = images(2)
    assert within_tolerance(predict(x), np.asarray(net(x, training=False)))


@needs_openvino
def test_winograd_rewrite_is_in_the_conversion_and_its_cache_key(tmp_path, monkeypatch):
    import keras
    inputs = keras.Input((10, 10, 64))
    x = keras.layers.Conv2D(128, 3, padding="same", activation="relu",
                            kernel_initializer=keras.initializers.GlorotUniform(3),
                            bias_initializer=keras.initializers.RandomNormal(seed=4))(inputs)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    x = np.random.default_rng(5).uniform(-1, 1, (2, 10, 10, 64)).astype(np.float32)
    expected = runtime.make_predict_fn(model, "tf")(x)
    counts = {}
    for winograd in (True, False):
        monkeypatch.setattr(runtime, "WINOGRAD", winograd)
        predict = runtime.make_predict_fn(model, "openvino", cache_dir=tmp_path,
                                          fingerprint="same weights")
        assert within_tolerance(predict(x), expected)
        counts[winograd] = ("Winograd" in predict.description)
    folders = sorted(p for p in (tmp_path / "openvino").iterdir() if p.is_dir())
    rewritten = sorted(json.loads((f / "manifest.json").read_text())["winograd_convolutions"]
                       for f in folders)
    assert rewritten == [0, 1]          # two conversions under two keys, one rewritten
    assert counts == {True: True, False: False}


@pytest.mark.slow
@needs_openvino
def test_vgg16_fc2_on_openvino_equals_tf(tmp_path):
    from captioning.encoders.vgg16 import build_feature_extractor
    model = build_feature_extractor(weights=None, seed=0, quiet=True)
    x = images(2, size=224, scale=128.0)             # the range of VGG16's preprocessed pixels
    tf_features = runtime.make_predict_fn(model, "tf")(x)
    predict = runtime.make_predict_fn(model, "openvino", cache_dir=tmp_path,
                                      fingerprint="random seed=0; layer=fc2")
    ov_features = predict(x)
    assert predict.runtime == "openvino" and ov_features.shape == tf_features.shape == (2, 4096)
    assert (tf_features > 0).mean() > 0.1                # a real signal through the ReLUs
    assert within_tolerance(ov_features, tf_features)
    folder = only_conversion(tmp_path)
    assert (folder / "model.bin").stat().st_size > 4 * 134_000_000  # float32
    # blocks 2-5's 3x3 convolutions (2 + 3 + 3 + 3) run as Winograd; block 1's two do not
    assert json.loads((folder / "manifest.json").read_text())["winograd_convolutions"] == 11
    assert predict.description.endswith("Winograd F(4x4,3x3) on 11 convolutions")


@pytest.mark.slow
@needs_openvino
def test_lite0_pooled_and_grid_on_openvino_equal_tf(tmp_path):
    from captioning.encoders import efficientnet_lite
    model = efficientnet_lite.build_feature_extractor(weights="none", output="both", quiet=True)
    x = images(2, size=224, scale=1.0)                # Lite0's (x - 127) / 128 range
    tf_out = runtime.make_predict_fn(model, "tf")(x)
    predict = runtime.make_predict_fn(model, "openvino", cache_dir=tmp_path,
                                      fingerprint="lite0 random seed=0")
    ov_out = predict(x)
    assert predict.runtime == "openvino"
    assert [o.shape for o in ov_out] == [o.shape for o in tf_out] == [(2, 1280), (2, 7, 7, 1280)]
    assert np.abs(tf_out[0]).max() > 0                  # a real signal, not all zeros
    assert all(within_tolerance(o, t) for o, t in zip(ov_out, tf_out))
    manifest = json.loads((only_conversion(tmp_path) / "manifest.json").read_text())
    assert manifest["winograd_convolutions"] == 0     # depthwise, strided or 1x1: none eligible
    assert "Winograd" not in predict.description


@pytest.mark.slow
@needs_openvino
def test_the_applications_encoder_runs_on_the_same_runtime(tmp_path, monkeypatch):
    """generate_caption, caption_video and serve.py encode photos through
    captioner.backbone_encoder: auto picks OpenVINO there too, under extract_features.py's cache
    key, and its features equal TF's within the tolerance."""
    from captioning.inference.captioner import backbone_encoder
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    rng = np.random.default_rng(4)
    photos = [Image.fromarray(rng.integers(0, 256, (150 + 10 * i, 200, 3), dtype=np.uint8))
              for i in range(3)]
    tf_encoder, auto_encoder = (backbone_encoder("lite0", "none", runtime=r) for r in ("tf", "auto"))
    assert auto_encoder.width == 1280 and auto_encoder._predict is None   # width: no conversion yet
    want, got = tf_encoder(photos), auto_encoder(photos)
    assert tf_encoder.runtime_used.startswith("tf ") and auto_encoder.runtime_used.startswith("openvino ")
    assert got.shape == want.shape == (3, 1280) and np.abs(want).max() > 0
    assert within_tolerance(got, want)
    assert auto_encoder.fingerprint == f"{ef.weights_fingerprint('none', ef.SEED, 'lite0')}; lite0"
    assert len(list((tmp_path / "keras" / "openvino").iterdir())) == 1


def tiny_224(seed=1):
    """extract_features needs 224x224 inputs; same tiny net at that size."""
    return tiny_net(seed, size=224)


@needs_openvino
def test_extract_features_runtime_flag(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    model = tiny_224()
    monkeypatch.setattr(ef, "build_model", lambda weights, *args, **kwargs: model)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    outputs = {}
    for choice in ("tf", "openvino"):
        out = tmp_path / f"{choice}.pkl"
        assert extract_features.main(["--images", str(folder), "--output", str(out), "--weights", "none",
                        "--batch-size", "2", "--runtime", choice]) == 0
        summary = capsys.readouterr().out
        assert f"; runtime {choice} " in summary and "3 computed" in summary
        outputs[choice] = ef.load_features(out)
        settings = json.loads(out.with_name(f"{choice}.settings.json").read_text())
        assert settings["runtime"] == choice and settings["runtime_used"].startswith(choice + " ")
    assert sorted(outputs["tf"]) == sorted(outputs["openvino"]) == ["p0", "p1", "p2"]
    stacked = {k: np.stack([v[i] for i in sorted(v)]) for k, v in outputs.items()}
    assert within_tolerance(stacked["openvino"], stacked["tf"])
    assert len(list((tmp_path / "keras" / "openvino").iterdir())) == 1  # beside Keras's cache


SIGNAL_AFTER_OPENVINO = r"""
import gc, os, signal, sys
import numpy as np
import keras
from captioning.encoders import runtime
inputs = keras.Input((8, 8, 3))
model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(inputs)))
runtime.PROBE_RTOL = -1.0          # OpenVINO "disagrees": auto compiles twice, then falls back
for attempt in range(2):
    predict = runtime.make_predict_fn(model, "auto", cache_dir=sys.argv[1])
    assert predict.runtime == "tf"
gc.collect()                       # every OpenVINO object of ours is gone now
predict(np.ones((4, 8, 8, 3), np.float32))

def interrupt(signum, frame):      # what extract_features does with SIGTERM
    raise KeyboardInterrupt
signal.signal(signal.SIGTERM, interrupt)
try:
    os.kill(os.getpid(), signal.SIGTERM)
except KeyboardInterrupt:
    print("interrupted cleanly")
"""


@pytest.mark.slow
@needs_openvino
def test_a_signal_after_openvino_is_handled_not_a_crash(tmp_path):
    """OpenVINO's CPU plugin leaves an alternate signal stack behind; unloading the plugin
    (when its last Core goes) turned the next Ctrl-C or SIGTERM into a segmentation fault."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", SIGNAL_AFTER_OPENVINO, str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "interrupted cleanly" in result.stdout, result.returncode


# -- telemetry ---------------------------------------------------------------------------------
TELEMETRY_PROBE = r"""
import sys, urllib.request
log, mode = sys.argv[1], sys.argv[2]

def blocked(request, *args, **kwargs):  # OpenVINO's telemetry sends through urlopen
    with open(log, "a") as handle:
        handle.write(getattr(request, "full_url", str(request)) + "\n")
    raise OSError("network blocked by the test")
urllib.request.urlopen = blocked

if mode == "unguarded":            # control: what a plain `import openvino` does
    import openvino
elif mode == "preimported":        # someone imported the telemetry package before us
    import openvino_telemetry
    from captioning.encoders.runtime import import_openvino
    import_openvino()
else:                              # our way, through a whole conversion
    import keras
    from captioning.encoders.runtime import make_predict_fn
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(inputs)))
    assert make_predict_fn(model, "openvino").runtime == "openvino"
"""


@pytest.mark.slow
@needs_openvino
@pytest.mark.parametrize("mode, sends", [("unguarded", True), ("preimported", False),
                                         ("guarded", False)])
def test_no_openvino_telemetry_leaves(tmp_path, mode, sends):
    """The control proves the probe sees OpenVINO's opt-out telemetry; ours sends nothing."""
    home, log = tmp_path / "home", tmp_path / "sent.log"
    home.mkdir()
    env = {key: value for key, value in os.environ.items()
           if key not in ("CI", "TF_BUILD", "JENKINS_URL")}  # telemetry stays quiet in CI anyway
    env.update(HOME=str(home), KERAS_HOME=str(tmp_path / "keras"), PYTHONPATH=str(REPO),
               TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", TELEMETRY_PROBE, str(log), mode], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    attempts = log.read_text().splitlines() if log.exists() else []
    if sends:
        assert attempts and all("google-analytics.com" in url for url in attempts)
        assert (home / "intel").is_dir()                   # it also leaves a client id there
    else:
        assert attempts == [] and not (home / "intel").exists()
