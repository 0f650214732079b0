"""Score a captioner on a split: caption every image, BLEU two ways, the COCO metrics, diagnostics.

evaluate_bleu.py is its command line:
    evaluation = evaluate_split("models/merge", "data", "data/features.pkl", split="test", beam=3)
    write_evaluation("results/", evaluation)      # captions.tsv, gallery.html, results.json
    print("\n".join(summary_lines(evaluation.results, "results/results.json")))

Reads:
    data_dir      prepare_text.py outputs: meta.json, tokenizer.json, splits.json,
                  descriptions.txt (tutorial BLEU's references), references.json (the
                  original captions: standard BLEU's and the COCO metrics' references).
    features      {image_id: vector} pickle whose width is the model's feature_dim, or for an
                  attention/transformer model the spatial grid file (grids of the model's size);
                  for a model trained with a fine-tuned top (train.py --finetune-top) the trunk
                  file (extract_features.py --trunk): its grids are that top's output.
    model         train.py run folder, or its model.keras; several: an ensemble
                  (captioning/inference/ensemble.py).
    images_dir    optional: the image folder, for the gallery's thumbnails.
Writes (write_evaluation, each atomically, results.json last):
    results.json  {"bleu": {"tutorial": {bleu1..bleu4}, "standard": {...}}, "coco": {bleu_1..
                   bleu_4, meteor, rouge_l, cider_d, spice, tokenizer, not_computed},
                   "diagnostics", "split", "n_images", "beam", "alpha", "model", "features",
                   "data_dir", "seconds" (whole run), "decode_seconds", for an ensemble
                   "members" (its model paths; "model" joins them with " + "), with consensus
                   re-ranking "consensus": {"features", "k", "weight", "candidates" (mean per
                   image), "changed" (images whose caption is not the beam's own choice)}}
    captions.tsv  header + one row per image: image_id, generated caption (no sentinels),
                  reference_1..reference_5 (the original captions), tab-separated.
    gallery.html  (with images_dir) the first `gallery` images as inline JPEG thumbnails with the
                  generated caption and the references; for a grid model also where it looked.
BLEU's two modes and the diagnostics: captioning/evaluation/metrics.py. The COCO metrics:
captioning/evaluation/coco_metrics.py (CIDEr-D's document frequencies from the split's references).
"""
import time
from dataclasses import dataclass
from pathlib import Path

from captioning.data import text
from captioning.data.features import read_rows
from captioning.evaluation import coco_metrics, metrics
from captioning.evaluation.gallery import attention_data_uri, gallery_html, thumbnail_data_uri, write_captions_tsv
from captioning.inference import consensus as reranking, ensemble
from captioning.inference.decoding import ALPHA, BEAM
from captioning.utils import PipelineError, atomic_write, write_json

SPLIT = "test"
GALLERY_IMAGES = 100       # images shown in gallery.html (inline base64 thumbnails, ~10 KB each)


@dataclass
class Evaluation:
    """What one scoring run produced; nothing is written until write_evaluation."""
    ids: list               # image ids of the split, in splits.json's order
    generated: list         # per image, the generated words (no sentinels)
    references: list        # per image, its original captions
    results: dict           # results.json's content
    gallery: str = None     # gallery.html's text, or None without an image folder


def split_matrix(features, ids, split, descriptions, references, data_dir, read=None):
    """Feature matrix (N, D), or grids (N, G, C), of the split's images `ids`, in their order.

    read: (path, ids) -> (found ids, matrix) (a Captioner's read_features: a fine-tuned
    model's grids from a trunk file); default read_rows (a pooled pickle or a spatial grid
    file). Every image needs features, a descriptions.txt entry and a references.json entry: a
    missing one is a PipelineError naming the image and the file.
    """
    found, matrix = read(features, ids) if read else read_rows(features, ids)[:2]
    found = set(found)
    for image_id in ids:
        for what, table in (("features", found), ("descriptions.txt", descriptions),
                            ("references.json", references)):
            if image_id not in table:
                raise PipelineError(f"image {image_id} of split {split} has no {what} entry "
                                    f"({features if what == 'features' else Path(data_dir) / what})")
    return matrix


