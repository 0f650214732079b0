"""Benchmark: greedy captions the coursework way vs the batched carried-state decoder, same model.

Usage:
    python benchmarks/bench_decode.py [--model models/RUN --data-dir data] [--features F]
                                      [--subset 20] [--beam 3]

From a clean clone the defaults work: without --data-dir, prepare_text.py runs on the shared
Flickr8k captions (or the bundled sample) in a temporary folder, the features default to the
shared Lite0 file (benchmarks/bench_common.py), and without --model a merge model is trained
there for --train-epochs epochs (default 1: the captions have realistic lengths; it is not the
tuned model). The `data:` and `model:` lines say what was used.

The coursework way (decoding.tutorial_greedy on the model rebuilt in train.py's "pairs" mode,
i.e. the tutorial's network): one model.predict per word per image on the whole pre-padded
prefix. It costs ~1 s per image, so it is timed on the first --subset images of the split and
projected to the whole split. Ours (decoding.caption_features): all images at once, one step of
the model's own layers with carried LSTM state; greedy (beam 1, the argmax loop) and beam
--beam (length normalisation alpha, decoding.ALPHA), each timed on the whole split. The
captions of the subset are compared with the coursework loop's (they must be identical).

Reads: the run folder, prepare_text outputs, the features pickle. Writes only into a temporary
folder, removed at the end. Prints timings; last line:
    speedup_vs_tutorial: <x>  greedy_seconds: <s>  beam3_seconds: <s>
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import bench_common
from captioning.inference import decoding
from captioning.models import registry
from captioning.data import text
from captioning.data.features import load_features
from captioning.utils import HelpFormatter, PipelineError, run_cli

SPLIT = "test"
SUBSET = 20        # images decoded the coursework way (~1 s each)
BEAM = 3
TRAIN_EPOCHS = 1   # epochs of the stand-in model trained when no --model is given


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", type=Path, default=None,
                        help="train.py run folder (unset: one trained in a temporary folder)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="prepare_text.py output (unset: prepared in a temporary folder)")
    parser.add_argument("--features", type=Path, default=None,
                        help="features pickle (unset: the shared Lite0 file, else random vectors)")
    parser.add_argument("--split", default=SPLIT, choices=["train", "dev", "test"], help="split to caption")
    parser.add_argument("--subset", type=int, default=SUBSET, help="images timed the coursework way")
    parser.add_argument("--beam", type=int, default=BEAM, help="beam width timed")
    parser.add_argument("--train-epochs", type=int, default=TRAIN_EPOCHS,
                        help="epochs of the model trained when --model is not given")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_decode_") as workdir:
        return run(args, Path(workdir))


def run(args, workdir):
    if args.model is not None and args.data_dir is None:
        raise PipelineError("--model needs the --data-dir it was trained with")
    data_dir, features_path, used = bench_common.prepare(args.data_dir, args.features, workdir)
    print(f"data: {used}", flush=True)
    if args.model is None:
        print(f"model: training merge for {args.train_epochs} epoch(s) in a temporary folder "
              f"(a stand-in, not the tuned model)", flush=True)
        bench_common.train(["--features", features_path, "--data-dir", data_dir,
                            "--output-dir", workdir / "models", "--name", "merge",
                            "--epochs", args.train_epochs], "the stand-in model")
        args.model = workdir / "models" / "merge"
    model, config, tokenizer = registry.load_captioner(args.model, data_dir)
    print(f"model: {args.model} ({config['variant']}, best epoch {config.get('best_epoch')})")
    features = load_features(features_path)
    ids = text.load_splits(data_dir)[args.split]
    missing = [i for i in ids if i not in features]
    if missing:
        raise PipelineError(f"{len(missing)} {args.split} images lack features, first {missing[0]} ({features_path})")
    matrix = np.stack([features[i] for i in ids])
    _, start_id, end_id, banned = decoding.vocabulary(tokenizer)
    max_length = config["max_length"]

    tutorial_model = registry.rebuild_for_mode(model, config, "pairs")
    decoding.tutorial_greedy(tutorial_model, matrix[0], start_id, end_id, 3, banned)   # warm-up (tracing)
    t0 = time.perf_counter()
    slow = [decoding.tutorial_greedy(tutorial_model, f, start_id, end_id, max_length, banned)
            for f in matrix[:args.subset]]
    per_image = (time.perf_counter() - t0) / args.subset
    tutorial_seconds = per_image * len(ids)
    words = sum(len(c) for c in slow) / len(slow)
    print(f"coursework loop: {per_image:.3f} s/image ({words:.1f} tokens/caption) on {args.subset} "
          f"images -> {tutorial_seconds:.0f} s projected for {len(ids)}")

    decoding.caption_features(model, config, tokenizer, matrix[:2], beam=1)   # warm-up (tracing)
    t0 = time.perf_counter()
    greedy = decoding.caption_features(model, config, tokenizer, matrix, beam=1)
    greedy_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    decoding.caption_features(model, config, tokenizer, matrix, beam=args.beam)
    beam_seconds = time.perf_counter() - t0
    same = sum(a == b for a, b in zip(slow, greedy))
    print(f"\nmachine: {os.cpu_count()} CPU cores; {len(ids)} {args.split} images\n")
    print("| decoding | seconds | images/s |")
    print("|---|---:|---:|")
    print(f"| coursework loop, one predict per word (projected from {args.subset}) | "
          f"{tutorial_seconds:.1f} | {len(ids) / tutorial_seconds:.1f} |")
    print(f"| greedy, batched, carried state | {greedy_seconds:.2f} | {len(ids) / greedy_seconds:.0f} |")
    print(f"| beam {args.beam}, alpha {decoding.ALPHA}, batched | {beam_seconds:.2f} | "
          f"{len(ids) / beam_seconds:.0f} |")
    print(f"\nsubset captions identical to the coursework loop: {same}/{len(slow)}")
    print(f"speedup_vs_tutorial: {tutorial_seconds / greedy_seconds:.0f}  greedy_seconds: "
          f"{greedy_seconds:.2f}  beam{args.beam}_seconds: {beam_seconds:.2f}")
    return 0 if same == len(slow) else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
