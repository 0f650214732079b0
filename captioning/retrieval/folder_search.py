"""search_images.py's engine: a folder of photos searched by a sentence, or a photo -> the closest
training captions and images, through a train_retrieval.py embedding (captioning/retrieval/vse.py).

    search = FolderSearch("models/vse", cache_dir="data/search_cache")
    ids, unknown = search.encode_query("a dog jumping into water")
    names, embeddings, skipped = search.folder_embeddings("photos/")
    hits, _ = search.rank(ids, names, embeddings, top=50)       # [(cosine, file name)], best first
    hits = search.rerank("a dog jumping into water", hits, "photos/", ["pretrained/merge-lite0"])

Photo features come from a feature source: the extractor of the backbone named in model.json
(vgg16 or lite0, captioning/encoders/backbones.py, with `weights`), exactly as
extract_features.py computes them, or a features pickle keyed by file name without extension
(`features`). A file that cannot be decoded, or has no entry in the pickle, is skipped with
its reason.

Reads: the run folder (model.keras + model.json: feature_dim, backbone, features_file,
tokenizer_sha256, data_dir, ...), the tokenizer (data_dir, default model.json's), the photos;
for the reverse search also data_dir's descriptions.txt and splits.json and the training
features file recorded in model.json.
Writes, into cache_dir (numpy .npz, no pickle, each atomically):
    <key>.npz        a folder's image embeddings: file names, sizes, mtimes, embeddings, skipped
                     files with reasons. The key hashes the folder's path, model.keras and the
                     feature source; inside, each file's (size, mtime) decides whether its row
                     is reused, so only new or changed files are embedded again. A corrupt cache
                     is rebuilt.
    train-<key>.npz  the training captions' embeddings (the reverse search), keyed likewise.
contact_sheet() makes the HTML page of the matches (inline thumbnails); the caller writes it.
"""
import hashlib
import html
import json
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

from captioning.data.features import load_features
from captioning.data.images import list_images
from captioning.data.text import encode_caption, load_descriptions, load_splits
from captioning.encoders import backbones
from captioning.encoders.extract import BATCH_SIZE, build_model, extract, weights_fingerprint
from captioning.evaluation.gallery import thumbnail_data_uri
from captioning.retrieval import caption_scoring, rerank, vector_index, vse
from captioning.utils import PipelineError, atomic_write, sha256_file

WEIGHTS = "imagenet"            # extractor weights (extract_features.py): imagenet | none | PATH
CACHE_DIR = "data/search_cache"
INDEX = "auto"                  # numpy | faiss | auto (faiss for very large folders, if installed)
CACHE_VERSION = 1               # bump when the cache layout changes: older files are rebuilt
# The retrieval model shipped in the repository (Lite0 features, tokenizer.json beside it):
# search_images.py's model when --model is not given.
PRETRAINED_MODEL = Path(__file__).resolve().parents[2] / "pretrained" / "vse-lite0"


def note(line):
    """Progress notes go to stderr: stdout holds only the results."""
    print(line, file=sys.stderr)


def default_model():
    """The shipped retrieval model's folder, or PipelineError saying how to get a model."""
    folder = Path(PRETRAINED_MODEL)
    if not (folder / vse.CONFIG_FILE).is_file():
        repo = Path(__file__).resolve().parents[2]
        shown = folder.relative_to(repo) if folder.is_relative_to(repo) else folder
        raise PipelineError(f"no retrieval model at {shown}; train one with train_retrieval.py or pass --model")
    return folder


