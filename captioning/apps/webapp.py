"""The local web page: caption uploaded photos, browse evaluate_bleu.py results, search images.

Owns the HTTP surface (FastAPI) and its safety rules. The model work belongs to the objects
passed to create_app, so tests can pass fakes:
    captioner  .caption(images: list of PIL images, beam: int) -> one dict per image:
               {"greedy": str, "beams": [(caption, score), ...] best first, "finished":
                [bool per beam] (optional; False = cut at max_length), "features": str,
                "attention": None or {"grid": [rows, cols], "words": [w...],
                "weights": [[rows*cols floats] per word]}} or {"error": str} for an image it
               cannot caption; optional .describe() -> dict shown on the page.
               (captioning/apps/web_captioner.py's WebCaptioner.) Calls are serialised by a lock: one at a
               time, because a Keras model and its decoder state are not thread-safe.
    retrieval  optional, the image-search model: .search(text, top_k) ->
               [{"image_id": str, "score": float, "captions": [str, ...]}], raising
               PipelineError for a query it cannot use (e.g. only unknown words; the message is
               shown); optional .nearest(image, top_k) -> the same, shown under each uploaded
               photo; optional .describe() -> dict. Without one the search view says so.
create_app keeps them, with the results folder, the image table and the limits, on
app.state.served (Served); the routes are module-level functions of `router` that read it.
Reads: the page (captioning/static/); per results run, results.json, captions.tsv and
gallery.html; images of the --images folder, by dataset id. Writes nothing.

Safety:
    - a request body over Limits.max_request_bytes is refused (413) from its Content-Length
      header, or as soon as the streamed bytes pass the limit; a file over max_image_bytes,
      more than max_images files, an empty file: refused with a message naming the file;
    - the file type is decided by content: PIL must identify it as one of IMAGE_FORMATS
      (a text file named .jpg is refused), then verify() and a full decode (corrupt or truncated
      data is refused); more than max_pixels pixels (read from the header, before decoding)
      is refused as a decompression bomb, as is anything PIL itself calls one;
    - no request value is ever joined into a file path: results runs, their files and images
      are found by listing the folders at start-up (runs again on each listing) into
      name -> path tables, requests only look names up, and every path must resolve inside its
      folder (a symlink pointing out is ignored);
    - every refusal is JSON {"error": "..."} with a 4xx status and is shown on the page; a
      failure inside the model is a 500 with a message, and the server keeps serving.
"""
import contextlib
import csv
import hashlib
import io
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from captioning.data.images import list_images
from captioning.evaluation.metrics import standard_tokens
from captioning.utils import PipelineError, read_json
from captioning.apps.web_captioner import DIGEST_KEY

