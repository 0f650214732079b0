"""Search a folder of photos by a sentence, or find the training captions closest to a photo.

Usage:
    python search_images.py "a dog jumping into water" --images DIR [--model models/vse] [--top 10]
    python search_images.py "two children on a beach" --images ../shared/flickr8k/Flicker8k_Dataset \\
        --features ../shared/flickr8k/features_efficientnet_lite0.pkl
    python search_images.py --image photo.jpg [--model models/vse] [--images TRAINING_IMAGES_DIR]

Text query: every image directly in --images is embedded once (then read from the cache), the
query sentence is embedded, and the --top closest images are printed, best first, as
`rank<TAB>cosine<TAB>file`, and shown in an HTML contact sheet (--html). Reverse (--image): the
photo is embedded, and the closest training captions and training images are printed (and
shown, with thumbnails when --images holds the training images).

Reads:
    --model DIR      train_retrieval.py's run folder: model.keras + model.json (feature_dim,
                     backbone, features_file, tokenizer_sha256, data_dir, ...).
    --data-dir DIR   tokenizer.json (+ descriptions.txt, splits.json for --image); default the
                     data_dir recorded in model.json. Its tokenizer must be the model's.
    --images DIR     the photos (captioning.data.images.list_images: image files directly in DIR).
                     Their features come from the extractor of the backbone named in model.json
                     (vgg16 or lite0, captioning/encoders/backbones.py, with --weights), exactly as
                     extract_features.py computes them, or with --features FILE from a features
                     pickle keyed by file name without extension. A file that cannot be decoded,
                     or has no entry in --features, is skipped and reported.
    --features FILE  optional precomputed features (read with the restricted unpickler).
Writes:
    --cache-dir/<key>.npz   image embeddings of a folder (numpy .npz, no pickle): file names,
                     sizes, mtimes, embeddings, skipped files with reasons. The key hashes the
                     folder's path, model.keras and the feature source; inside, each file's
                     (size, mtime) decides whether its row is reused, so only new or changed
                     files are embedded again. A corrupt cache is rebuilt. --image mode caches
                     the training captions' embeddings the same way (train-<key>.npz).
    --html FILE      the contact sheet (inline thumbnails, scores, the query), atomically.
"""
import argparse
import hashlib
import html
import json
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

from captioning.encoders import backbones

from captioning.retrieval import vse

from captioning.retrieval import vector_index
from captioning.data.features import load_features
from captioning.data.images import list_images
from captioning.data.text import encode_caption, load_descriptions, load_splits
from captioning.utils import HelpFormatter, PipelineError, atomic_write, run_cli, sha256_file
from captioning.evaluation.gallery import thumbnail_data_uri
from captioning.encoders.extract import BATCH_SIZE, build_model, extract, weights_fingerprint

# ---- settings (argparse defaults) --------------------------------------------------------------
MODEL_DIR = "models/vse"
TOP = 10
WEIGHTS = "imagenet"            # extractor weights (extract_features.py): imagenet | none | PATH
CACHE_DIR = "data/search_cache"
HTML = "results/search.html"
INDEX = "auto"                  # numpy | faiss | auto (faiss for very large folders, if installed)
CACHE_VERSION = 1               # bump when the cache layout changes: older files are rebuilt


# ---- image features ----------------------------------------------------------------------------
def build_extractor(backbone, weights, seed=0):
    """(keras model (H, W, 3) -> (D,), weights fingerprint) for the backbone of model.json.

    The backbones of captioning/encoders/backbones.py (vgg16, lite0) embed raw photos exactly as
    extract_features.py does. For any other name (or "unknown": features of unrecorded origin)
    nothing is guessed: pass --features with the photos' precomputed vectors.
    """
    if backbone not in backbones.ENCODERS:
        raise PipelineError(f"no extractor for backbone {backbone!r} of this model here (available: "
                            f"{', '.join(backbones.BACKBONES)}); pass --features FILE with the "
                            f"photos' precomputed features")
    return build_model(weights, seed, backbone), weights_fingerprint(weights, seed, backbone)


def check_width(width, config, source):
    if width != config["feature_dim"]:
        raise PipelineError(f"the model was trained on {config['feature_dim']}-d features (backbone "
                            f"{config.get('backbone')}) but {source} gives {width}-d; use a model "
                            f"trained on this backbone's features")


