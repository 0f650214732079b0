"""Benchmark of the inference runtimes (captioning/encoders/runtime.py) for feature extraction, in one run.

Usage (from the repo root):
    python benchmarks/bench_runtime.py                          # VGG16 fc2, 128 shared images
    python benchmarks/bench_runtime.py --backbone lite0 --n-images 256
    python benchmarks/bench_runtime.py --n-images 256 --rounds 4 --batch-size 32

Measures, on the same images and the same random, seeded weights of the --backbone (VGG16 up to
fc2, or EfficientNet-Lite0 up to its pooled 1280-d layer; the weights' values do not change the
speed):
  (a) per_image: the course notes' loop: keras.utils.load_img + img_to_array + the backbone's
      preprocessing, then model.predict on a batch of one, image after image (TensorFlow);
  for every runtime R (tf; openvino with PERFORMANCE_HINT LATENCY, THROUGHPUT, and AUTO, which
  is what --runtime auto runs: THROUGHPUT for batches, LATENCY for one image):
  (b) extract: extract.extract with R's predict function (threaded decoding
      overlapped with batched forward passes), as `extract_features.py --runtime R` runs it;
  (c) ceiling: R's forward pass alone in a tight loop on already-decoded tensors, same batch,
      the next batch submitted while one runs (as (b) does);
  (d) batch 1: R's forward pass on one image at a time, each waited for before the next (what
      one web request or photo costs; AUTO on a predictor of its own, see make_runtimes).
The images are split into --rounds chunks and every method takes its turn on each chunk (in
reverse order every other round), so a machine shared with other jobs slows them all alike and
the ratios stay meaningful. Before
timing, the features of every runtime are checked against TF's (max |R - tf| <= PROBE_RTOL *
max |tf|); a runtime that disagrees stops the benchmark.
Prints the machine, a table, and last
    speedup_vs_tf_ceiling: <x>  fraction_of_fastest_ceiling: <y>
where x = (b) of the runtime `--runtime auto` picks / (c) of tf, and y = that (b) / the
largest (c) of all runtimes. Reads the images; writes only the OpenVINO conversion cache
($KERAS_HOME/openvino, see captioning/encoders/runtime.py).
"""
import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from captioning.encoders import backbones, extract  # noqa: E402
from bench_common import ceiling  # noqa: E402
from captioning.encoders import runtime  # noqa: E402
from captioning.utils import HelpFormatter, PipelineError, run_cli  # noqa: E402

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "flickr8k" / "Flicker8k_Dataset"
N_IMAGES = 128
ROUNDS = 4              # chunks; the methods alternate chunk by chunk
BATCH_SIZE = extract.BATCH_SIZE
WORKERS = extract.WORKERS
SEED = 0


class Backbone:
    """What the benchmark needs of a backbone: its model (random, seeded), the course loop's
    preprocessing, the extractor's decode function and the extra arguments extract() takes."""

    def __init__(self, name):
        # the key extract_features.py --weights none gives its conversion: the same cache
        self.name = name
        self.size = backbones.get(name).image_size
        self.fingerprint = f"{extract.weights_fingerprint(None, SEED, name)}; {name}"
        if name == "vgg16":
            from keras.applications.vgg16 import preprocess_input
            from captioning.encoders.vgg16 import build_feature_extractor
            self.model = build_feature_extractor(weights=None, seed=SEED, quiet=True)
            self.preprocess, self.decode, self.extract_kwargs = (
                preprocess_input, extract.load_image, {})
            return
        from captioning.encoders import efficientnet_lite
        self.model = efficientnet_lite.build_feature_extractor(weights="none", variant=name,
                                                               seed=SEED, quiet=True)
        self.preprocess = efficientnet_lite.preprocess
        self.decode = lambda path: extract.load_image(path, backbone=name)
        self.extract_kwargs = {"backbone": name}


def per_image(backbone, paths):
    """(a) the course notes' loop: one load_img and one model.predict per image."""
    import keras
    for path in paths:
        image = keras.utils.img_to_array(keras.utils.load_img(path, target_size=backbone.size))
        backbone.model.predict(backbone.preprocess(image.reshape((1, *image.shape))), verbose=0)


def extract(backbone, predict, paths, batch_size, workers):
    """(b) extract.extract, exactly as the CLI runs it (without the progress bar)."""
    extract.extract(backbone.model, paths, batch_size=batch_size, workers=workers,
                             predict=predict, **backbone.extract_kwargs)


def timed(fn, *args):
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def make_runtimes(model, fingerprint):
    """{name: predict} for tf and each OpenVINO hint (when installed), and the name of the one
    `--runtime auto` picks (its own predictor: openvino with hint AUTO, or tf).

    (d) gets AUTO a predictor of its own: on one image AUTO compiles a second (LATENCY) model,
    which extract_features.py never compiles for full batches, and that compilation held beside
    the batch one would slow (b) a little."""
    runtimes = {"tf": runtime.make_predict_fn(model, "tf")}
    if runtime.openvino_installed():
        for hint in ("LATENCY", "THROUGHPUT"):
            runtimes[f"openvino {hint}"] = runtime.make_predict_fn(
                model, "openvino", fingerprint=fingerprint, hint=hint)
    else:
        print("openvino is not installed: only tf is measured", file=sys.stderr)
    auto = runtime.make_predict_fn(model, "auto", fingerprint=fingerprint)
    auto_name = "tf" if auto.runtime == "tf" else f"openvino {runtime.PERFORMANCE_HINT}"
    runtimes.setdefault(auto_name, auto)
    single = ({} if auto_name == "tf" else
              {auto_name: runtime.make_predict_fn(model, "auto", fingerprint=fingerprint)})
    return runtimes, auto_name, single


