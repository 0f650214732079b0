"""Which runtime runs an image network's forward pass: TensorFlow, or OpenVINO when it is
installed and gives TensorFlow's numbers. One place decides it for every caller
(extract_features.py, generate_caption.py, video, the web page): make_predict_fn.

Runtimes:
  tf        model(x, training=False) in TensorFlow (CPU, or a CUDA GPU where TF finds one).
  openvino  the same Keras model converted once to OpenVINO IR (Keras's own
            model.export(format="openvino"): a tf.function trace handed to ov.convert_model,
            weights kept float32), run by OpenVINO's CPU plugin with INFERENCE_PRECISION_HINT
            f32 (OpenVINO's default on CPUs with bf16 instructions is bf16, which moves VGG16's
            fc2 by ~1e-2 relative). PERFORMANCE_HINT AUTO: a batch of several images runs
            compiled for THROUGHPUT (one stream per core, the batch split between them), a
            single image compiled for LATENCY (one stream using every core); each is compiled
            on first use. Measured on the 2-core AVX2 VM (benchmarks/bench_runtime.py):
            THROUGHPUT extracts Lite0 batches ~6% faster, because extract()'s decoding threads
            stall a stream, not a barrier shared by all cores; LATENCY is 1.6x faster on one
            image (a photo, a web request).
  auto      tf when TensorFlow sees a GPU (a GPU runs VGG16 hundreds of times faster than any
            CPU runtime; docs/readme/runtime.md). Otherwise openvino if the package is installed,
            the conversion works and its output on a probe batch agrees with TF's
            (max |ov - tf| <= PROBE_RTOL * max |tf|); otherwise tf. A fallback says why on stderr.

Telemetry: the openvino wheel depends on `openvino-telemetry`, which is opt-OUT. Importing
openvino (its model-conversion tools are imported with it) and converting a model send events
to Google Analytics unless ~/intel/openvino_telemetry says "0" or CI=true. import_openvino()
stops that before anything is sent: the conversion tools then use their own no-op stub (see
openvino/tools/ovc/telemetry_utils.py), and nothing is written to ~/intel. Always import
OpenVINO through it.

Files written: the conversion cache, beside Keras's own cache:
  <root>/openvino/<key>/{model.xml, model.bin, manifest.json}
  root = cache_dir, else $KERAS_HOME, else ~/.keras. key = sha256 of the weights' fingerprint
  (the caller's, e.g. extract_features.weights_fingerprint, else a hash of the weights
  themselves), the network's structure (layer types, weight shapes, input and output shapes)
  and the Keras/TensorFlow/OpenVINO versions. manifest.json is written last and records the
  sha256 of model.xml and model.bin; the folder appears by one rename, so an interrupted build
  leaves nothing under the key. A cached conversion is used only if both files match the
  manifest (the bytes checked are the bytes loaded) and the probe agrees with TF; otherwise it
  is deleted and rebuilt, never trusted. If the cache root cannot be written the conversion is
  made in a temporary folder and not kept.
Files read: that cache.
"""
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from captioning.utils import PipelineError, read_json, sha256_file, write_json

# -- settings ---------------------------------------------------------------------------------
RUNTIMES = ("auto", "tf", "openvino")
RUNTIME = "auto"
DEVICE = "CPU"                  # OpenVINO device; a CUDA GPU is TF's (runtime tf or auto's fallback)
PERFORMANCE_HINT = "AUTO"       # AUTO | LATENCY | THROUGHPUT (see the module docstring)
HINTS = ("AUTO", "LATENCY", "THROUGHPUT")
PRECISION = "f32"               # OpenVINO inference precision: exact, not bf16
# Why not pinned: extract() decodes JPEGs in threads while the network runs; pinned OpenVINO
# threads wait for the core a decoder holds, unpinned ones move. Measured on the 2-core AVX2 VM
# (Lite0, extract()/ceiling): 0.87 pinned, 0.92 unpinned; VGG16 0.98 either way.
CPU_PINNING = False
PROBE_RTOL = 1e-4               # agreement needed: max |ov - tf| <= PROBE_RTOL * max |tf| (f32 measures ~1e-6)
PROBE_IMAGES = 2                # images in the probe batch
PROBE_RANGE = 2.0               # probe pixels ~ uniform(-PROBE_RANGE, PROBE_RANGE), seeded
PROBE_SEED = 0
IR_FILES = ("model.xml", "model.bin")
MANIFEST = "manifest.json"