STATIC_DIR = Path(__file__).resolve().parent / "static"
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")   # the extensions extract_features reads
RESULTS_FILES = ("results.json", "captions.tsv", "gallery.html")  # what evaluate_bleu.py writes
BEAM_DEFAULT = 3
SEARCH_TOP_DEFAULT = 12
ROWS_PER_PAGE = 50
MB = 2 ** 20
log = logging.getLogger("captioning.apps.webapp")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Memory: a decoded RGB image takes 3 bytes per pixel, so
    max_pixels = 40 M is at most 120 MB per image (PIL's own bomb limit is 89 M pixels), and
    max_request_pixels = 100 M bounds one request's decoded photos to 300 MB."""
    max_image_bytes: int = 8 * MB       # one uploaded file
    max_images: int = 12                # files per request
    max_request_bytes: int = 40 * MB    # the whole request body
    max_pixels: int = 40_000_000        # width * height of one image, checked before decoding
    max_request_pixels: int = 100_000_000   # all images of one request together
    max_beam: int = 10
    max_query_chars: int = 200
    max_search_top: int = 50


class Refusal(Exception):
    """A request or upload the app will not process: HTTP status + one-line message."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status, self.message = status, message


class BodyTooLarge(Exception):
    """Raised from inside the request stream when the body passes max_request_bytes."""


class BodyLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` without reading them into memory.

    A declared Content-Length over the limit is answered at once; a body without one (chunked)
    is counted while it streams and BodyTooLarge is raised in the reader (the caption endpoint
    turns that into a 413; anything else that reads a body gets the same 413 here).
    """

    def __init__(self, app, max_bytes):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await too_large(self.max_bytes, int(declared))(scope, receive, send)
        seen, started = 0, False

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await too_large(self.max_bytes)(scope, receive, send)


def size_text(n):
    """Bytes -> "340 KB" / "8 MB" / "12.5 MB" (1 KB = 1024 bytes) for messages."""
    if n < MB:
        return f"{n / 1024:.0f} KB"
    return f"{n / MB:.1f}".removesuffix(".0") + " MB"


def pixels_text(n):
    """Pixel count -> "64 M pixels" / "2500 pixels" for messages."""
    return f"{n / 1e6:.0f} M pixels" if n >= 1e6 else f"{n} pixels"


def error(status, message):
    return JSONResponse({"error": message}, status_code=status)


def too_large(limit, size=None):
    what = size_text(size) if size is not None else f"over {size_text(limit)}"
    return error(413, f"upload refused: the request is {what}; the limit is {size_text(limit)} "
                      f"per request")


# ---- uploads ----------------------------------------------------------------------------------
def safe_name(name):
    """An upload's file name for messages: the last path part, printable, at most 80 chars."""
    name = str(name or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch if ch.isprintable() else "?" for ch in name).strip() or "upload"
    return name if len(name) <= 80 else name[:77] + "..."


def open_upload(data, name, limits, pixels_left=None):
    """Bytes of one uploaded file -> a fully decoded PIL image, or Refusal saying why not.

    pixels_left: what is left of the request's pixel budget (None = no request budget)."""
    if not data:
        raise Refusal(400, f"{name} is empty")
    if len(data) > limits.max_image_bytes:
        raise Refusal(413, f"{name} is {size_text(len(data))}; the limit is "
                           f"{size_text(limits.max_image_bytes)} per image")
    kinds = ", ".join(IMAGE_FORMATS)
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as probe:
            width, height = probe.size
            if width * height > limits.max_pixels:
                raise Refusal(413, f"{name} is {width}x{height} = {pixels_text(width * height)}; "
                                   f"the limit is {pixels_text(limits.max_pixels)} "
                                   f"(decompression-bomb guard)")
            if pixels_left is not None and width * height > pixels_left:
                raise Refusal(413, f"{name} ({width}x{height}) would take this request over "
                                   f"{pixels_text(limits.max_request_pixels)} in all; send "
                                   f"fewer large photos at a time")
            probe.verify()                 # structure and checksums, without decoding pixels
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        image.load()                       # full decode: truncated pixel data fails here
    except Refusal:
        raise
    except UnidentifiedImageError:
        raise Refusal(415, f"{name} is not an image ({kinds}; the type is read from the "
                           f"content, not the file name)") from None
    except Image.DecompressionBombError as exc:
        raise Refusal(413, f"{name} refused as a decompression bomb ({exc})") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise Refusal(422, f"{name} is a corrupt or truncated image ({reason})") from None
    image.info[DIGEST_KEY] = hashlib.sha256(data).hexdigest()
    return image


# ---- results folders --------------------------------------------------------------------------
def inside(path, root):
    """Whether `path` resolves to `root` or below it (symlinks followed)."""
    try:
        path.resolve().relative_to(root)
        return True
    except (ValueError, OSError):
        return False


def sentence_bleu4(references, generated):
    """Smoothed sentence BLEU-4 of one caption against its original references, tokenised as
    evaluate_bleu's standard mode. Smoothing (NLTK method1: a zero n-gram count counts as 0.1)
    keeps a short caption without a 4-gram match from scoring exactly 0; only for filtering."""
    import warnings
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    refs = [standard_tokens(r) for r in references]
    hyp = standard_tokens(generated)
    if not hyp or not any(refs):
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(sentence_bleu(refs, hyp, smoothing_function=SmoothingFunction().method1))


def read_captions_tsv(path):
    """evaluate_bleu.py's captions.tsv -> [{"image_id", "generated", "references"}]."""
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if not header or header[:2] != ["image_id", "generated"]:
            raise PipelineError(f"{path.name} does not start with the header image_id, generated, "
                                f"reference_1...")
        rows = []
        for number, fields in enumerate(reader, start=2):
            if len(fields) < 2:
                raise PipelineError(f"{path.name} line {number} has {len(fields)} field(s); "
                                    f"expected image_id, generated, references")
            rows.append({"image_id": fields[0], "generated": fields[1],
                         "references": [r for r in fields[2:] if r]})
    return rows


class ResultsFolder:
    """The evaluate_bleu.py runs in a folder: the folder itself and/or its direct subfolders
    that hold a results.json. Each run is loaded on first request, again when its files change."""

    def __init__(self, root):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise PipelineError(f"results folder not found ({root})")
        self._cache = {}

    def runs(self):
        """{run name: folder}, discovered now; only folders that resolve inside the root."""
        found = {}
        candidates = [self.root] + sorted(p for p in self.root.iterdir() if p.is_dir())
        for folder in candidates:
            marker = folder / "results.json"
            if marker.is_file() and inside(folder, self.root) and inside(marker, self.root):
                found[folder.name if folder != self.root else self.root.name] = folder
        return found

    def file(self, run, name):
        """Path of one of RESULTS_FILES of a known run, or Refusal 404."""
        folder = self.runs().get(run)
        if folder is None or name not in RESULTS_FILES:
            raise Refusal(404, f"no file {name!r} in results run {run!r}")
        path = folder / name
        if not path.is_file() or not inside(path, self.root):
            raise Refusal(404, f"results run {run!r} has no {name}")
        return path

    def load(self, run):
        """(results.json dict, rows with per-caption BLEU, files present) of a run."""
        runs = self.runs()
        if run not in runs:
            raise Refusal(404, f"no results run named {run!r} (known: {', '.join(runs) or 'none'})")
        summary_path = self.file(run, "results.json")
        tsv_path = self.file(run, "captions.tsv")
        stamp = tuple(p.stat().st_mtime_ns for p in (summary_path, tsv_path))
        cached = self._cache.get(run)
        if cached is None or cached[0] != stamp:
            summary = read_json(summary_path)
            rows = read_captions_tsv(tsv_path)
            for row in rows:
                row["bleu"] = round(sentence_bleu4(row["references"], row["generated"]), 4)
            files = [name for name in RESULTS_FILES if (runs[run] / name).is_file()]
            cached = self._cache[run] = (stamp, summary, rows, files)
        return cached[1:]


def select_rows(rows, min_bleu=0.0, max_bleu=1.0, words="", sort="order"):
    """Rows whose sentence BLEU is in [min_bleu, max_bleu] and whose caption contains every
    word of `words`; sort "order" (the split's), "bleu" (lowest first) or "-bleu"."""
    wanted = words.lower().split()
    chosen = [r for r in rows if min_bleu <= r["bleu"] <= max_bleu
              and all(w in r["generated"].lower().split() for w in wanted)]
    if sort in ("bleu", "-bleu"):
        chosen = sorted(chosen, key=lambda r: r["bleu"], reverse=sort == "-bleu")
    return chosen


# ---- the app ----------------------------------------------------------------------------------
def image_table(images_dir):
    """{dataset image id: path} for the images directly in `images_dir` (resolving inside it)."""
    if images_dir is None:
        return {}
    root = Path(images_dir).resolve()
    return {p.stem: p for p in list_images(root) if inside(p, root)}


@dataclass
class Served:
    """What the routes serve; one per app, on app.state.served."""
    captioner: object           # None: the caption view says no model is loaded
    results: object             # ResultsFolder or None
    retrieval: object           # the image-search model or None
    images: dict                # {dataset image id: path}
    limits: Limits
    model_lock: threading.Lock = field(default_factory=threading.Lock)   # one model call at a time


def create_app(captioner, results_dir=None, retrieval=None, images_dir=None, limits=Limits()):
    """The FastAPI app. captioner may be None (the caption view then says no model is loaded)."""
    app = FastAPI(title="Flickr8k captioner", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=limits.max_request_bytes)
    app.state.served = Served(captioner, ResultsFolder(results_dir) if results_dir is not None else None,
                              retrieval, image_table(images_dir), limits)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, bad_parameter)
    app.add_exception_handler(Refusal, refused)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(router)
    return app


