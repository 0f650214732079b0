"""Extraction in shards, in one process or on a Dask cluster, and the merge of the parts into
files that are read per batch (a memory-mapped array, an HDF5 virtual dataset).

A run over M images in N shards: the images are sorted by id (file name without extension) and
shard I (0 <= I < N) takes the contiguous block [I*M//N, (I+1)*M//N) of that list, so any
machine computes the same split from the same list, and the parts joined in order are the
sorted list again. Each shard is one task: `extract_features.py --shard I/N` by hand or from a
job array, or all of them on Dask (run_on_dask). Every part is resumable and atomic on its own.

Part files, in the parts folder, for shard I of N (NNNN and IIII zero-padded to 4 digits):
    part-IIII-of-NNNN.npy    float32 (n, D): pooled features of the part's images, row k the
                             image ids[k] of the part's .json; np.save format
    part-IIII-of-NNNN.h5     only with grids: captioning/data/spatial.py's layout, /features
                             float16 (n, H, W, C), /ids UTF-8 (n,) (its own row order), attrs
                             format_version, backbone, layer, grid, width, fingerprint, count
    part-IIII-of-NNNN.json   written last: the part is complete when it exists. {"format_version":
                             1, "shard": I, "shards": N, "ids": [...] (the .npy's rows),
                             "fingerprint": the weights, resize and preprocessing the features
                             depend on, "backbone", "image_size": [H, W] the network's input,
                             "width": D, "grid": [H, W, C] or null, "images_sha256": of the
                             part's image ids (which images it was asked for), "skipped":
                             [[file name, reason]], "seconds", "runtime"}
    while a part runs: part-IIII-of-NNNN.partial (checkpoint: restricted pickle {"fingerprint",
    "features": {id: float32 (D,)}}, rewritten every checkpoint_every images) and
    part-IIII-of-NNNN.h5.partial (grids committed at the same moments); a rerun of a killed part
    computes only what they lack, a rerun of a finished part computes nothing.
A part is refused (one line naming both values) when the folder holds parts of another N, or
parts or checkpoints made with other weights/preprocessing (fingerprint) or image size.

Merged (merge_parts; OUT = e.g. data/coco/features.npy):
    OUT                      float32 (M', D), M' = images read (skipped ones left out), rows in
                             id order; np.load(OUT, mmap_mode="r") reads rows on demand, so a
                             reader's memory does not grow with M'. Written part by part.
    <OUT stem>.ids.txt       UTF-8, one image id per line: line k names row k of OUT
    <OUT stem>.settings.json backbone, fingerprint, images, width, feature_shape [D], grid,
                             dtype, layout "npy", shards N, runtimes, skipped (as the settings
                             extract_features.py writes beside features.pkl)
    G.h5 (with grids)        spatial.py's layout, readable by SpatialFeatures / read_grids:
                             /features is an HDF5 virtual dataset (M', H, W, C) float16 mapping
                             each part's /features, nothing copied (the file is a few KB);
                             /ids a real dataset. The parts are named relative to G.h5's folder:
                             keep them beside it (moving both together is fine); a missing part
                             reads as NaN, so merge_parts checks they are all there.
    FILE.pkl (optional)      the course's features.pkl {id: float32 (D,)} from the parts, for
                             Flickr8k-size runs (it is loaded whole).

Dask (run_on_dask): `local:N` starts a LocalCluster of N worker processes with one thread each
on 127.0.0.1; `tcp://HOST:PORT` joins a user's scheduler (dask-scheduler / dask-worker, or one
that dask-jobqueue or dask-kubernetes started). Every worker must see the images and the parts
folder at the same paths (a shared file system) and have this project installed. One task per
part; the model is built once per worker process (cached_model: kept in the worker's memory,
keyed by the builder and the fingerprint), not once per part. A worker process that dies (killed,
out of memory) has its running part rescheduled on another worker by the scheduler, up to
distributed.scheduler.allowed-failures times (3 by default; then KilledWorker, reported in one
line); the redo resumes from the part's checkpoint. A task that raises is retried RETRIES times
(client.submit(retries=...)). A scheduler that does not answer within CONNECT_TIMEOUT seconds,
or has no worker within WORKER_TIMEOUT, is a one-line error.
"""
import contextlib
import hashlib
import json
import os
import re
import socket
import sys
import threading
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from captioning.data import karpathy
from captioning.data.features import save_features
from captioning.data.images import IMAGE_EXTENSIONS, list_images
from captioning.data.rowfile import partial_path
from captioning.data.spatial import SpatialFeatures, SpatialWriter
from captioning.encoders import backbones
from captioning.encoders import extract as ef
from captioning.utils import PipelineError, atomic_write, read_json, require, write_json