class Predictor:
    """batch (N, H, W, C) float32 numpy -> features (N, ...) float32 numpy, or a list of such
    arrays, in the model's output order, for a model with several outputs (pooled + grid).

    `runtime` is "tf" or "openvino" (what actually runs); `description` adds the details, for
    summary lines and settings files.
    """

    def __init__(self, fn, runtime, description):
        self.fn, self.runtime, self.description = fn, runtime, description

    def __call__(self, batch):
        return self.fn(batch)

    def __repr__(self):
        return f"Predictor({self.description})"


def make_predict_fn(keras_model, runtime=RUNTIME, cache_dir=None, fingerprint=None,
                    hint=PERFORMANCE_HINT, probe=None):
    """The forward pass of `keras_model` on the runtime asked for (see the module docstring).

    fingerprint: a string naming the weights (extract_features.weights_fingerprint); None hashes
        the weights themselves (about 1 s for VGG16). Only the cache key depends on it: a wrong
        fingerprint costs a rebuild, never wrong features, because the probe compares with TF.
    probe: the batch compared between runtimes; default PROBE_IMAGES seeded uniform images.
    Raises PipelineError for an unknown runtime, and for runtime="openvino" when OpenVINO is
    missing, cannot convert the model, or disagrees with TF.
    """
    if runtime not in RUNTIMES:
        raise PipelineError(f"unknown runtime {runtime!r} (choose from {', '.join(RUNTIMES)})")
    tf_predict = make_tf_predict(keras_model)
    if runtime == "tf":
        return tf_predict
    if runtime == "auto" and tf_sees_gpu():
        note("runtime auto: TensorFlow sees a GPU, using tf")
        return tf_predict
    if not openvino_installed():
        if runtime == "openvino":
            raise PipelineError("runtime openvino needs the openvino package (pip install "
                                "openvino), or use runtime tf or auto")
        note("runtime auto: openvino is not installed, using tf")
        return tf_predict
    try:
        return make_openvino_predict(keras_model, tf_predict, cache_dir, fingerprint, hint, probe)
    except PipelineError as exc:
        if runtime == "openvino":
            raise
        note(f"runtime auto: using tf ({exc})")
        return tf_predict


def make_tf_predict(keras_model):
    """model(x, training=False): one graph call per batch, no Keras predict() machinery."""
    import tensorflow as tf

    def predict(batch):
        out = keras_model(batch, training=False)
        return [np.asarray(o) for o in out] if isinstance(out, (list, tuple)) else np.asarray(out)
    return Predictor(predict, "tf", f"tf {tf.__version__}")


def tf_sees_gpu():
    """True when TensorFlow has a GPU to run on (CUDA set up)."""
    import tensorflow as tf
    return bool(tf.config.list_physical_devices("GPU"))


def openvino_installed():
    """True when the openvino package can be imported (without importing it)."""
    return importlib.util.find_spec("openvino") is not None


def import_openvino():
    """`import openvino` with its telemetry unable to send anything (see the module docstring).

    A None entry in sys.modules makes every later `import openvino_telemetry` in this process
    fail, so OpenVINO's conversion tools fall back to their built-in no-op stub and write no
    client id. If the real package was imported earlier (by other code), its only sending
    method is also replaced by a no-op, for objects made before this call.
    """
    loaded = sys.modules.get("openvino_telemetry")
    if loaded is not None:
        from openvino_telemetry.utils.sender import TelemetrySender
        TelemetrySender.send = lambda self, *args, **kwargs: None
    sys.modules["openvino_telemetry"] = None
    import openvino
    return openvino


def note(message):
    print(message, file=sys.stderr)


