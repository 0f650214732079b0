"""Benchmark: 50 caption requests at once against the web app, from a client on loopback.

Usage:
    python benchmarks/bench_web.py --model models/RUN --data-dir data [--weights imagenet]
    python benchmarks/bench_web.py --random-model --data-dir data --weights none    # untrained
    python benchmarks/bench_web.py --model models/ls-bleu --data-dir data \\
        --features ../shared/flickr8k/features_efficientnet_lite0.pkl \\
        --images ../shared/flickr8k/Flicker8k_Dataset

Starts the real app (captioning/apps/webapp.py with captioning/apps/web_captioner.py) under uvicorn
on 127.0.0.1 in this process, then sends --requests POST /api/caption requests, one photo each
(the first --requests photos of --photos, so no two are alike), all started at the same moment
from one asyncio client (httpx2). Checks that every request is answered with 200 and with the
caption of its own photo (none lost, none swapped), and reports requests/s and latency
percentiles. Two baselines, in the same run and on the same photos: the same requests sent one
after another (no concurrency), and the captioner called in-process without HTTP (its compute
alone). The model is called under a lock, one request at a time, so concurrency is expected
to add throughput only where uploads, decoding and validation overlap the model's work.

--random-model: a merge model of train.py's default size with random weights over --data-dir's
vocabulary, on VGG16 fc2 features (4096-d); its captions mean nothing, its compute is a real
model's. With --weights none, VGG16 has random weights too (same compute as ImageNet's).

Reads: --model (or --data-dir for --random-model), --photos, optional --features/--images.
Writes: nothing but a temporary folder for --random-model; prints a table. Last line:
    answered: <n>/<n>  requests_per_s: <r>  p95_s: <s>  concurrent_vs_serial: <x>  http_overhead: <y>
"""
import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from captioning.models import registry  # noqa: E402

from captioning.data import text
from captioning.inference.captioner import WEIGHTS  # noqa: E402
from captioning.data.images import list_images  # noqa: E402
from captioning.utils import HelpFormatter, PipelineError, run_cli, sha256_file, write_json  # noqa: E402
from captioning.apps.web_captioner import DIGEST_KEY, WebCaptioner  # noqa: E402
from captioning.apps.webapp import Limits, create_app, open_upload, running  # noqa: E402
from captioning.inference.captioner import DATA_DIR, PRETRAINED_DIR as MODEL_DIR  # noqa: E402

REQUESTS = 50
PHOTOS = "../shared/flickr8k/Flicker8k_Dataset"
BEAM = 3                 # the page's default
TIMEOUT_S = 600          # per request: 50 queued requests at ~0.3 s each need ~15 s


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", default=MODEL_DIR, help="train.py run folder")
    parser.add_argument("--random-model", action="store_true",
                        help="use a random-weight model of train.py's default size instead of --model")
    parser.add_argument("--data-dir", default=DATA_DIR, help="prepare_text.py output folder")
    parser.add_argument("--weights", default=WEIGHTS, help="VGG16 weights: imagenet | none | PATH")
    parser.add_argument("--features", default=None, help="cached features.pkl of --images")
    parser.add_argument("--images", default=None, help="the folder --features was computed from")
    parser.add_argument("--photos", default=PHOTOS, help="folder of photos to upload")
    parser.add_argument("--requests", type=int, default=REQUESTS, help="concurrent requests")
    parser.add_argument("--beam", type=int, default=BEAM, help="beam width asked for")
    return parser.parse_args(argv)


def random_model_dir(data_dir, out_dir):
    """A train.py-style run folder holding a default-size merge model with random weights."""
    import keras
    meta = text.load_meta(data_dir)
    keras.utils.set_random_seed(0)
    model = registry.build_model("merge", 4096, meta["vocab_size"], meta["max_length"])
    model.save(Path(out_dir) / registry.MODEL_FILE)
    write_json(Path(out_dir) / registry.CONFIG_FILE, {
        "variant": "merge", "mode": "sequence", "feature_dim": 4096, "vocab_size": meta["vocab_size"],
        "max_length": meta["max_length"], "embed_dim": registry.EMBED_DIM, "units": registry.UNITS,
        "dropout": registry.DROPOUT, "start_token": meta["start_token"], "end_token": meta["end_token"],
        "pad_id": 0, "tokenizer_sha256": sha256_file(Path(data_dir) / "tokenizer.json"),
        "data_dir": str(data_dir)})
    return out_dir


