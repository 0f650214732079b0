"""Images -> features: batched, threaded, checkpointed extraction (extract_features.py's engine).

Owns
  extract          features of a list of image files from a backbone model: decoding in threads,
                   fixed-shape batches (the last zero-padded), one batch in flight while the next
                   is gathered; on_batch after every forward pass (checkpoints).
  extract_folder   a whole folder to FILE (+ G.h5 grids), resumable: FILE.partial (restricted
                   pickle) and G.h5.partial are checkpoints; a rerun with the same fingerprint
                   computes only what is missing; other settings are refused unless overwrite.
  extract_trunk    a whole folder's EfficientNet-Lite lower-part maps (the input of a trainable
                   top) to a trunk file T.h5 (captioning/data/trunk.py), optionally with a
                   mirrored second view; resumable through the same checkpointed loop.
  build_model, build_trunk_model, weights_fingerprint, load_image   the backbone's extractor,
                   the trunk's, what features depend on, one preprocessed image.
Files: extract_features.py's docstring (features.pkl, FILE.partial, G.h5, T.h5,
<stem>.settings.json).
"""
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

from captioning.encoders import backbones, efficientnet_lite
from captioning.data.features import load_features, load_pickle, save_features
from captioning.data.images import IMAGE_EXTENSIONS, list_images, load_rgb
from captioning.encoders.runtime import make_predict_fn as make_runtime_predict_fn
from captioning.encoders.runtime import submitter, tf_sees_gpu
from captioning.data.spatial import SpatialFeatures, SpatialWriter
from captioning.data.trunk import TrunkSpec, TrunkWriter
from captioning.utils import PipelineError, atomic_write, on_terminal, read_json, save_settings
from captioning.utils import progress as progress_bar

# -- defaults (extract_features.py's options) ----------------------------------------------------
BACKBONE = backbones.DEFAULT_BACKBONE  # vgg16 | lite0 | auto
WEIGHTS = "imagenet"        # imagenet | none | PATH (see vgg16_build.py / efficientnet_lite.py)
SEED = 0                    # random init seed, only matters with --weights none
BATCH_SIZE = 32             # images per forward pass; fixed shape (the last batch is zero-padded)
WORKERS = 1                 # decode threads on a CPU: one keeps up with the network, a second
                            # takes its cores (benchmarks/bench_extract.py measures it)
PREFETCH_BATCHES = 2        # decoded batches kept ready ahead of the model (bounds memory)
CHECKPOINT_EVERY = 512      # images between checkpoints of FILE.partial (~30 s of CPU work)
RESIZE_FILTER = "bilinear"  # PIL filter for images that are not already 224x224
RUNTIME = "auto"            # auto | tf | openvino: which runtime runs the network (captioning/encoders/runtime.py)


def load_image(path, resize_filter=RESIZE_FILTER, backbone=BACKBONE):
    """One image file -> float32 array (224, 224, 3) preprocessed for `backbone` (VGG16: BGR,
    means subtracted; Lite0: (x - 127) / 128). Raises PipelineError naming an undecodable file.
    """
    encoder = backbones.get(backbone)
    return encoder.preprocess(load_rgb(path, encoder.image_size, resize_filter))


def make_predict_fn(model, runtime="tf", fingerprint=None):
    """numpy batch → numpy features (a list for a [pooled, spatial] model), one call per batch,
    on `runtime` (captioning.encoders.runtime: what auto picks, the cached OpenVINO conversion keyed by
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
    size = backbones.get(backbone).image_size

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
    One batch runs (predict.submit, captioning.encoders.runtime) while the next is gathered, so on
    OpenVINO the cores never wait for this loop; batches still finish, and reach on_batch, in order.
    """
    submit = submitter(make_predict_fn(model) if predict is None else predict)
    preprocess = backbones.get(backbone).preprocess
    features, failures, seen = {}, [], {}
    batch_ids, batch_failures = [], []
    # Two batch buffers in turn: one is read by the forward pass in flight while the other is
    # filled. Preprocessing straight into a reused buffer, not into a fresh 600 KB array per
    # image stacked into a fresh batch, saves core time (page faults, cache misses) that the
    # network's threads get back (benchmarks/bench_extract.py measures extraction).
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
    """The backbone's extractor (captioning/encoders/backbones.py); tests swap this for a tiny model."""
    return backbones.build(backbone, weights, seed=seed, output=output)


def weights_fingerprint(weights, seed, backbone=BACKBONE):
    """What the features depend on: a rerun may only resume a file with the same fingerprint."""
    return backbones.weights_fingerprint(backbone, weights, seed)