def served(request):
    return request.app.state.served


# ---- errors: every refusal is {"error": "..."} with its status ---------------------------------
async def http_error(request, exc):
    message = exc.detail if exc.status_code != 404 else f"not found: {request.url.path}"
    return error(exc.status_code, str(message))


async def bad_parameter(request, exc):
    parts = ["{}: {}".format(".".join(str(x) for x in e.get("loc", ())[1:]), e.get("msg"))
             for e in exc.errors()]
    return error(422, "bad parameter: " + "; ".join(parts))


async def refused(request, exc):
    return error(exc.status, exc.message)


# ---- routes ------------------------------------------------------------------------------------
router = APIRouter()


@router.get("/", include_in_schema=False)
def index():
    return FileResponse(STATIC_DIR / "index.html")


@router.get("/api/info")
def info(request: Request):
    state = served(request)
    describe = getattr(state.captioner, "describe", None)
    describe_retrieval = getattr(state.retrieval, "describe", None)
    return {"captioner": (describe() if describe else {}) if state.captioner is not None else None,
            "retrieval": (describe_retrieval() if describe_retrieval else {})
            if state.retrieval is not None else None,
            "runs": list(state.results.runs()) if state.results is not None else [],
            "images": len(state.images), "beam_default": BEAM_DEFAULT, "limits": asdict(state.limits)}