# -- OpenVINO ---------------------------------------------------------------------------------
def make_openvino_predict(keras_model, tf_predict, cache_dir, fingerprint, hint, probe):
    """Load (or build) the cached conversion, compile it, and check it against TF on the probe."""
    ov = import_openvino()
    probe = default_probe(keras_model) if probe is None else np.asarray(probe, np.float32)
    expected = tf_predict(probe)
    folder, scratch = cache_folder(keras_model, fingerprint, cache_dir, ov.get_version())
    try:
        data, problem = read_cache(folder)
        if problem is not None:
            if problem != "missing":
                note(f"OpenVINO cache {folder} is {problem}; rebuilding it")
            data = build_cache(keras_model, folder)
        predict = make_hinted_predict(ov, data, hint)
        error = relative_error(predict(probe), expected)
        if error > PROBE_RTOL and problem is None:
            note(f"OpenVINO cache {folder} disagrees with TF (max relative error {error:.1e}): "
                 "made from other weights under the same fingerprint; rebuilding it")
            data = build_cache(keras_model, folder)
            predict = make_hinted_predict(ov, data, hint)
            error = relative_error(predict(probe), expected)
        if error > PROBE_RTOL:
            raise PipelineError(f"OpenVINO's output differs from TF's on the probe batch (max "
                                f"relative error {error:.1e} > {PROBE_RTOL:g})")
        version = ov.get_version().split("-")[0]
        how = "THROUGHPUT for batches, LATENCY for one image" if hint == "AUTO" else hint
        return Predictor(predict, "openvino", f"openvino {version} {DEVICE} {PRECISION} {how}")
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def default_probe(keras_model):
    """PROBE_IMAGES seeded uniform images of the model's input shape."""
    shape = tuple(keras_model.input_shape[1:])
    if None in shape:
        raise PipelineError(f"the model's input shape {shape} is not fixed; pass a probe batch")
    rng = np.random.default_rng(PROBE_SEED)
    return rng.uniform(-PROBE_RANGE, PROBE_RANGE, (PROBE_IMAGES, *shape)).astype(np.float32)


def relative_error(actual, expected):
    """max |actual - expected| / max |expected| (0 when both are all zeros); for lists of
    outputs, the largest over the outputs; inf when the shapes or the output counts differ."""
    if isinstance(expected, list) or isinstance(actual, list):
        if not (isinstance(expected, list) and isinstance(actual, list)
                and len(actual) == len(expected)):
            return float("inf")
        return max(relative_error(a, e) for a, e in zip(actual, expected))
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        return float("inf")
    scale = np.abs(expected).max()
    diff = np.abs(actual - expected).max()
    return float(diff / scale) if scale > 0 else float(diff > 0) * float("inf")


def cache_root(cache_dir=None):
    """Where Keras caches its downloads: cache_dir, $KERAS_HOME or ~/.keras."""
    return Path(cache_dir or os.environ.get("KERAS_HOME") or Path.home() / ".keras").expanduser()


def cache_key(keras_model, fingerprint, openvino_version):
    """Hex key naming the conversion of these weights in this network with these versions."""
    import keras
    import tensorflow as tf
    material = {
        "weights": fingerprint if fingerprint is not None else weights_digest(keras_model),
        "layers": [[type(layer).__name__, [list(w.shape) for w in layer.weights]]
                   for layer in keras_model.layers],
        "input": list(keras_model.input_shape), "output": list(keras_model.output_shape),
        "versions": [keras.__version__, tf.__version__, openvino_version],
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]


def weights_digest(keras_model):
    """sha256 over every weight's shape and float values, in layer order."""
    digest = hashlib.sha256()
    for weight in keras_model.weights:
        value = np.ascontiguousarray(np.asarray(weight), dtype=np.float32)
        digest.update(str(value.shape).encode())
        digest.update(value.tobytes())
    return "sha256=" + digest.hexdigest()


def cache_folder(keras_model, fingerprint, cache_dir, openvino_version):
    """(folder for this conversion, scratch folder to delete afterwards or None)."""
    key = cache_key(keras_model, fingerprint, openvino_version)
    root = cache_root(cache_dir) / "openvino"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-")
        probe.close()
        return root / key, None
    except OSError as exc:
        scratch = Path(tempfile.mkdtemp(prefix="openvino-"))
        note(f"cannot write the OpenVINO cache in {root} ({exc.strerror or exc}); converting "
             "into a temporary folder, not kept")
        return scratch / key, scratch


def read_cache(folder):
    """(IR bytes {name: bytes}, None) for a complete conversion matching its manifest, else
    (None, what is wrong). The bytes checked are the bytes returned, so OpenVINO never reads
    or maps a file that could change after the check."""
    if not folder.is_dir():
        return None, "missing"
    try:
        manifest = read_json(folder / MANIFEST)
    except PipelineError:
        return None, f"incomplete ({MANIFEST} missing or unreadable)"
    data = {}
    for name in IR_FILES:
        path = folder / name
        if not path.is_file():
            return None, f"incomplete ({name} missing)"
        data[name] = path.read_bytes()
        if hashlib.sha256(data[name]).hexdigest() != manifest.get("sha256", {}).get(name):
            return None, f"corrupt ({name}: checksum differs from {MANIFEST})"
    return data, None


