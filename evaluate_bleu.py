"""Stage 6: caption every image of a split and score the captions with corpus BLEU-1..4.

Usage:
    python evaluate_bleu.py --features data/features.pkl --data-dir data --model models/RUN \\
        --split test --beam 3 --output results/ [--images ../shared/flickr8k/Flicker8k_Dataset]

BLEU is reported two ways (NLTK corpus_bleu, no smoothing), both in results.json:
    tutorial  exactly as J. Brownlee's Flickr8k tutorial computes it, to compare with its
              published 0.579/0.345/0.252/0.131: references are the TRAINING-CLEANED captions
              (descriptions.txt) wrapped as "startseq ... endseq"; the hypothesis keeps
              "startseq" and "endseq" (when generated); weights (1,0,0,0), (.5,.5,0,0),
              (.3,.3,.3,0) [sic: sums to 0.9, the tutorial's], (.25,.25,.25,.25). The free
              sentinel matches and the references cleaned the same way as the training text
              inflate it.
    standard  the way papers report it, the headline number: sentinels stripped, weights 1/n,
              references = the 5 ORIGINAL captions (references.json) lowercased with every
              punctuation character deleted ("dog's" -> "dogs"), never the training-cleaned ones,
              so a cleaning that drops words (e.g. "a") cannot make its own references easier.
Diagnostics (results.json "diagnostics"): share of distinct captions, number of distinct words
used, share of generated captions that are copied verbatim from a training caption (cleaned
text), mean caption length, share that never produced endseq (truncated at max_length).

Reads:
    --features FILE   {image_id: vector} pickle (load_features); its width must
                      equal the model's feature_dim.
    --data-dir DIR    prepare_text.py outputs: meta.json, tokenizer.json, splits.json,
                      descriptions.txt, references.json.
    --model DIR       train.py run folder (model.keras, model.json).
    --images DIR      optional: the Flickr8k image folder, for the gallery.
Writes (into --output, each atomically, all after the scoring succeeded):
    results.json      {"bleu": {"tutorial": {bleu1..bleu4}, "standard": {...}}, "diagnostics",
                       "split", "n_images", "beam", "alpha", "model", "features", "data_dir",
                       "seconds" (whole run), "decode_seconds"}
    captions.tsv      header + one row per image: image_id, generated caption (no sentinels),
                      reference_1..reference_5 (the original captions), tab-separated.
    gallery.html      (only with --images) the first --gallery images as inline base64 JPEG
                      thumbnails with the generated caption and the references.
"""
import argparse
import base64
import html
import io
import os
import string
import sys
import time
from pathlib import Path

from generate_caption import ALPHA, BEAM, DATA_DIR, MODEL_DIR  # decoding defaults: one place
from captioning import text
from captioning.features import load_features
from captioning.utils import PipelineError, atomic_write, run_cli, write_json

# ---- settings (argparse defaults) -------------------------------------------------------------
FEATURES = "data/features.pkl"
SPLIT = "test"
OUTPUT_DIR = "results"
GALLERY_IMAGES = 100       # images shown in gallery.html (inline thumbnails, ~10 KB each)
THUMBNAIL_PIXELS = 224     # longest side of a gallery thumbnail

TUTORIAL_WEIGHTS = [(1.0, 0, 0, 0), (0.5, 0.5, 0, 0), (0.3, 0.3, 0.3, 0), (0.25, 0.25, 0.25, 0.25)]
STANDARD_WEIGHTS = [(1.0,), (1 / 2,) * 2, (1 / 3,) * 3, (1 / 4,) * 4]
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


