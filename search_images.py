"""Search a folder of photos by a sentence, or find the training captions closest to a photo.

Usage:
    python search_images.py "a dog jumping into water" --images DIR [--model DIR] [--top 10]
    python search_images.py "two children on a beach" --images ../shared/flickr8k/Flicker8k_Dataset \\
        --features ../shared/flickr8k/features_efficientnet_lite0.pkl
    python search_images.py --image photo.jpg [--model DIR] [--images TRAINING_IMAGES_DIR]

Text query: every image directly in --images is embedded once (then read from the cache), the
query sentence is embedded, and the --top closest images are printed, best first, as
`rank<TAB>cosine<TAB>file`, and shown in an HTML contact sheet (--html). With
--rerank-captioner DIR [DIR ...], the --rerank-top closest are re-ordered by W * z(cosine) +
(1 - W) * z(the query's log-likelihood under the captioners) first (--rerank-weight W; on the
Flickr8k test split this raised R@1 from 17.1 to 20.0 with the shipped merge captioner); their
features are computed again for that, a few seconds per query through the extractor. Reverse (--image): the
photo is embedded, and the closest training captions and training images are printed (and
shown, with thumbnails when --images holds the training images).

Reads:
    --model DIR      train_retrieval.py's run folder: model.keras + model.json. Default: the
                     shipped pretrained/vse-lite0 (Lite0 features; tokenizer.json beside it).
    --data-dir DIR   tokenizer.json (+ descriptions.txt, splits.json for --image); default the
                     data_dir recorded in model.json. Its tokenizer must be the model's.
    --images DIR     the photos (image files directly in DIR), embedded through the extractor of
                     the model's backbone (with --weights) or, with --features FILE, from a
                     features pickle keyed by file name without extension. A file that cannot
                     be decoded, or has no entry in --features, is skipped and reported.
Writes:
    --cache-dir/<key>.npz   the folder's image embeddings (train-<key>.npz: the training
                     captions'), reused for unchanged files; captioning/retrieval/folder_search.py.
    --html FILE      the contact sheet (inline thumbnails, scores, the query), atomically.
"""
import argparse
import sys
import time
from pathlib import Path

from captioning.retrieval import rerank, vector_index
from captioning.retrieval.folder_search import (CACHE_DIR, INDEX, WEIGHTS, FolderSearch, contact_sheet,
                                                default_model, images_by_id)
from captioning.utils import HelpFormatter, PipelineError, atomic_write, run_cli

TOP = 10
HTML = "results/search.html"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("query", nargs="?", default=None, help="the sentence to search for")
    p.add_argument("--images", default=None, help="folder of photos to search (with --image: the "
                   "training images, for thumbnails)")
    p.add_argument("--image", default=None, help="reverse search: a photo -> closest training captions/images")
    p.add_argument("--model", default=None, help="train_retrieval.py run folder (default: the shipped "
                   "pretrained/vse-lite0)")
    p.add_argument("--data-dir", default=None, help="prepare_text.py folder (default: the data_dir recorded in model.json)")
    p.add_argument("--top", type=int, default=TOP, help="matches to show")
    p.add_argument("--features", default=None, help="precomputed features pickle for the photos")
    p.add_argument("--weights", default=WEIGHTS, help="extractor weights: imagenet | none | PATH "
                   "(see extract_features.py)")
    p.add_argument("--cache-dir", default=CACHE_DIR, help="where embeddings are cached")
    p.add_argument("--html", default=HTML, help="contact sheet to write")
    p.add_argument("--index", default=INDEX, choices=vector_index.BACKENDS, help="vector index backend")
    p.add_argument("--rerank-captioner", default=None, nargs="+", help="train.py run folder(s) of the "
                   "model's backbone (e.g. pretrained/merge-lite0) that re-order a text query's top images")
    p.add_argument("--rerank-top", type=int, default=rerank.TOP_K, help="images to re-rank (K)")
    p.add_argument("--rerank-weight", type=float, default=rerank.WEIGHT,
                   help="W: the embedding's share of the combined score, 0..1")
    args = p.parse_args(argv)
    if args.top < 1:
        p.error("--top must be >= 1")
    if (args.query is None) == (args.image is None):
        p.error("give a query sentence, or --image PHOTO (not both)")
    if args.query is not None and not args.images:
        p.error("a text query needs --images DIR")
    if args.rerank_captioner and args.image:
        p.error("--rerank-captioner re-ranks a text query's photos, not --image's")
    if args.rerank_top < 1:
        p.error("--rerank-top must be >= 1")
    if not 0.0 <= args.rerank_weight <= 1.0:
        p.error("--rerank-weight must be between 0 and 1")
    return args


