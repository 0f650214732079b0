"""Benchmark: train.py's default whole-caption mode vs the tutorial's progressive loading.

Usage:
    python benchmarks/bench_train.py [--features F] [--data-dir DIR] [--pairs-photos 150]
                                     [--sequence-photos 1500] [--batch-size 64]

From a clean clone the defaults work: without --data-dir, prepare_text.py runs on the shared
Flickr8k captions (or the bundled sample) in a temporary folder; the features default to the
shared Lite0 file (see benchmarks/bench_common.py). The `data:` line says what was used.

Same features, same captions, same model (merge, same seed), same process: each mode first
trains a few warm-up batches (graph tracing, not timed), then one pass over a fixed set of
training photos is timed, in --rounds slices alternating between the modes so both see the
same load on a shared machine, and projected to a full training epoch (seconds x train
captions / captions timed). Validation is not timed. Reads the features pickle and prepare_text's
data folder (as train.py); writes only into a temporary folder, removed at the end. Prints a table and, last,
`speedup_vs_tutorial: <x>  peak_rss_gb: <y>` (projected epoch time of --mode pairs divided by
that of the default mode; peak resident memory of this process in GiB, both modes included).
"""
import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import bench_common
from captioning.data import inputs
from captioning.models import registry
from captioning.training import trainer
from captioning.utils import HelpFormatter, PipelineError, run_cli

PAIRS_PHOTOS = 150        # ~750 captions: the tutorial mode is slow, a small sample suffices
SEQUENCE_PHOTOS = 1500    # ~7500 captions: enough batches for realistic length buckets
WARMUP_BATCHES = 4
ROUNDS = 3                # modes alternate in this many slices: both see the same load


def peak_rss_gb():
    """Peak resident set size of this process so far, GiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def make_model(mode, config, seed, words_per_row):
    trainer.seed_everything(seed)
    return registry.compile_model(registry.build_from_config(dict(config, variant="merge"), mode),
                                words_per_row=words_per_row)


def time_modes(samples, matrix, config, args):
    """Seconds per mode for one pass over its sample, the modes interleaved in --rounds slices.

    Interleaving makes both modes see the same machine load (this CPU is shared), so their
    ratio is fair even when the absolute times drift. Warm-up batches (graph tracing) are
    trained first and not timed.
    """
    nets, seconds = {}, {}
    for mode, sample in samples.items():
        sample = [e for photo in sample for e in photo]
        nets[mode] = make_model(mode, config, args.seed, inputs.words_per_row(sample, mode))
        warm = inputs.make_dataset(sample, matrix, mode, args.batch_size, config["max_length"], seed=args.seed)
        nets[mode].fit(warm.take(WARMUP_BATCHES), epochs=1, verbose=0, shuffle=False)
        seconds[mode] = 0.0
    for r in range(args.rounds):
        for mode, sample in samples.items():
            part = [e for photo in sample[r::args.rounds] for e in photo]  # whole photos per slice
            dataset = inputs.make_dataset(part, matrix, mode, args.batch_size, config["max_length"], seed=args.seed + r)
            started = time.perf_counter()
            nets[mode].fit(dataset, epochs=1, verbose=0, shuffle=False)
            seconds[mode] += time.perf_counter() - started
            print(f"round {r + 1}/{args.rounds} {mode}: {len(part)} captions, "
                  f"{time.perf_counter() - started:.1f}s", flush=True)
    return seconds


def photo_sample(examples, n_photos, seed):
    """The captions of n_photos training photos drawn at random (seeded): a list per photo."""
    by_row = {}
    for e in examples:
        by_row.setdefault(e[0], []).append(e)
    rows = sorted(by_row)
    return [by_row[row] for row in np.random.default_rng(seed).permutation(rows)[:n_photos].tolist()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--features", type=Path, default=None,
                   help="features pickle (unset: the shared Lite0 file, else random vectors)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="prepare_text.py output (unset: prepared in a temporary folder)")
    p.add_argument("--pairs-photos", type=int, default=PAIRS_PHOTOS)
    p.add_argument("--sequence-photos", type=int, default=SEQUENCE_PHOTOS)
    p.add_argument("--batch-size", type=int, default=trainer.BATCH_SIZE, help="captions per batch, default mode")
    p.add_argument("--seed", type=int, default=trainer.SEED)
    p.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved timing slices per mode")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as workdir:
        return run(args, workdir)


def run(args, workdir):
    args.data_dir, args.features, used = bench_common.prepare(args.data_dir, args.features, workdir)
    if not args.features.is_file():
        raise PipelineError(f"missing features file {args.features}")
    print(f"data: {used}", flush=True)
    # train.py's own loading, so the benchmark measures exactly what training does
    load_args = argparse.Namespace(features=args.features, data_dir=args.data_dir, max_missing=trainer.MAX_MISSING,
                                   fail_on_missing=False, variant="merge", mode="sequence",
                                   embed_dim=registry.EMBED_DIM, units=registry.UNITS, dropout=registry.DROPOUT)
    matrix, examples, _, config, _ = trainer.prepare_inputs(load_args)
    epoch_captions = len(examples)
    words_per_caption = np.mean([len(ids) - 1 for _, ids in examples])
    samples = {"pairs": photo_sample(examples, args.pairs_photos, args.seed),
               "sequence": photo_sample(examples, args.sequence_photos, args.seed)}
    seconds = time_modes(samples, matrix, config, args)
    labels = {"pairs": "tutorial progressive loading (--mode pairs)",
              "sequence": f"whole captions, length-bucketed (default, batch {args.batch_size})"}
    rows = []
    for mode in ("pairs", "sequence"):
        n = sum(len(photo) for photo in samples[mode])
        epoch_s = seconds[mode] * epoch_captions / n
        rows.append((labels[mode], n, seconds[mode], epoch_s, epoch_captions * words_per_caption / epoch_s))
    print(f"\nmachine: {os.cpu_count()} CPU cores; data: {used} "
          f"(D={config['feature_dim']}), vocab {config['vocab_size']}, max_length {config['max_length']}, "
          f"{epoch_captions} training captions per epoch\n")
    print(f"| {'mode':<55} | captions timed | seconds | projected epoch (s) | predicted words/s |")
    print(f"|{'-' * 57}|---------------:|--------:|--------------------:|------------------:|")
    for label, n, seconds, epoch_s, wps in rows:
        print(f"| {label:<55} | {n:>14} | {seconds:>7.1f} | {epoch_s:>19.0f} | {wps:>17.0f} |")
    print(f"\nspeedup_vs_tutorial: {rows[0][3] / rows[1][3]:.1f}  peak_rss_gb: {peak_rss_gb():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