# ---- BLEU assembly (plain functions, unit-tested) ---------------------------------------------
def bleu_scores(references, hypotheses, weights_list):
    """NLTK corpus BLEU for each weight tuple -> {"bleu1": ..., "bleu2": ...}.

    references: per hypothesis, a list of token lists; hypotheses: token lists.
    """
    import warnings
    from nltk.translate.bleu_score import corpus_bleu
    with warnings.catch_warnings():          # NLTK warns when an n-gram order has no match (BLEU 0)
        warnings.simplefilter("ignore")
        return {f"bleu{n}": float(corpus_bleu(references, hypotheses, weights=w))
                for n, w in enumerate(weights_list, start=1)}


def standard_tokens(text):
    """An original caption -> tokens: lowercase, punctuation characters deleted, split on space."""
    return text.lower().translate(_PUNCT_TABLE).split()


def tutorial_reference(cleaned_caption, start_token, end_token):
    """A training-cleaned caption -> the tutorial's reference tokens, sentinels included."""
    return [start_token] + cleaned_caption.split() + [end_token]


def tutorial_hypothesis(words, finished, start_token, end_token):
    """Generated words -> the tutorial's hypothesis: startseq kept, endseq if it was generated."""
    return [start_token] + list(words) + ([end_token] if finished else [])


def tutorial_bleu(cleaned_refs, generated, finished, start_token, end_token):
    """Tutorial-mode BLEU-1..4. cleaned_refs: per image, its cleaned captions (strings);
    generated: per image, the generated words; finished: per image, whether endseq was generated."""
    refs = [[tutorial_reference(c, start_token, end_token) for c in caps] for caps in cleaned_refs]
    hyps = [tutorial_hypothesis(w, f, start_token, end_token) for w, f in zip(generated, finished)]
    return bleu_scores(refs, hyps, TUTORIAL_WEIGHTS)


def standard_bleu(original_refs, generated):
    """Standard BLEU-1..4: original captions normalised by standard_tokens, no sentinels."""
    refs = [[standard_tokens(c) for c in caps] for caps in original_refs]
    return bleu_scores(refs, [list(w) for w in generated], STANDARD_WEIGHTS)


def diagnostics(generated, finished, training_captions):
    """Numbers that expose a model saying the same thing for every image.

    generated: list of word lists; training_captions: set of cleaned training caption strings.
    """
    texts = [" ".join(words) for words in generated]
    n = max(len(texts), 1)
    return {
        "n_captions": len(texts),
        "distinct_share": len(set(texts)) / n,
        "distinct_captions": len(set(texts)),
        "vocabulary_used": len({w for words in generated for w in words}),
        "copied_from_training_share": sum(t in training_captions for t in texts) / n,
        "mean_length_words": sum(len(w) for w in generated) / n,
        "unfinished_share": sum(not f for f in finished) / n,
    }


# ---- outputs ----------------------------------------------------------------------------------
def _cell(text):
    return " ".join(str(text).split())      # no tabs/newlines inside a TSV cell


def write_captions_tsv(path, ids, generated, references):
    with atomic_write(path) as handle:
        width = max((len(r) for r in references), default=5)
        handle.write("\t".join(["image_id", "generated"] +
                               [f"reference_{i}" for i in range(1, width + 1)]) + "\n")
        for image_id, words, refs in zip(ids, generated, references):
            handle.write("\t".join([image_id, _cell(" ".join(words))] + [_cell(r) for r in refs]) + "\n")


def thumbnail_data_uri(path, pixels=THUMBNAIL_PIXELS):
    """An image file -> 'data:image/jpeg;base64,...' thumbnail, or None if unreadable."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((pixels, pixels))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=80)
    except (OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def gallery_html(rows, title):
    """rows: (image_id, data_uri or None, generated caption, [references]) -> HTML text."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif}figure{display:inline-block;width:300px;"
             "vertical-align:top;margin:8px}figcaption b{color:#036}li{font-size:85%}</style>",
             f"<h1>{html.escape(title)}</h1>"]
    for image_id, uri, caption, refs in rows:
        img = (f"<img src='{uri}' alt='{html.escape(image_id)}' width='224'>" if uri
               else "<p>(image not found)</p>")
        items = "".join(f"<li>{html.escape(r)}</li>" for r in refs)
        parts.append(f"<figure>{img}<figcaption><small>{html.escape(image_id)}</small><br>"
                     f"<b>{html.escape(caption)}</b><ul>{items}</ul></figcaption></figure>")
    return "\n".join(parts) + "\n"


