"""Benchmark: the grid captioners (attention, transformer): epoch time, peak memory, decoding speed.

Usage:
    python benchmarks/bench_grid.py --spatial data/spatial.h5 [--data-dir DIR]
        [--models models/attention,models/transformer] [--train-batches 30] [--subset 10]

--spatial is extract_features.py --spatial's file (Lite0 7x7x1280 grids; the shared folder has
no grids, so it must be made first). Without --data-dir, prepare_text.py runs on the shared
Flickr8k captions in a temporary folder (benchmarks/bench_common.py).

Training (each variant in its own child process, so its peak RSS is its own): train.py's inputs
(trainer.prepare_inputs: train+dev grids kept float16) and batches (whole images, length
buckets), the default sizes, label smoothing 0.1; 3 warm-up batches (graph tracing, not timed),
then --train-batches timed and projected to a full epoch (x batches per epoch). Both wall
seconds and the process's CPU seconds are given: on a shared machine the wall time depends on
the other work, CPU seconds / cores is what the epoch costs on an idle machine of this kind
(an estimate: it assumes both cores stay busy). Peak RSS is the child's maximum resident memory.

Decoding, with the run folders of --models (or stand-ins: each variant trained 1 epoch on the
first 1000 training images, which gives captions of realistic lengths, not the tuned model):
the per-word predict loop (one model.predict on the whole prefix per word, image by image, as
the course decodes) timed on --subset test images and projected to the 1000; greedy through
decoding.caption_features (carried state, all images at once) and beam 3 on all 1000; for the
transformer also greedy through a batched prefix re-run (every step runs the whole model on
all prefixes: the alternative to its key/value cache). Subset captions must equal the loop's.

Reads the spatial file and prepare_text's folder; writes only a temporary folder. Prints tables
and, last, the ratios: `<variant>_epoch_cpu_s: ..  <variant>_speedup_vs_predict_loop: ..
<variant>_beam3_s: ..  transformer_cache_vs_prefix_rerun: ..`.
"""
import argparse
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import bench_common
from captioning.data import inputs, text
from captioning.data.features import read_grids
from captioning.inference import decoding
from captioning.models import registry
from captioning.training import trainer
from captioning.utils import HelpFormatter, PipelineError, run_cli, write_json

TRAIN_BATCHES = 30      # timed training batches per variant (~6% of an epoch)
WARMUP_BATCHES = 3
SUBSET = 10             # test images decoded with the per-word predict loop
STAND_IN_IMAGES = 1000  # training images of a stand-in model (1 epoch) when --models is not given
BEAM = 3


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--spatial", type=Path, required=True, help="extract_features.py --spatial file")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="prepare_text.py output (unset: prepared in a temporary folder)")
    parser.add_argument("--models", default="",
                        help="comma-separated run folders of trained grid models (unset: stand-ins)")
    parser.add_argument("--variants", default=",".join(registry.GRID_VARIANTS), help="variants timed")
    parser.add_argument("--train-batches", type=int, default=TRAIN_BATCHES, help="timed training batches")
    parser.add_argument("--subset", type=int, default=SUBSET, help="images decoded by the predict loop")
    parser.add_argument("--skip-training", action="store_true", help="decoding only")
    return parser.parse_args(argv)


def train_args(variant, spatial, data_dir):
    """train.py's options at their defaults, label smoothing 0.1, as trainer.prepare_inputs and
    the timing below read them (from the package: benchmarks import no script)."""
    transformer = registry.OPTIONS["transformer"]
    return argparse.Namespace(
        variant=variant, mode=registry.MODE, features=Path(spatial), spatial=None,
        data_dir=Path(data_dir), max_missing=trainer.MAX_MISSING, fail_on_missing=False,
        **registry.OPTIONS["attention"],            # embed_dim, units, dropout and attention's own
        **{key: value for key, value in transformer.items() if key != "dropout"},
        transformer_dropout=transformer["dropout"], learning_rate=registry.LEARNING_RATE,
        label_smoothing=0.1, batch_size=trainer.BATCH_SIZE, seed=trainer.SEED)


