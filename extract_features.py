"""Stage 2: VGG16 fc2 features for every image in a folder, fast and resumable.

Usage:
    python extract_features.py --images ../shared/flickr8k/Flicker8k_Dataset --output data/features.pkl
    python extract_features.py --images DIR --output /tmp/f.pkl --weights none --limit 100

Reads:
  --images DIR: image files directly in DIR (not sub-folders) with an extension in
      IMAGE_EXTENSIONS (any case); other files (.txt, ...) are ignored. Grayscale, RGBA/LA and
      transparent palette images (composited onto white), palette, CMYK and 16-bit images are
      converted to RGB, and EXIF orientation is applied. A file that cannot be decoded (corrupt,
      truncated, empty, not an image) is reported with its name and reason, skipped and counted.
  --weights: see vgg16_build.py (imagenet | none | PATH).
Preprocessing (what keras.applications.VGG16 expects): the whole frame resized to 224x224
  (aspect ratio not kept, as keras.utils.load_img(target_size=...) in the course) with PIL's
  --resize-filter (default bilinear, antialiased when shrinking; load_img's default "nearest"
  aliases), then keras.applications.vgg16.preprocess_input: RGB->BGR and the ImageNet channel
  means subtracted, no scaling. Already-224x224 images are not resampled.
Writes:
  --output FILE (e.g. data/features.pkl): pickle of {image_id: numpy float32 array, shape (4096,)}
      (1-D, not the tutorial's (1, 4096); load_features accepts both, and float16), image_id =
      file name without extension. Written atomically once the run is complete.
  FILE.partial: checkpoint while running ({"fingerprint": ..., "features": {...}}), rewritten
      atomically every --checkpoint-every images and on Ctrl-C/SIGTERM; deleted at the end.
  <FILE stem>.settings.json: the run's settings, the weights fingerprint, counts and the list of
      skipped files. A rerun with the same weights and preprocessing continues from FILE.partial
      and/or FILE (only missing images are computed; batch boundaries line up, so the result
      equals an uninterrupted run); different settings are refused unless --overwrite.
"""
import argparse
import os
import pickle
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from captioning.features import load_features, load_pickle, save_features  # noqa: F401 (re-exported)
from captioning.images import IMAGE_EXTENSIONS, list_images, load_rgb
from captioning.utils import (HelpFormatter, PipelineError, atomic_write, on_terminal, read_json,
                              run_cli, save_settings, sha256_file)
from captioning.utils import progress as progress_bar
from vgg16_build import IMAGE_SIZE

# -- settings ---------------------------------------------------------------------------------
WEIGHTS = "imagenet"        # imagenet | none | PATH (see vgg16_build.py)
SEED = 0                    # random init seed, only matters with --weights none
BATCH_SIZE = 32             # images per forward pass; fixed shape (the last batch is zero-padded)
WORKERS = 2                 # decode/resize threads, overlapped with the forward pass
PREFETCH_BATCHES = 2        # decoded batches kept ready ahead of the model (bounds memory)
CHECKPOINT_EVERY = 512      # images between checkpoints of FILE.partial (~30 s of CPU work)
RESIZE_FILTER = "bilinear"  # PIL filter for images that are not already 224x224


def load_image(path, resize_filter=RESIZE_FILTER):
    """One image file -> float32 array (224, 224, 3) preprocessed for VGG16 (BGR, means subtracted).

    Raises PipelineError naming the file when it cannot be decoded.
    """
    from keras.applications.vgg16 import preprocess_input
    return preprocess_input(load_rgb(path, IMAGE_SIZE, resize_filter).astype(np.float32))


def make_predict_fn(model):
    """numpy batch → numpy features, one graph call per batch.

    model(x, training=False) on a fixed batch shape is as fast as predict_on_batch and a
    tf.function here (benchmarks/bench_extract.py measures the choices); no per-call Keras
    predict() machinery (callbacks, dataset adapters) runs.
    """
    def predict(batch):
        return np.asarray(model(batch, training=False))
    return predict


