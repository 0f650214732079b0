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
caption's top `rerank_top` images and each image's top `rerank_top` captions by the embedding,
so it runs on the whole split; its recalls are reported beside the plain ones, for each
weight W asked for.

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
from captioning.data.text import encode_caption, load_descriptions, load_splits
from captioning.retrieval import caption_scoring, folder_search, ranking, rerank, vse
from captioning.utils import PipelineError, sha256_file

SPLIT = "test"
CAPTIONER_IMAGES = 100   # images (and their captions) the captioner ranks; 0 = the whole split
RERANK_TOP = rerank.TOP_K          # images per caption and captions per image re-ranked
RERANK_WEIGHTS = (rerank.WEIGHT,)  # W of W * z(cosine) + (1 - W) * z(captioner score)
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


def captioner_ranking(captioner, matrix, captions, n_images):
    """(ranking of the captioner, caption_scoring.load_captioner's (model, config, tokenizer), on
    the first n_images, seconds)."""
    model, config, tokenizer = captioner
    subset = [(k, c) for k, c in captions if k < n_images]
    tokens = [encode_caption(tokenizer, c)[:config["max_length"]] for _, c in subset]
    started = time.time()
    scores = caption_scoring.caption_scores(model, config, matrix[:n_images], tokens, progress=True)
    return ranking.evaluate(scores, [k for k, _ in subset]), time.time() - started


def rerank_split(captioners, scores, matrix, captions, top_k=RERANK_TOP, weights=RERANK_WEIGHTS):
    """results.json's "rerank" dict and its table rows: both directions re-ranked by one or more
    captioners (captioning/retrieval/rerank.py) for each weight W, beside the plain embedding.
    captioners: {run folder: caption_scoring.load_captioner's (model, config, tokenizer)}.

    The pairs scored, each once per captioner: every caption's top K images (text -> image, and
    the caption prior of image -> text's PMI) and every image's top K captions, nearly all of
    which are among the former. K of 50 on Flickr8k's test split: 250,196 of its 5 million pairs. Several captioners act as one
    (a product of experts): a pair's log-likelihoods, length-normalised and total, are their
    means over the captioners, each reading the captions through its own tokenizer.
    """
    caption_image = np.array([k for k, _ in captions])
    n_images, n_captions = scores.shape
    rows = rerank.candidates(scores, caption_image, top_k)                # (K, captions) images
    cols = rerank.caption_candidates(scores, caption_image, top_k)        # (images, K') captions
    search_pairs = rows * n_captions + np.arange(n_captions)[None, :]
    annotation_pairs = np.arange(n_images)[:, None] * n_captions + cols
    pairs, where = np.unique(np.concatenate([search_pairs.ravel(), annotation_pairs.ravel()]),
                             return_inverse=True)
    normalised, total = np.zeros(pairs.size), np.zeros(pairs.size)
    started = time.time()
    for model, config, tokenizer in captioners.values():
        tokens = [encode_caption(tokenizer, c)[:config["max_length"]] for _, c in captions]
        lengths = np.array([len(t) - 1 for t in tokens], np.float64)    # words + endseq
        scored = caption_scoring.pair_scores(model, config, matrix, tokens, pairs // n_captions,
                                             pairs % n_captions, progress=True).astype(np.float64)
        normalised += scored / len(captioners)
        total += scored * lengths[pairs % n_captions] / len(captioners)
    seconds = time.time() - started
    likelihood = normalised[where[:search_pairs.size]].reshape(rows.shape)
    prior = rerank.caption_prior(total[where[:search_pairs.size]].reshape(rows.shape))
    pmi = rerank.pointwise_mi(total[where[search_pairs.size:]].reshape(cols.shape), prior, cols)
    out = {"captioner": " + ".join(str(d) for d in captioners), "top_k": int(rows.shape[0]),
           "captions_rescored": int(len(rerank.movable(scores, caption_image, rows.shape[0])[0])),
           "images_rescored": int(np.any(caption_image[cols] == np.arange(n_images)[:, None], axis=1).sum()),
           "pairs": int(pairs.size), "seconds": round(seconds, 1), "by_weight": []}
    table = []
    for weight in weights:
        found = {"image_to_text": ranking.summarize(rerank.image_to_text_ranks(scores, caption_image, cols, pmi, weight)),
                 "text_to_image": ranking.summarize(rerank.text_to_image_ranks(scores, caption_image, rows,
                                                                               likelihood, weight))}
        row = {"weight": float(weight), **found,
               "rsum": float(sum(d[f"r{n}"] for d in found.values() for n in ranking.RECALL_AT))}
        out["by_weight"].append(row)
        table.append((f"re-ranked top {rows.shape[0]}, W {weight:g}", row))
    return out, table


def evaluate_split(model_dir, split=SPLIT, features=None, data_dir=None, captioner=None,
                   captioner_images=CAPTIONER_IMAGES, images=None, weights=WEIGHTS,
                   rerank_captioner=None, rerank_top=RERANK_TOP, rerank_weights=RERANK_WEIGHTS):
    """-> (results.json's dict, table rows [(label, ranking.evaluate's dict)]).

    images: a folder of the split's photos, embedded through the model's backbone with
    `weights`, instead of a features pickle (`features`). rerank_captioner: a run folder or a
    list of them (rerank_split).

    results: {"split", "images", "captions", "embedding": {image_to_text, text_to_image, rsum},
    "subset": null or {"images", "captions", "which", "embedding", "captioner"}, "rerank": null
    or {"captioner", "top_k", "captions_rescored", "images_rescored", "pairs", "seconds",
    "by_weight": [{"weight", "image_to_text", "text_to_image", "rsum"}]}, "model",
    "captioner_model", "features", "features_sha256", "images_dir", "data_dir", "seconds", "captioner_seconds" (with a
    captioner)}. With `images`, "features" and "features_sha256" are null.
    """
    if features and images:
        raise PipelineError("give a features file or an image folder, not both")
    started = time.time()
    model, config, tokenizer = vse.load_embedding(model_dir, data_dir)
    data_dir = Path(data_dir or config["data_dir"])
    # every captioner is read and checked against the embedding before any scoring
    if isinstance(rerank_captioner, (str, Path)):
        rerank_captioner = [rerank_captioner]
    rerankers = {d: caption_scoring.load_captioner(d, config["feature_dim"], config.get("backbone"))
                 for d in rerank_captioner or []}
    ranker = caption_scoring.load_captioner(captioner, config["feature_dim"]) if captioner else None
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
    if rerankers:
        results["rerank"], rerank_rows = rerank_split(rerankers, scores, matrix, captions,
                                                      rerank_top, rerank_weights)
        rows += rerank_rows
    if captioner:
        n = min(captioner_images or len(ids), len(ids))
        columns = [j for j, (k, _) in enumerate(captions) if k < n]
        by_captioner, seconds = captioner_ranking(ranker, matrix, captions, n)
        results["subset"] = {"images": n, "captions": len(columns), "which": f"first {n} image ids of "
                             f"the split (sorted) and their captions",
                             "embedding": ranking.evaluate(scores[:n][:, columns], [caption_image[j] for j in columns]),
                             "captioner": by_captioner}
        results["captioner_seconds"] = round(seconds, 1)
        rows += [(f"embedding, first {n} images", results["subset"]["embedding"]),
                 (f"captioner log-lik, first {n} images", by_captioner)]
    results["seconds"] = round(time.time() - started, 1)
    return results, rows