def features_fingerprint(backbone, weights, seed, resize_filter):
    """Everything extracted features depend on (weights, resizing, preprocessing, layer): a run
    resumes, or a part file joins a merge, only under the same string."""
    encoder = backbones.get(backbone)
    return (f"{weights_fingerprint(weights, seed, backbone)}; resize={resize_filter}; "
            f"preprocess={encoder.preprocess_name}; layer={encoder.pooled_layer}")


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


def checkpointed_extract(pending, done, partial, fingerprint, grids, checkpoint_every, open_model,
                         workers=None, **extract_kwargs):
    """extract() over `pending` into the dict `done` (and the grids writer `grids`: a
    SpatialWriter, a captioning.data.trunk.TrunkWriter, or None),
    checkpointing `done` to `partial` (restricted pickle, with `fingerprint`) and committing the
    grids every `checkpoint_every` images and on any interruption (Ctrl-C, SIGTERM, an error),
    so a rerun resumes from the last finished batch. Shared by extract_folder, the part files
    of captioning/encoders/shards.py and extract_trunk. partial None: nothing is pickled, the
    grids writer's commits are the whole checkpoint (a trunk file; `done` is never written).

    open_model() -> (model, predict) is called only when there is work; workers None = one
    decoding thread per decode_threads(predict). extract_kwargs: extract()'s batch_size,
    resize_filter, progress, backbone. Returns (failures [(path, reason)], seconds of
    extraction, predict or None, workers used or None).
    """
    failures, since, seconds, predict = [], [0], 0.0, None

    def checkpoint():
        if partial is not None:
            save_partial(partial, fingerprint, done)
        if grids is not None:
            grids.commit()   # the grids of exactly the images the pickle checkpoint holds
        since[0] = 0

    def on_batch(new, new_failures, new_grids):
        if grids is not None and new_grids:
            grids.append(new_grids)
        done.update(new)
        failures.extend(new_failures)
        since[0] += len(new) + len(new_failures)
        if since[0] >= checkpoint_every:
            checkpoint()

    previous_handler = sigterm_as_interrupt()
    try:
        if pending:
            model, predict = open_model()
            if workers is None:
                workers = decode_threads(predict)
            start = time.perf_counter()  # the rate is extraction only, not the model build
            extract(model, pending, workers=workers, on_batch=on_batch, predict=predict,
                    **extract_kwargs)
            seconds = time.perf_counter() - start
    except BaseException:
        if since[0]:
            checkpoint()  # keep every finished batch
        raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        if grids is not None:
            grids.close()
    return failures, seconds, predict, workers


def extract_folder(args, log=lambda line: print(line, file=sys.stderr)):
    """Extract every image of a folder into args.output (and args.spatial), resuming a stopped run.

    args: extract_features.py's options (images, output, backbone, weights, spatial, seed,
    batch_size, workers, limit, checkpoint_every, resize_filter, runtime, overwrite); they are
    also what <stem>.settings.json records. log(line): progress notes (stderr by default).
    Returns a summary dict: output, backbone, width, grid, images, computed, resumed, seconds,
    runtime, failures [(path, reason)]. A kill at any moment leaves FILE.partial (and
    G.h5.partial) holding every finished batch; nothing half-written under the final names.
    """
    output = Path(args.output)
    partial = output.with_name(output.name + ".partial")
    settings_path = output.with_name(output.stem + ".settings.json")
    all_paths = list_images(args.images)
    if not all_paths:
        raise PipelineError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {args.images}")
    paths = all_paths[:args.limit] if args.limit else all_paths
    backbone, note = backbones.choose_backbone(args.backbone, args.weights)
    if note:
        log(f"note: {note}")
    encoder = backbones.get(backbone)
    weights_id = weights_fingerprint(args.weights, args.seed, backbone)
    fingerprint = features_fingerprint(backbone, args.weights, args.seed, args.resize_filter)

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
    log(f"{len(paths)} images in {args.images}: {resumed} already done, {len(pending)} to go "
        f"({backbone})")

    def open_model():
        model = build_model(args.weights, args.seed, backbone,
                            "both" if spatial is not None else "pooled")
        return model, make_predict_fn(model, args.runtime, f"{weights_id}; {backbone}")

    failures, seconds, predict, args.workers = checkpointed_extract(
        pending, done, partial, fingerprint, spatial, args.checkpoint_every, open_model,
        workers=args.workers, batch_size=args.batch_size, resize_filter=args.resize_filter,
        progress=True, backbone=backbone)
    runtime = predict.description if predict is not None else "none (nothing to compute)"

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
    return {"output": output, "backbone": backbone, "width": width, "grid": grid,
            "images": len(done), "computed": len(pending) - len(failures), "resumed": resumed,
            "seconds": seconds, "runtime": runtime, "failures": failures}


