"""Benchmark of the bigger-dataset data path: reading features per batch against loading them
whole, and merge and attention training, at Flickr8k, Flickr30k and COCO sizes; and sharded
extraction with 0, 1 and 2 local Dask workers.

Usage (from the repo root):
    python benchmarks/bench_datasets.py                        # 8,091 / 31,783 / 123,287 images
    python benchmarks/bench_datasets.py --sizes 8091 --extract-images 32 --workdir /tmp/bench

Features: synthetic, of the real shape and dtype (EfficientNet-Lite0 pooled, float32 (N, 1280),
random values; ids synth000000...), written once per size into --workdir as merge_parts writes
them (features.npy + features.ids.txt) and as the course's features.pkl. Each reading mode runs
in a fresh process (its own peak memory) and reads one epoch of shuffled batches of BATCH rows:
    mmap    np.load(features.npy, mmap_mode="r"), each batch's rows copied out (what the
            trainers do per batch)
    npy     np.load(features.npy) whole, then the same batches
    pickle  load_features(features.pkl) whole (the course's format), then the same batches
Columns: peak RSS (VmHWM: every page the process had resident at once, the mapped file's pages
included: they are the OS's file cache, dropped under memory pressure, and a memory-mapped
reader that touches every row once has them all mapped) and peak allocated (RssAnon sampled
after each batch: the memory the process itself holds; it is what grows with the dataset when
loading whole and stays flat when reading per batch).

Training (train.py's own inputs and batches: trainer.prepare_inputs, make_datasets, fit), each
in a fresh process: merge on features.npy (memory map, per batch) and on features.pkl (loaded
whole, for contrast), attention on grids.h5 (HDF5, per batch). Captions are synthetic: 5 per
image, words drawn from the real Flickr8k training vocabulary by their real frequencies, lengths
from the real captions; the last 1,000 images are the dev split. Lite0 grids (7x7x1280 float16,
125 KB an image) are random too; to keep COCO's 15 GB off the disk, one block of GRID_BLOCK
images is written and the grids file is an HDF5 virtual dataset that maps it again and again
(ids synth000000...), so the reads are real per-batch HDF5 reads but the data the page cache
holds is the block's 1 GB. Run time is capped: WARMUP batches (tracing), then --train-batches
timed batches, projected to the epoch (batches per epoch x seconds per batch). Wall seconds
depend on the other jobs of a shared machine; the process's CPU seconds / cores ("epoch s
(CPU)") are what the epoch costs on an idle one, and the ratio printed last uses them. Peak RSS
is the process's (TensorFlow included); peak allocated is RssAnon sampled after every batch.

Extraction: --extract-images shared Flickr8k images (EfficientNet-Lite0, random seeded weights:
the speed is the ImageNet weights' speed) in PARTS parts: in this process one after the other
(no Dask), and on Dask LocalClusters of 1 and 2 worker processes. On these 2 cores TensorFlow
already uses both cores in one process, so Dask adds worker start-up, one model build per worker
and two processes competing for the cores: the table shows that overhead, not a speed-up. Dask
pays off with more machines (docs/datasets.md).

Prints a table per part; the last line is
    allocated_whole_over_per_batch_at_<largest>: <x>  rss_whole_over_per_batch_at_<largest>: <y>
    attention_rss_<largest>_over_<smallest>: <a>  merge_epoch_<largest>_over_<smallest>: <b> (CPU)
    dask2_over_sequential_img_s: <z>
Writes only into --workdir (a temporary folder by default, removed at the end).
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402

from captioning.utils import HelpFormatter, PipelineError, run_cli  # noqa: E402

SIZES = (8091, 31783, 123287)       # Flickr8k, Flickr30k, COCO 2014 train+val
WIDTH = 1280                        # EfficientNet-Lite0 pooled features
BATCH = 64
CHUNK = 8192                        # rows generated and written at a time
EXTRACT_IMAGES = 128                # 32 a part: full batches
PARTS = 4
IMAGES = REPO.parent / "shared" / "flickr8k" / "Flicker8k_Dataset"
TEXT = REPO.parent / "shared" / "flickr8k" / "Flickr8k_text"
SAMPLE_TEXT = REPO / "data" / "sample" / "Flickr8k_text"
GRID = (7, 7, 1280)                 # Lite0 head_relu
GRID_BLOCK = 8091                   # grid rows written; the virtual dataset repeats them
DEV_IMAGES = 1000
WARMUP = 3
TRAIN_BATCHES = 20


# ---- synthetic features ---------------------------------------------------------------------
def write_synthetic(folder, size, seed=0):
    """features.npy float32 (size, WIDTH), features.ids.txt, and features.pkl, in CHUNK rows at a
    time (the .npy never whole in memory; the pickle is the course's format, whole by nature)."""
    from captioning.data.features import save_features
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = [f"synth{k:06d}" for k in range(size)]
    matrix = np.lib.format.open_memmap(folder / "features.npy", mode="w+", dtype=np.float32,
                                       shape=(size, WIDTH))
    for lo in range(0, size, CHUNK):
        hi = min(size, lo + CHUNK)
        matrix[lo:hi] = rng.random((hi - lo, WIDTH), dtype=np.float32)
    matrix.flush()
    (folder / "features.ids.txt").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    save_features(folder / "features.pkl", {i: np.array(matrix[k]) for k, i in enumerate(ids)})
    del matrix


def memory_now():
    """(RssAnon, VmHWM) in MB from /proc/self/status."""
    fields = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields["RssAnon"], fields["VmHWM"]


def read_epoch(folder, mode, seed=0):
    """One epoch of shuffled BATCH-row batches in `mode` -> dict of the measurements (run in a
    fresh process by measure())."""
    start = time.perf_counter()
    peak_anon = memory_now()[0]
    if mode == "mmap":
        matrix = np.load(folder / "features.npy", mmap_mode="r")
    elif mode == "npy":
        matrix = np.load(folder / "features.npy")
    elif mode == "pickle":
        from captioning.data.features import load_features
        table = load_features(folder / "features.pkl")
        ids = list(table)
    else:
        raise PipelineError(f"unknown mode {mode}")
    loaded = time.perf_counter() - start
    size = len(ids) if mode == "pickle" else matrix.shape[0]
    order = np.random.default_rng(seed).permutation(size)
    total = 0.0
    for lo in range(0, size, BATCH):
        rows = np.sort(order[lo:lo + BATCH])    # increasing offsets: sequential-ish file reads
        if mode == "pickle":
            batch = np.stack([table[ids[r]] for r in rows])
        else:
            batch = np.asarray(matrix[rows], dtype=np.float32)
        total += float(batch[:, 0].sum())       # use the rows, as a model would
        peak_anon = max(peak_anon, memory_now()[0])
    anon, hwm = memory_now()
    return {"mode": mode, "images": size, "peak_rss_mb": round(hwm, 1),
            "peak_allocated_mb": round(max(peak_anon, anon), 1),
            "load_s": round(loaded, 2), "epoch_s": round(time.perf_counter() - start, 2)}


def measure(folder, mode):
    """read_epoch in a new Python process (its peak memory is its own)."""
    out = subprocess.run([sys.executable, __file__, "--read", str(folder), "--mode", mode],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise PipelineError(f"reading {mode} at {folder} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- training -------------------------------------------------------------------------------
def write_synthetic_text(folder, size, seed=0):
    """prepare_text.py's folder for `size` synthetic images: 5 captions each, words of the real
    Flickr8k vocabulary (default cleaning, min_count 5) drawn by their real training counts,
    lengths from the real captions; dev = the last DEV_IMAGES images. Kept with min_count 1, so
    every size has the real vocabulary (the output layer's cost does not change with size)."""
    from collections import Counter
    from captioning.data import text
    source = TEXT if TEXT.is_dir() else SAMPLE_TEXT
    real, _ = text.prepare(source)
    captions = [c.split() for i in real["splits"]["train"] for c in real["descriptions"][i]]
    counts = Counter(w for c in captions for w in c)
    words = np.array(sorted(w for w in real["tokenizer"]["word_index"] if w in counts))
    p = np.array([counts[w] for w in words], dtype=np.float64)
    lengths = np.array([len(c) for c in captions if c])
    rng = np.random.default_rng(seed)
    ids = [f"synth{k:06d}" for k in range(size)]
    take = rng.choice(lengths, size=5 * size)
    drawn = words[rng.choice(len(words), size=int(take.sum()), p=p / p.sum())]
    ends = np.cumsum(take)
    raw = {image_id: [" ".join(drawn[end - n:end]) for n, end in
                      zip(take[5 * k:5 * k + 5], ends[5 * k:5 * k + 5])]
           for k, image_id in enumerate(ids)}
    splits = {"train": ids[:-DEV_IMAGES], "dev": ids[-DEV_IMAGES:], "test": []}
    outputs = text.build_outputs(raw, splits, Counter(), text.CLEANING, 1, "unk")
    outputs["meta"].update(inputs={}, input_report={}, n_images_with_captions=size)
    text.write_outputs(folder, outputs)


def write_grid_block(path, seed=0):
    """GRID_BLOCK random Lite0 grids in spatial.py's layout (the block the virtual files map)."""
    import h5py
    from captioning.data.spatial import FORMAT_VERSION
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as handle:
        features = handle.create_dataset("features", shape=(GRID_BLOCK, *GRID), dtype=np.float16,
                                         chunks=(1, *GRID))
        for lo in range(0, GRID_BLOCK, 512):
            hi = min(GRID_BLOCK, lo + 512)
            features[lo:hi] = rng.random((hi - lo, *GRID), dtype=np.float32).astype(np.float16)
        handle.create_dataset("ids", data=[f"block{k:06d}" for k in range(GRID_BLOCK)],
                              dtype=h5py.string_dtype("utf-8"))
        handle.attrs.update(format_version=FORMAT_VERSION, backbone="lite0", layer="head_relu",
                            grid=list(GRID[:2]), width=GRID[2], fingerprint="synthetic",
                            count=GRID_BLOCK)


def write_virtual_grids(path, block, size):
    """`size` grids (ids synth000000...) as a virtual dataset repeating the block's rows."""
    import h5py
    layout = h5py.VirtualLayout(shape=(size, *GRID), dtype=np.float16)
    source = h5py.VirtualSource(os.path.relpath(block, path.parent), "features",
                                shape=(GRID_BLOCK, *GRID))
    for lo in range(0, size, GRID_BLOCK):
        n = min(GRID_BLOCK, size - lo)
        layout[lo:lo + n] = source[:n]
    with h5py.File(block, "r") as handle:
        attrs = dict(handle.attrs)
    with h5py.File(path, "w", libver="latest") as handle:
        handle.create_virtual_dataset("features", layout)
        handle.create_dataset("ids", data=[f"synth{k:06d}" for k in range(size)],
                              dtype=h5py.string_dtype("utf-8"))
        handle.attrs.update(attrs)
        handle.attrs["count"] = size


def train_args(variant, features, data_dir):
    """train.py's options at their defaults (from the package: benchmarks import no script)."""
    from captioning.models import registry
    from captioning.training import trainer
    transformer = registry.OPTIONS["transformer"]
    return argparse.Namespace(
        variant=variant, mode=registry.MODE, features=Path(features), spatial=None,
        data_dir=Path(data_dir), max_missing=trainer.MAX_MISSING, fail_on_missing=False,
        **registry.OPTIONS["attention"] if variant == "attention" else registry.OPTIONS["merge"],
        **{key: value for key, value in transformer.items() if key != "dropout"},
        transformer_dropout=transformer["dropout"], learning_rate=registry.LEARNING_RATE,
        label_smoothing=trainer.RECIPES[trainer.RECIPE]["label_smoothing"], batch_size=trainer.BATCH_SIZE, seed=trainer.SEED)


def train_steps(variant, features, data_dir, batches):
    """Child process: WARMUP then `batches` timed training batches of `variant`."""
    import keras
    from captioning.data import inputs
    from captioning.models import registry
    from captioning.training import trainer
    args = train_args(variant, features, data_dir)
    start = time.perf_counter()
    matrix, train, dev, config, row_of_id = trainer.prepare_inputs(args)
    prepared = time.perf_counter() - start
    trainer.seed_everything(args.seed)
    model = registry.build_from_config(config)
    registry.compile_model(model, args.learning_rate, args.label_smoothing,
                           inputs.words_per_row(train, "sequence"))
    train_ds, _ = trainer.make_datasets(config, args.batch_size, args.seed, train, dev, matrix)
    per_epoch = int(train_ds.cardinality())
    peak, marks = [memory_now()[0]], {}

    class Timer(keras.callbacks.Callback):
        """Times the batches after the warm-up ones: the epoch's batch plan and the graph
        tracing fall before the window, as they do once per epoch (not per batch) in train.py."""
        def on_train_batch_end(self, batch, logs=None):
            peak[0] = max(peak[0], memory_now()[0])
            if batch == WARMUP - 1:
                marks["start"] = (time.perf_counter(), time.process_time())

        def on_train_end(self, logs=None):
            marks["end"] = (time.perf_counter(), time.process_time())

    model.fit(train_ds.take(WARMUP + batches), verbose=0, callbacks=[Timer()])
    wall, cpu = (marks["end"][k] - marks["start"][k] for k in (0, 1))
    return {"variant": variant, "features": Path(features).name, "images": len(row_of_id),
            "batch_size": args.batch_size, "vocab_size": config["vocab_size"],
            "train_captions": len(train), "batches_per_epoch": per_epoch,
            "s_per_batch": round(wall / batches, 4), "epoch_s": round(wall / batches * per_epoch, 1),
            "cpu_s_per_batch": round(cpu / batches, 4),
            "epoch_cpu_s": round(cpu / batches * per_epoch / (os.cpu_count() or 1), 1),
            "prepare_s": round(prepared, 1), "peak_rss_mb": round(memory_now()[1], 1),
            "peak_allocated_mb": round(peak[0], 1)}


def measure_training(variant, features, data_dir, batches):
    out = subprocess.run([sys.executable, __file__, "--train", variant, "--features", str(features),
                          "--data", str(data_dir), "--train-batches", str(batches)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise PipelineError(f"training {variant} on {features} failed: "
                            f"{out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- extraction -----------------------------------------------------------------------------
def extraction(workdir, n_images, log):
    """img/s of extract_shard in this process and run_on_dask on local:1 and local:2."""
    from captioning.data.images import list_images
    from captioning.encoders import shards
    if not IMAGES.is_dir():
        raise PipelineError(f"extraction needs the shared Flickr8k images ({IMAGES})")
    paths = list_images(IMAGES)[:n_images]
    settings = shards.Settings(backbone="lite0", weights="none", runtime="tf")
    rows = []
    for mode in ("no Dask (this process)", "Dask local:1", "Dask local:2"):
        parts = workdir / f"parts-{len(rows)}"
        shutil.rmtree(parts, ignore_errors=True)     # computed again, not resumed
        start = time.perf_counter()
        if mode.startswith("no Dask"):
            summaries = [shards.extract_shard(i, PARTS, paths, parts, settings, log=lambda line: None)
                         for i in range(PARTS)]
        else:
            summaries = shards.run_on_dask(mode.split()[-1], paths, parts, settings, PARTS,
                                           log=lambda line: None)
        wall = time.perf_counter() - start
        compute = sum(s["seconds"] for s in summaries)
        rows.append({"mode": mode, "images": len(paths), "wall_s": round(wall, 1),
                     "img_s": round(len(paths) / wall, 2),
                     "forward_s": round(compute, 1),
                     "models_built": sum(s["model_built"] for s in summaries)})
        log(f"  {mode}: {rows[-1]}")
    return rows


def cpu_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        name = next((line.split(":", 1)[1].strip() for line in out.splitlines()
                     if line.startswith("Model name")), platform.processor())
    except OSError:
        name = platform.processor()
    avx512 = "avx512f" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
    return f"{name}, {os.cpu_count()} cores, avx512f {'yes' if avx512 else 'no'}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)),
                        help="comma-separated numbers of images")
    parser.add_argument("--extract-images", type=int, default=EXTRACT_IMAGES,
                        help="shared images for the extraction part (0 skips it)")
    parser.add_argument("--workdir", default=None, help="where the synthetic files go (kept)")
    parser.add_argument("--train-batches", type=int, default=TRAIN_BATCHES,
                        help="timed training batches per run (0 skips training)")
    parser.add_argument("--read", default=None, help=argparse.SUPPRESS)   # the child processes
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--train", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--features", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.read:
        print(json.dumps(read_epoch(Path(args.read), args.mode)))
        return 0
    if args.train:
        print(json.dumps(train_steps(args.train, args.features, args.data, args.train_batches)))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_datasets_"))
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    try:
        print(f"cpu: {cpu_name()}; python {platform.python_version()}, numpy {np.__version__}; "
              f"load average at the start {os.getloadavg()[0]:.1f} (other jobs share the cores)")
        print(f"data: synthetic Lite0 pooled features, float32 (N, {WIDTH}), random; one epoch "
              f"of shuffled batches of {BATCH}")
        reads = []
        for size in sizes:
            folder = workdir / f"synthetic-{size}"
            if not (folder / "features.pkl").is_file():
                log(f"writing {size} synthetic features to {folder}")
                write_synthetic(folder, size)
            for mode in ("mmap", "npy", "pickle"):
                reads.append(measure(folder, mode))
                log(f"  {reads[-1]}")
        print(f"\n{'images':>8} {'reading':<26} {'file MB':>8} {'peak RSS MB':>12} "
              f"{'peak allocated MB':>18} {'load s':>7} {'epoch s':>8}")
        what = {"mmap": "per batch (memory map)", "npy": "whole (np.load)",
                "pickle": "whole (features.pkl)"}
        for row in reads:
            file_mb = row["images"] * WIDTH * 4 / 2**20
            print(f"{row['images']:>8} {what[row['mode']]:<26} {file_mb:>8.0f} "
                  f"{row['peak_rss_mb']:>12.0f} {row['peak_allocated_mb']:>18.0f} "
                  f"{row['load_s']:>7.2f} {row['epoch_s']:>8.2f}")
        trains = []
        if args.train_batches:
            block = workdir / "grid-block.h5"
            if not block.is_file():
                log(f"writing the {GRID_BLOCK}-image grid block {block}")
                write_grid_block(block)
            for size in sizes:
                folder = workdir / f"synthetic-{size}"
                if not (folder / "meta.json").is_file():
                    log(f"writing {size} synthetic captions to {folder}")
                    write_synthetic_text(folder, size)
                if not (folder / "grids.h5").is_file():
                    write_virtual_grids(folder / "grids.h5", block, size)
                for variant, name in (("merge", "features.npy"), ("merge", "features.pkl"),
                                      ("attention", "grids.h5")):
                    trains.append(measure_training(variant, folder / name, folder,
                                                   args.train_batches))
                    log(f"  {trains[-1]}")
            print(f"\ntraining: train.py's inputs and batches (batch {trains[0]['batch_size']} "
                  f"captions), default sizes, vocabulary {trains[0]['vocab_size']} words, "
                  f"{WARMUP} warm-up + {args.train_batches} timed batches, projected to the epoch")
            print(f"{'images':>8} {'model':<10} {'features':<24} {'batches':>8} {'s/batch':>8} "
                  f"{'CPU s/batch':>12} {'epoch s':>8} {'epoch s (CPU)':>14} {'peak RSS MB':>12} "
                  f"{'peak allocated MB':>18}")
            how = {"features.npy": "features.npy (per batch)", "features.pkl": "features.pkl (whole)",
                   "grids.h5": "grids.h5 (per batch)"}
            for row in trains:
                print(f"{row['images']:>8} {row['variant']:<10} {how[row['features']]:<24} "
                      f"{row['batches_per_epoch']:>8} {row['s_per_batch']:>8.3f} "
                      f"{row['cpu_s_per_batch']:>12.3f} {row['epoch_s']:>8.0f} "
                      f"{row['epoch_cpu_s']:>14.0f} {row['peak_rss_mb']:>12.0f} "
                      f"{row['peak_allocated_mb']:>18.0f}")
        extract_rows = []
        if args.extract_images:
            log(f"extraction of {args.extract_images} images in {PARTS} parts")
            extract_rows = extraction(workdir, args.extract_images, log)
            print(f"\nextraction: {args.extract_images} shared Flickr8k images, EfficientNet-Lite0 "
                  f"(random seeded weights), {PARTS} parts, batch 32, TensorFlow runtime")
            print(f"{'how':<24} {'wall s':>7} {'img/s':>7} {'forward s (sum)':>16} {'models built':>13}")
            for row in extract_rows:
                print(f"{row['mode']:<24} {row['wall_s']:>7.1f} {row['img_s']:>7.2f} "
                      f"{row['forward_s']:>16.1f} {row['models_built']:>13}")
        largest = max(sizes)
        by_mode = {r["mode"]: r for r in reads if r["images"] == largest}
        ratios = [f"allocated_whole_over_per_batch_at_{largest}: "
                  f"{by_mode['npy']['peak_allocated_mb'] / by_mode['mmap']['peak_allocated_mb']:.2f}",
                  f"rss_whole_over_per_batch_at_{largest}: "
                  f"{by_mode['npy']['peak_rss_mb'] / by_mode['mmap']['peak_rss_mb']:.2f}"]
        if trains:
            first, last = min(sizes), largest
            pick = {(r["images"], r["variant"], r["features"]): r for r in trains}
            ratios.append(f"attention_rss_{last}_over_{first}: "
                          f"{pick[(last, 'attention', 'grids.h5')]['peak_rss_mb'] / pick[(first, 'attention', 'grids.h5')]['peak_rss_mb']:.2f}")
            ratios.append(f"merge_epoch_{last}_over_{first}: "
                          f"{pick[(last, 'merge', 'features.npy')]['epoch_cpu_s'] / pick[(first, 'merge', 'features.npy')]['epoch_cpu_s']:.2f}")
        if extract_rows:
            ratios.append(f"dask2_over_sequential_img_s: "
                          f"{extract_rows[2]['img_s'] / extract_rows[0]['img_s']:.2f}")
        print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
        print("  ".join(ratios))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    # the reading child imports no TensorFlow: its memory is the reader's alone
    sys.exit(run_cli(main, tensorflow="--read" not in sys.argv))