FORMAT_VERSION = 1
CONNECT_TIMEOUT = 10     # seconds to wait for a --dask tcp://... scheduler to answer
WORKER_TIMEOUT = 60      # seconds to wait for its first worker
RETRIES = 1              # reruns of a part whose task raised (not counting worker deaths)
_PART = re.compile(r"^part-(\d{4})-of-(\d{4})\.json$")


@dataclass(frozen=True)
class Settings:
    """What a part is extracted with (extract_features.py's options); backbone is resolved
    (vgg16 | lite0, never auto) before the parts start, so every worker uses the same one."""
    backbone: str = "vgg16"
    weights: str = ef.WEIGHTS
    seed: int = ef.SEED
    grids: bool = False          # also the spatial grids (part .h5 files)
    batch_size: int = ef.BATCH_SIZE
    checkpoint_every: int = ef.CHECKPOINT_EVERY
    resize_filter: str = ef.RESIZE_FILTER
    runtime: str = ef.RUNTIME
    workers: int = None          # decode threads; None = ef.decode_threads's choice

    def fingerprint(self):
        """What the features depend on; the same string extract_folder records."""
        return ef.features_fingerprint(self.backbone, self.weights, self.seed, self.resize_filter)


# ---- which images a shard takes -----------------------------------------------------------------
def parse_shard(text):
    """'3/16' -> (3, 16); I counts from 0 (0 <= I < N), as job-array indices do."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match or not 0 <= int(match[1]) < int(match[2]) or int(match[2]) > 9999:
        raise PipelineError(f"--shard takes I/N with 0 <= I < N <= 9999 (got {text!r})")
    return int(match[1]), int(match[2])


def part_name(index, shards):
    return f"part-{index:04d}-of-{shards:04d}"


def sorted_images(paths):
    """Image paths sorted by id; two files with one id (a.jpg, a.png) are a PipelineError."""
    by_id = {}
    for path in map(Path, paths):
        if path.stem in by_id:
            raise PipelineError(f"duplicate image id {path.stem}: {by_id[path.stem]} and {path}")
        by_id[path.stem] = path
    return [by_id[i] for i in sorted(by_id)]


def shard_paths(paths, index, shards):
    """Shard `index`'s block of the id-sorted `paths` (see the module docstring)."""
    paths = sorted_images(paths)
    return paths[index * len(paths) // shards:(index + 1) * len(paths) // shards]


# ---- one part ---------------------------------------------------------------------------------
_MODELS = {}
_MODELS_LOCK = threading.Lock()


def cached_model(settings):
    """(model, predict, built) for `settings`: built once per process and kept, so a Dask worker
    runs all its parts with one network; built is True for the call that built it. Keyed by the
    builder (tests swap ef.build_model for a tiny model) and what the network depends on."""
    output = "both" if settings.grids else "pooled"
    key = (ef.build_model, settings.fingerprint(), settings.backbone, output, settings.runtime)
    with _MODELS_LOCK:
        built = key not in _MODELS
        if built:
            model = ef.build_model(settings.weights, settings.seed, settings.backbone, output)
            weights_id = ef.weights_fingerprint(settings.weights, settings.seed, settings.backbone)
            _MODELS[key] = (model, ef.make_predict_fn(model, settings.runtime,
                                                      f"{weights_id}; {settings.backbone}"))
        return (*_MODELS[key], built)


def _ids_sha256(ids):
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()


def read_part(path):
    """A finished part's .json -> dict (see the module docstring); PipelineError if unreadable."""
    part = read_json(path)
    keys = ("shard", "shards", "ids", "fingerprint", "image_size", "width", "grid")
    if not isinstance(part, dict) or part.get("format_version") != FORMAT_VERSION or \
            any(k not in part for k in keys):
        raise PipelineError(f"not a part file of this version ({path})")
    return part


def check_parts_folder(parts_dir, shards, fingerprint, image_size, overwrite=False):
    """One-line PipelineError if `parts_dir` holds a finished part of another N, model or image
    size than this run's (merging them would mix features that do not belong together). With
    overwrite the parts of this N are about to be redone, so only their N is checked."""
    for path in sorted(Path(parts_dir).glob("part-*-of-*.json")):
        part = read_part(path)
        if part["shards"] != shards:
            raise PipelineError(f"{path.name} is one of {part['shards']} parts, this run makes "
                                f"{shards}; use another parts folder or delete those parts")
        if overwrite:
            continue
        if part["fingerprint"] != fingerprint:
            raise PipelineError(f"{path.name} was made with another model ({part['fingerprint']}), "
                                f"this run uses {fingerprint}; pass --overwrite or use another "
                                f"parts folder")
        if list(part["image_size"]) != list(image_size):
            raise PipelineError(f"{path.name} was made at image size {part['image_size']}, this "
                                f"run at {list(image_size)}; pass --overwrite or use another "
                                f"parts folder")


def extract_shard(index, shards, paths, parts_dir, settings, overwrite=False, progress=False,
                  log=lambda line: print(line, file=sys.stderr)):
    """Extract shard `index` of `shards` of the images `paths` (all of them: the shard's block is
    chosen here) into `parts_dir`. Returns extract_part's summary."""
    return extract_part(index, shards, shard_paths(paths, index, shards), parts_dir, settings,
                        overwrite, progress, log)


def extract_part(index, shards, share, parts_dir, settings, overwrite=False, progress=False,
                 log=lambda line: print(line, file=sys.stderr)):
    """Extract the images `share` (shard `index`'s block) into part-IIII-of-NNNN.* in
    `parts_dir`, resuming its checkpoint; nothing to do when the part is already complete.

    Returns {"part", "images", "computed", "resumed", "skipped", "seconds", "runtime",
    "process": host:pid that ran it, "model_built": whether it built the network (the first part
    a process runs) or reused the one cached_model kept}.
    """
    parts_dir, name = Path(parts_dir), part_name(index, shards)
    share = [Path(p) for p in share]
    if not share:
        raise PipelineError(f"{name} has no images: there are fewer images than parts; use fewer")
    encoder = backbones.get(settings.backbone)
    fingerprint, image_size = settings.fingerprint(), list(encoder.image_size)
    check_parts_folder(parts_dir, shards, fingerprint, image_size, overwrite)
    record, npy = parts_dir / f"{name}.json", parts_dir / f"{name}.npy"
    checkpoint_path, grids_path = parts_dir / f"{name}.partial", parts_dir / f"{name}.h5"
    asked = _ids_sha256([p.stem for p in share])
    if record.is_file() and not overwrite:
        part = read_part(record)
        if part["images_sha256"] != asked:
            raise PipelineError(f"{record} was made from another image list (images added or "
                                f"removed since?); pass --overwrite or use another parts folder")
        if settings.grids and part["grid"] is None:
            raise PipelineError(f"{record} has no grids; pass --overwrite to extract them too")
        return {"part": name, "images": len(part["ids"]), "computed": 0,
                "resumed": len(part["ids"]), "skipped": part["skipped"], "seconds": 0.0,
                "runtime": part["runtime"], "process": _process(), "model_built": False}
    if overwrite:
        for stale in (record, npy, checkpoint_path):
            stale.unlink(missing_ok=True)
    parts_dir.mkdir(parents=True, exist_ok=True)
    done = {} if overwrite else ef.load_partial(checkpoint_path, fingerprint)
    grids = None
    if settings.grids:
        grids = SpatialWriter(grids_path, f"{fingerprint}; grid={encoder.spatial_layer}",
                              settings.backbone, encoder.spatial_layer, overwrite=overwrite)
    pending = [p for p in share if p.stem not in done or (grids and p.stem not in grids.done)]
    log(f"{name}: {len(share)} images, {len(share) - len(pending)} already done, "
        f"{len(pending)} to go ({settings.backbone})")

    built = []

    def open_model():
        model, predict, was_built = cached_model(settings)
        built.append(was_built)
        return model, predict

    failures, seconds, predict, _ = ef.checkpointed_extract(
        pending, done, checkpoint_path, fingerprint, grids, settings.checkpoint_every, open_model,
        workers=settings.workers or None, batch_size=settings.batch_size,
        resize_filter=settings.resize_filter, progress=progress, backbone=settings.backbone)
    runtime = predict.description if predict is not None else "none (nothing to compute)"
    built = bool(built and built[0])

    ids = [p.stem for p in share if p.stem in done]
    if not ids:
        raise PipelineError(f"{name}: no image could be read ({len(failures)} skipped)")
    grid = None
    if grids is not None:
        grids.finish()
        with SpatialFeatures(grids_path) as written:
            grid = [*written.grid, written.width]
    with atomic_write(npy, "wb") as handle:
        np.save(handle, np.stack([done[i] for i in ids]).astype(np.float32))
    write_json(record, {"format_version": FORMAT_VERSION, "shard": index, "shards": shards,
                        "ids": ids, "fingerprint": fingerprint, "backbone": settings.backbone,
                        "image_size": image_size, "width": int(done[ids[0]].shape[0]),
                        "grid": grid, "images_sha256": asked,
                        "skipped": [[p.name, reason] for p, reason in failures],
                        "seconds": round(seconds, 1), "runtime": runtime,
                        "settings": asdict(settings)})
    checkpoint_path.unlink(missing_ok=True)
    return {"part": name, "images": len(ids), "computed": len(pending) - len(failures),
            "resumed": len(share) - len(pending),
            "skipped": [[p.name, reason] for p, reason in failures], "seconds": seconds,
            "runtime": runtime, "process": _process(), "model_built": built}


def _process():
    return f"{socket.gethostname()}:{os.getpid()}"


# ---- the merge --------------------------------------------------------------------------------
def finished_parts(parts_dir):
    """All N parts of `parts_dir` in order, checked to belong together; a PipelineError naming
    the first missing, foreign or unfinished part otherwise."""
    parts_dir = Path(parts_dir)
    found = sorted(p for p in parts_dir.glob("part-*-of-*.json") if _PART.match(p.name))
    if not found:
        raise PipelineError(f"no finished part files (part-IIII-of-NNNN.json) in {parts_dir}")
    parts = [read_part(p) for p in found]
    first = parts[0]
    for path, part in zip(found, parts):
        for key, what in (("shards", "number of parts"), ("fingerprint", "model"),
                          ("image_size", "image size"), ("grid", "grid")):
            if part[key] != first[key]:
                raise PipelineError(f"{path.name} and {found[0].name} differ in {what}: "
                                    f"{part[key]} and {first[key]}; they cannot be merged")
    shards = first["shards"]
    have = {part["shard"] for part in parts}
    missing = [i for i in range(shards) if i not in have]
    if missing:
        raise PipelineError(f"{len(missing)} of {shards} parts not finished in {parts_dir}, first "
                            f"{part_name(missing[0], shards)} (run --shard {missing[0]}/{shards})")
    return parts


def merge_parts(parts_dir, output, spatial=None, pickle_path=None,
                log=lambda line: print(line, file=sys.stderr)):
    """Join the finished parts of `parts_dir` into OUT (.npy), OUT's .ids.txt and .settings.json,
    and optionally the grids file `spatial` (virtual dataset) and the pickle `pickle_path`.
    Every file is written under a temporary name and renamed when complete. Returns a summary."""
    parts_dir, output = Path(parts_dir), Path(output)
    parts = finished_parts(parts_dir)
    ids = [i for part in parts for i in part["ids"]]
    if len(set(ids)) != len(ids):
        raise PipelineError(f"an image id is in two parts of {parts_dir}; the parts were made from "
                            f"different image lists")
    width, shards = parts[0]["width"], parts[0]["shards"]
    names = [parts_dir / part_name(part["shard"], shards) for part in parts]
    if spatial is not None and parts[0]["grid"] is None:
        raise PipelineError(f"the parts in {parts_dir} have no grids (extract them with --spatial)")

    with atomic_write(output, "wb") as handle:   # the .npy header, then each part's rows
        np.lib.format.write_array_header_1_0(handle, {"descr": np.lib.format.dtype_to_descr(
            np.dtype("<f4")), "fortran_order": False, "shape": (len(ids), width)})
        for name, part in zip(names, parts):
            rows = np.load(name.with_suffix(".npy"), mmap_mode="r")
            if rows.shape != (len(part["ids"]), width):
                raise PipelineError(f"{name}.npy holds {rows.shape}, its .json lists "
                                    f"{len(part['ids'])} ids of width {width}")
            handle.write(np.ascontiguousarray(rows, dtype="<f4").tobytes())
    stem = output.with_suffix("")     # features.npy -> features.ids.txt, features.settings.json
    with atomic_write(stem.with_name(stem.name + ".ids.txt")) as handle:
        handle.writelines(f"{i}\n" for i in ids)
    if spatial is not None:
        merge_grids([name.with_suffix(".h5") for name in names], spatial)
    if pickle_path is not None:
        matrix = np.load(output, mmap_mode="r")
        save_features(pickle_path, {i: np.array(matrix[k]) for k, i in enumerate(ids)})
    encoder = backbones.get(parts[0]["backbone"])
    settings_path = stem.with_name(stem.name + ".settings.json")
    write_json(settings_path, {
        "backbone": parts[0]["backbone"], "fingerprint": parts[0]["fingerprint"],
        "images": len(ids), "feature_shape": [width], "width": width, "grid": parts[0]["grid"],
        "pooled_layer": encoder.pooled_layer, "dtype": "float32", "layout": "npy",
        "output": output.name, "ids_file": stem.name + ".ids.txt", "shards": shards,
        "parts_dir": str(parts_dir), "spatial": None if spatial is None else str(spatial),
        "pickle": None if pickle_path is None else str(pickle_path),
        "runtimes": sorted({part["runtime"] for part in parts}),
        "seconds": round(sum(part["seconds"] for part in parts), 1),
        "skipped": [s for part in parts for s in part["skipped"]]})
    log(f"merged {shards} parts: {len(ids)} images -> {output}")
    return {"output": output, "images": len(ids), "width": width, "grid": parts[0]["grid"],
            "shards": shards, "backbone": parts[0]["backbone"],
            "skipped": [s for part in parts for s in part["skipped"]]}


def merge_grids(part_files, output):
    """The parts' grids as one spatial.py file whose /features is a virtual dataset: each part's
    rows are mapped, not copied (the part files stay where they are, named relative to it)."""
    import h5py
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    layout_rows, ids, sources = 0, [], []
    for path in part_files:
        if not path.is_file():
            raise PipelineError(f"grids of a part missing ({path})")
        with SpatialFeatures(path) as part:
            sources.append((path, len(part.ids), part.handle["features"].shape))
            ids.extend(part.ids)
            layout_rows += len(part.ids)
            attrs = dict(part.handle.attrs)
    shape = (layout_rows, *sources[0][2][1:])
    layout = h5py.VirtualLayout(shape=shape, dtype=np.float16)
    row = 0
    for path, n, stored in sources:
        source = h5py.VirtualSource(os.path.relpath(path, output.parent), "features", shape=stored)
        layout[row:row + n] = source[:n]
        row += n
    tmp = output.with_name(f"{output.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        with h5py.File(tmp, "w", libver="latest") as handle:
            handle.create_virtual_dataset("features", layout, fillvalue=np.nan)
            handle.create_dataset("ids", data=ids, dtype=h5py.string_dtype("utf-8"))
            handle.attrs.update({k: attrs[k] for k in ("format_version", "backbone", "layer",
                                                       "grid", "width", "fingerprint")})
            handle.attrs["count"] = layout_rows
            handle.attrs["parts"] = json.dumps([os.path.relpath(p, output.parent)
                                                for p, _, _ in sources])
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            tmp.unlink()
    partial_path(output).unlink(missing_ok=True)


# ---- Dask -------------------------------------------------------------------------------------
@contextlib.contextmanager
def dask_client(address, connect_timeout=None, worker_timeout=None):
    """A dask.distributed Client: `local:N` starts N one-thread worker processes on 127.0.0.1
    (closed on exit); `tcp://HOST:PORT` connects to a running scheduler. A scheduler that does
    not answer, or has no worker, is a one-line PipelineError after the stated timeout."""
    distributed = require("distributed", "cluster", "extract_features.py --dask")
    connect_timeout = CONNECT_TIMEOUT if connect_timeout is None else connect_timeout
    worker_timeout = WORKER_TIMEOUT if worker_timeout is None else worker_timeout
    local = re.fullmatch(r"local:(\d+)", address)
    if local:
        if not 1 <= int(local[1]) <= 256:
            raise PipelineError(f"--dask local:N takes 1 <= N <= 256 (got {address})")
        import logging
        with distributed.LocalCluster(n_workers=int(local[1]), threads_per_worker=1,
                                      processes=True, host="127.0.0.1", dashboard_address=None,
                                      silence_logs=logging.ERROR) as cluster, \
                distributed.Client(cluster) as client:
            yield client
        return
    if not re.fullmatch(r"(tcp|tls|ucx)://[^/\s]+:\d+", address):
        raise PipelineError(f"--dask takes local:N or tcp://HOST:PORT (got {address!r})")
    try:
        client = distributed.Client(address, timeout=connect_timeout)
    except (OSError, TimeoutError) as exc:
        raise PipelineError(f"no Dask scheduler answered at {address} within {connect_timeout} s "
                            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    try:
        try:
            client.wait_for_workers(1, timeout=worker_timeout)
        except (TimeoutError, OSError):
            raise PipelineError(f"the Dask scheduler at {address} has no worker after "
                                f"{worker_timeout} s (start one: dask-worker {address})") from None
        yield client
    finally:
        client.close()


def run_on_dask(address, paths, parts_dir, settings, shards, overwrite=False,
                connect_timeout=None, log=lambda line: print(line, file=sys.stderr)):
    """Run the `shards` parts of the images `paths` as Dask tasks (one per part) and wait for all.

    The shards are chosen here, so workers get their block, not the whole list (never more parts
    than images: every part has one at least). Returns the parts' summaries in part order; a part whose task failed (after RETRIES retries, or whose
    worker died allowed-failures times) is a one-line PipelineError naming it.
    """
    distributed = require("distributed", "cluster", "extract_features.py --dask")
    paths = sorted_images(paths)
    if shards > len(paths):
        log(f"note: {len(paths)} images make {len(paths)} parts, not {shards}")
        shards = len(paths)
    encoder = backbones.get(settings.backbone)
    check_parts_folder(parts_dir, shards, settings.fingerprint(), list(encoder.image_size),
                       overwrite)
    run = uuid.uuid4().hex[:8]
    summaries = {}
    with dask_client(address, connect_timeout) as client:
        futures = {}
        for index in range(shards):
            share = [str(p) for p in paths[index * len(paths) // shards:
                                            (index + 1) * len(paths) // shards]]
            future = client.submit(extract_part, index, shards, share, str(parts_dir), settings,
                                   overwrite, key=f"extract-{part_name(index, shards)}-{run}",
                                   retries=RETRIES, pure=False)
            futures[future] = index
        for future in distributed.as_completed(futures):
            index = futures[future]
            try:
                summary = future.result()
            except distributed.KilledWorker as exc:
                raise PipelineError(f"{part_name(index, shards)}: its worker died too often "
                                    f"(distributed.scheduler.allowed-failures) ({exc})") from None
            summaries[index] = summary
            log(f"{summary['part']}: {summary['images']} images, {summary['computed']} computed, "
                f"{summary['resumed']} resumed, {len(summary['skipped'])} skipped; worker "
                f"{summary['process']}" + (" (built its model)" if summary["model_built"] else ""))
    return [summaries[i] for i in range(shards)]


# ---- extract_features.py's modes --------------------------------------------------------------
SHARDS = 16              # parts of a --dask run (--shards)


def image_list(images, image_paths=None, limit=None):
    """The images of a run, sorted by id: the image files in the folder `images`, or with
    `image_paths` (prepare_text.py --karpathy-json's image_paths.json, or its folder) its paths
    under `images`, every one checked to exist; the first `limit` by id when given."""
    if image_paths is not None:
        table = karpathy.load_image_paths(image_paths)
        missing = karpathy.missing_files(images, list(table.values()))
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise PipelineError(f"image file missing: {Path(images) / missing[0]}{more} "
                                f"({image_paths} under {images})")
        paths = sorted_images(Path(images) / relative for relative in table.values())
    else:
        paths = sorted_images(list_images(images))
        if not paths:
            raise PipelineError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {images}")
    return paths[:limit] if limit else paths


def is_sharded(args):
    """Whether extract_features.py's options ask for this module (else extract_folder runs)."""
    return bool(args.shard or args.dask or args.merge_parts or args.image_paths
                or Path(args.output).suffix == ".npy")


def run_command(args, log=lambda line: print(line, file=sys.stderr)):
    """extract_features.py with --shard, --dask, --merge-parts, --image-paths or an .npy output.

    --output X.npy writes X.npy (+ X.ids.txt, X.settings.json); X.pkl writes the course's
    pickle and the .npy beside it. --shard I/N extracts one part into --parts-dir (default
    <output without suffix>.parts) and stops; --dask runs every part, then merges; otherwise
    (--image-paths) the parts run here, one after the other, then merge. Returns
    {"part": extract_part's summary} or {"merged": merge_parts's summary, "parts": [...]}.
    """
    output = Path(args.output)
    npy, pickle_path = (output, None) if output.suffix == ".npy" else (output.with_suffix(".npy"),
                                                                        output)
    parts_dir = Path(args.parts_dir) if args.parts_dir else output.with_suffix(".parts")
    if args.merge_parts:
        return {"merged": merge_parts(args.merge_parts, npy, args.spatial, pickle_path, log),
                "parts": []}
    if not args.images:
        raise PipelineError("--images is required (except with --merge-parts)")
    paths = image_list(args.images, args.image_paths, args.limit)
    backbone, note = backbones.choose_backbone(args.backbone, args.weights)
    if note:
        log(f"note: {note}")
    settings = Settings(backbone, args.weights, args.seed, bool(args.spatial), args.batch_size,
                        args.checkpoint_every, args.resize_filter, args.runtime, args.workers)
    if args.shard:
        index, shards = parse_shard(args.shard)
        return {"part": extract_shard(index, shards, paths, parts_dir, settings, args.overwrite,
                                      progress=True, log=log), "parts_dir": parts_dir,
                "shards": shards}
    if args.dask:
        parts = run_on_dask(args.dask, paths, parts_dir, settings, args.shards, args.overwrite,
                            log=log)
    else:
        parts = [extract_shard(0, 1, paths, parts_dir, settings, args.overwrite, progress=True,
                               log=log)]
    return {"merged": merge_parts(parts_dir, npy, args.spatial, pickle_path, log), "parts": parts}


def summary_lines(result, output, spatial=None):
    """run_command's result -> the lines extract_features.py prints (a part, or the merge)."""
    if "part" in result:
        part, parts_dir = result["part"], result["parts_dir"]
        lines = [f"summary: {part['part']}: {part['images']} images -> {parts_dir}; "
                 f"{part['computed']} computed, {part['resumed']} resumed, "
                 f"{len(part['skipped'])} skipped; {part['seconds']:.1f} s; runtime {part['runtime']}",
                 f"when all {result['shards']} parts are done: python extract_features.py "
                 f"--merge-parts {parts_dir} --output {output}"
                 + (f" --spatial {spatial}" if spatial else "")]
        skipped = part["skipped"]
    else:
        merged, grid = result["merged"], result["merged"]["grid"]
        grids = f" and {grid[0]}x{grid[1]}x{grid[2]} grids -> {spatial}" if grid and spatial else ""
        lines = [f"summary: {merged['images']} {merged['backbone']} features ({merged['width']} "
                 f"wide) from {merged['shards']} parts -> {output}{grids}; "
                 f"{sum(p['computed'] for p in result['parts'])} computed now, "
                 f"{len(merged['skipped'])} skipped"]
        skipped = merged["skipped"]
    return lines + [f"  skipped {name}: {reason}" for name, reason in skipped]
