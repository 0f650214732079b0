"""Which runtime runs an image network's forward pass: TensorFlow, or OpenVINO when it is
installed and gives TensorFlow's numbers. One place decides it for every caller
(extract_features.py, generate_caption.py, video, the web page): make_predict_fn.

Runtimes:
  tf        model(x, training=False) in TensorFlow (CPU, or a CUDA GPU where TF finds one).
  openvino  the same Keras model converted once to OpenVINO IR (Keras's own
            model.export(format="openvino"): a tf.function trace handed to ov.convert_model,
            weights kept float32), its 3x3 stride-1 convolutions with enough channels rewritten
            as Winograd F(4x4, 3x3) (captioning/encoders/winograd.py: 4x fewer multiplications, same
            result up to float32 rounding; VGG16's blocks 2-5, none of Lite0's), run by
            OpenVINO's CPU plugin with INFERENCE_PRECISION_HINT
            f32 (OpenVINO's default on CPUs with bf16 instructions is bf16, which moves VGG16's
            fc2 by ~1e-2 relative). PERFORMANCE_HINT AUTO: a batch of several images runs
            compiled for THROUGHPUT (one stream per core; the batch cut into CHUNK-image pieces
            on a RequestPool, so a stream that finishes early takes the next piece, even of the
            next batch), a single image compiled for LATENCY (one stream using every core);
            each is compiled on first use. Why two: extract()'s decoding threads stall one
            stream, not a barrier shared by all cores, while one image is done soonest by all
            cores together (benchmarks/bench_runtime.py measures both).
  auto      tf when TensorFlow sees a GPU (a GPU runs VGG16 hundreds of times faster than any
            CPU runtime; docs/runtime.md). Otherwise openvino if the package is installed,
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
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from captioning.encoders import winograd
from captioning.utils import PipelineError, read_json, sha256_file, write_json

# -- settings ---------------------------------------------------------------------------------
RUNTIMES = ("auto", "tf", "openvino")
RUNTIME = "auto"
DEVICE = "CPU"                  # OpenVINO device; a CUDA GPU is TF's (runtime tf or auto's fallback)
PERFORMANCE_HINT = "AUTO"       # AUTO | LATENCY | THROUGHPUT (see the module docstring)
HINTS = ("AUTO", "LATENCY", "THROUGHPUT")
PRECISION = "f32"               # OpenVINO inference precision: exact, not bf16
# Rewrite eligible 3x3 convolutions as Winograd F(winograd.TILE x TILE, 3x3) when converting:
# 4x fewer multiplications, the same features up to float32 rounding (benchmarks/bench_runtime.py).
WINOGRAD = True
# Not pinned: extract() decodes JPEGs in threads meanwhile, and a pinned OpenVINO thread waits for
# the core a decoder holds where an unpinned one moves (benchmarks/bench_runtime.py measures it).
CPU_PINNING = False
# THROUGHPUT cuts a batch into CHUNK-image pieces on QUEUE_DEPTH requests per stream, so a stream that
# finishes early takes the next piece instead of idling (benchmarks/bench_runtime.py measures it).
CHUNK = 4
QUEUE_DEPTH = 2
PROBE_RTOL = 1e-4               # agreement needed: max |ov - tf| <= PROBE_RTOL * max |tf| (VGG16 fc2: ~3e-6)
PROBE_IMAGES = 2                # images in the probe batch
PROBE_RANGE = 2.0               # probe pixels ~ uniform(-PROBE_RANGE, PROBE_RANGE), seeded
PROBE_SEED = 0
IR_FILES = ("model.xml", "model.bin")
MANIFEST = "manifest.json"


class Predictor:
    """batch (N, H, W, C) float32 numpy -> features (N, ...) float32 numpy, or a list of such
    arrays, in the model's output order, for a model with several outputs (pooled + grid).

    `runtime` is "tf" or "openvino" (what actually runs); `description` adds the details, for
    summary lines and settings files. submit(batch) starts the same forward pass and returns a
    future of its output (.done(), .result()): OpenVINO THROUGHPUT returns while the batch runs,
    so a caller (extract_features.extract) gathers the next batch meanwhile; the other runtimes
    compute it before returning. The pass may read `batch` until its result has been read, so
    the caller must not change the array before that.
    """

    def __init__(self, fn, runtime, description, submit=None):
        self.fn, self.runtime, self.description = fn, runtime, description
        self._submit = submit

    def __call__(self, batch):
        return self.fn(batch)

    def submit(self, batch):
        return self._submit(batch) if self._submit is not None else finished(self.fn(batch))

    def __repr__(self):
        return f"Predictor({self.description})"


def finished(value):
    """A Future that already holds `value`."""
    future = Future()
    future.set_result(value)
    return future


def submitter(predict):
    """predict.submit for a Predictor; for any other batch -> output function, one that
    computes the output at once and returns it as a finished Future (test doubles)."""
    return getattr(predict, "submit", None) or (lambda batch: finished(predict(batch)))


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
        submit = make_hinted_submit(ov, data, hint)
        error = relative_error(submit(probe).result(), expected)
        if error > PROBE_RTOL and problem is None:
            note(f"OpenVINO cache {folder} disagrees with TF (max relative error {error:.1e}): "
                 "made from other weights under the same fingerprint; rebuilding it")
            data = build_cache(keras_model, folder)
            submit = make_hinted_submit(ov, data, hint)
            error = relative_error(submit(probe).result(), expected)
        if error > PROBE_RTOL:
            raise PipelineError(f"OpenVINO's output differs from TF's on the probe batch (max "
                                f"relative error {error:.1e} > {PROBE_RTOL:g})")
        version = ov.get_version().split("-")[0]
        how = "THROUGHPUT for batches, LATENCY for one image" if hint == "AUTO" else hint
        fast = (f", Winograd F({winograd.TILE}x{winograd.TILE},3x3) on {rewritten} convolutions"
                if (rewritten := data["winograd"]) else "")
        return Predictor(lambda batch: submit(batch).result(), "openvino",
                         f"openvino {version} {DEVICE} {PRECISION} {how}{fast}", submit=submit)
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
        "winograd": ([winograd.VERSION, winograd.TILE, winograd.MIN_IN_CHANNELS,
                      winograd.MIN_OUT_CHANNELS] if WINOGRAD else None),
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
    data["winograd"] = manifest.get("winograd_convolutions", 0)
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
            exported = tmp / ("keras.xml" if WINOGRAD else IR_FILES[0])
            keras_model.export(str(exported), format="openvino", verbose=False)
            rewritten = rewrite_convolutions(exported, tmp / IR_FILES[0]) if WINOGRAD else 0
        except Exception as exc:  # noqa: BLE001 - converters raise many types; say which, one line
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PipelineError(f"cannot convert the model to OpenVINO ({reason})") from None
        write_json(tmp / MANIFEST, {"sha256": {name: sha256_file(tmp / name) for name in IR_FILES},
                                    "bytes": {name: (tmp / name).stat().st_size
                                              for name in IR_FILES},
                                    "winograd_convolutions": rewritten})
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


def rewrite_convolutions(source, target):
    """Read IR `source` (.xml + .bin), rewrite its eligible convolutions for Winograd, write
    the float32 IR to `target` and delete `source`; returns how many were rewritten."""
    ov = import_openvino()
    import openvino.opset13 as opset  # the graph-building ops, after telemetry is blocked
    model = openvino_core().read_model(str(source))
    rewritten = winograd.rewrite(model, opset)
    ov.save_model(model, str(target), compress_to_fp16=False)
    del model                         # unmaps keras.bin before it is deleted
    source.unlink()
    source.with_suffix(".bin").unlink()
    return rewritten


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


def make_hinted_submit(ov, data, hint):
    """numpy batch -> Future of its output through IR `data` compiled for `hint`; AUTO compiles
    on first use one model for batches (THROUGHPUT) and one for single images (LATENCY), and
    keeps `data` (the IR bytes, checked against the manifest) until both exist."""
    if hint not in HINTS:
        raise PipelineError(f"unknown OpenVINO hint {hint!r} (choose from {', '.join(HINTS)})")
    if hint != "AUTO":
        return make_compiled_submit(ov, compile_ir(ov, data, hint), hint)
    lock, compiled, source = threading.Lock(), {}, {"ir": data}

    def submit(batch):
        kind = "LATENCY" if len(batch) == 1 else "THROUGHPUT"
        with lock:
            if kind not in compiled:
                compiled[kind] = make_compiled_submit(ov, compile_ir(ov, source["ir"], kind), kind)
                if len(compiled) == 2:
                    source.clear()   # VGG16's IR is 537 MB; both compilations hold their own copy
        return compiled[kind](batch)
    return submit


class RequestPool:
    """THROUGHPUT execution: QUEUE_DEPTH infer requests per stream, used in turn, each running
    one CHUNK-image piece of a batch. A piece reads its input from the caller's batch and writes
    its output straight into the result arrays (OpenVINO tensors sharing numpy's memory), and no
    Python callback runs in OpenVINO's threads: one would wait for the GIL while extract()'s
    Python thread holds it, stalling its stream (benchmarks/bench_runtime.py measures extract()).

    submit(batch) -> Pending; it returns once every piece has started, waiting for a request
    only when all of them are busy. Thread-safe: one lock guards the requests.
    """

    def __init__(self, ov, compiled):
        self.ov, self.lock = ov, threading.Lock()
        streams = compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
        self.requests = [compiled.create_infer_request() for _ in range(QUEUE_DEPTH * streams)]
        self.started = [0] * len(self.requests)    # pieces started on each request so far
        self.finished = [0] * len(self.requests)   # ... of which known to be finished
        self.holding = [None] * len(self.requests)  # arrays a running piece reads and writes
        self.turn = 0
        self.shapes = [tuple(int(d) for d in output.get_partial_shape()[1:].to_shape())
                       for output in compiled.outputs]

    def submit(self, batch):
        batch = np.ascontiguousarray(batch, np.float32)
        outputs = [np.empty((len(batch), *shape), np.float32) for shape in self.shapes]
        pieces = []
        with self.lock:
            for start in range(0, len(batch), CHUNK):
                slot, self.turn = self.turn, (self.turn + 1) % len(self.requests)
                self._wait(slot, self.started[slot])   # its previous piece must be done
                request, rows = self.requests[slot], slice(start, start + CHUNK)
                request.set_input_tensor(self.ov.Tensor(batch[rows], shared_memory=True))
                for index, output in enumerate(outputs):
                    request.set_output_tensor(index, self.ov.Tensor(output[rows],
                                                                    shared_memory=True))
                self.holding[slot] = (batch, outputs)
                request.start_async()
                self.started[slot] += 1
                pieces.append((slot, self.started[slot]))
        return Pending(self, pieces, outputs[0] if len(outputs) == 1 else outputs)

    def _wait(self, slot, piece):
        """Block until piece number `piece` of request `slot` has finished (lock held)."""
        if self.finished[slot] < piece:
            self.requests[slot].wait()
            self.finished[slot], self.holding[slot] = piece, None

    def wait(self, pieces):
        with self.lock:
            for slot, piece in pieces:
                self._wait(slot, piece)

    def all_done(self, pieces):
        with self.lock:
            return all(self.finished[slot] >= piece or self.requests[slot].wait_for(0)
                       for slot, piece in pieces)


class Pending:
    """A submitted batch on a RequestPool, used like a Future: done(), result()."""

    def __init__(self, pool, pieces, value):
        self.pool, self.pieces, self.value = pool, pieces, value

    def done(self):
        return self.pool.all_done(self.pieces)

    def result(self):
        self.pool.wait(self.pieces)
        return self.value


def make_compiled_submit(ov, compiled, hint):
    """numpy batch -> Future of the numpy output (a list for several outputs) through a
    compiled model. Safe to call from several threads.

    LATENCY: one infer request takes the whole batch, before the call returns. THROUGHPUT: the
    batch is cut into CHUNK-image pieces run on a RequestPool; the call returns when every piece
    has started, and the pieces of the next call queue behind them, so the streams do not wait
    at batch boundaries.
    """
    if hint == "THROUGHPUT":
        return RequestPool(ov, compiled).submit

    n_outputs = len(compiled.outputs)
    lock = threading.Lock()       # a request serves one call at a time
    request = compiled.create_infer_request()

    def submit(batch):
        with lock:
            request.infer({0: np.ascontiguousarray(batch, np.float32)})
            # copies: the request reuses its output buffers on the next call
            out = [request.get_output_tensor(i).data.copy() for i in range(n_outputs)]
        return finished(out[0] if n_outputs == 1 else out)
    return submit