# ---- command line -----------------------------------------------------------------------------
def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--features", default=FEATURES, help="features.pkl of the split's images")
    parser.add_argument("--data-dir", default=DATA_DIR, help="prepare_text.py output folder")
    parser.add_argument("--model", default=MODEL_DIR, help="train.py run folder")
    parser.add_argument("--split", default=SPLIT, choices=["train", "dev", "test"], help="split to caption")
    parser.add_argument("--beam", type=int, default=BEAM, help="beam width (1 = greedy)")
    parser.add_argument("--alpha", type=float, default=ALPHA, help="beam length normalisation exponent")
    parser.add_argument("--output", default=OUTPUT_DIR, help="folder for results.json etc.")
    parser.add_argument("--images", default=None, help="image folder, to write gallery.html")
    parser.add_argument("--gallery", type=int, default=GALLERY_IMAGES, help="images in the gallery")
    parser.add_argument("--limit", type=int, default=None,
                        help="score only the first N images of the split (quick checks)")
    args = parser.parse_args(argv)
    if args.beam < 1:
        parser.error("--beam must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import generate_caption as gc
    data_dir = Path(args.data_dir)
    meta = text.load_meta(data_dir)
    splits = text.load_splits(data_dir)
    descriptions = text.load_descriptions(data_dir / "descriptions.txt")
    references = text.load_references(data_dir)
    model, config, tokenizer = gc.load_captioner(args.model, data_dir)
    features = load_features(args.features)

    ids = list(splits[args.split])[:args.limit]
    for image_id in ids:
        for what, table in (("features", features), ("descriptions.txt", descriptions),
                            ("references.json", references)):
            if image_id not in table:
                raise PipelineError(f"image {image_id} of split {args.split} has no {what} entry "
                                    f"({args.features if what == 'features' else data_dir / what})")
    matrix = np.stack([features[i] for i in ids])

    decode_started = time.time()
    id_lists = gc.caption_features(model, config, tokenizer, matrix, args.beam, args.alpha, progress=True)
    decode_seconds = time.time() - decode_started
    id_to_word, _, end_id, _ = gc.vocabulary(tokenizer)
    generated = [gc.ids_to_words(id_to_word, x, end_id) for x in id_lists]
    finished = [bool(x) and x[-1] == end_id for x in id_lists]

    start, end = meta["start_token"], meta["end_token"]
    training = {c for i in splits["train"] for c in descriptions.get(i, [])}
    results = {
        "bleu": {
            "tutorial": tutorial_bleu([descriptions[i] for i in ids], generated, finished, start, end),
            "standard": standard_bleu([references[i] for i in ids], generated),
        },
        "diagnostics": diagnostics(generated, finished, training),
        "split": args.split, "n_images": len(ids), "beam": args.beam, "alpha": args.alpha,
        "model": str(args.model), "features": Path(args.features).name,
        "data_dir": str(args.data_dir), "decode_seconds": round(decode_seconds, 3),
    }
    gallery = None
    if args.images:
        rows = []
        for image_id, words in list(zip(ids, generated))[:args.gallery]:
            path = next((p for p in Path(args.images).glob(image_id + ".*")), None)
            rows.append((image_id, thumbnail_data_uri(path) if path else None, " ".join(words),
                         references[image_id]))
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
    d = results["diagnostics"]
    print(f"distinct captions {d['distinct_captions']}/{d['n_captions']}, vocabulary used "
          f"{d['vocabulary_used']}, copied from training {d['copied_from_training_share']:.1%}, "
          f"{results['seconds']:.1f} s -> {output / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
