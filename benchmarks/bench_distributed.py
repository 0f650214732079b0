"""Benchmark: one worker against two workers of captioning.training.distributed on this machine,
the bytes a step exchanges, and a projection on paper for N machines.

Usage:
    python benchmarks/bench_distributed.py [--features F] [--data-dir DIR] [--batch-size 64]
                                           [--steps 30] [--warmup 5]

From a clean clone the defaults work (benchmarks/bench_common.py: prepare_text.py on the shared
Flickr8k captions, the shared Lite0 features, or the bundled sample with random features). The
model is train.py's default merge model (256 units, the data's vocabulary), so the gradient has
its real size.

What is timed: --steps steps of distributed.CaptionSteps at the global batch --batch-size,
after --warmup untimed ones (tracing), both ways on the same global batches:
    one worker   one process, the default strategy (no collective), all cores (intra-op threads
                 = cores)
    two workers  two processes on 127.0.0.1 (train.py --local-workers' launcher), each half the
                 cores and half of every global batch, gradients summed over gRPC every step
On ONE machine the two workers share its cores: this measures what the collective and a second
process cost, not a speed-up. The speed-up of several machines is projected on paper:

    step(N) = compute / N + 2 (N-1)/N * bytes / bandwidth + 2 (N-1) * latency
    compute  the one-worker step time measured here (this CPU; each machine one such CPU; the
             batch splits evenly, so each does 1/N of it: optimistic for small shares)
    bytes    the gradient: sum of trainable variable sizes * 4 (float32), as a dense all-reduce
             sums it; a ring all-reduce sends and receives 2 (N-1)/N of it per worker. (The
             embedding's gradient is IndexedSlices, gathered rather than summed: fewer bytes;
             the dense figure is the conservative one.)
    bandwidth 10 Gbit/s; latency 50 us per ring hop (a LAN); no overlap of compute and
             communication (the step sums the gradient after the backward pass). A last column
             puts in the rate at which the two local workers summed the gradient instead (gRPC
             over loopback on the shared cores): a pessimistic bound.
    epochs   captions / global batch steps: Flickr30k ~145k training captions, COCO ~590k.
Reads the features and prepare_text's folder; writes only into a temporary folder, removed at
the end. Prints a table and, last, the ratios
`two_workers_vs_one: <steps/s of two workers / one>  projected_speedup_8: <x>  projected_speedup_16: <y>`.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import bench_common
from captioning.data import inputs
from captioning.models import registry
from captioning.training import distributed, trainer
from captioning.utils import HelpFormatter, PipelineError, read_json, run_cli, write_json

BATCH_SIZE = 64
STEPS = 30
WARMUP = 5
SEED = 1
BANDWIDTH = 10e9 / 8          # bytes per second: 10 Gbit/s
LATENCY = 50e-6               # seconds per ring hop
MACHINES = (1, 2, 4, 8, 16)
DATASETS = {"Flickr30k": 145_000, "COCO": 590_000}       # training captions per epoch


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--features", type=Path, default=None, help="features pickle (default: the shared Lite0 file)")
    p.add_argument("--data-dir", type=Path, default=None, help="prepare_text.py output (default: prepared here)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="global batch (captions per step)")
    p.add_argument("--steps", type=int, default=STEPS, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=WARMUP, help="untimed steps first (tracing)")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)   # internal: result file
    return p.parse_args(argv)


def time_steps(args):
    """One worker's part: this process's steps/s and the gradient's sizes -> args.worker (JSON).
    Under a TF_CONFIG of several workers it is one of them, else the one-worker case."""
    import tensorflow as tf
    workers = distributed.join(120)
    if workers is None:
        workers = distributed.Workers(tf.distribute.get_strategy(),
                                      distributed.Cluster(("127.0.0.1:0",), 0, ("worker 0",)))
    load_args = argparse.Namespace(features=args.features, data_dir=args.data_dir,
                                   max_missing=trainer.MAX_MISSING, fail_on_missing=False,
                                   variant="merge", mode="sequence", embed_dim=registry.EMBED_DIM,
                                   units=registry.UNITS, dropout=registry.DROPOUT)
    matrix, train, _, config, _ = trainer.prepare_inputs(load_args)
    trainer.seed_everything(SEED)
    model = distributed.build_in_scope(workers, lambda: registry.compile_model(
        registry.build_from_config(config), words_per_row=inputs.words_per_row(train, "sequence")))
    steps = distributed.CaptionSteps(workers, model)
    make_batch, signature, rows = distributed.caption_batches(config, train, matrix)
    plan = distributed.caption_plan(config, train, args.batch_size, SEED, 0)
    if len(plan) < args.warmup + args.steps:
        raise PipelineError(f"{len(plan)} batches of {args.batch_size}: fewer than --warmup + --steps")
    steps.train_epoch(distributed.distribute(workers, plan[:args.warmup], make_batch, signature, rows))
    started = time.perf_counter()
    steps.train_epoch(distributed.distribute(workers, plan[args.warmup:args.warmup + args.steps],
                                             make_batch, signature, rows))
    seconds = time.perf_counter() - started
    sum_seconds = time_gradient_sum(workers, model, args.steps)
    if workers.is_chief:
        sizes = {v.path: int(np.prod(v.shape)) for v in model.trainable_variables}
        write_json(args.worker, {"steps_per_s": args.steps / seconds, "params": sum(sizes.values()),
                                 "embedding": sizes.get("embedding/embeddings", 0),
                                 "sum_ms": 1000 * sum_seconds,
                                 "vocab": config["vocab_size"], "captions": len(train),
                                 "words_per_caption": inputs.words_per_row(train, "sequence")})
    return 0


def time_gradient_sum(workers, model, repeats):
    """Seconds of one all-reduce of a dense gradient (zeros shaped like the trainable
    variables) among the workers, alone: the collective's part of a step."""
    import tensorflow as tf
    zeros = [np.zeros(v.shape, np.float32) for v in model.trainable_variables]

    def replica_sum(grads):
        # identity: the function's inputs have no device; the collective needs the replica's
        return tf.distribute.get_replica_context().all_reduce("sum", [tf.identity(g) for g in grads])

    @tf.function
    def total(grads):
        return workers.strategy.run(replica_sum, args=(grads,))

    total(zeros)
    started = time.perf_counter()
    for _ in range(repeats):
        result = total(zeros)
    tf.nest.flatten(workers.strategy.experimental_local_results(result))[0].numpy()   # wait for it
    return (time.perf_counter() - started) / repeats