@router.post("/api/caption")
async def caption(request: Request):
    state = served(request)
    if state.captioner is None:
        raise Refusal(503, "no captioning model is loaded: start serve.py with --model DIR")
    started = time.perf_counter()
    try:
        beam, files = await read_caption_form(request, state.limits)
    except BodyTooLarge:
        return too_large(state.limits.max_request_bytes)
    results_out, opened = await run_in_threadpool(open_all, files, state.limits)
    if opened:
        try:
            answers = await run_in_threadpool(caption_locked, state, [img for _, img in opened], beam)
            near = await run_in_threadpool(nearest_all, state, [img for _, img in opened])
        except Exception as exc:          # keep serving; the log has the traceback
            log.exception("captioning failed")
            reason = exc if isinstance(exc, PipelineError) else type(exc).__name__
            raise Refusal(500, f"captioning failed ({reason}); see the server log") from None
        for (index, _), answer, neighbours in zip(opened, answers, near):
            results_out[index].update(image_answer(answer, neighbours, state.images))
    ok = [r for r in results_out if "error" not in r]
    status = 200 if ok else results_out[0]["status"]
    body = {"beam": beam, "results": results_out,
            "seconds": round(time.perf_counter() - started, 3)}
    if not ok:
        body["error"] = results_out[0]["error"] if len(results_out) == 1 else \
            "no image could be captioned: " + "; ".join(r["error"] for r in results_out)
    return JSONResponse(body, status_code=status)


@router.get("/api/results")
def list_runs(request: Request):
    return {"runs": list(results_of(request).runs())}


@router.get("/api/results/{run}")
def show_run(request: Request, run: str, min_bleu: float = 0.0, max_bleu: float = 1.0,
             words: str = "", sort: str = "order", offset: int = 0, limit: int = ROWS_PER_PAGE):
    state, results = served(request), results_of(request)
    if not (0 <= min_bleu <= max_bleu <= 1) or math.isnan(min_bleu + max_bleu):
        raise Refusal(400, "BLEU bounds must satisfy 0 <= from <= to <= 1")
    if sort not in ("order", "bleu", "-bleu") or offset < 0 or not 1 <= limit <= 500:
        raise Refusal(400, "sort is order, bleu or -bleu; offset >= 0; 1 <= limit <= 500")
    try:
        summary, rows, files = results.load(run)
    except PipelineError as exc:
        raise Refusal(422, f"results run {run!r} cannot be read: {exc}") from None
    chosen = select_rows(rows, min_bleu, max_bleu, words[:state.limits.max_query_chars], sort)
    page = [{**r, "has_image": r["image_id"] in state.images} for r in chosen[offset:offset + limit]]
    return {"run": run, "summary": summary, "files": files, "total": len(rows),
            "matched": len(chosen), "offset": offset, "rows": page,
            "row_bleu": "sentence BLEU-4, standard tokens, NLTK smoothing method1 "
                        "(for filtering; the run's corpus BLEU is above)"}


@router.get("/results/{run}/{name}")
def results_file(request: Request, run: str, name: str):
    return FileResponse(results_of(request).file(run, name))


@router.get("/api/image/{image_id}")
def image(request: Request, image_id: str):
    path = served(request).images.get(image_id)
    if path is None:
        raise Refusal(404, f"no image {image_id!r} in the image folder")
    return FileResponse(path)