def extractor_source(config, weights):
    """A function paths -> ({stem: vector}, [(path, reason)]) through the model's backbone.

    The extractor is built and checked (width, weights) before any image is read.
    """
    backbone = config.get("backbone")
    model, fingerprint = build_extractor(backbone, weights)
    check_width(int(model.outputs[0].shape[-1]), config, f"the {config.get('backbone')} extractor")
    recorded = config.get("features_fingerprint")
    if recorded and not recorded.startswith(fingerprint):
        raise PipelineError(f"the model was trained on features made with {recorded.split(';')[0]}, "
                            f"but the extractor here uses {fingerprint}; pass the same --weights")

    def features_of(paths):
        # extract pads every batch to batch_size rows: a few photos need not cost a full batch
        return extract(model, paths, batch_size=max(1, min(len(paths), BATCH_SIZE)),
                       progress=True, backbone=backbone)   # the backbone's resize + scaling
    return features_of


def file_source(features_path, config):
    """A function paths -> ({stem: vector}, [(path, reason)]) reading a features pickle by stem."""
    table = load_features(features_path)
    if table:
        check_width(len(next(iter(table.values()))), config, f"{features_path}")

    def features_of(paths):
        found = {p.stem: table[p.stem] for p in paths if p.stem in table}
        return found, [(p, f"no features in {Path(features_path).name}") for p in paths if p.stem not in table]
    return features_of


def feature_source(config, args):
    return file_source(args.features, config) if args.features else extractor_source(config, args.weights)


# ---- the folder's embeddings, cached -----------------------------------------------------------
def signature(path):
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def cache_key(*parts):
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts]).encode()).hexdigest()[:24]


def read_cache(path):
    """The cached arrays as a dict, or {} if absent or unreadable (then it is rebuilt)."""
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        print(f"note: cache {path} is unreadable ({type(exc).__name__}); rebuilding it", file=sys.stderr)
        return {}


def write_cache(path, **arrays):
    with atomic_write(path, "wb") as handle:
        np.savez(handle, **arrays)


def folder_embeddings(folder, model, config, model_sha, args):
    """(file names, (N, d) embeddings, [(name, reason)] skipped) of every image in `folder`."""
    paths = list_images(folder)
    if not paths:
        raise PipelineError(f"no image files in {folder}")
    source = f"features {sha256_file(args.features)}" if args.features else f"extractor {args.weights}"
    cache_path = Path(args.cache_dir) / f"{cache_key(str(Path(folder).resolve()), model_sha, source)}.npz"
    cached = read_cache(cache_path)
    known = {}
    if cached:
        for k, name in enumerate(cached["names"]):
            known[str(name)] = (tuple(int(x) for x in cached["signatures"][k]), k)
    names, sigs, rows, reasons, todo = [], [], [], [], []
    for path in paths:
        sig = signature(path)
        hit = known.get(path.name)
        names.append(path.name)
        sigs.append(sig)
        if hit and hit[0] == sig:
            rows.append(cached["embeddings"][hit[1]])
            reasons.append(str(cached["reasons"][hit[1]]))
        else:
            rows.append(None)
            reasons.append("")
            todo.append(path)
    if todo:
        features_of = feature_source(config, args)
        print(f"embedding {len(todo)} of {len(paths)} images in {folder} "
              f"({len(paths) - len(todo)} from the cache)", file=sys.stderr)
        found, failures = features_of(todo)
        failed = {p.name: reason for p, reason in failures}
        have = [p for p in todo if p.name not in failed and p.stem in found]
        vectors = vse.embed_images(vse.image_encoder(model),
                                         np.stack([found[p.stem] for p in have])) if have else []
        fresh = dict(zip((p.name for p in have), vectors))
        for k, name in enumerate(names):
            if rows[k] is None:
                rows[k] = fresh.get(name, np.zeros(config["embed_dim"], np.float32))
                reasons[k] = failed.get(name, "" if name in fresh else "not embedded")
        write_cache(cache_path, names=np.array(names), signatures=np.array(sigs, np.int64),
                    embeddings=np.stack(rows).astype(np.float32), reasons=np.array(reasons))
    ok = [k for k, reason in enumerate(reasons) if not reason]
    skipped = [(names[k], reasons[k]) for k, reason in enumerate(reasons) if reason]
    embeddings = np.stack([rows[k] for k in ok]) if ok else np.zeros((0, config["embed_dim"]), np.float32)
    return [names[k] for k in ok], embeddings, skipped


