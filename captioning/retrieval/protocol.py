"""evaluate_retrieval.py's engine: a split's images and captions ranked by the joint embedding
and, optionally, by a captioner, with the metrics of captioning/retrieval/ranking.py.

    results, rows = evaluate_split("models/vse", split="test", captioner="models/ls-bleu")
    print(ranking.format_table(rows))

The embedding scores every (image, caption) pair of the split by cosine. A captioner scores a
pair by the caption's length-normalised log-likelihood given the image
(captioning/retrieval/caption_scoring.py): a softmax over the vocabulary per word per pair, so
it ranks only the first `captioner_images` images of the split (sorted ids) and their
captions, and the embedding is scored on that subset too, side by side.

Re-ranking (captioning/retrieval/rerank.py) needs far fewer pairs: a captioner re-orders each
caption's top `rerank_top` images by the embedding, so it runs on the whole split; its
text -> image recall is reported beside the plain one, for each weight W asked for.

Image vectors come from a features pickle, or from the split's photos (`images`, a folder
holding <image id>.<ext> files) through the extractor of the backbone recorded in model.json
(captioning/retrieval/folder_search.py's, the one search_images.py uses). Every photo of the
split must be there and readable, else PipelineError naming the file.

Reads: the retrieval run folder (model.keras, model.json), the features pickle (default the
features_file in model.json; its width must be the model's) or the photos, data_dir's
tokenizer.json (checked against the model), descriptions.txt and splits.json; the captioners'
run folders and their own tokenizers (tokenizer.json beside the model, else its model.json's
data_dir). Writes nothing (the script writes results.json).
"""
import time
from pathlib import Path

import numpy as np

from captioning.data.features import load_features
from captioning.data.images import list_images, load_rgb
from captioning.encoders import backbones
from captioning.data.text import encode_caption, load_descriptions, load_splits, load_tokenizer
from captioning.models.registry import load_run
from captioning.retrieval import caption_scoring, folder_search, ranking, rerank, vse
from captioning.utils import PipelineError, sha256_file

SPLIT = "test"
CAPTIONER_IMAGES = 100   # images (and their captions) the captioner ranks; 0 = the whole split
RERANK_TOP = 50          # images per caption the re-ranking captioner re-orders; its cost grows
                         # linearly with it. 50 and W 0.3 were the best on the Lite0 dev split
RERANK_WEIGHTS = (0.3,)  # W of W * z(cosine) + (1 - W) * z(log-likelihood) (docs/results.md)
WEIGHTS = folder_search.WEIGHTS   # extractor weights for `images` (imagenet | none | PATH)


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


def photo_matrix(split, ids, folder, config, weights=WEIGHTS):
    """(images, D) features of the split's photos in `folder`, in the order of ids, through the
    extractor of the model's backbone. PipelineError naming the first missing or unreadable
    photo, so nothing is scored from part of a split.

    Every photo is decoded once before the extraction: a bad file stops the run at once, not
    after minutes of extraction (and without the extractor's skipped-file note). On Flickr8k's
    JPEGs that costs a few ms a photo, a few percent of the extraction.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PipelineError(f"image folder not found ({folder})")
    files = {p.stem: p for p in list_images(folder)}
    for image_id in ids:
        if image_id not in files:
            raise PipelineError(f"missing photo {folder / (image_id + '.jpg')} of image {image_id} "
                                f"(split {split})")
    features_of = folder_search.extractor_source(config, weights)   # checks width and weights
    size = backbones.get(config["backbone"]).image_size
    for image_id in ids:
        try:
            load_rgb(files[image_id], size)
        except PipelineError as exc:
            raise PipelineError(f"cannot use photo {files[image_id]} of split {split}: {exc}") from None
    found, failures = features_of([files[i] for i in ids])
    if failures:
        path, reason = failures[0]
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise PipelineError(f"cannot use photo {path} of split {split}: {reason}{more}")
    return np.stack([found[i] for i in ids])


def load_captioner(captioner_dir, width):
    """(keras model, model.json, tokenizer) of a train.py run folder whose features are `width`-d.
    Its tokenizer: tokenizer.json beside the model (a shipped model), else its data_dir's."""
    beside = Path(captioner_dir) / "tokenizer.json"
    tokenizer_path = beside if beside.is_file() else None
    model, config = load_run(captioner_dir, tokenizer_path)   # checks its tokenizer's sha256
    if config["feature_dim"] != width:
        raise PipelineError(f"captioner {captioner_dir} was trained on {config['feature_dim']}-d "
                            f"features, these are {width}-d")
    tokenizer = load_tokenizer(tokenizer_path or Path(config["data_dir"]) / "tokenizer.json")
    return model, config, tokenizer


def captioner_ranking(captioner_dir, matrix, captions, n_images):
    """(ranking of the captioner on the first n_images, seconds)."""
    model, config, tokenizer = load_captioner(captioner_dir, matrix.shape[1])
    subset = [(k, c) for k, c in captions if k < n_images]
    tokens = [encode_caption(tokenizer, c)[:config["max_length"]] for _, c in subset]
    started = time.time()
    scores = caption_scoring.caption_scores(model, config, matrix[:n_images], tokens, progress=True)
    return ranking.evaluate(scores, [k for k, _ in subset]), time.time() - started


