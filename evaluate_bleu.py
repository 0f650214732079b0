"""Stage 6: caption every image of a split and score the captions: BLEU-1..4 and the COCO metrics.

Usage:
    python evaluate_bleu.py --features data/features.pkl --data-dir data --model models/RUN \\
        --split test --beam 3 --output results/ [--images ../shared/flickr8k/Flicker8k_Dataset]
    python evaluate_bleu.py --model models/A models/B --features data/features.pkl \\
        --features data/grids.h5 ...          # an ensemble: each model reads the file that fits it
    python evaluate_bleu.py --model models/RUN/checkpoint-000*/last.keras \\
        --average-into models/RUN-avg ...     # one model: the mean of their weights, then scored

BLEU is reported two ways, both in results.json: "tutorial" (the tutorial's own computation,
to compare with its published numbers) and "standard" (the headline: sentinels stripped, the
original captions as references); plus diagnostics (distinct captions, words used, captions
copied from training, mean length, unfinished share): captioning/evaluation/metrics.py.
The COCO caption metrics (captioning/evaluation/coco_metrics.py, the pycocoevalcap package):
BLEU-1..4, ROUGE-L and CIDEr-D always, METEOR when Java is present (--java), SPICE never (it
cannot run offline); PTB tokenisation with Java, else a pure-Python one, named in results.json.

Reads:
    --features FILE   {image_id: vector} pickle (load_features) whose width equals the
                      model's feature_dim; for an attention/transformer model the spatial grid
                      file of extract_features.py --spatial (grids of the model's size).
                      For a model trained with a fine-tuned top (train.py --finetune-top): the
                      trunk file of extract_features.py --trunk, read through that top.
                      Several files (repeat, or list after one --features): each model reads
                      the first of its kind that fits it (a fine-tuned member a trunk file).
    --data-dir DIR    prepare_text.py outputs: meta.json, tokenizer.json, splits.json,
                      descriptions.txt, references.json.
    --model PATH      train.py run folder, or its model.keras (model.keras + model.json).
                      Several (repeat, or list after one --model): an ensemble, one caption
                      from the mean of their next-word log-probabilities; they must share the
                      vocabulary (captioning/inference/ensemble.py, docs/models.md).
    --average-into DIR  instead of an ensemble: average the weights of the --model files (.keras
                      files such as a run's checkpoint-NNNN/last.keras, or run folders; one
                      architecture), write that model as run folder DIR, then score it.
    --images DIR      optional: the Flickr8k image folder, for the gallery.
    --consensus FILE  optional: a pooled features pickle holding the training images and the
                      split's (e.g. the Lite0 features). Each image's caption is then chosen
                      from its beam's finished captions (--beam, default 5 here) by
                      W * z(model score) + (1 - W) * z(mean CIDEr-D against the captions of its
                      --consensus-k nearest training images), W = --consensus-weight
                      (captioning/inference/consensus.py; K and W chosen on dev).
Writes (into --output, each atomically, all after the scoring succeeded):
    results.json, captions.tsv, gallery.html (only with --images: the first --gallery images);
    their contents: captioning/evaluation/scoring.py.
"""
import argparse
import sys
from pathlib import Path

from captioning.utils import check_installed

check_installed("evaluate_bleu.py", "metrics", "pycocoevalcap")   # METEOR, ROUGE-L, CIDEr-D
from captioning.evaluation.scoring import GALLERY_IMAGES, SPLIT, evaluate_split, summary_lines, write_evaluation
from captioning.inference import consensus
from captioning.inference.decoding import ALPHA, BEAM
from captioning.inference.ensemble import save_average
from captioning.utils import HelpFormatter, PipelineError, run_cli

MODEL_DIR = "models/merge"
DATA_DIR = "data"
FEATURES = "data/features.pkl"
OUTPUT_DIR = "results"
JAVA = {"auto": "auto", "yes": True, "no": False}     # --java -> coco_metrics.score_captions(java=)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--features", nargs="+", action="extend", default=None,
                        help=f"features file of the split's images; several for an ensemble "
                             f"(default: {FEATURES})")
    parser.add_argument("--data-dir", default=DATA_DIR, help="prepare_text.py output folder")
    parser.add_argument("--model", nargs="+", action="extend", default=None,
                        help=f"train.py run folder, or its model.keras; several = an ensemble "
                             f"(default: {MODEL_DIR})")
    parser.add_argument("--average-into", default=None, metavar="DIR",
                        help="write the mean of the --model weights as run folder DIR and score it")
    parser.add_argument("--split", default=SPLIT, choices=["train", "dev", "test"], help="split to caption")
    parser.add_argument("--beam", type=int, default=None,
                        help=f"beam width (1 = greedy; default {BEAM}, {consensus.BEAM} with --consensus)")
    parser.add_argument("--alpha", type=float, default=ALPHA,
                        help="beam length normalisation exponent, for --beam >= 2 only "
                             "(beam 1 is the plain argmax loop)")
    parser.add_argument("--output", default=OUTPUT_DIR, help="folder for results.json etc.")
    parser.add_argument("--images", default=None, help="image folder, to write gallery.html")
    parser.add_argument("--gallery", type=int, default=GALLERY_IMAGES, help="images in the gallery")
    parser.add_argument("--java", default="auto", choices=list(JAVA),
                        help="COCO metrics: Java for METEOR and the PTB tokenizer (auto = if present)")
    parser.add_argument("--limit", type=int, default=None,
                        help="score only the first N images of the split (quick checks)")
    consensus.add_options(parser)
    args = parser.parse_args(argv)
    args.model = args.model or [MODEL_DIR]
    args.features = args.features or [FEATURES]
    if args.average_into and len(args.model) < 2:
        parser.error("--average-into needs two or more --model")
    consensus.check_options(parser, args, BEAM)
    if args.limit is not None and args.limit < 1:
        raise PipelineError(f"--limit must be at least 1 (got {args.limit})")
    return args


def main(argv=None):
    args = parse_args(argv)
    models = args.model
    # read and checked before anything is written or decoded
    reranker = consensus.from_options(args, args.data_dir)
    if args.average_into:
        models = [str(save_average(args.model, args.average_into))]
        print(f"averaged {len(args.model)} models -> {args.average_into}")
    features = args.features if len(args.features) > 1 else args.features[0]
    evaluation = evaluate_split(models if len(models) > 1 else models[0], args.data_dir, features,
                                split=args.split, beam=args.beam, alpha=args.alpha, java=JAVA[args.java],
                                limit=args.limit, images_dir=args.images, gallery=args.gallery,
                                consensus=reranker)
    write_evaluation(args.output, evaluation)
    print("\n".join(summary_lines(evaluation.results, Path(args.output) / "results.json")))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