def decoded_in_order(paths, workers=WORKERS, prefetch=PREFETCH_BATCHES * BATCH_SIZE,
                     resize_filter=RESIZE_FILTER):
    """Yield (path, array or None, reason or None) in order; decoding runs ahead in threads.

    At most `prefetch` images are decoded ahead, so memory stays bounded (224*224*3*4 bytes =
    600 KB each) whatever the folder size. PIL and numpy release the GIL while decoding.
    """
    def safe_load(path):
        try:
            return load_image(path, resize_filter), None
        except PipelineError as exc:
            return None, str(exc)

    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode")
    try:
        queue, upcoming = deque(), iter(paths)
        for path in upcoming:
            queue.append((path, pool.submit(safe_load, path)))
            if len(queue) >= prefetch:
                break
        while queue:
            path, future = queue.popleft()
            following = next(upcoming, None)
            if following is not None:
                queue.append((following, pool.submit(safe_load, following)))
            yield (path, *future.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def extract(model, paths, batch_size=BATCH_SIZE, workers=WORKERS, resize_filter=RESIZE_FILTER,
            on_batch=None, progress=False):
    """Features of `paths` from `model` (any Keras model (224, 224, 3) → (D,)).

    Returns ({image_id: float32 (D,)}, [(path, reason), ...] for files that were skipped).
    on_batch(new_features, new_failures) is called after every forward pass (checkpoints).
    Every batch is padded to `batch_size` rows, so the model always sees one shape (one graph,
    and per-image results that do not depend on how many images were left over).
    """
    predict = make_predict_fn(model)
    features, failures, seen = {}, [], {}
    batch_ids, batch_arrays, batch_failures = [], [], []
    bar = progress_bar(total=len(paths), unit="img", desc="features",
                       disable=not (progress and on_terminal()), mininterval=1.0, smoothing=0.05)

    def run_batch():
        n = len(batch_arrays)
        x = np.stack(batch_arrays)
        if n < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
        out = predict(x)[:n].reshape(n, -1)
        new = {image_id: np.array(row, dtype=np.float32) for image_id, row in zip(batch_ids, out)}
        features.update(new)
        bar.update(n + len(batch_failures))
        if on_batch is not None:
            on_batch(new, list(batch_failures))
        batch_ids.clear(), batch_arrays.clear(), batch_failures.clear()

    try:
        for path, array, reason in decoded_in_order(paths, workers, PREFETCH_BATCHES * batch_size,
                                                    resize_filter):
            if array is not None and path.stem in seen:
                array, reason = None, f"duplicate image id {path.stem} (also {seen[path.stem].name})"
            if array is None:
                failures.append((path, reason))
                batch_failures.append((path, reason))
                bar.write(f"skipped {path.name}: {reason}", file=sys.stderr)
                continue
            seen[path.stem] = path
            batch_ids.append(path.stem)
            batch_arrays.append(array)
            if len(batch_arrays) == batch_size:
                run_batch()
        if batch_arrays:
            run_batch()
        elif batch_failures:
            bar.update(len(batch_failures))
            if on_batch is not None:
                on_batch({}, list(batch_failures))
    finally:
        bar.close()
    return features, failures


def build_model(weights, seed=SEED):
    """The fc2 extractor (vgg16_build); tests swap this for a tiny model."""
    from vgg16_build import build_feature_extractor
    return build_feature_extractor(weights=weights, seed=seed)


def weights_fingerprint(weights, seed):
    """What the features depend on: a rerun may only resume a file with the same fingerprint."""
    from vgg16_build import IMAGENET_MD5
    if weights is None or str(weights).lower() == "none":
        return f"random seed={seed}"
    if str(weights).lower() == "imagenet":
        return f"imagenet md5={IMAGENET_MD5}"
    path = Path(weights)
    if path.suffix.lower() == ".json":
        path = path.with_suffix(".h5")
    if not path.is_file():
        raise PipelineError(f"weights file not found ({path})")
    return f"{path.name} sha256={sha256_file(path)}"


def load_partial(path, fingerprint):
    """The features a stopped run checkpointed, or {} when there is no checkpoint."""
    if not path.is_file():
        return {}
    state = load_pickle(path, "checkpoint")   # restricted: a checkpoint never runs code
    try:
        saved, features = state["fingerprint"], state["features"]
    except (KeyError, TypeError) as exc:
        raise PipelineError(f"unreadable checkpoint ({path}: {exc!r}); delete it or pass --overwrite") from None
    if saved != fingerprint:
        raise PipelineError(f"checkpoint made with other settings ({path}: {saved}); "
                            "pass --overwrite to start again")
    return features


def save_partial(path, fingerprint, features):
    with atomic_write(path, "wb") as handle:
        pickle.dump({"fingerprint": fingerprint, "features": features}, handle,
                    protocol=pickle.HIGHEST_PROTOCOL)


def load_finished(output, settings_path, fingerprint):
    """Features already in --output from an earlier run with the same fingerprint, else an error."""
    if not output.is_file():
        return {}
    saved = read_json(settings_path).get("fingerprint") if settings_path.is_file() else None
    if saved != fingerprint:
        raise PipelineError(f"{output} exists and was made with other settings ({saved}); pass "
                            "--overwrite to replace it or choose another --output")
    return load_features(output)


def sigterm_as_interrupt():
    """Make `kill` (SIGTERM) behave like Ctrl-C, so the finished work is checkpointed first."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt
    return signal.signal(signal.SIGTERM, handler)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--images", required=True, help="folder of image files")
    parser.add_argument("--output", default="data/features.pkl", help="features pickle to write")
    parser.add_argument("--weights", default=WEIGHTS, help="imagenet | none | PATH (vgg16_build.py)")
    parser.add_argument("--seed", type=int, default=SEED, help="random-weights seed (--weights none)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=WORKERS, help="decoding threads")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images (by name)")
    parser.add_argument("--checkpoint-every", type=int, default=CHECKPOINT_EVERY,
                        help="images between checkpoints")
    parser.add_argument("--resize-filter", default=RESIZE_FILTER,
                        choices=["nearest", "bilinear", "bicubic", "lanczos"],
                        help="PIL filter for images that are not 224x224")
    parser.add_argument("--overwrite", action="store_true",
                        help="ignore an existing output/checkpoint instead of continuing it")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.checkpoint_every < 1 or (args.limit is not None and args.limit < 1):
        raise PipelineError("--batch-size, --checkpoint-every and --limit must be >= 1")

    output = Path(args.output)
    partial = output.with_name(output.name + ".partial")
    settings_path = output.with_name(output.stem + ".settings.json")
    all_paths = list_images(args.images)
    if not all_paths:
        raise PipelineError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {args.images}")
    paths = all_paths[:args.limit] if args.limit else all_paths
    fingerprint = (f"{weights_fingerprint(args.weights, args.seed)}; resize={args.resize_filter}; "
                   "preprocess=vgg16 caffe; layer=fc2")

    done = {}
    if not args.overwrite:
        done.update(load_finished(output, settings_path, fingerprint))
        done.update(load_partial(partial, fingerprint))
    present = {p.stem for p in all_paths}
    done = {k: v for k, v in done.items() if k in present}  # images deleted since are dropped
    pending = [p for p in paths if p.stem not in done]
    resumed = len({p.stem for p in paths} & done.keys())
    print(f"{len(paths)} images in {args.images}: {resumed} already done, {len(pending)} to go",
          file=sys.stderr)

    failures, since_checkpoint, seconds = [], [0], 0.0

    def on_batch(new, new_failures):
        done.update(new)
        failures.extend(new_failures)
        since_checkpoint[0] += len(new) + len(new_failures)
        if since_checkpoint[0] >= args.checkpoint_every:
            save_partial(partial, fingerprint, done)
            since_checkpoint[0] = 0

    previous_handler = sigterm_as_interrupt()
    try:
        if pending:
            model = build_model(args.weights, args.seed)
            start = time.perf_counter()  # the rate below is extraction only, not the model build
            extract(model, pending, batch_size=args.batch_size, workers=args.workers,
                    resize_filter=args.resize_filter, on_batch=on_batch, progress=True)
            seconds = time.perf_counter() - start
    except BaseException:
        if since_checkpoint[0]:
            save_partial(partial, fingerprint, done)  # keep every finished batch
        raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)

    if not done:
        raise PipelineError(f"no image in {args.images} could be read ({len(failures)} skipped)")
    widths = {v.shape[0] for v in done.values()}
    save_features(output, done)
    save_settings(settings_path, args, fingerprint=fingerprint, images=len(done),
                  feature_shape=[widths.pop()], dtype="float32", seconds=round(seconds, 1),
                  skipped=[[p.name, reason] for p, reason in failures])
    if partial.exists():
        partial.unlink()
    computed = len(pending) - len(failures)
    rate = computed / seconds if seconds > 0 else 0.0
    print(f"summary: {len(done)} features -> {output}; {computed} computed, {resumed} resumed, "
          f"{len(failures)} skipped; {seconds:.1f} s, {rate:.1f} img/s")
    for path, reason in failures:
        print(f"  skipped {path.name}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
