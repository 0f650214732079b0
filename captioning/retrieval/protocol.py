"""evaluate_retrieval.py's engine: a split's images and captions ranked by the joint embedding
and, optionally, by a captioner, with the metrics of captioning/retrieval/ranking.py.

    results, rows = evaluate_split("models/vse", split="test", captioner="models/ls-bleu")
    print(ranking.format_table(rows))

The embedding scores every (image, caption) pair of the split by cosine. A captioner scores a
pair by the caption's length-normalised log-likelihood given the image
(captioning/retrieval/caption_scoring.py): a softmax over the vocabulary per word per pair, so
it ranks only the first `captioner_images` images of the split (sorted ids) and their
captions, and the embedding is scored on that subset too, side by side.

Reads: the retrieval run folder (model.keras, model.json), the features pickle (default the
features_file in model.json; its width must be the model's), data_dir's tokenizer.json
(checked against the model), descriptions.txt and splits.json; the captioner's run folder and
its own tokenizer (its model.json's data_dir). Writes nothing (the script writes results.json).
"""
import time
from pathlib import Path

import numpy as np

from captioning.data.features import load_features
from captioning.data.text import encode_caption, load_descriptions, load_splits, load_tokenizer
from captioning.models.registry import load_run
from captioning.retrieval import caption_scoring, ranking, vse
from captioning.utils import PipelineError, sha256_file

SPLIT = "test"
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


def captioner_ranking(captioner_dir, matrix, captions, n_images):
    """(ranking of the captioner on the first n_images, seconds)."""
    model, config = load_run(captioner_dir)   # checks its tokenizer's sha256
    if config["feature_dim"] != matrix.shape[1]:
        raise PipelineError(f"captioner {captioner_dir} was trained on {config['feature_dim']}-d "
                            f"features, these are {matrix.shape[1]}-d")
    tokenizer = load_tokenizer(Path(config["data_dir"]) / "tokenizer.json")
    subset = [(k, c) for k, c in captions if k < n_images]
    tokens = [encode_caption(tokenizer, c)[:config["max_length"]] for _, c in subset]
    started = time.time()
    scores = caption_scoring.caption_scores(model, config, matrix[:n_images], tokens, progress=True)
    return ranking.evaluate(scores, [k for k, _ in subset]), time.time() - started


def evaluate_split(model_dir, split=SPLIT, features=None, data_dir=None, captioner=None,
                   captioner_images=CAPTIONER_IMAGES):
    """-> (results.json's dict, table rows [(label, ranking.evaluate's dict)]).

    results: {"split", "images", "captions", "embedding": {image_to_text, text_to_image, rsum},
    "subset": null or {"images", "captions", "which", "embedding", "captioner"}, "model",
    "captioner_model", "features", "features_sha256", "data_dir", "seconds",
    "captioner_seconds" (with a captioner)}.
    """
    started = time.time()
    model, config, tokenizer = vse.load_embedding(model_dir, data_dir)
    data_dir = Path(data_dir or config["data_dir"])
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
               "embedding": ranking.evaluate(scores, caption_image), "subset": None,
               "model": str(model_dir), "captioner_model": captioner,
               "features": features_path.name, "features_sha256": sha256_file(features_path),
               "data_dir": str(data_dir)}
    rows = [(f"embedding, {len(ids)} images", results["embedding"])]
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