def write_html(path, text):
    with atomic_write(path) as handle:
        handle.write(text)
    print(f"contact sheet -> {path}", file=sys.stderr)


def search_text(search, args):
    ids, unknown = search.encode_query(args.query)
    if unknown:
        print(f"warning: not in the vocabulary, read as {search.tokenizer.get('oov_token') or 'nothing'}: "
              f"{', '.join(unknown)}", file=sys.stderr)
    names, embeddings, skipped = search.folder_embeddings(args.images)
    for name, reason in skipped:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    print(f"{len(names)} images indexed, {len(skipped)} skipped", file=sys.stderr)
    if not names:
        raise PipelineError(f"no image in {args.images} could be embedded ({len(skipped)} skipped)")
    wanted = max(args.top, args.rerank_top) if args.rerank_captioner else args.top
    hits, (embed_s, search_s, backend) = search.rank(ids, names, embeddings, wanted)
    print(f"query embedded in {embed_s * 1000:.0f} ms (the first call builds the graph), "
          f"{len(names)} images searched in {search_s * 1000:.1f} ms ({backend})", file=sys.stderr)
    if args.rerank_captioner:
        started = time.perf_counter()
        hits = search.rerank(args.query, hits, args.images, args.rerank_captioner, args.rerank_top,
                             args.rerank_weight)[:args.top]
        print(f"top {min(args.rerank_top, len(names))} re-ranked by {' + '.join(args.rerank_captioner)} "
              f"(W {args.rerank_weight:g}) in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    else:
        hits = [(score, None, name) for score, name in hits]
    for rank, (score, _, name) in enumerate(hits, start=1):
        print(f"{rank}\t{score:.4f}\t{name}")
    cards = [(f"{rank}. {name}", Path(args.images) / name,
              [f"cosine {score:.4f}"] + ([] if likelihood is None else [f"log-likelihood {likelihood:.3f}"]))
             for rank, (score, likelihood, name) in enumerate(hits, start=1)]
    write_html(args.html, contact_sheet(f"search: {args.query}", cards))


def search_image(search, args):
    captions, images = search.closest_training(args.image, args.top)
    print("closest training captions:")
    for rank, (score, image_id, caption) in enumerate(captions, start=1):
        print(f"{rank}\t{score:.4f}\t{image_id}\t{caption}")
    print("closest training images:")
    for rank, (score, image_id) in enumerate(images, start=1):
        print(f"{rank}\t{score:.4f}\t{image_id}")
    paths = images_by_id(args.images)
    cards = [("query", Path(args.image), [caption for _, _, caption in captions[:5]])]
    cards += [(f"{rank}. {image_id}", paths.get(image_id), [f"cosine {score:.4f}"])
              for rank, (score, image_id) in enumerate(images, start=1)]
    write_html(args.html, contact_sheet(f"closest to {Path(args.image).name}", cards))


def main(argv=None):
    args = parse_args(argv)
    if args.query is not None and not args.query.strip():
        raise PipelineError("empty query: give a sentence to search for")
    search = FolderSearch(args.model or default_model(), args.data_dir, args.features, args.weights, args.cache_dir,
                          args.index)
    if args.query is not None:
        search_text(search, args)
    else:
        search_image(search, args)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