def evaluate_split(model, data_dir, features, split=SPLIT, beam=BEAM, alpha=ALPHA, java="auto",
                   limit=None, images_dir=None, gallery=GALLERY_IMAGES, consensus=None):
    """Caption the split's images (the first `limit`) and score them -> Evaluation.

    model: a run folder (or its model.keras), or a list of them: several are one ensemble
    (captioning/inference/ensemble.py), recorded in results.json as "model" (the paths joined
    by " + ") and "members" (the list). features: a features file, or a list of them: each
    member reads the first that fits it (pooled vectors or grids of its size).
    java: the COCO metrics' Java use ("auto", True, False; METEOR and PTB tokens need it).
    consensus: a captioning.inference.consensus.Consensus: each image's caption is chosen from
    its beam's finished captions by agreement with its nearest training images (beam >= 2).
    """
    started = time.time()
    folder = Path(data_dir)
    models = [model] if isinstance(model, (str, Path)) else list(model)
    files = [features] if isinstance(features, (str, Path)) else list(features)
    meta, splits = text.load_meta(folder), text.load_splits(folder)
    descriptions = text.load_descriptions(folder / "descriptions.txt")
    references = text.load_references(folder)
    captioner = ensemble.load_captioner(models, folder)
    ids = list(splits[split])[:limit]
    ensembled = len(models) > 1
    # a fine-tuned member reads its top's grids of a trunk file, a frozen one the other files
    inputs, files = ensemble.member_features(
        captioner.members if ensembled else [captioner], files, [str(m) for m in models],
        lambda member, path: split_matrix(path, ids, split, descriptions, references, folder,
                                          member.read_features))

    decode_started = time.time()
    if consensus is None:
        id_lists = captioner.caption_ids(inputs if ensembled else inputs[0], beam, alpha, progress=True)
    else:
        queries = consensus.query_vectors(ids)      # before decoding: a missing vector fails at once
        id_lists, n_best, picks = reranking.caption_ids(captioner, inputs if ensembled else inputs[0],
                                                        consensus, queries, beam, alpha, ids, progress=True)
    decode_seconds = time.time() - decode_started
    generated = [captioner.words(x) for x in id_lists]
    finished = [bool(x) and x[-1] == captioner.end_id for x in id_lists]

    coco = coco_metrics.score_captions({i: references[i] for i in ids},
                                       {i: " ".join(w) for i, w in zip(ids, generated)}, java=java)
    start, end = meta["start_token"], meta["end_token"]
    training_captions = {c for i in splits["train"] for c in descriptions.get(i, [])}
    results = {
        "bleu": {
            "tutorial": metrics.tutorial_bleu([descriptions[i] for i in ids], generated, finished, start, end),
            "standard": metrics.standard_bleu([references[i] for i in ids], generated),
        },
        "coco": coco,
        "diagnostics": metrics.diagnostics(generated, finished, training_captions),
        "split": split, "n_images": len(ids), "beam": beam, "alpha": alpha,
        "model": " + ".join(str(m) for m in models),
        "features": " + ".join(Path(f).name for f in files),
        "data_dir": str(data_dir), "decode_seconds": round(decode_seconds, 3),
    }
    if ensembled:
        results["members"] = [str(m) for m in models]
    if consensus is not None:
        results["consensus"] = {"features": consensus.source, "k": consensus.k, "weight": consensus.weight,
                                "candidates": round(sum(len(o) for o in n_best) / len(n_best), 2),
                                "changed": sum(p != 0 for p in picks)}
    page = None
    if images_dir:
        shown = min(gallery, len(ids))
        title = " + ".join(Path(m).name for m in models)
        page = split_gallery(captioner, ids[:shown], inputs[0][:shown], id_lists[:shown],
                             generated[:shown], [references[i] for i in ids[:shown]], images_dir,
                             f"{title} on {split} (beam {beam})")
    results["seconds"] = round(time.time() - started, 3)
    return Evaluation(ids, generated, [references[i] for i in ids], results, page)


def split_gallery(captioner, ids, matrix, id_lists, generated, references, images_dir, title):
    """gallery.html's text for these images (their features, caption token ids and words, and
    references); grid models also show where each word looked (the decoder's own weights)."""
    maps = (captioner.attention_maps(matrix, id_lists) if captioner.config.get("grid")
            else [None] * len(ids))
    rows = []
    for image_id, words, refs, weights in zip(ids, generated, references, maps):
        path = next((p for p in Path(images_dir).glob(image_id + ".*")), None)
        rows.append((image_id, thumbnail_data_uri(path) if path else None, " ".join(words), refs,
                     attention_data_uri(path, words, weights) if weights is not None else None))
    return gallery_html(rows, title)


def write_evaluation(output, evaluation):
    """captions.tsv, gallery.html (if made) and results.json into `output`, each atomically."""
    output = Path(output)
    write_captions_tsv(output / "captions.tsv", evaluation.ids, evaluation.generated,
                       evaluation.references)
    if evaluation.gallery is not None:
        with atomic_write(output / "gallery.html") as handle:
            handle.write(evaluation.gallery)
    write_json(output / "results.json", evaluation.results)


def summary_lines(results, results_file):
    """What evaluate_bleu.py prints: BLEU in both modes, the COCO metrics, the diagnostics."""
    lines = []
    for mode in ("standard", "tutorial"):
        b = results["bleu"][mode]
        lines.append(f"{mode:9s} BLEU-1..4: {b['bleu1']:.3f} {b['bleu2']:.3f} {b['bleu3']:.3f} {b['bleu4']:.3f}")
    coco = results["coco"]
    meteor = "n/a (no Java)" if coco["meteor"] is None else f"{coco['meteor']:.3f}"
    lines.append(f"COCO ({coco['tokenizer']} tokens) BLEU-1..4: {coco['bleu_1']:.3f} {coco['bleu_2']:.3f} "
                 f"{coco['bleu_3']:.3f} {coco['bleu_4']:.3f}  METEOR {meteor}  ROUGE-L {coco['rouge_l']:.3f}  "
                 f"CIDEr-D {coco['cider_d']:.3f}")
    d = results["diagnostics"]
    lines.append(f"distinct captions {d['distinct_captions']}/{d['n_captions']}, vocabulary used "
                 f"{d['vocabulary_used']}, copied from training {d['copied_from_training_share']:.1%}, "
                 f"{results['seconds']:.1f} s -> {results_file}")
    return lines