def measure(args, workdir):
    """{1: one worker's result, 2: two workers' result} (time_steps in processes of their own)."""
    from captioning.apps.pipeline import run_script
    results = {}
    common = ["--features", str(args.features), "--data-dir", str(args.data_dir), "--batch-size",
              str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    for n in (1, 2):
        result = Path(workdir) / f"result-{n}.json"
        argv = [*common, "--worker", str(result)]
        if n == 1:
            os.environ["TF_NUM_INTRAOP_THREADS"] = str(os.cpu_count() or 1)
            status = run_script(Path(__file__), argv)
            del os.environ["TF_NUM_INTRAOP_THREADS"]
        else:
            status = distributed.launch_local(n, argv, Path(__file__), timeout=1800)
        if status != 0:
            raise PipelineError(f"the {n}-worker run failed (exit status {status})")
        results[n] = read_json(result)
    return results


def step_seconds(compute, grad_bytes, machines, bandwidth=BANDWIDTH):
    """The projected seconds of one step on `machines` machines (module docstring)."""
    ring = 2 * (machines - 1) / machines
    return compute / machines + ring * grad_bytes / bandwidth + 2 * (machines - 1) * LATENCY


def report(args, results, used):
    one, two = results[1], results[2]
    grad_bytes = one["params"] * 4
    compute = 1 / one["steps_per_s"]
    overhead = 1 / two["steps_per_s"] - compute
    print(f"\nmachine: {os.cpu_count()} CPU cores; data: {used}; merge model, vocab {one['vocab']}, "
          f"{one['params']:,} trainable parameters; global batch {args.batch_size}; "
          f"{args.steps} timed steps each\n")
    label = 52
    print(f"| {'measured on this machine':<{label}} | steps/s | ms/step |")
    print(f"|{'-' * (label + 2)}|--------:|--------:|")
    for text, result in ((f"one worker (one process, {os.cpu_count()} threads)", one),
                         ("two workers (two processes on 127.0.0.1, gRPC)", two)):
        print(f"| {text:<{label}} | {result['steps_per_s']:>7.2f} | {1000 / result['steps_per_s']:>7.0f} |")
    print(f"\ntwo workers' overhead per step: {1000 * overhead:.0f} ms, of it the gradient sum alone "
          f"(dense, loopback gRPC): {two['sum_ms']:.0f} ms; the rest is two processes sharing "
          f"{os.cpu_count()} cores on half batches (this measures the overhead, not a speed-up)")
    print(f"gradient per step: {grad_bytes / 1e6:.1f} MB dense float32 (embedding {one['embedding'] * 4 / 1e6:.1f} MB of "
          f"it, sent as IndexedSlices: ~{args.batch_size * one['words_per_caption'] * one['embedding'] / one['vocab'] * 4 / 1e6:.2f} MB); "
          f"a ring all-reduce sends and receives 2(N-1)/N of it per worker: "
          f"{grad_bytes / 1e6:.1f} MB at N=2, {2 * 15 / 16 * grad_bytes / 1e6:.1f} MB at N=16\n")
    print(f"projection: each machine this CPU, 10 Gbit/s, {LATENCY * 1e6:.0f} us per hop, global batch {args.batch_size}")
    # the rate of the loopback sum measured above, had it been a ring of two: a pessimistic
    # bound (gRPC's CPU work on cores the compute needs too)
    measured_rate = grad_bytes / (two["sum_ms"] / 1000)
    print(f"(last column: the gradient sum at the rate measured here, {measured_rate / 1e6:.0f} MB/s, "
          f"instead of 10 Gbit/s)")
    names = [f"{name} epoch (min)" for name in DATASETS]
    print(f"| machines | step (ms) | of it network (ms) | speed-up | {' | '.join(names)} | "
          f"speed-up at the measured rate |")
    print("|---------:|----------:|-------------------:|---------:|" +
          "".join(f"{'-' * (len(n) + 1)}:|" for n in names) + "------------------------------:|")
    speedups = {}
    for n in MACHINES:
        step = step_seconds(compute, grad_bytes, n)
        network = step - compute / n
        speedups[n] = compute / step
        epochs = " | ".join(f"{captions / args.batch_size * step / 60:>{len(label)}.1f}"
                            for label, captions in zip(names, DATASETS.values()))
        slow = compute / step_seconds(compute, grad_bytes, n, measured_rate)
        print(f"| {n:>8} | {1000 * step:>9.0f} | {1000 * network:>18.1f} | {speedups[n]:>8.2f} | {epochs} | "
              f"{slow:>29.2f} |")
    print(f"\ntwo_workers_vs_one: {two['steps_per_s'] / one['steps_per_s']:.2f}  "
          f"projected_speedup_8: {speedups[8]:.2f}  projected_speedup_16: {speedups[16]:.2f}")


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return time_steps(args)
    with tempfile.TemporaryDirectory(prefix="bench_distributed_") as workdir:
        args.data_dir, args.features, used = bench_common.prepare(args.data_dir, args.features, workdir)
        print(f"data: {used}", flush=True)
        results = measure(args, workdir)
        report(args, results, used)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