# ---- image features ----------------------------------------------------------------------------
def build_extractor(backbone, weights, seed=0):
    """(keras model (H, W, 3) -> (D,), weights fingerprint) for the backbone of model.json.

    For a name that is not one of captioning/encoders/backbones.py's (or "unknown": features of
    unrecorded origin) nothing is guessed: the photos' precomputed features are needed.
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


# ---- the cache ---------------------------------------------------------------------------------
def signature(path):
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def cache_key(*parts):
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts]).encode()).hexdigest()[:24]


def read_cache(path, log=note):
    """The cached arrays as a dict, or {} if absent or unreadable (then it is rebuilt)."""
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        log(f"note: cache {path} is unreadable ({type(exc).__name__}); rebuilding it")
        return {}


def write_cache(path, **arrays):
    with atomic_write(path, "wb") as handle:
        np.savez(handle, **arrays)


# ---- the search --------------------------------------------------------------------------------
class FolderSearch:
    """A train_retrieval.py model with its tokenizer and feature source (see the module docstring)."""

    def __init__(self, model_dir, data_dir=None, features=None, weights=WEIGHTS,
                 cache_dir=CACHE_DIR, index=INDEX, log=note):
        """features: a features pickle of the photos (default: the model's backbone extracts
        them with `weights`). data_dir: the prepare_text.py folder (default model.json's)."""
        if features and not Path(features).is_file():
            raise PipelineError(f"features file not found ({features})")
        self.model, self.config, self.tokenizer = vse.load_embedding(model_dir, data_dir)
        self.data_dir = Path(data_dir or self.config["data_dir"])
        self.model_sha = sha256_file(Path(model_dir) / vse.MODEL_FILE)
        self.features, self.weights, self.cache_dir = features, weights, Path(cache_dir)
        self.index, self.log = index, log

    def feature_source(self):
        if self.features:
            return file_source(self.features, self.config)
        return extractor_source(self.config, self.weights)

    def encode_query(self, query):
        """(token ids, [unknown words]); PipelineError for a query of no known word."""
        return vse.encode_query(query, self.tokenizer, self.config["max_length"])

    def folder_embeddings(self, folder):
        """(file names, (N, d) embeddings, [(name, reason)] skipped) of every image in `folder`."""
        paths = list_images(folder)
        if not paths:
            raise PipelineError(f"no image files in {folder}")
        source = f"features {sha256_file(self.features)}" if self.features else f"extractor {self.weights}"
        cache_path = self.cache_dir / f"{cache_key(str(Path(folder).resolve()), self.model_sha, source)}.npz"
        cached = read_cache(cache_path, self.log)
        known = {str(name): (tuple(int(x) for x in cached["signatures"][k]), k)
                 for k, name in enumerate(cached.get("names", []))}
        names, sigs, rows, reasons, todo = [], [], [], [], []
        for path in paths:
            sig, hit = signature(path), known.get(path.name)
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
            features_of = self.feature_source()
            self.log(f"embedding {len(todo)} of {len(paths)} images in {folder} "
                     f"({len(paths) - len(todo)} from the cache)")
            found, failures = features_of(todo)
            failed = {p.name: reason for p, reason in failures}
            have = [p for p in todo if p.name not in failed and p.stem in found]
            vectors = self.embed_features(np.stack([found[p.stem] for p in have])) if have else []
            fresh = dict(zip((p.name for p in have), vectors))
            for k, name in enumerate(names):
                if rows[k] is None:
                    rows[k] = fresh.get(name, np.zeros(self.config["embed_dim"], np.float32))
                    reasons[k] = failed.get(name, "" if name in fresh else "not embedded")
            write_cache(cache_path, names=np.array(names), signatures=np.array(sigs, np.int64),
                        embeddings=np.stack(rows).astype(np.float32), reasons=np.array(reasons))
        ok = [k for k, reason in enumerate(reasons) if not reason]
        skipped = [(names[k], reasons[k]) for k, reason in enumerate(reasons) if reason]
        embeddings = (np.stack([rows[k] for k in ok]) if ok
                      else np.zeros((0, self.config["embed_dim"]), np.float32))
        return [names[k] for k in ok], embeddings, skipped

    def embed_features(self, matrix):
        """(N, D) image features -> (N, d) embeddings."""
        return vse.embed_images(vse.image_encoder(self.model), matrix)

    def rank(self, query_ids, names, embeddings, top):
        """[(cosine, name)] of the `top` closest images, best first, and
        (seconds to embed the query, seconds to search, index backend)."""
        index = vector_index.make_index(embeddings, self.index)
        started = time.perf_counter()
        query = vse.embed_captions(vse.text_encoder(self.model), [query_ids])
        searched = time.perf_counter()
        scores, rows = index.search(query, top)
        done = time.perf_counter()
        hits = [(float(score), names[row]) for score, row in zip(scores[0], rows[0])]
        return hits, (searched - started, done - searched, index.backend)

    def rerank(self, query, hits, folder, captioners, top_k=rerank.TOP_K, weight=rerank.WEIGHT):
        """[(cosine, log-likelihood or None, name)]: the first top_k of rank()'s `hits` re-ordered
        by W * z(cosine) + (1 - W) * z(log-likelihood) (captioning/retrieval/rerank.py), the
        others after them in their order (log-likelihood None).

        The log-likelihood is the query's length-normalised one given the photo, the mean over
        the `captioners` (train.py run folders of the model's backbone), each cleaning and
        encoding the query with its own tokenizer. The candidates' features come from the
        feature source again (the cache holds embeddings only): without a features pickle, each
        query runs the extractor on K photos. Equal combined scores keep the embedding's order.
        """
        head, tail = hits[:top_k], hits[top_k:]
        paths = [Path(folder) / name for _, name in head]
        found, failures = self.feature_source()(paths)
        if failures:
            raise PipelineError(f"cannot re-rank with photo {failures[0][0]}: {failures[0][1]}")
        matrix = np.stack([found[p.stem] for p in paths])
        likelihood = np.zeros(len(head))
        for captioner_dir in captioners:
            model, config, tokenizer = caption_scoring.load_captioner(captioner_dir, matrix.shape[1],
                                                                      self.config.get("backbone"))
            ids, _ = vse.encode_query(query, tokenizer, config["max_length"])
            likelihood += caption_scoring.pair_scores(model, config, matrix, [ids], np.arange(len(head)),
                                                      np.zeros(len(head), np.int64)) / len(captioners)
        cosine = np.array([score for score, _ in head])
        combined = rerank.combine(cosine[:, None], likelihood[:, None], weight)[:, 0]
        order = np.argsort(-combined, kind="stable")
        return ([(head[k][0], float(likelihood[k]), head[k][1]) for k in order]
                + [(score, None, name) for score, name in tail])

    # ---- reverse search: a photo -> the training set ----
    def image_features(self, path):
        """Feature vector (D,) of one photo (from the features pickle by stem, else the extractor)."""
        path = Path(path)
        if not path.is_file():
            raise PipelineError(f"image not found ({path})")
        found, failures = self.feature_source()([path])
        if failures:
            raise PipelineError(f"cannot use {path}: {failures[0][1]}")
        return found[path.stem]

    def training_set(self):
        """(caption rows [(image_id, caption)], caption embeddings, image ids, image embeddings)."""
        descriptions = load_descriptions(self.data_dir / "descriptions.txt")
        train_ids = [i for i in load_splits(self.data_dir)["train"] if i in descriptions]
        captions = [(i, c) for i in train_ids for c in descriptions[i]]
        key = cache_key(self.model_sha, self.config["tokenizer_sha256"],
                        sha256_file(self.data_dir / "descriptions.txt"))
        cache_path = self.cache_dir / f"train-{key}.npz"
        cached = read_cache(cache_path, self.log)
        if cached and len(cached["captions"]) == len(captions):
            text_emb = cached["captions"]
        else:
            self.log(f"embedding {len(captions)} training captions (once; cached in {cache_path})")
            ids = [encode_caption(self.tokenizer, c)[:self.config["max_length"]] for _, c in captions]
            text_emb = vse.embed_captions(vse.text_encoder(self.model), ids)
            write_cache(cache_path, captions=text_emb)
        features_path = Path(self.config["features_file"])
        if not features_path.is_file():
            raise PipelineError(f"the training features file recorded in model.json is missing ({features_path})")
        table = load_features(features_path)
        image_ids = [i for i in train_ids if i in table]
        image_emb = self.embed_features(np.stack([table[i] for i in image_ids]))
        return captions, text_emb, image_ids, image_emb

    def closest_training(self, photo, top):
        """A photo -> ([(cosine, image_id, caption)] closest training captions,
        [(cosine, image_id)] closest training images), best first."""
        query = self.embed_features(self.image_features(photo)[None])
        captions, text_emb, image_ids, image_emb = self.training_set()
        cap_scores, cap_rows = vector_index.make_index(text_emb, self.index).search(query, top)
        img_scores, img_rows = vector_index.make_index(image_emb, self.index).search(query, top)
        return ([(float(s), *captions[r]) for s, r in zip(cap_scores[0], cap_rows[0])],
                [(float(s), image_ids[r]) for s, r in zip(img_scores[0], img_rows[0])])


# ---- output ------------------------------------------------------------------------------------
def contact_sheet(title, cards):
    """cards: (label, image path or None, lines of text) -> an HTML page (inline thumbnails)."""
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


def images_by_id(folder):
    """{file stem: path} of the images in `folder` ({} without a folder), for thumbnails."""
    return {p.stem: p for p in list_images(folder)} if folder else {}
