"""Benchmark: greedy captions the coursework way vs the fast batched decoder, same model, same run.

Usage:
    python benchmarks/bench_decode.py --model models/merge --data-dir data \\
        --features ../shared/flickr8k/features_efficientnet_lite0.pkl [--subset 20] [--beam 3]

The coursework way (decoding.tutorial_greedy on the model rebuilt in train.py's "pairs"
mode, i.e. the tutorial's network): one model.predict per word per image on the whole
pre-padded prefix. It costs ~0.75 s per image, so it is timed on the first --subset images of
the split and projected to the whole split. Ours (decoding.caption_features): all
images at once, one step of the model's own layers with carried LSTM state; greedy and beam --beam, each timed on the
whole split. The captions of the subset are compared (they must be identical).

Reads: the run folder (--model), prepare_text outputs (--data-dir), the features pickle.
Writes: nothing; prints timings. Last line:
    speedup_vs_tutorial: <x>  greedy_seconds: <s>  beam3_seconds: <s>
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the stages are top-level modules
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from captioning import decoding, models, text  # noqa: E402
from captioning.features import load_features  # noqa: E402
from captioning.utils import PipelineError, run_cli  # noqa: E402

MODEL_DIR = "models/merge"
DATA_DIR = "data"
FEATURES = "../shared/flickr8k/features_efficientnet_lite0.pkl"
SPLIT = "test"
SUBSET = 20      # images decoded the coursework way (~0.75 s each)
BEAM = 3


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=MODEL_DIR, help="train.py run folder")
    parser.add_argument("--data-dir", default=DATA_DIR, help="prepare_text.py output folder")
    parser.add_argument("--features", default=FEATURES, help="features pickle")
    parser.add_argument("--split", default=SPLIT, choices=["train", "dev", "test"], help="split to caption")
    parser.add_argument("--subset", type=int, default=SUBSET, help="images timed the coursework way")
    parser.add_argument("--beam", type=int, default=BEAM, help="beam width timed")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import numpy as np
    model, config, tokenizer = models.load_captioner(args.model, args.data_dir)
    features = load_features(args.features)
    ids = text.load_splits(args.data_dir)[args.split]
    missing = [i for i in ids if i not in features]
    if missing:
        raise PipelineError(f"{len(missing)} {args.split} images lack features, first {missing[0]} ({args.features})")
    matrix = np.stack([features[i] for i in ids])
    _, start_id, end_id, banned = decoding.vocabulary(tokenizer)
    max_length = config["max_length"]

    tutorial_model = models.rebuild_for_mode(model, config, "pairs")
    decoding.tutorial_greedy(tutorial_model, matrix[0], start_id, end_id, 3, banned)   # warm-up (tracing)
    t0 = time.perf_counter()
    slow = [decoding.tutorial_greedy(tutorial_model, f, start_id, end_id, max_length, banned)
            for f in matrix[:args.subset]]
    per_image = (time.perf_counter() - t0) / args.subset
    tutorial_seconds = per_image * len(ids)
    words = sum(len(c) for c in slow) / len(slow)
    print(f"coursework loop: {per_image:.3f} s/image ({words:.1f} tokens/caption) on {args.subset} "
          f"images -> {tutorial_seconds:.0f} s projected for {len(ids)}")

    t0 = time.perf_counter()
    greedy = decoding.caption_features(model, config, tokenizer, matrix, beam=1)
    greedy_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    decoding.caption_features(model, config, tokenizer, matrix, beam=args.beam)
    beam_seconds = time.perf_counter() - t0
    same = sum(a == b for a, b in zip(slow, greedy))
    print(f"ours: greedy {greedy_seconds:.2f} s, beam {args.beam} {beam_seconds:.2f} s for {len(ids)} "
          f"images; subset captions identical to the coursework loop: {same}/{len(slow)}")
    print(f"speedup_vs_tutorial: {tutorial_seconds / greedy_seconds:.0f}  greedy_seconds: "
          f"{greedy_seconds:.2f}  beam{args.beam}_seconds: {beam_seconds:.2f}")
    return 0 if same == len(slow) else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
