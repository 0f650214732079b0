"""A local web page: caption photos, browse evaluate_bleu.py results, search images.

Usage:
    python serve.py --model models/RUN                      # http://127.0.0.1:8000
    python serve.py --model models/RUN --results results/ --images ../shared/flickr8k/Flicker8k_Dataset
    python serve.py --model models/ls-bleu --features ../shared/flickr8k/features_efficientnet_lite0.pkl \\
        --images ../shared/flickr8k/Flicker8k_Dataset      # dataset photos from their cached vectors
    python serve.py --results results/ --port 8080          # browse results only, no model
    python serve.py --retrieval models/vse --features ../shared/flickr8k/features_efficientnet_lite0.pkl \
        --images ../shared/flickr8k/Flicker8k_Dataset      # + text search over those images

The page has three views: (1) photos dropped or picked -> the greedy caption and the beam-search
alternatives with their scores (attention maps for models that have them); (2) a results folder
from evaluate_bleu.py -> its scores and diagnostics, then each caption beside its five
references, filterable by sentence BLEU and by words; (3) a text query -> the closest images,
when a retrieval model (train_retrieval.py) is loaded with --retrieval.

Reads:
    --model DIR       train.py run folder (model.keras, model.json), loaded once. If the default
                      folder does not exist the page runs without captioning and says so.
    --data-dir DIR    prepare_text.py's tokenizer.json (must be the model's vocabulary).
    --weights W       weights of the model's own image encoder, VGG16 fc2 or EfficientNet-Lite0
                      as model.json tells (imagenet | none | PATH), loaded once for new photos.
    --features FILE   optional features.pkl of the --images folder: a photo whose bytes equal one
                      of those images is captioned from its cached vector, the one evaluate_bleu.py
                      used (and the only way for a model whose encoder is not known here).
    --images DIR      the dataset images (thumbnails in the results view, cached features).
    --results DIR     evaluate_bleu.py output: a folder with results.json + captions.tsv, or a
                      folder of such folders (one run each).
    --retrieval [DIR] train_retrieval.py run folder (model.keras, model.json; its tokenizer beside
                      it, or from the data_dir it records, or --retrieval-data-dir); without DIR
                      the shipped pretrained/vse-lite0. Every image of --features
                      is embedded once at start-up and the search view ranks them by cosine
                      (captioning/retrieval/image_search.py). Needs --features of the model's backbone.
Writes: nothing (the server's log goes to stderr).
Binds to 127.0.0.1 by default, so only this machine can open the page; the page has no login,
so think twice before --host 0.0.0.0.
"""
import argparse
import os
import socket
import sys
from pathlib import Path

from captioning.utils import check_installed

check_installed("serve.py", "web", "fastapi", "uvicorn", "multipart")   # the web server and uploads
from captioning.inference.captioner import DATA_DIR, PRETRAINED_DIR as MODEL_DIR, WEIGHTS  # noqa: E402
from captioning.inference.decoding import ALPHA
from captioning.retrieval import folder_search
from captioning.retrieval.image_search import ImageSearch
from captioning.utils import HelpFormatter, PipelineError, run_cli
from captioning.apps.web_captioner import WebCaptioner
from captioning.apps.webapp import MB, Limits, create_app

HOST = "127.0.0.1"
PORT = 8000


def parse_args(argv):
    limits = Limits()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", default=MODEL_DIR,
                        help="train.py run folder; if the default is missing, no captioning")
    parser.add_argument("--data-dir", default=DATA_DIR, help="prepare_text.py output folder")
    parser.add_argument("--weights", default=WEIGHTS,
                        help="image encoder weights (VGG16 or Lite0, the model's): imagenet | none | PATH")
    parser.add_argument("--alpha", type=float, default=ALPHA, help="beam length normalisation exponent")
    parser.add_argument("--features", default=None, help="cached features.pkl of --images")
    parser.add_argument("--images", default=None, help="dataset image folder")
    parser.add_argument("--results", default=None, help="evaluate_bleu.py output folder")
    parser.add_argument("--retrieval", nargs="?", const="", default=None, metavar="DIR",
                        help="train_retrieval.py run folder (none given: the shipped "
                             "pretrained/vse-lite0): text search over the --features images")
    parser.add_argument("--retrieval-data-dir", default=None,
                        help="the retrieval model's prepare_text.py folder (default: the one in its model.json)")
    parser.add_argument("--host", default=HOST, help="address to listen on")
    parser.add_argument("--port", type=int, default=PORT, help="port to listen on")
    parser.add_argument("--max-image-mb", type=float, default=limits.max_image_bytes / MB,
                        help="largest accepted upload per image, MB")
    parser.add_argument("--max-images", type=int, default=limits.max_images,
                        help="most photos per request")
    args = parser.parse_args(argv)
    if args.features and not args.images:
        parser.error("--features needs --images (the folder the features were computed from)")
    if args.retrieval is not None and not args.features:
        parser.error("--retrieval needs --features (the vectors of the images to search) and --images")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be 0..65535")
    return args


def bind(host, port):
    """A listening socket, made before the slow model load so a taken port fails at once."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)        # from here on, connections wait in the backlog until served
    except OSError as exc:
        raise PipelineError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); "
                            f"pick another with --port") from None
    return sock


def load_captioner(args):
    """The WebCaptioner, or None when --model is the default and that folder does not exist."""
    if args.model == MODEL_DIR and not Path(args.model).exists():
        print(f"no model at {args.model}: the page runs without captioning (pass --model DIR)",
              file=sys.stderr)
        return None
    return WebCaptioner(args.model, args.data_dir, weights=args.weights, alpha=args.alpha,
                        features=args.features, images=args.images)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import uvicorn
    sock = bind(args.host, args.port)
    limits = Limits(max_image_bytes=int(args.max_image_mb * MB), max_images=args.max_images,
                    max_request_bytes=max(Limits().max_request_bytes,
                                          int(args.max_images * args.max_image_mb * MB) + MB))
    retrieval = args.retrieval or (folder_search.default_model() if args.retrieval == "" else None)
    search = ImageSearch(retrieval, args.features, args.retrieval_data_dir) if retrieval else None
    app = create_app(load_captioner(args), results_dir=args.results, retrieval=search,
                     images_dir=args.images, limits=limits)
    host, port = sock.getsockname()[:2]
    if host not in ("127.0.0.1", "::1"):
        print(f"warning: listening on {host}, reachable from other machines; the page has no "
              f"login", file=sys.stderr)
    print(f"serving on http://{args.host}:{port}/ (Ctrl-C stops)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info"))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:      # uvicorn shuts down cleanly on Ctrl-C, then re-raises it
        pass
    print("stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
