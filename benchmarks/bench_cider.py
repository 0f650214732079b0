"""Benchmark: CIDEr-D rewards per second, captioning.evaluation.coco_metrics.CiderD vs pycocoevalcap's Cider.

Usage:
    python benchmarks/bench_cider.py [--text-dir ../shared/flickr8k/Flickr8k_text] [--samples 5]
        [--batch-images 50] [--limit N] [--seed 0]

Workload, shaped like a self-critical training epoch: references = the 5 original captions of
each training image (pure-Python PTB-style tokenisation); per image, --samples hypotheses: its
own first caption and the first captions of --samples - 1 other training images picked with
--seed, so rewards range from high to near zero.

Timed, each on the same hypotheses:
    ours            CiderD built once from the training references (document frequencies,
                    reference vectors), then .scores() on every hypothesis; build time reported apart
    pycocoevalcap   Cider().compute_score over all training images, one call per sample index:
                    document frequencies from the same references, so the SAME rewards (checked:
                    max_abs_diff)
    pycocoevalcap, per batch   one call per batch of --batch-images images x --samples hypotheses,
                    the naive way in a training loop; its document frequencies come from the
                    batch, so its rewards differ (timing only)

Reads: Flickr8k.token.txt and Flickr_8k.trainImages.txt in --text-dir. Writes nothing.
Times are wall and CPU seconds of this process; everything runs in one thread, so the ratios
use CPU seconds, which other jobs on a shared machine do not stretch. Last line:
    speedup_vs_pycocoevalcap: <x>  speedup_vs_per_batch: <x>  rewards_per_cpu_second: <n>
    build_cpu_seconds: <s>  max_abs_diff: <d>
"""
import argparse
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

from captioning.evaluation.coco_metrics import CiderD, python_tokenize
from captioning.utils import HelpFormatter, PipelineError, run_cli

TEXT_DIR = "../shared/flickr8k/Flickr8k_text"
SAMPLES = 5          # hypotheses per image (SCST samples per image)
BATCH_IMAGES = 50    # images per call in the per-batch pycocoevalcap timing
SEED = 0


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--text-dir", default=TEXT_DIR, help="Flickr8k_text folder")
    parser.add_argument("--samples", type=int, default=SAMPLES, help="hypotheses per image")
    parser.add_argument("--batch-images", type=int, default=BATCH_IMAGES,
                        help="images per pycocoevalcap call in the per-batch timing")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--seed", type=int, default=SEED, help="seed for picking other images' captions")
    args = parser.parse_args(argv)
    if args.samples < 1 or args.batch_images < 1:
        parser.error("--samples and --batch-images must be >= 1")
    return args


def load_training_references(text_dir, limit):
    """{image_id: [tokenised caption, ...]} for the training split (pure-Python tokenisation)."""
    text_dir = Path(text_dir)
    token_file, train_file = text_dir / "Flickr8k.token.txt", text_dir / "Flickr_8k.trainImages.txt"
    for path in (token_file, train_file):
        if not path.is_file():
            raise PipelineError(f"missing file {path} (set --text-dir)")
    train = [line.strip().rsplit(".", 1)[0] for line in train_file.read_text(encoding="utf-8").splitlines()
             if line.strip()][:limit]
    wanted = set(train)
    refs = defaultdict(list)
    for number, line in enumerate(token_file.read_text(encoding="utf-8").splitlines(), start=1):
        if "\t" not in line:
            continue
        name, caption = line.split("\t", 1)
        image_id = name.split("#")[0].rsplit(".", 1)[0]
        if image_id in wanted:
            refs[image_id].append(python_tokenize(caption))
    return {i: refs[i] for i in train if refs.get(i)}


class Timer:
    """Wall and CPU (this process) seconds of a with-block."""

    def __enter__(self):
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def main(argv=None):
    args = parse_args(argv)
    import numpy as np
    from pycocoevalcap.cider.cider import Cider
    refs = load_training_references(args.text_dir, args.limit)
    ids = list(refs)
    rng = random.Random(args.seed)
    # hypotheses[s][i]: sample s of image ids[i]
    hypotheses = [[refs[i][0] for i in ids]]
    for _ in range(args.samples - 1):
        hypotheses.append([refs[rng.choice(ids)][0] for _ in ids])
    n_rewards = len(ids) * args.samples
    print(f"{len(ids)} training images x {args.samples} hypotheses = {n_rewards} rewards")

    with Timer() as build:
        scorer = CiderD(refs)
    with Timer() as ours_time:
        ours = [scorer.scores(ids, hyps) for hyps in hypotheses]

    with Timer() as theirs_time:
        theirs = []
        for hyps in hypotheses:
            _, per_image = Cider().compute_score(refs, {i: [h] for i, h in zip(ids, hyps)})
            theirs.append(np.asarray(per_image))
    max_abs_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(ours, theirs))

    with Timer() as batch_time:
        for start in range(0, len(ids), args.batch_images):
            batch = ids[start:start + args.batch_images]
            gts = {(i, s): refs[i] for s in range(args.samples) for i in batch}
            res = {(i, s): [hypotheses[s][start + k]] for s in range(args.samples) for k, i in enumerate(batch)}
            Cider().compute_score(gts, res)

    rows = [("ours: CiderD (built once), .scores()", ours_time),
            ("pycocoevalcap Cider, df from all training refs (same rewards)", theirs_time),
            (f"pycocoevalcap Cider per batch of {args.batch_images} images (df from the batch)", batch_time)]
    print(f"{'method':68s} {'wall s':>8s} {'CPU s':>8s} {'rewards/CPU s':>14s}")
    for name, timer in rows:
        print(f"{name:68s} {timer.wall:8.2f} {timer.cpu:8.2f} {n_rewards / timer.cpu:14.0f}")
    print(f"CiderD build (document frequencies + reference vectors, once): {build.wall:.2f} s wall, "
          f"{build.cpu:.2f} s CPU; mean reward {np.mean(ours):.4f}")
    # CPU seconds, not wall: on a shared machine other jobs stretch wall time (all is one thread)
    print(f"speedup_vs_pycocoevalcap: {theirs_time.cpu / ours_time.cpu:.1f}  "
          f"speedup_vs_per_batch: {batch_time.cpu / ours_time.cpu:.1f}  "
          f"rewards_per_cpu_second: {n_rewards / ours_time.cpu:.0f}  build_cpu_seconds: {build.cpu:.2f}  "
          f"max_abs_diff: {max_abs_diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
