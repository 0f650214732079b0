"""download_flickr8k.py (captioning/data/download.py) against a loopback HTTP server serving
small zips made here.

No test touches the internet: the server listens on 127.0.0.1 and serves zips with the
release's layouts (text files at the zip's top level with a __MACOSX folder; images inside a
Flicker8k_Dataset/ folder). Range requests are honoured so that resuming can be checked.
"""
import hashlib
import http.server
import io
import threading
import zipfile

import pytest

import download_flickr8k
from captioning.data import download as dl
from captioning.utils import PipelineError, run_cli

TEXT_FILES = {name: f"content of {name}\n" for name in dl.TEXT_FILES}


def make_zip(entries):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


TEXT_ZIP = make_zip({**TEXT_FILES, "__MACOSX/._Flickr8k.token.txt": "junk"})
IMAGES_ZIP = make_zip({f"Flicker8k_Dataset/{i}.jpg": bytes([i]) * 5000 for i in range(20)})


class Server:
    """Serves a dict of name -> bytes; supports `Range: bytes=N-`; can cut a transfer short."""

    def __init__(self, files):
        self.files, self.requests, self.cut_after = files, [], None
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                owner.requests.append((self.path, self.headers.get("Range")))
                data = owner.files.get(self.path.lstrip("/"))
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].rstrip("-"))
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if owner.cut_after is not None:  # simulate a dropped connection
                    body, owner.cut_after = body[:owner.cut_after], None
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    srv = Server({"Flickr8k_text.zip": TEXT_ZIP, "Flickr8k_Dataset.zip": IMAGES_ZIP})
    monkeypatch.setitem(dl.RELEASE_FILES, "Flickr8k_text.zip",
                        (hashlib.md5(TEXT_ZIP).hexdigest(), "Flickr8k_text"))
    monkeypatch.setitem(dl.RELEASE_FILES, "Flickr8k_Dataset.zip",
                        (hashlib.md5(IMAGES_ZIP).hexdigest(), "Flicker8k_Dataset"))
    yield srv
    srv.close()


def test_fresh_download_unpacks_the_expected_layout(server, tmp_path):
    assert download_flickr8k.main(["--data-dir", str(tmp_path), "--base-url", server.url, "--yes"]) == 0
    for name, text in TEXT_FILES.items():
        assert (tmp_path / "Flickr8k_text" / name).read_text() == text
    assert not (tmp_path / "Flickr8k_text" / "__MACOSX").exists()
    images = sorted((tmp_path / "Flicker8k_Dataset").glob("*.jpg"))
    assert len(images) == 20 and images[3].read_bytes() == bytes([11]) * 5000  # 0,1,10,11: by name
    assert dl.missing_files(tmp_path) == []
    assert not list((tmp_path / "downloads").iterdir())  # zips removed after unpacking
    # A second run finds everything and asks the server for nothing.
    server.requests.clear()
    assert dl.ensure_flickr8k(tmp_path, server.url, assume_yes=True) == []
    assert server.requests == []


def test_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    server.cut_after = 10_000  # the first transfer of the image zip stops after 10 kB
    dest = tmp_path / "Flickr8k_Dataset.zip"
    md5 = hashlib.md5(IMAGES_ZIP).hexdigest()
    with pytest.raises(PipelineError, match="run again to resume"):
        dl.download(f"{server.url}/Flickr8k_Dataset.zip", dest, md5)
    part = tmp_path / "Flickr8k_Dataset.zip.part"
    assert part.stat().st_size == 10_000 and not dest.exists()
    dl.download(f"{server.url}/Flickr8k_Dataset.zip", dest, md5)
    assert server.requests[-1] == ("/Flickr8k_Dataset.zip", "bytes=10000-")
    assert dest.read_bytes() == IMAGES_ZIP and not part.exists()


def test_checksum_mismatch_deletes_the_file_and_extracts_nothing(server, tmp_path, monkeypatch):
    monkeypatch.setitem(dl.RELEASE_FILES, "Flickr8k_text.zip", ("0" * 32, "Flickr8k_text"))
    with pytest.raises(PipelineError, match="expected 00000000"):
        dl.ensure_flickr8k(tmp_path, server.url, assume_yes=True)
    assert not (tmp_path / "Flickr8k_text").exists()
    assert not list((tmp_path / "downloads").iterdir())


def test_offline_gives_one_line_saying_what_to_put_where(tmp_path, capsys):
    dead = "http://127.0.0.1:9"  # discard port: nothing listens, the connection is refused
    assert run_cli(download_flickr8k.main, ["--data-dir", str(tmp_path), "--base-url", dead, "--yes"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: cannot reach")
    assert "Flickr8k_text/Flickr8k.token.txt" in err and "Flicker8k_Dataset" in err


def test_half_present_data_dir_lists_exactly_what_is_missing(tmp_path):
    (tmp_path / "Flickr8k_text").mkdir()
    (tmp_path / "Flickr8k_text" / "Flickr8k.token.txt").write_text("x")
    assert dl.missing_files(tmp_path) == [
        "Flickr8k_text/Flickr_8k.trainImages.txt", "Flickr8k_text/Flickr_8k.devImages.txt",
        "Flickr8k_text/Flickr_8k.testImages.txt", "Flicker8k_Dataset/*.jpg"]
    with pytest.raises(PipelineError, match="Flickr_8k.devImages.txt"):
        dl.ensure_flickr8k(tmp_path, "http://127.0.0.1:9", assume_yes=False)  # no terminal


def test_shared_data_is_recognised_as_complete(flickr8k_dir):
    assert dl.missing_files(flickr8k_dir) == []