def rerank_search(captioner_dir, scores, matrix, captions, top_k=RERANK_TOP, weights=RERANK_WEIGHTS):
    """results.json's "rerank" dict and its table rows: text -> image re-ranked by a captioner
    (captioning/retrieval/rerank.py) for each weight W, beside the plain embedding.

    Only captions whose own image is in their top K can move, so only their K candidate pairs
    are scored; the ranks of the others are the embedding's by construction. Re-ranking leaves
    image -> text alone: each row's image_to_text is the embedding's, and its rsum differs from
    the embedding's by the text -> image recalls only.
    """
    model, config, tokenizer = load_captioner(captioner_dir, matrix.shape[1])
    caption_image = np.array([k for k, _ in captions])
    rows = rerank.candidates(scores, caption_image, top_k)
    k = rows.shape[0]
    cols, _ = rerank.movable(scores, caption_image, k)
    tokens = [encode_caption(tokenizer, c)[:config["max_length"]] for _, c in captions]
    started = time.time()
    scored = caption_scoring.pair_scores(model, config, matrix, tokens, rows[:, cols].ravel(),
                                         np.tile(cols, k), progress=True)
    seconds = time.time() - started
    likelihood = np.full(rows.shape, np.nan)
    likelihood[:, cols] = scored.reshape(k, len(cols))
    plain = ranking.evaluate(scores, caption_image)
    out = {"captioner": str(captioner_dir), "top_k": k, "captions_rescored": int(len(cols)),
           "pairs": int(scored.size), "seconds": round(seconds, 1), "by_weight": []}
    table = []
    for weight in weights:
        search = ranking.summarize(rerank.text_to_image_ranks(scores, caption_image, rows, likelihood, weight))
        row = {"weight": float(weight), "image_to_text": plain["image_to_text"], "text_to_image": search,
               "rsum": float(sum(d[f"r{n}"] for d in (plain["image_to_text"], search)
                                 for n in ranking.RECALL_AT))}
        out["by_weight"].append(row)
        table.append((f"re-ranked top {k}, W {weight:g}", row))
    return out, table


def evaluate_split(model_dir, split=SPLIT, features=None, data_dir=None, captioner=None,
                   captioner_images=CAPTIONER_IMAGES, images=None, weights=WEIGHTS,
                   rerank_captioner=None, rerank_top=RERANK_TOP, rerank_weights=RERANK_WEIGHTS):
    """-> (results.json's dict, table rows [(label, ranking.evaluate's dict)]).

    images: a folder of the split's photos, embedded through the model's backbone with
    `weights`, instead of a features pickle (`features`).

    results: {"split", "images", "captions", "embedding": {image_to_text, text_to_image, rsum},
    "subset": null or {"images", "captions", "which", "embedding", "captioner"}, "rerank": null
    or {"captioner", "top_k", "captions_rescored", "pairs", "seconds", "by_weight": [{"weight",
    "image_to_text", "text_to_image", "rsum"}]}, "model", "captioner_model", "features",
    "features_sha256", "images_dir", "data_dir", "seconds", "captioner_seconds" (with a
    captioner)}. With `images`, "features" and "features_sha256" are null.
    """
    if features and images:
        raise PipelineError("give a features file or an image folder, not both")
    started = time.time()
    model, config, tokenizer = vse.load_embedding(model_dir, data_dir)
    data_dir = Path(data_dir or config["data_dir"])
    if images:
        features_path = None
        ids = list(load_splits(data_dir)[split])
        table = dict(zip(ids, photo_matrix(split, ids, images, config, weights)))
    else:
        features_path = Path(features or config["features_file"])
        if not features_path.is_file():
            raise PipelineError(f"features file not found ({features_path})")
        table = load_features(features_path)
    ids, captions = split_items(split, data_dir, table, config["feature_dim"])
    if not ids:
        raise PipelineError(f"split {split} is empty ({data_dir / 'splits.json'})")
    matrix = np.stack([table[i] for i in ids])
    del table
    scores = embedding_scores(model, config, tokenizer, matrix, captions)
    caption_image = [k for k, _ in captions]
    results = {"split": split, "images": len(ids), "captions": len(captions),
               "embedding": ranking.evaluate(scores, caption_image), "subset": None, "rerank": None,
               "model": str(model_dir), "captioner_model": captioner,
               "features": features_path.name if features_path else None,
               "features_sha256": sha256_file(features_path) if features_path else None,
               "images_dir": str(images) if images else None, "data_dir": str(data_dir)}
    rows = [(f"embedding, {len(ids)} images", results["embedding"])]
    if rerank_captioner:
        results["rerank"], rerank_rows = rerank_search(rerank_captioner, scores, matrix, captions,
                                                       rerank_top, rerank_weights)
        rows += rerank_rows
    if captioner:
        n = min(captioner_images or len(ids), len(ids))
        columns = [j for j, (k, _) in enumerate(captions) if k < n]
        by_captioner, seconds = captioner_ranking(captioner, matrix, captions, n)
        results["subset"] = {"images": n, "captions": len(columns), "which": f"first {n} image ids of "
                             f"the split (sorted) and their captions",
                             "embedding": ranking.evaluate(scores[:n][:, columns], [caption_image[j] for j in columns]),
                             "captioner": by_captioner}
        results["captioner_seconds"] = round(seconds, 1)
        rows += [(f"embedding, first {n} images", results["subset"]["embedding"]),
                 (f"captioner log-lik, first {n} images", by_captioner)]
    results["seconds"] = round(time.time() - started, 1)
    return results, rows
