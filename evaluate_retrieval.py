"""Score image-sentence retrieval on a split: the embedding, and a captioner used as a ranker.

Usage:
    python evaluate_retrieval.py --model models/vse --split test [--output results/retrieval]
    python evaluate_retrieval.py --model models/vse --split test \\
        --captioner models/ls-bleu --captioner-images 1000      # all 1000: slow on a CPU
    python evaluate_retrieval.py --model models/vse --split test \\
        --images data/flickr8k/Flicker8k_Dataset              # features from the photos
    python evaluate_retrieval.py --model models/vse --split dev \\
        --rerank-captioner models/ls-bleu --rerank-top 20 --rerank-weight 0.3 0.5 0.7
    python evaluate_retrieval.py --model pretrained/vse-lite0 --split test \
        --rerank-captioner pretrained/merge-lite0 models/merge-s1 models/merge-s2 models/merge-s3 \
        --rerank-weight 0.2                                   # the best re-ranker measured

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

Re-ranking (--rerank-captioner), both directions: for each caption, the embedding's
--rerank-top images are re-ordered by W * z(cosine) + (1 - W) * z(the caption's log-likelihood
under the captioner), z standardising over those K (captioning/retrieval/rerank.py); for each
image, its --rerank-top captions likewise, by the captioner's pointwise mutual information of
image and caption in the log-likelihood's place. The other items keep their order below. It
scores about K pairs per caption and per image, so it runs on the whole split. One row per
--rerank-weight; choose W on dev, then report test with that W.

Reads:
    --model DIR       train_retrieval.py's run folder (model.keras, model.json).
    --features FILE   features pickle (default: the features_file recorded in model.json), read
                      with the restricted unpickler. Its width must be the model's.
    --images DIR      instead of --features: the split's photos (<image id>.jpg), through the
                      extractor of the backbone recorded in model.json (--weights), as
                      search_images.py embeds a folder. A missing or unreadable photo of the
                      split is an error naming it; nothing is written.
    --data-dir DIR    prepare_text.py outputs (default model.json's data_dir): tokenizer.json
                      (checked against the model), descriptions.txt, splits.json.
    --captioner DIR   optional train.py run folder; its own tokenizer (tokenizer.json beside the
                      model, else model.json's data_dir) encodes the same cleaned captions.
    --rerank-captioner DIR [DIR ...]   the same, for re-ranking; several act as one (the mean
                      of their log-likelihoods).
Writes (into --output, atomically, after every score is computed):
    results.json      {"split", "images", "captions", "embedding": {image_to_text, text_to_image,
                       rsum}, "subset": null or {"images", "captions", "embedding": {...},
                       "captioner": {...}}, "rerank": null or {"captioner", "top_k",
                       "captions_rescored", "images_rescored", "pairs", "seconds",
                       "by_weight": [{"weight", "image_to_text", "text_to_image" (both
                       re-ranked), "rsum"}]},
                       "model", "captioner_model", "features", "images_dir", "seconds",
                       "captioner_seconds"}
Prints the table (ranking.format_table).
"""
import argparse
import sys
from pathlib import Path

from captioning.retrieval import ranking
from captioning.retrieval.protocol import (CAPTIONER_IMAGES, RERANK_TOP, RERANK_WEIGHTS, SPLIT, WEIGHTS,
                                           evaluate_split)
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
    p.add_argument("--images", default=None, help="folder of the split's photos, embedded through the "
                   "model's backbone (instead of --features)")
    p.add_argument("--weights", default=WEIGHTS, help="extractor weights for --images: imagenet | none | "
                   "PATH (see extract_features.py)")
    p.add_argument("--rerank-captioner", default=None, nargs="+", help="train.py run folder(s) (merge: "
                   "fast) that re-rank each caption's top images and each image's top captions; "
                   "several act as one, by their mean log-likelihoods")
    p.add_argument("--rerank-top", type=int, default=RERANK_TOP,
                   help="images per caption and captions per image to re-rank (K)")
    p.add_argument("--rerank-weight", type=float, nargs="+", default=list(RERANK_WEIGHTS),
                   help="W: the embedding's share of the combined score, 0..1; several give one row each")
    args = p.parse_args(argv)
    if args.captioner_images < 0:
        p.error("--captioner-images must be >= 0")
    if args.images and args.features:
        p.error("give --features or --images, not both")
    if args.rerank_top < 1:
        p.error("--rerank-top must be >= 1")
    if any(not 0.0 <= w <= 1.0 for w in args.rerank_weight):
        p.error("--rerank-weight must be between 0 and 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    results, rows = evaluate_split(args.model, args.split, args.features, args.data_dir,
                                   args.captioner, args.captioner_images, args.images, args.weights,
                                   args.rerank_captioner, args.rerank_top, args.rerank_weight)
    write_json(Path(args.output) / "results.json", results)
    print(ranking.format_table(rows))
    print(f"{args.split}: {results['images']} images, {results['captions']} captions; "
          f"{results['seconds']:.1f} s -> {Path(args.output) / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
