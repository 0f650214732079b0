"""Stage 6: caption every image of a split and score the captions: BLEU-1..4 and the COCO metrics.

Usage:
    python evaluate_bleu.py --features data/features.pkl --data-dir data --model models/RUN \\
        --split test --beam 3 --output results/ [--images ../shared/flickr8k/Flicker8k_Dataset]

BLEU is reported two ways, both in results.json: "tutorial" (the tutorial's own computation,
to compare with its published numbers) and "standard" (the headline: sentinels stripped, the
original captions as references); plus diagnostics (distinct captions, words used, captions
copied from training, mean length, unfinished share). captioning/evaluation/metrics.py defines them.
The COCO caption metrics papers report (captioning/evaluation/coco_metrics.py, the pycocoevalcap package):
BLEU-1..4, ROUGE-L and CIDEr-D always, METEOR when Java is present (--java), SPICE never (it
cannot run offline); PTB tokenisation with Java, else a pure-Python one, named in results.json.
CIDEr-D's document frequencies come from the references of the split scored (COCO convention).

Reads:
    --features FILE   {image_id: vector} pickle (load_features) whose width equals the
                      model's feature_dim; for an attention/transformer model the spatial grid
                      file of extract_features.py --spatial (grids of the model's size).
    --data-dir DIR    prepare_text.py outputs: meta.json, tokenizer.json, splits.json,
                      descriptions.txt, references.json.
    --model PATH      train.py run folder, or its model.keras (model.keras + model.json).
    --images DIR      optional: the Flickr8k image folder, for the gallery.
Writes (into --output, each atomically, all after the scoring succeeded):
    results.json      {"bleu": {"tutorial": {bleu1..bleu4}, "standard": {...}}, "coco": {bleu_1..
                       bleu_4, meteor, rouge_l, cider_d, spice, tokenizer, not_computed}, "diagnostics",
                       "split", "n_images", "beam", "alpha", "model", "features", "data_dir",
                       "seconds" (whole run), "decode_seconds"}
    captions.tsv      header + one row per image: image_id, generated caption (no sentinels),
                      reference_1..reference_5 (the original captions), tab-separated.
    gallery.html      (only with --images) the first --gallery images as inline base64 JPEG
                      thumbnails with the generated caption and the references; for an
                      attention/transformer model also where it looked for each word.
"""
import argparse
import sys
import time
from pathlib import Path

from captioning.evaluation import coco_metrics, metrics
from captioning.evaluation.gallery import attention_data_uri, gallery_html, thumbnail_data_uri, write_captions_tsv
from captioning.data import text
from captioning.inference.captioner import Captioner
from captioning.inference.decoding import ALPHA, BEAM
from captioning.data.features import check_features, read_rows
from captioning.utils import HelpFormatter, PipelineError, atomic_write, run_cli, write_json

# ---- settings (argparse defaults) -------------------------------------------------------------
MODEL_DIR = "models/merge"
DATA_DIR = "data"
FEATURES = "data/features.pkl"
SPLIT = "test"
OUTPUT_DIR = "results"
GALLERY_IMAGES = 100       # images shown in gallery.html (inline base64 thumbnails, ~10 KB each)