def check_agreement(runtimes, tensors):
    """Every runtime's features against TF's on the first batch; returns {name: relative error}."""
    expected = runtimes["tf"](tensors)
    errors = {name: runtime.relative_error(predict(tensors), expected)
              for name, predict in runtimes.items()}
    for name, error in errors.items():
        if error > runtime.PROBE_RTOL:
            raise PipelineError(f"{name} differs from tf (max relative error {error:.1e})")
    return errors


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--backbone", default="vgg16", choices=backbones.BACKBONES,
                        help="network measured (random, seeded weights)")
    parser.add_argument("--images", default=str(IMAGES), help="folder of images")
    parser.add_argument("--n-images", type=int, default=N_IMAGES, help="images to time (first N)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="alternating chunks")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="(b) and (c)")
    parser.add_argument("--workers", type=int, default=WORKERS, help="decoding threads (b)")
    args = parser.parse_args(argv)

    import tensorflow as tf

    paths = extract.list_images(args.images)[:args.n_images]
    if len(paths) < args.rounds:
        raise PipelineError(f"need at least {args.rounds} images in {args.images}")
    backbone = Backbone(args.backbone)
    tensors = np.stack([backbone.decode(p) for p in paths])
    runtimes, auto_name, single = make_runtimes(backbone.model, backbone.fingerprint)
    errors = check_agreement(runtimes, tensors[:args.batch_size])

    # warm-up: every method once, so tracing and first-call allocation are not timed
    per_image(backbone, paths[:2])
    for name, predict in runtimes.items():
        extract(backbone, predict, paths[:args.batch_size], args.batch_size, args.workers)
        ceiling(predict, tensors[:args.batch_size], args.batch_size)
        ceiling(single.get(name, predict), tensors[:1], 1, overlapped=False)

    def measure(step, chunk, chunk_paths):
        """Seconds of one method on one chunk; step = "per_image" or (runtime name, b|c|d)."""
        if step == "per_image":
            return timed(per_image, backbone, chunk_paths)
        name, key = step
        predict = runtimes[name]
        if key == "b":
            return timed(extract, backbone, predict, chunk_paths, args.batch_size, args.workers)
        if key == "c":
            return timed(ceiling, predict, tensors[chunk], args.batch_size)
        return timed(ceiling, single.get(name, predict), tensors[chunk], 1, False)

    # every other round runs the methods in reverse order: a method that leaves the machine
    # busy for a moment (threads still spinning, caches full of its data) slows the next one,
    # and a fixed order gave the same configuration 3-4% less in one position than another
    steps = ["per_image"] + [(name, key) for name in runtimes for key in "bcd"]
    seconds = dict.fromkeys(steps, 0.0)
    chunks = np.array_split(np.arange(len(paths)), args.rounds)
    for index, chunk in enumerate(chunks, 1):
        chunk_paths = [paths[i] for i in chunk]
        for step in (steps if index % 2 else steps[::-1]):
            seconds[step] += measure(step, chunk, chunk_paths)
        print(f"round {index}/{args.rounds}: {len(chunk)} images", file=sys.stderr)

    n = len(paths)
    rate = {key: n / value for key, value in seconds.items()}
    cpu = platform.processor() or platform.machine()
    flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").exists() else ""
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    print(f"machine: {platform.node()} {cpu}, {os.cpu_count()} CPUs ({simd}), TF {tf.__version__}, "
          f"load average {os.getloadavg()[0]:.1f} at the end; {args.backbone} (random weights); {n} "
          f"images from {args.images}; batch {args.batch_size}, {args.workers} decode threads, "
          f"{args.rounds} rounds")
    print("| method | runtime | seconds | img/s | max rel. error vs tf |")
    print("| --- | --- | ---: | ---: | ---: |")
    print(f"| (a) course per-image loop: load_img + model.predict(batch of 1) | tf | "
          f"{seconds['per_image']:.1f} | {rate['per_image']:.2f} | |")
    labels = {"b": f"(b) extract(), batch {args.batch_size}",
              "c": f"(c) ceiling: forward pass only, batch {args.batch_size}",
              "d": "(d) forward pass only, batch 1"}
    for key, label in labels.items():
        for name in runtimes:
            mark = " (auto's choice)" if name == auto_name else ""
            print(f"| {label}{mark} | {name} | {seconds[name, key]:.1f} | {rate[name, key]:.2f} | "
                  f"{errors[name]:.1e} |")
    fastest = max(rate[name, "c"] for name in runtimes)
    chosen = rate[auto_name, "b"]
    print(f"speedup_vs_tf_ceiling: {chosen / rate['tf', 'c']:.2f}  "
          f"fraction_of_fastest_ceiling: {chosen / fastest:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