async def send_all(url, photos, beam, concurrent):
    """POST each photo; all at once (concurrent) or one after another. -> [(seconds, response)]."""
    import httpx2
    limits = httpx2.Limits(max_connections=len(photos), max_keepalive_connections=len(photos))
    async with httpx2.AsyncClient(base_url=url, timeout=TIMEOUT_S, limits=limits) as client:
        async def one(path):
            started = time.perf_counter()
            response = await client.post("/api/caption", data={"beam": str(beam)},
                                         files=[("images", (path.name, path.read_bytes(), "image/jpeg"))])
            return time.perf_counter() - started, response
        if concurrent:
            return await asyncio.gather(*(one(p) for p in photos))
        return [await one(p) for p in photos]


def check(photos, answers, expected):
    """Every answer 200, naming its own photo, with the caption the in-process run gave it."""
    lost = [p.name for p, (_, r) in zip(photos, answers) if r.status_code != 200]
    wrong = [p.name for p, (_, r) in zip(photos, answers) if r.status_code == 200 and
             (r.json()["results"][0]["name"] != p.name or
              r.json()["results"][0]["greedy"] != expected[p.name])]
    return len(photos) - len(lost) - len(wrong), lost, wrong


def row(label, seconds, latencies, n):
    lat = np.asarray(latencies)
    p50, p95 = (np.percentile(lat, q) for q in (50, 95)) if len(lat) else (float("nan"),) * 2
    print(f"| {label:34s} | {n:4d} | {seconds:8.2f} | {n / seconds:8.2f} | {p50:6.2f} | {p95:6.2f} | "
          f"{lat.max() if len(lat) else float('nan'):6.2f} |")
    return n / seconds, p95


def main(argv=None):
    args = parse_args(argv)
    photos = list_images(args.photos)[:args.requests]
    if len(photos) < args.requests:
        raise PipelineError(f"need {args.requests} photos in {args.photos}, found {len(photos)}")
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = random_model_dir(args.data_dir, scratch) if args.random_model else args.model
        captioner = WebCaptioner(model_dir, args.data_dir, weights=args.weights,
                                 features=args.features, images=args.images)
        print(f"model {model_dir if not args.random_model else 'random, train.py default size'}; "
              f"{captioner.describe()}; beam {args.beam}; {os.cpu_count()} CPUs; load average "
              f"{os.getloadavg()[0]:.1f}")

        # in-process: the captioner's own work per photo (decode + validate + caption), no HTTP
        expected, latencies = {}, []
        captioner.caption([open_upload(photos[0].read_bytes(), photos[0].name, Limits())], args.beam)
        started = time.perf_counter()
        for path in photos:
            t = time.perf_counter()
            image = open_upload(path.read_bytes(), path.name, Limits())
            assert image.info[DIGEST_KEY]
            expected[path.name] = captioner.caption([image], args.beam)[0]["greedy"]
            latencies.append(time.perf_counter() - t)
        in_process = time.perf_counter() - started

        print("| way | requests | seconds | requests/s | p50 s | p95 s | max s |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        inproc_rps, _ = row("in-process captioner, one by one", in_process, latencies, len(photos))
        with running(create_app(captioner)) as url:
            asyncio.run(send_all(url, photos[:1], args.beam, False))             # warm-up
            started = time.perf_counter()
            serial = asyncio.run(send_all(url, photos, args.beam, False))
            serial_s = time.perf_counter() - started
            started = time.perf_counter()
            together = asyncio.run(send_all(url, photos, args.beam, True))
            together_s = time.perf_counter() - started
    serial_rps, _ = row("HTTP, one request after another", serial_s, [s for s, _ in serial], len(photos))
    rps, p95 = row(f"HTTP, {len(photos)} requests at once", together_s, [s for s, _ in together],
                   len(photos))
    for label, answers in (("one after another", serial), ("at once", together)):
        good, lost, wrong = check(photos, answers, expected)
        print(f"{label}: {good}/{len(photos)} answered with their own caption"
              + (f"; failed: {lost}" if lost else "") + (f"; wrong caption: {wrong}" if wrong else ""))
    good = check(photos, together, expected)[0]
    print(f"answered: {good}/{len(photos)}  requests_per_s: {rps:.2f}  p95_s: {p95:.2f}  "
          f"concurrent_vs_serial: {rps / serial_rps:.2f}  http_overhead: {inproc_rps / serial_rps:.2f}")
    return 0 if good == len(photos) else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