# ---- reverse search: the training set ----------------------------------------------------------
def training_set(model, config, tokenizer, data_dir, model_sha, cache_dir):
    """(caption rows [(image_id, caption)], caption embeddings, image ids, image embeddings)."""
    descriptions = load_descriptions(Path(data_dir) / "descriptions.txt")
    train_ids = [i for i in load_splits(data_dir)["train"] if i in descriptions]
    captions = [(i, c) for i in train_ids for c in descriptions[i]]
    cache_path = Path(cache_dir) / f"train-{cache_key(model_sha, config['tokenizer_sha256'], sha256_file(Path(data_dir) / 'descriptions.txt'))}.npz"
    cached = read_cache(cache_path)
    if cached and len(cached["captions"]) == len(captions):
        text_emb = cached["captions"]
    else:
        print(f"embedding {len(captions)} training captions (once; cached in {cache_path})", file=sys.stderr)
        ids = [encode_caption(tokenizer, c)[:config["max_length"]] for _, c in captions]
        text_emb = vse.embed_captions(vse.text_encoder(model), ids)
        write_cache(cache_path, captions=text_emb)
    features_path = Path(config["features_file"])
    if not features_path.is_file():
        raise PipelineError(f"the training features file recorded in model.json is missing ({features_path})")
    table = load_features(features_path)
    image_ids = [i for i in train_ids if i in table]
    image_emb = vse.embed_images(vse.image_encoder(model), np.stack([table[i] for i in image_ids]))
    return captions, text_emb, image_ids, image_emb


def query_image_features(path, config, args):
    """Feature vector (D,) of the --image photo (from --features by stem, else the extractor)."""
    path = Path(args.image)
    if not path.is_file():
        raise PipelineError(f"image not found ({path})")
    found, failures = feature_source(config, args)([path])
    if failures:
        raise PipelineError(f"cannot use {path}: {failures[0][1]}")
    return found[path.stem]