def time_training(variant, spatial, data_dir, batches, queue):
    """Child process: project one epoch of `variant` from `batches` timed batches."""
    args = train_args(variant, spatial, data_dir)
    matrix, train, dev, config, _ = trainer.prepare_inputs(args)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    trainer.seed_everything(args.seed)
    model = registry.build_from_config(config)
    registry.compile_model(model, args.learning_rate, args.label_smoothing, inputs.words_per_row(train, "sequence"))
    train_ds, _ = trainer.make_datasets(config, args.batch_size, args.seed, train, dev, matrix)
    per_epoch = int(train_ds.cardinality())
    model.fit(train_ds.take(WARMUP_BATCHES), verbose=0)
    wall, cpu = time.perf_counter(), time.process_time()
    model.fit(train_ds.take(batches), verbose=0)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    queue.put({"variant": variant, "grid_gb": matrix.nbytes / 2**30, "dtype": str(matrix.dtype),
               "params": model.count_params(), "batches": per_epoch,
               "epoch_wall_s": wall / batches * per_epoch, "epoch_cpu_s": cpu / batches * per_epoch,
               "rss_loaded_gb": rss_loaded,
               "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})


def time_decoding(run_dir, spatial, data_dir, subset):
    model, config, tokenizer = registry.load_captioner(run_dir, data_dir)
    ids = text.load_splits(data_dir)["test"]
    found, grid, _ = read_grids(spatial, ids)
    if len(found) != len(ids):
        raise PipelineError(f"{len(ids) - len(found)} test images have no grid ({spatial})")
    _, start_id, end_id, banned = decoding.vocabulary(tokenizer)
    max_length = config["max_length"]
    decoding.tutorial_greedy(model, grid[0], start_id, end_id, 3, banned)                 # warm-up (tracing)
    t0 = time.perf_counter()
    slow = [decoding.tutorial_greedy(model, g, start_id, end_id, max_length, banned) for g in grid[:subset]]
    loop_s = (time.perf_counter() - t0) / subset * len(ids)
    decoding.caption_features(model, config, tokenizer, grid[:2])              # warm-up (tracing)
    t0 = time.perf_counter()
    greedy = decoding.caption_features(model, config, tokenizer, grid, beam=1)
    greedy_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    decoding.caption_features(model, config, tokenizer, grid, beam=BEAM)
    beam_s = time.perf_counter() - t0
    row = {"variant": config["variant"], "model": str(run_dir), "loop_s": loop_s, "greedy_s": greedy_s,
           "beam_s": beam_s, "same": sum(a == b for a, b in zip(slow, greedy)), "subset": subset,
           "tokens": float(np.mean([len(c) for c in greedy]))}
    if config["variant"] == "transformer":
        init_fn, step_fn = decoding.prefix_step_fns(model, grid)
        decoding.greedy_decode(step_fn, init_fn(grid[:2]), start_id, end_id, 3, banned)   # warm-up
        t0 = time.perf_counter()
        rerun = decoding.greedy_decode(step_fn, init_fn(grid), start_id, end_id, max_length, banned)
        row["rerun_s"] = time.perf_counter() - t0
        row["rerun_same"] = sum(a == b for a, b in zip(rerun, greedy))
    return row


def stand_in(variant, spatial, data_dir, workdir):
    """A 1-epoch model on the first STAND_IN_IMAGES training images (realistic caption lengths)."""
    small = workdir / f"data-{variant}"
    if not small.is_dir():
        shutil.copytree(data_dir, small)
        splits = text.load_splits(small)
        splits["train"] = splits["train"][:STAND_IN_IMAGES]
        write_json(small / "splits.json", splits)
    bench_common.train(["--variant", variant, "--features", spatial, "--data-dir", small,
                        "--output-dir", workdir / "models", "--epochs", "1", "--verbose", "0"],
                       f"the stand-in {variant} model")
    return workdir / "models" / variant, small


def main(argv=None):
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_grid_") as workdir:
        return run(args, Path(workdir))


def run(args, workdir):
    data_dir, _, used = bench_common.prepare(args.data_dir, args.spatial, workdir)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    print(f"data: {used}\nmachine: {os.cpu_count()} CPU cores, load average "
          f"{os.getloadavg()[0]:.1f} at the start", flush=True)
    ratios = []
    if not args.skip_training:
        context = multiprocessing.get_context("spawn")
        rows = []
        for variant in variants:
            queue = context.Queue()
            child = context.Process(target=time_training,
                                    args=(variant, args.spatial, data_dir, args.train_batches, queue))
            child.start()
            rows.append(queue.get())
            child.join()
        cores = os.cpu_count()
        print(f"\ntraining, one epoch of the {rows[0]['batches']} whole-image batches projected from "
              f"{args.train_batches} (load average now {os.getloadavg()[0]:.1f})\n")
        print("| variant | parameters | grids in memory | s/epoch, wall | s/epoch, CPU / cores | peak RSS |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['variant']} | {r['params']:,} | {r['grid_gb']:.2f} GiB {r['dtype']} | "
                  f"{r['epoch_wall_s']:.0f} | {r['epoch_cpu_s'] / cores:.0f} | {r['peak_rss_gb']:.2f} GiB |")
            ratios.append(f"{r['variant']}_epoch_cpu_s: {r['epoch_cpu_s'] / cores:.0f}")
    runs = [Path(p) for p in args.models.split(",") if p.strip()]
    pairs = []
    if runs:
        pairs = [(run_dir, data_dir) for run_dir in runs]
    else:
        print(f"\nmodels: stand-ins, each variant trained 1 epoch on {STAND_IN_IMAGES} training "
              f"images (decoding speed only; not the tuned models)", flush=True)
        pairs = [stand_in(v, args.spatial, data_dir, workdir) for v in variants]
    rows = [time_decoding(run_dir, args.spatial, data_dir, args.subset) for run_dir, data_dir in pairs]
    print(f"\ndecoding the 1000 test images (load average {os.getloadavg()[0]:.1f})\n")
    print("| variant | predict loop (projected) | greedy, carried state | beam 3 | loop / greedy | "
          "subset identical |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['loop_s']:.0f} s | {r['greedy_s']:.2f} s | {r['beam_s']:.2f} s | "
              f"{r['loop_s'] / r['greedy_s']:.0f}x | {r['same']}/{r['subset']} |")
        ratios += [f"{r['variant']}_speedup_vs_predict_loop: {r['loop_s'] / r['greedy_s']:.0f}",
                   f"{r['variant']}_beam3_s: {r['beam_s']:.1f}"]
        if "rerun_s" in r:
            print(f"| transformer, greedy by batched prefix re-run (no cache) | | {r['rerun_s']:.2f} s | "
                  f"| | {r['rerun_same']}/1000 same as cached |")
            ratios.append(f"transformer_cache_vs_prefix_rerun: {r['rerun_s'] / r['greedy_s']:.1f}")
    print("\n" + "  ".join(ratios))
    return 0 if all(r["same"] == r["subset"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