@router.get("/api/search")
def search(request: Request, q: str = "", top: int = SEARCH_TOP_DEFAULT):
    state = served(request)
    if state.retrieval is None:
        raise Refusal(503, "no retrieval model is loaded, so text search is not available")
    query, limits = " ".join(q.split()), state.limits
    if not query:
        raise Refusal(400, "type a few words to search for")
    if len(query) > limits.max_query_chars or not 1 <= top <= limits.max_search_top:
        raise Refusal(400, f"queries are at most {limits.max_query_chars} characters and "
                           f"1 <= top <= {limits.max_search_top}")
    try:
        with state.model_lock:
            hits = state.retrieval.search(query, top)
    except PipelineError as exc:
        raise Refusal(400, str(exc)) from None
    return {"query": query, "results": [with_image_flag(h, state.images) for h in hits]}


# ---- the routes' helpers -----------------------------------------------------------------------
def results_of(request):
    """The ResultsFolder, or Refusal 404 when serve.py was started without --results."""
    results = served(request).results
    if results is None:
        raise Refusal(404, "no results folder: start serve.py with --results DIR")
    return results


async def read_caption_form(request, limits):
    """The caption form -> (beam, [(safe file name, bytes)]); Refusal for a bad form.
    BodyTooLarge passes through (the caller answers 413)."""
    try:
        form = await request.form(max_files=limits.max_images, max_fields=4)
    except HTTPException as exc:          # starlette's multipart errors (too many files...)
        raise Refusal(400, f"upload refused: {exc.detail}") from None
    try:
        beam = parse_beam(form.get("beam"), limits)
        uploads = [f for f in form.getlist("images") if hasattr(f, "read")]
        if not uploads:
            raise Refusal(400, "no images in the request (send them as form field 'images')")
        return beam, [(safe_name(f.filename), await f.read()) for f in uploads]
    finally:
        await form.close()


def open_all(files, limits):
    """[(name, bytes)] -> (one result dict per file, [(index, PIL image)] of the good ones)."""
    out, opened, pixels_left = [], [], limits.max_request_pixels
    for index, (name, data) in enumerate(files):
        try:
            image = open_upload(data, name, limits, pixels_left)
            pixels_left -= image.size[0] * image.size[1]
            opened.append((index, image))
            out.append({"name": name, "width": image.size[0], "height": image.size[1]})
        except Refusal as exc:
            out.append({"name": name, "error": exc.message, "status": exc.status})
    return out, opened


def caption_locked(state, pil_images, beam):
    with state.model_lock:
        return state.captioner.caption(pil_images, beam)


def nearest_all(state, pil_images):
    nearest = getattr(state.retrieval, "nearest", None)
    if nearest is None:
        return [None] * len(pil_images)
    with state.model_lock:
        return [nearest(image, SEARCH_TOP_DEFAULT // 2) for image in pil_images]


def image_answer(answer, neighbours, images):
    """The captioner's answer for one photo (+ its nearest dataset images) -> the page's JSON."""
    if "error" in answer:
        return {"error": answer["error"], "status": 422}
    out = {"greedy": answer["greedy"],
           "beams": [{"caption": c, "score": float(s), "finished": bool(done)} for (c, s), done
                     in zip(answer["beams"], answer.get("finished") or [True] * len(answer["beams"]))],
           "features": answer.get("features"), "attention": answer.get("attention")}
    if neighbours is not None:
        out["nearest"] = [with_image_flag(n, images) for n in neighbours]
    return out


def with_image_flag(hit, images):
    return {**hit, "score": float(hit["score"]), "has_image": hit["image_id"] in images}


def parse_beam(value, limits):
    """The form's beam width -> int in 1..max_beam, or Refusal."""
    if value is None or value == "":
        return BEAM_DEFAULT
    try:
        beam = int(value)
    except (TypeError, ValueError):
        beam = 0
    if not 1 <= beam <= limits.max_beam:
        raise Refusal(400, f"beam must be a whole number from 1 to {limits.max_beam} (got {value!r})")
    return beam


@contextlib.contextmanager
def running(app, host="127.0.0.1", port=0, startup_seconds=30):
    """Serve `app` with uvicorn in a background thread (tests, benchmarks); yields its base URL.

    port 0 takes a free port. The server stops, finishing open requests, when the block ends.
    """
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_seconds
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise PipelineError(f"the web server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()
    try:
        yield f"http://{host}:{bound[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=startup_seconds)