# ---- output ------------------------------------------------------------------------------------
def contact_sheet(title, cards):
    """cards: (label, image path or None, lines of text) -> an HTML page."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif}figure{display:inline-block;width:240px;"
             "vertical-align:top;margin:6px}figcaption{font-size:85%}</style>",
             f"<h1>{html.escape(title)}</h1>"]
    for label, path, lines in cards:
        uri = thumbnail_data_uri(path) if path else None
        img = f"<img src='{uri}' alt='{html.escape(label)}' width='224'>" if uri else ""
        text = "<br>".join(html.escape(line) for line in lines)
        parts.append(f"<figure>{img}<figcaption><b>{html.escape(label)}</b><br>{text}</figcaption></figure>")
    return "\n".join(parts) + "\n"


def write_html(path, text):
    with atomic_write(path) as handle:
        handle.write(text)
    print(f"contact sheet -> {path}", file=sys.stderr)


def images_by_id(folder):
    """{file stem: path} of the images in `folder` ({} without a folder), for thumbnails."""
    return {p.stem: p for p in list_images(folder)} if folder else {}


# ---- command line ------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("query", nargs="?", default=None, help="the sentence to search for")
    p.add_argument("--images", default=None, help="folder of photos to search (with --image: the "
                   "training images, for thumbnails)")
    p.add_argument("--image", default=None, help="reverse search: a photo -> closest training captions/images")
    p.add_argument("--model", default=MODEL_DIR, help="train_retrieval.py run folder")
    p.add_argument("--data-dir", default=None, help="prepare_text.py folder (default: the data_dir recorded in model.json)")
    p.add_argument("--top", type=int, default=TOP, help="matches to show")
    p.add_argument("--features", default=None, help="precomputed features pickle for the photos")
    p.add_argument("--weights", default=WEIGHTS, help="extractor weights: imagenet | none | PATH "
                   "(see extract_features.py)")
    p.add_argument("--cache-dir", default=CACHE_DIR, help="where embeddings are cached")
    p.add_argument("--html", default=HTML, help="contact sheet to write")
    p.add_argument("--index", default=INDEX, choices=vector_index.BACKENDS, help="vector index backend")
    args = p.parse_args(argv)
    if args.top < 1:
        p.error("--top must be >= 1")
    if (args.query is None) == (args.image is None):
        p.error("give a query sentence, or --image PHOTO (not both)")
    if args.query is not None and not args.images:
        p.error("a text query needs --images DIR")
    return args


def search_text(args, model, config, tokenizer, model_sha):
    ids, unknown = vse.encode_query(args.query, tokenizer, config["max_length"])
    if unknown:
        print(f"warning: not in the vocabulary, read as {tokenizer.get('oov_token') or 'nothing'}: "
              f"{', '.join(unknown)}", file=sys.stderr)
    names, embeddings, skipped = folder_embeddings(args.images, model, config, model_sha, args)
    for name, reason in skipped:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    print(f"{len(names)} images indexed, {len(skipped)} skipped", file=sys.stderr)
    if not names:
        raise PipelineError(f"no image in {args.images} could be embedded ({len(skipped)} skipped)")
    index = vector_index.make_index(embeddings, args.index)
    started = time.perf_counter()
    query = vse.embed_captions(vse.text_encoder(model), [ids])
    searched = time.perf_counter()
    scores, rows = index.search(query, args.top)
    done = time.perf_counter()
    for rank, (score, row) in enumerate(zip(scores[0], rows[0]), start=1):
        print(f"{rank}\t{score:.4f}\t{names[row]}")
    print(f"query embedded in {(searched - started) * 1000:.0f} ms (the first call builds the graph), "
          f"{len(names)} images searched in {(done - searched) * 1000:.1f} ms ({index.backend})", file=sys.stderr)
    cards = [(f"{rank}. {names[row]}", Path(args.images) / names[row], [f"cosine {score:.4f}"])
             for rank, (score, row) in enumerate(zip(scores[0], rows[0]), start=1)]
    write_html(args.html, contact_sheet(f"search: {args.query}", cards))


def search_image(args, model, config, tokenizer, model_sha, data_dir):
    vector = query_image_features(args.image, config, args)
    query = vse.embed_images(vse.image_encoder(model), vector[None])
    captions, text_emb, image_ids, image_emb = training_set(model, config, tokenizer, data_dir,
                                                            model_sha, args.cache_dir)
    cap_scores, cap_rows = vector_index.make_index(text_emb, args.index).search(query, args.top)
    img_scores, img_rows = vector_index.make_index(image_emb, args.index).search(query, args.top)
    print("closest training captions:")
    for rank, (score, row) in enumerate(zip(cap_scores[0], cap_rows[0]), start=1):
        print(f"{rank}\t{score:.4f}\t{captions[row][0]}\t{captions[row][1]}")
    print("closest training images:")
    for rank, (score, row) in enumerate(zip(img_scores[0], img_rows[0]), start=1):
        print(f"{rank}\t{score:.4f}\t{image_ids[row]}")
    paths = images_by_id(args.images)
    cards = [("query", Path(args.image), [captions[r][1] for r in cap_rows[0][:5]])]
    cards += [(f"{rank}. {image_ids[row]}", paths.get(image_ids[row]), [f"cosine {score:.4f}"])
              for rank, (score, row) in enumerate(zip(img_scores[0], img_rows[0]), start=1)]
    write_html(args.html, contact_sheet(f"closest to {Path(args.image).name}", cards))


def main(argv=None):
    args = parse_args(argv)
    if args.query is not None and not args.query.strip():
        raise PipelineError("empty query: give a sentence to search for")
    if args.features and not Path(args.features).is_file():
        raise PipelineError(f"features file not found ({args.features})")
    model_dir = Path(args.model)
    model, config, tokenizer = vse.load_embedding(model_dir, args.data_dir)
    data_dir = Path(args.data_dir or config["data_dir"])
    model_sha = sha256_file(model_dir / vse.MODEL_FILE)
    if args.query is not None:
        search_text(args, model, config, tokenizer, model_sha)
    else:
        search_image(args, model, config, tokenizer, model_sha, data_dir)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
