"""Score image-sentence retrieval on a split: the embedding, and a captioner used as a ranker.

Usage:
    python evaluate_retrieval.py --model models/vse --split test [--output results/retrieval]
    python evaluate_retrieval.py --model models/vse --split test \\
        --captioner models/ls-bleu --captioner-images 1000      # all 1000: slow on a CPU

The standard protocol (Hodosh et al. 2013; captioning/retrieval/ranking.py): every image of the split
against every caption of those images (Flickr8k test: 1000 images, 5000 captions). Image
annotation (image -> text): rank of the first correct caption among all captions; image search
(text -> image): rank of the caption's image among all images. R@1, R@5, R@10 (percent),
median and mean rank, and rsum (the six recalls summed).

The captioner as a ranker scores a pair by the caption's length-normalised log-likelihood given
the image: ~5 million pairs on the full test split, so by default only the first
--captioner-images images of the split and their captions, where the embedding is scored too
(captioning/retrieval/protocol.py). Recall on N images is easier than on 1000 (fewer wrong
candidates): compare rankers only on the same N.

Reads:
    --model DIR       train_retrieval.py's run folder (model.keras, model.json).
    --features FILE   features pickle (default: the features_file recorded in model.json), read
                      with the restricted unpickler. Its width must be the model's.
    --data-dir DIR    prepare_text.py outputs (default model.json's data_dir): tokenizer.json
                      (checked against the model), descriptions.txt, splits.json.
    --captioner DIR   optional train.py run folder; its own tokenizer (model.json's data_dir)
                      encodes the same cleaned captions.
Writes (into --output, atomically, after every score is computed):
    results.json      {"split", "images", "captions", "embedding": {image_to_text, text_to_image,
                       rsum}, "subset": null or {"images", "captions", "embedding": {...},
                       "captioner": {...}}, "model", "captioner_model", "features", "seconds",
                       "captioner_seconds"}
Prints the table (ranking.format_table).
"""
import argparse
import sys
from pathlib import Path

from captioning.retrieval import ranking
from captioning.retrieval.protocol import CAPTIONER_IMAGES, SPLIT, evaluate_split
from captioning.utils import HelpFormatter, run_cli, write_json

MODEL_DIR = "models/vse"
OUTPUT_DIR = "results/retrieval"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default=MODEL_DIR, help="train_retrieval.py run folder")
    p.add_argument("--split", default=SPLIT, choices=["train", "dev", "test"], help="split to rank")
    p.add_argument("--features", default=None, help="features pickle (default: the features_file recorded in model.json)")
    p.add_argument("--data-dir", default=None, help="prepare_text.py folder (default: the data_dir recorded in model.json)")
    p.add_argument("--output", default=OUTPUT_DIR, help="folder for results.json")
    p.add_argument("--captioner", default=None, help="train.py run folder to rank with as well")
    p.add_argument("--captioner-images", type=int, default=CAPTIONER_IMAGES,
                   help="images the captioner ranks (0 = the whole split)")
    args = p.parse_args(argv)
    if args.captioner_images < 0:
        p.error("--captioner-images must be >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    results, rows = evaluate_split(args.model, args.split, args.features, args.data_dir,
                                   args.captioner, args.captioner_images)
    write_json(Path(args.output) / "results.json", results)
    print(ranking.format_table(rows))
    print(f"{args.split}: {results['images']} images, {results['captions']} captions; "
          f"{results['seconds']:.1f} s -> {Path(args.output) / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