def build_cache(keras_model, folder):
    """Convert into a temporary sibling folder, record checksums, rename it into place; return
    the IR bytes as read back from the cache."""
    note(f"converting the model to OpenVINO IR once (cache: {folder})")
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        try:
            keras_model.export(str(tmp / IR_FILES[0]), format="openvino", verbose=False)
        except Exception as exc:  # noqa: BLE001 - converters raise many types; say which, one line
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PipelineError(f"cannot convert the model to OpenVINO ({reason})") from None
        write_json(tmp / MANIFEST, {"sha256": {name: sha256_file(tmp / name) for name in IR_FILES},
                                    "bytes": {name: (tmp / name).stat().st_size
                                              for name in IR_FILES}})
        shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            pass  # another process put its own conversion there first; it is checked below
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    data, problem = read_cache(folder)
    if problem is not None:
        raise PipelineError(f"OpenVINO cache {folder} is {problem} right after building it")
    return data


@functools.lru_cache(maxsize=None)
def openvino_core():
    """The process's one ov.Core, kept for the life of the process.

    Why kept: the CPU plugin installs an alternate signal stack on the thread that first
    compiles; when the last Core goes away the plugin is unloaded and that stack with it, and
    the next signal (Ctrl-C, SIGTERM: extract_features' checkpoint-on-kill) crashes the process
    with a segmentation fault (seen with openvino 2026.4.1; tests/test_runtime.py checks it).
    """
    return import_openvino().Core()


def compile_ir(ov, data, hint):
    """Compile IR bytes for DEVICE with the precision and performance hints."""
    core = openvino_core()
    model = core.read_model(model=data["model.xml"], weights=data["model.bin"])
    return core.compile_model(model, DEVICE, {"PERFORMANCE_HINT": hint,
                                              "INFERENCE_PRECISION_HINT": PRECISION,
                                              "ENABLE_CPU_PINNING": CPU_PINNING})


def make_hinted_predict(ov, data, hint):
    """numpy batch -> output through IR `data` compiled for `hint`; AUTO compiles on first use
    one model for batches (THROUGHPUT) and one for single images (LATENCY), and keeps `data`
    (the IR bytes, checked against the manifest) until both exist."""
    if hint not in HINTS:
        raise PipelineError(f"unknown OpenVINO hint {hint!r} (choose from {', '.join(HINTS)})")
    if hint != "AUTO":
        return make_compiled_predict(ov, compile_ir(ov, data, hint), hint)
    lock, compiled, source = threading.Lock(), {}, {"ir": data}

    def predict(batch):
        kind = "LATENCY" if len(batch) == 1 else "THROUGHPUT"
        with lock:
            if kind not in compiled:
                compiled[kind] = make_compiled_predict(ov, compile_ir(ov, source["ir"], kind), kind)
                if len(compiled) == 2:
                    source.clear()   # VGG16's IR is 537 MB; both compilations hold their own copy
        return compiled[kind](batch)
    return predict


def make_compiled_predict(ov, compiled, hint):
    """numpy batch -> numpy output (a list for several outputs) through a compiled model.

    LATENCY: one infer request takes the whole batch. THROUGHPUT: the batch is split across the
    plugin's optimal number of requests, run concurrently (one per stream). A lock makes the
    function safe to call from several threads (a request serves one call at a time).
    """
    lock = threading.Lock()
    n_outputs = len(compiled.outputs)

    def outputs_of(request):  # copies: a request reuses its output buffers on the next call
        return [request.get_output_tensor(i).data.copy() for i in range(n_outputs)]

    def result(arrays):
        return arrays[0] if n_outputs == 1 else arrays

    if hint == "THROUGHPUT":
        queue = ov.AsyncInferQueue(compiled, compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        parts = {}
        queue.set_callback(lambda request, index: parts.__setitem__(index, outputs_of(request)))

        def predict(batch):
            with lock:
                parts.clear()
                chunks = np.array_split(np.ascontiguousarray(batch, np.float32), len(queue))
                for index, chunk in enumerate(c for c in chunks if len(c)):
                    queue.start_async({0: chunk}, index)
                queue.wait_all()
                ordered = [parts[i] for i in sorted(parts)]
                return result([np.concatenate([p[k] for p in ordered]) for k in range(n_outputs)])
        return predict

    request = compiled.create_infer_request()

    def predict(batch):
        with lock:
            request.infer({0: np.ascontiguousarray(batch, np.float32)})
            return result(outputs_of(request))
    return predict