# ---- command line -----------------------------------------------------------------------------
def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--features", default=FEATURES, help="features.pkl of the split's images")
    parser.add_argument("--data-dir", default=DATA_DIR, help="prepare_text.py output folder")
    parser.add_argument("--model", default=MODEL_DIR, help="train.py run folder, or its model.keras")
    parser.add_argument("--split", default=SPLIT, choices=["train", "dev", "test"], help="split to caption")
    parser.add_argument("--beam", type=int, default=BEAM, help="beam width (1 = greedy)")
    parser.add_argument("--alpha", type=float, default=ALPHA,
                        help="beam length normalisation exponent, for --beam >= 2 only "
                             "(beam 1 is the plain argmax loop)")
    parser.add_argument("--output", default=OUTPUT_DIR, help="folder for results.json etc.")
    parser.add_argument("--images", default=None, help="image folder, to write gallery.html")
    parser.add_argument("--gallery", type=int, default=GALLERY_IMAGES, help="images in the gallery")
    parser.add_argument("--java", default="auto", choices=["auto", "yes", "no"],
                        help="COCO metrics: Java for METEOR and the PTB tokenizer (auto = if present)")
    parser.add_argument("--limit", type=int, default=None,
                        help="score only the first N images of the split (quick checks)")
    args = parser.parse_args(argv)
    if args.beam < 1:
        parser.error("--beam must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise PipelineError(f"--limit must be at least 1 (got {args.limit})")
    return args


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    data_dir = Path(args.data_dir)
    meta = text.load_meta(data_dir)
    splits = text.load_splits(data_dir)
    descriptions = text.load_descriptions(data_dir / "descriptions.txt")
    references = text.load_references(data_dir)
    captioner = Captioner(args.model, data_dir)

    ids = list(splits[args.split])[:args.limit]
    found, matrix, _ = read_rows(args.features, ids)    # a pooled pickle or a spatial grid file
    found = set(found)
    for image_id in ids:
        for what, table in (("features", found), ("descriptions.txt", descriptions),
                            ("references.json", references)):
            if image_id not in table:
                raise PipelineError(f"image {image_id} of split {args.split} has no {what} entry "
                                    f"({args.features if what == 'features' else data_dir / what})")
    check_features(matrix.shape, captioner.config, args.features)

    decode_started = time.time()
    id_lists = captioner.caption_ids(matrix, args.beam, args.alpha, progress=True)
    decode_seconds = time.time() - decode_started
    generated = [captioner.words(x) for x in id_lists]
    finished = [bool(x) and x[-1] == captioner.end_id for x in id_lists]

    coco = coco_metrics.score_captions({i: references[i] for i in ids},
                                       {i: " ".join(w) for i, w in zip(ids, generated)},
                                       java={"auto": "auto", "yes": True, "no": False}[args.java])
    start, end = meta["start_token"], meta["end_token"]
    training_captions = {c for i in splits["train"] for c in descriptions.get(i, [])}
    results = {
        "bleu": {
            "tutorial": metrics.tutorial_bleu([descriptions[i] for i in ids], generated, finished, start, end),
            "standard": metrics.standard_bleu([references[i] for i in ids], generated),
        },
        "coco": coco,
        "diagnostics": metrics.diagnostics(generated, finished, training_captions),
        "split": args.split, "n_images": len(ids), "beam": args.beam, "alpha": args.alpha,
        "model": str(args.model), "features": Path(args.features).name,
        "data_dir": str(args.data_dir), "decode_seconds": round(decode_seconds, 3),
    }
    gallery = None
    if args.images:
        rows = []
        shown = min(args.gallery, len(ids))
        # grid models: where each word looked (the same weights the decoder used)
        maps = (captioner.attention_maps(matrix[:shown], id_lists[:shown])
                if captioner.config.get("grid") else [None] * shown)
        for image_id, words, weights in zip(ids[:shown], generated[:shown], maps):
            path = next((p for p in Path(args.images).glob(image_id + ".*")), None)
            rows.append((image_id, thumbnail_data_uri(path) if path else None, " ".join(words),
                         references[image_id],
                         attention_data_uri(path, words, weights) if weights is not None else None))
        gallery = gallery_html(rows, f"{Path(args.model).name} on {args.split} (beam {args.beam})")
    results["seconds"] = round(time.time() - started, 3)

    output = Path(args.output)
    write_captions_tsv(output / "captions.tsv", ids, generated, [references[i] for i in ids])
    if gallery is not None:
        with atomic_write(output / "gallery.html") as handle:
            handle.write(gallery)
    write_json(output / "results.json", results)
    for mode in ("standard", "tutorial"):
        b = results["bleu"][mode]
        print(f"{mode:9s} BLEU-1..4: {b['bleu1']:.3f} {b['bleu2']:.3f} {b['bleu3']:.3f} {b['bleu4']:.3f}")
    meteor = "n/a (no Java)" if coco["meteor"] is None else f"{coco['meteor']:.3f}"
    print(f"COCO ({coco['tokenizer']} tokens) BLEU-1..4: {coco['bleu_1']:.3f} {coco['bleu_2']:.3f} "
          f"{coco['bleu_3']:.3f} {coco['bleu_4']:.3f}  METEOR {meteor}  ROUGE-L {coco['rouge_l']:.3f}  "
          f"CIDEr-D {coco['cider_d']:.3f}")
    d = results["diagnostics"]
    print(f"distinct captions {d['distinct_captions']}/{d['n_captions']}, vocabulary used "
          f"{d['vocabulary_used']}, copied from training {d['copied_from_training_share']:.1%}, "
          f"{results['seconds']:.1f} s -> {output / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
