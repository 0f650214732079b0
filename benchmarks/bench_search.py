"""Benchmark: text-to-image search latency over all 8091 Flickr8k images (the goal: <= 50 ms).

Usage:
    python benchmarks/bench_search.py --model models/vse \\
        --features ../shared/flickr8k/features_efficientnet_lite0.pkl [--queries 200] [--top 10]

What is timed, in one run, after a warm-up query:
    index build   embedding every image of --features with the model's image encoder, plus
                  building the index (numpy: normalising; faiss: IndexFlatIP.add);
    query         one sentence end to end, as search_images.py does it: clean + encode the
                  text, embed it (GRU), top --top over all images. --queries sentences (the
                  first captions of the test split, one per image) are timed one at a time;
                  the table gives the median and the 90th percentile per backend, and the
                  query split into its two parts. faiss rows only when faiss is installed.
    baseline      the obvious way: all cosines by a BLAS product, then a full argsort, per
                  query (same top-k, checked); the index scores a few queries without BLAS
                  threads and sorts only the top k.

Reads: the run folder (--model), its data_dir (tokenizer.json, descriptions.txt, splits.json),
the features pickle. Writes: nothing; prints the table. Last line:
    query_ms_median: <ms>  target_ms: 50  fraction_of_target: <median / 50>  images: <N>
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from captioning.data.features import load_features
from captioning.data.text import load_descriptions, load_splits
from captioning.retrieval import vector_index, vse
from captioning.utils import HelpFormatter, run_cli

MODEL_DIR = "models/vse"
FEATURES = "../shared/flickr8k/features_efficientnet_lite0.pkl"
QUERIES = 200
TOP = 10
TARGET_MS = 50.0


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", default=MODEL_DIR, help="train_retrieval.py run folder")
    parser.add_argument("--features", default=FEATURES, help="features of the images to search")
    parser.add_argument("--queries", type=int, default=QUERIES, help="sentences timed one by one")
    parser.add_argument("--top", type=int, default=TOP, help="matches per query")
    return parser.parse_args(argv)


def percentiles(seconds):
    ms = 1000 * np.asarray(seconds)
    return float(np.median(ms)), float(np.percentile(ms, 90))


def main(argv=None):
    args = parse_args(argv)
    model, config, tokenizer = vse.load_embedding(args.model)
    data_dir = Path(config["data_dir"])
    table = load_features(args.features)
    ids = sorted(table)
    matrix = np.stack([table[i] for i in ids])
    descriptions = load_descriptions(data_dir / "descriptions.txt")
    sentences = [descriptions[i][0] for i in load_splits(data_dir)["test"][:args.queries]]
    image_encoder, text_encoder = vse.image_encoder(model), vse.text_encoder(model)

    backends = ["numpy"] + (["faiss"] if vector_index.faiss_available() else [])
    rows, medians = [], {}
    started = time.perf_counter()
    embeddings = vse.embed_images(image_encoder, matrix)
    embed_seconds = time.perf_counter() - started
    indexes = {}
    for backend in backends:
        started = time.perf_counter()
        indexes[backend] = vector_index.make_index(embeddings, backend)
        rows.append((f"index build, {backend}", f"{embed_seconds + time.perf_counter() - started:.2f} s",
                     f"of which embedding {len(ids)} images {embed_seconds:.2f} s"))

    def query(sentence, index):
        tokens, _ = vse.encode_query(sentence, tokenizer, config["max_length"])
        t0 = time.perf_counter()
        vector = vse.embed_captions(text_encoder, [tokens])
        t1 = time.perf_counter()
        result = index.search(vector, args.top)
        return result, t1 - t0, time.perf_counter() - t1

    query(sentences[0], indexes["numpy"])                        # warm-up: builds the graph once
    for backend in backends:
        total, text_part, search_part = [], [], []
        for sentence in sentences:
            t0 = time.perf_counter()
            _, text_s, search_s = query(sentence, indexes[backend])
            total.append(time.perf_counter() - t0)
            text_part.append(text_s)
            search_part.append(search_s)
        medians[backend] = percentiles(total)[0]
        rows.append((f"query, {backend}", "median %.1f ms, p90 %.1f ms" % percentiles(total),
                     "text %.1f ms + search %.2f ms (medians)" % (percentiles(text_part)[0],
                                                                 percentiles(search_part)[0])))

    # baseline: full argsort of every cosine per query (same answers as the partial sort)
    vectors = vector_index.normalize_rows(embeddings)
    queries = vse.embed_captions(text_encoder, [vse.encode_query(s, tokenizer, config["max_length"])[0]
                                                      for s in sentences])
    full, partial = [], []
    for q in queries:
        t0 = time.perf_counter()
        top_full = np.argsort(-(vectors @ q), kind="stable")[:args.top]
        t1 = time.perf_counter()
        top_part = indexes["numpy"].search(q[None], args.top)[1][0]
        partial.append(time.perf_counter() - t1)
        full.append(t1 - t0)
        assert top_full.tolist() == top_part.tolist(), "partial and full sorts disagree"
    rows.append(("search only, obvious way", "median %.2f ms" % percentiles(full)[0],
                 "baseline: BLAS product + full argsort"))
    rows.append(("search only, numpy index", "median %.2f ms" % percentiles(partial)[0],
                 f"{percentiles(full)[0] / max(percentiles(partial)[0], 1e-9):.1f}x faster than the baseline"))

    print(f"{len(ids)} images, {len(sentences)} queries, top {args.top}, embedding d={config['embed_dim']}, "
          f"{os.cpu_count()} CPUs")
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:<28} {note}")
    best = medians["numpy"]
    print(f"query_ms_median: {best:.1f}  target_ms: {TARGET_MS:.0f}  fraction_of_target: "
          f"{best / TARGET_MS:.2f}  images: {len(ids)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