def build_trunk_model(weights, seed=SEED, backbone="lite0", block=None, flips=False):
    """The lower part of `backbone` cut before `block` (None: its default split), as a model
    extract() can run: preprocessed (None, S, S, 3) -> [channel means (None, c), maps (None, h,
    w, c)], or with flips maps (None, 2, h, w, c) [the image, the image mirrored left-right].
    The means only fill extract()'s pooled slot (kept in memory, never written)."""
    import keras
    if backbone not in backbones.LITE:
        raise PipelineError(f"--trunk needs an EfficientNet-Lite backbone ({' or '.join(backbones.LITE)}), not {backbone}")
    lower = efficientnet_lite.build_split(weights, backbone, block, seed=seed).lower
    image, maps = lower.input, lower.output
    if flips:   # mirroring the preprocessed input = preprocessing the mirrored image (per pixel)
        maps = keras.ops.stack([maps, lower(keras.ops.flip(image, axis=2))], axis=1)
    means = keras.ops.mean(maps, axis=tuple(range(1, len(maps.shape) - 1)))
    return keras.Model(image, [means, maps], name=f"{lower.name}_trunk")


def extract_trunk(args, log=lambda line: print(line, file=sys.stderr)):
    """The lower part's maps of every image of a folder into the trunk file args.trunk
    (captioning/data/trunk.py), resuming a stopped run through checkpointed_extract.

    args: extract_features.py's options (images, trunk, trunk_block, flips, backbone, weights,
    seed, batch_size, workers, limit, checkpoint_every, resize_filter, runtime, overwrite).
    Returns a summary dict: output, backbone, block, shape, flips, images, computed, resumed,
    seconds, runtime, failures [(path, reason)]. A kill leaves T.h5.partial holding every
    committed batch; T.h5 appears only complete, in one rename.
    """
    backbone = "lite0" if args.backbone in (None, "auto") else args.backbone
    if backbone not in backbones.LITE:
        raise PipelineError(f"--trunk needs an EfficientNet-Lite backbone ({' or '.join(backbones.LITE)}), not {backbone}")
    block = (efficientnet_lite.default_split_block(backbone) if args.trunk_block is None
             else efficientnet_lite.check_split_block(args.trunk_block, backbone))
    all_paths = list_images(args.images)
    if not all_paths:
        raise PipelineError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {args.images}")
    paths = all_paths[:args.limit] if args.limit else all_paths
    weights_id = weights_fingerprint(args.weights, args.seed, backbone)
    spec = TrunkSpec(backbone, efficientnet_lite.image_size(backbone), block,
                     features_fingerprint(backbone, args.weights, args.seed, args.resize_filter))
    writer = TrunkWriter(args.trunk, spec, flips=args.flips, overwrite=args.overwrite)
    pending = [p for p in paths if p.stem not in writer.done]
    resumed = len(paths) - len(pending)
    log(f"{len(paths)} images in {args.images}: {resumed} already done, {len(pending)} to go "
        f"({spec.describe()}{', with flips' if args.flips else ''})")

    def open_model():
        model = build_trunk_model(args.weights, args.seed, backbone, block, args.flips)
        return model, make_predict_fn(model, args.runtime,
                                      f"{weights_id}; {backbone} trunk {block} flips={args.flips}")

    failures, seconds, predict, args.workers = checkpointed_extract(
        pending, {}, None, spec.fingerprint, writer, args.checkpoint_every, open_model,
        workers=args.workers, batch_size=args.batch_size, resize_filter=args.resize_filter,
        progress=True, backbone=backbone)
    if not writer.rows:
        raise PipelineError(f"no image in {args.images} could be read ({len(failures)} skipped)")
    images = writer.finish()
    return {"output": Path(args.trunk), "backbone": backbone, "block": block,
            "shape": list(efficientnet_lite.trunk_shape(block, backbone)), "flips": args.flips,
            "images": images, "computed": len(pending) - len(failures), "resumed": resumed,
            "seconds": seconds, "failures": failures,
            "runtime": predict.description if predict is not None else "none (nothing to compute)"}


def spatial_grid(path):
    """[H, W, C] of a finished spatial file (what the settings record)."""
    with SpatialFeatures(path) as grids:
        return [*grids.grid, grids.width]
