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

The captioner as a ranker (captioning/retrieval/caption_scoring.py): a train.py captioner scores a pair
by the caption's length-normalised log-likelihood given the image. That costs a softmax over
the vocabulary per word per pair (~5 million pairs on the full test split), so by default it
runs on the first --captioner-images images of the split (sorted ids) and their captions; the
embedding is scored on the same subset too, side by side. Recall on N images is easier than on
1000 (fewer wrong candidates): compare rankers only on the same N.

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
import time
from pathlib import Path

import numpy as np

from captioning.retrieval import caption_scoring

from captioning.retrieval import ranking

from captioning.retrieval import vse
from captioning.data.features import load_features
from captioning.models.registry import load_run
from captioning.data.text import encode_caption, load_descriptions, load_splits, load_tokenizer
from captioning.utils import HelpFormatter, PipelineError, run_cli, sha256_file, write_json

# ---- settings (argparse defaults) --------------------------------------------------------------
MODEL_DIR = "models/vse"
SPLIT = "test"
OUTPUT_DIR = "results/retrieval"
CAPTIONER_IMAGES = 100   # images (and their captions) the captioner ranks; 0 = the whole split


def split_items(split, data_dir, features, width):
    """(image ids, [(image index, cleaned caption)]) of a split; checks features and captions."""
    ids = list(load_splits(data_dir)[split])
    descriptions = load_descriptions(Path(data_dir) / "descriptions.txt")
    for image_id in ids:
        if image_id not in features:
            raise PipelineError(f"image {image_id} of split {split} has no features")
        if image_id not in descriptions:
            raise PipelineError(f"image {image_id} of split {split} has no captions "
                                f"({Path(data_dir) / 'descriptions.txt'})")
    if ids and len(features[ids[0]]) != width:
        raise PipelineError(f"features are {len(features[ids[0]])}-d but the model expects {width}-d")
    captions = [(k, c) for k, image_id in enumerate(ids) for c in descriptions[image_id]]
    return ids, captions


def embedding_scores(model, config, tokenizer, matrix, captions):
    """(images, captions) cosine matrix from the joint embedding."""
    tokens = [encode_caption(tokenizer, c)[:config["max_length"]] for _, c in captions]
    images = vse.embed_images(vse.image_encoder(model), matrix)
    texts = vse.embed_captions(vse.text_encoder(model), tokens)
    return images @ texts.T


def captioner_result(args, matrix, captions, n_images):
    """(ranking of the captioner on the first n_images, seconds)."""
    model, config = load_run(args.captioner)   # checks its tokenizer's sha256
    if config["feature_dim"] != matrix.shape[1]:
        raise PipelineError(f"captioner {args.captioner} was trained on {config['feature_dim']}-d "
                            f"features, these are {matrix.shape[1]}-d")
    tokenizer = load_tokenizer(Path(config["data_dir"]) / "tokenizer.json")
    subset = [(k, c) for k, c in captions if k < n_images]
    tokens = [encode_caption(tokenizer, c)[:config["max_length"]] for _, c in subset]
    started = time.time()
    scores = caption_scoring.caption_scores(model, config, matrix[:n_images], tokens, progress=True)
    return ranking.evaluate(scores, [k for k, _ in subset]), time.time() - started


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
    started = time.time()
    model, config, tokenizer = vse.load_embedding(args.model, args.data_dir)
    data_dir = Path(args.data_dir or config["data_dir"])
    features_path = Path(args.features or config["features_file"])
    if not features_path.is_file():
        raise PipelineError(f"features file not found ({features_path})")
    features = load_features(features_path)
    ids, captions = split_items(args.split, data_dir, features, config["feature_dim"])
    if not ids:
        raise PipelineError(f"split {args.split} is empty ({data_dir / 'splits.json'})")
    matrix = np.stack([features[i] for i in ids])
    del features
    scores = embedding_scores(model, config, tokenizer, matrix, captions)
    caption_image = [k for k, _ in captions]
    results = {"split": args.split, "images": len(ids), "captions": len(captions),
               "embedding": ranking.evaluate(scores, caption_image), "subset": None,
               "model": str(args.model), "captioner_model": args.captioner,
               "features": features_path.name, "features_sha256": sha256_file(features_path),
               "data_dir": str(data_dir)}
    rows = [(f"embedding, {len(ids)} images", results["embedding"])]
    if args.captioner:
        n = min(args.captioner_images or len(ids), len(ids))
        columns = [j for j, (k, _) in enumerate(captions) if k < n]
        captioner, seconds = captioner_result(args, matrix, captions, n)
        results["subset"] = {"images": n, "captions": len(columns), "which": f"first {n} image ids of "
                             f"the split (sorted) and their captions",
                             "embedding": ranking.evaluate(scores[:n][:, columns], [caption_image[j] for j in columns]),
                             "captioner": captioner}
        results["captioner_seconds"] = round(seconds, 1)
        rows += [(f"embedding, first {n} images", results["subset"]["embedding"]),
                 (f"captioner log-lik, first {n} images", captioner)]
    results["seconds"] = round(time.time() - started, 1)
    write_json(Path(args.output) / "results.json", results)
    print(ranking.format_table(rows))
    print(f"{args.split}: {len(ids)} images, {len(captions)} captions; {results['seconds']:.1f} s "
          f"-> {Path(args.output) / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
