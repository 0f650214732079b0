"""The Flickr8k release files: download (resumable, MD5-checked), unpack, check the layout.

Owns where the files come from (BASE_URL, RELEASE_FILES with their MD5 sums), the layout the
scripts expect (missing_files) and getting there (ensure_flickr8k). download_flickr8k.py is its
command line; run_pipeline.py calls ensure_flickr8k before its stages.

Reads nothing but the network. Writes, under data_dir:
    Flickr8k_text/{Flickr8k.token.txt, Flickr_8k.{train,dev,test}Images.txt, ...}
    Flicker8k_Dataset/<image>.jpg                  8091 photos (the release's own spelling)
    downloads/<zip>.part                           only while a download is unfinished
The zips are the widely used release copies `Flickr8k_text.zip` (~2.2 MB) and
`Flickr8k_Dataset.zip` (~1.1 GB) of the dataset of Hodosh, Young and Hockenmaier (2013),
checked against the MD5 sums published with them (the same sums torchvision for R checks).
A partial zip resumes with an HTTP Range request; a checksum mismatch deletes the bad zip; a
folder only appears once its zip has been fully extracted, so a half-unpacked dataset is never
mistaken for a whole one.
"""
import hashlib
import os
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from captioning.utils import PipelineError

BASE_URL = "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k"
CHUNK_BYTES = 1 << 20          # 1 MiB reads: a progress update per MiB, little overhead
TIMEOUT_S = 30                 # per socket operation, not for the whole download

# zip name -> (MD5 of the release file, folder its contents must end up in)
RELEASE_FILES = {
    "Flickr8k_text.zip": ("bf6c1abcb8e4a833b7f922104de18627", "Flickr8k_text"),
    "Flickr8k_Dataset.zip": ("f18a1e2920de5bd84dae7cf08ec78978", "Flicker8k_Dataset"),
}
TEXT_FILES = ["Flickr8k.token.txt", "Flickr_8k.trainImages.txt", "Flickr_8k.devImages.txt",
              "Flickr_8k.testImages.txt"]


def missing_files(data_dir):
    """What of the expected layout is absent under data_dir, as paths relative to it."""
    data_dir = Path(data_dir)
    missing = [f"Flickr8k_text/{name}" for name in TEXT_FILES
               if not (data_dir / "Flickr8k_text" / name).is_file()]
    images = data_dir / "Flicker8k_Dataset"
    if not images.is_dir() or not any(images.glob("*.jpg")):
        missing.append("Flicker8k_Dataset/*.jpg")
    return missing


def zips_needed(missing):
    """Which release zips provide the missing paths."""
    needed = []
    if any(path.startswith("Flickr8k_text/") for path in missing):
        needed.append("Flickr8k_text.zip")
    if any(path.startswith("Flicker8k_Dataset") for path in missing):
        needed.append("Flickr8k_Dataset.zip")
    return needed


def md5_file(path):
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url, dest, md5=None):
    """Download url to dest, resuming a previous `dest.part`; verify MD5; rename when whole.

    Returns dest. Raises PipelineError (one line) on a network error or a checksum mismatch;
    a network error keeps the .part for the next try, a mismatch deletes it.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code != 416:  # 416: nothing left to send, the .part is already complete
            raise PipelineError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
        response = None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PipelineError(f"cannot reach {url} ({reason})") from None
    if response is not None:
        with response:
            resumed = have and response.status == 206
            if have and not resumed:
                have = 0  # the server ignored the Range header: start again
            total = response.length + have if response.length is not None else None
            try:
                with open(part, "ab" if resumed else "wb") as handle, tqdm(
                        total=total, initial=have, unit="B", unit_scale=True,
                        unit_divisor=1024, desc=dest.name) as bar:
                    for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                        handle.write(chunk)
                        bar.update(len(chunk))
            except OSError as exc:
                raise PipelineError(f"download of {url} broke off ({exc}); "
                                    "run again to resume") from None
            if total is not None and part.stat().st_size != total:
                raise PipelineError(f"download of {url} ended early at {part.stat().st_size} "
                                    f"of {total} bytes; run again to resume")
    if md5 is not None:
        got = md5_file(part)
        if got != md5:
            part.unlink()
            raise PipelineError(f"{dest.name} from {url} has MD5 {got}, expected {md5}; "
                                "the bad file was deleted, run again to retry")
    os.replace(part, dest)
    return dest


def safe_members(archive):
    """Zip members worth extracting: no macOS resource forks, no absolute or `..` paths."""
    for info in archive.infolist():
        parts = Path(info.filename).parts
        if not parts or parts[0] == "__MACOSX" or info.filename.startswith("/") or ".." in parts:
            continue
        if Path(info.filename).name.startswith("._"):
            continue
        yield info


def extract(zip_path, data_dir, folder):
    """Unpack zip_path so that its files end up in data_dir/folder, whatever the zip's nesting.

    Extracts into a temporary folder first and renames at the end, so an interrupted
    extraction never leaves a half-filled `folder` behind.
    """
    data_dir = Path(data_dir)
    staging = data_dir / f".{folder}.extracting"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = list(safe_members(archive))
            for info in tqdm(members, desc=f"extract {Path(zip_path).name}", unit="file"):
                archive.extract(info, staging)
    except zipfile.BadZipFile as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise PipelineError(f"{zip_path} is not a valid zip ({exc}); delete it and run again") \
            from None
    # The release nests files differently per zip (a folder, or files at the top): find the
    # folder that holds the files and move it into place.
    root = staging
    entries = [p for p in root.iterdir()]
    if len(entries) == 1 and entries[0].is_dir():
        root = entries[0]
    target = data_dir / folder
    if target.exists():
        shutil.rmtree(target)
    os.replace(root, target)
    shutil.rmtree(staging, ignore_errors=True)
    return target


def offline_message(data_dir, missing):
    return (f"Flickr8k is not in {data_dir} (missing: {', '.join(missing)}); "
            f"run `python download_flickr8k.py --data-dir {data_dir}` with internet, or put "
            f"Flickr8k_text.zip's files in {Path(data_dir) / 'Flickr8k_text'} and the images in "
            f"{Path(data_dir) / 'Flicker8k_Dataset'}")


def ensure_flickr8k(data_dir, base_url=None, assume_yes=False, keep_zips=False, ask=input):
    """Make sure data_dir holds Flickr8k; download and unpack what is missing.

    Asks before downloading unless assume_yes (refuses when nobody can answer: no terminal).
    Returns the list of zips fetched (empty when everything was already there).
    """
    data_dir = Path(data_dir)
    missing = missing_files(data_dir)
    if not missing:
        return []
    base_url = (base_url or os.environ.get("FLICKR8K_BASE_URL") or BASE_URL).rstrip("/")
    needed = zips_needed(missing)
    if not assume_yes:
        if not sys.stdin or not sys.stdin.isatty():
            raise PipelineError(offline_message(data_dir, missing) +
                                " (or pass --download to fetch them, ~1.1 GB)")
        answer = ask(f"Flickr8k is missing from {data_dir} ({', '.join(missing)}). "
                     f"Download {', '.join(needed)} (~1.1 GB) from {base_url}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            raise PipelineError(offline_message(data_dir, missing))
    downloads = data_dir / "downloads"
    for name in needed:
        md5, folder = RELEASE_FILES[name]
        zip_path = downloads / name
        if not zip_path.exists():
            try:
                download(f"{base_url}/{name}", zip_path, md5)
            except PipelineError as exc:
                if "cannot reach" in str(exc):
                    raise PipelineError(f"{exc}; offline? " + offline_message(data_dir, missing)) \
                        from None
                raise
        extract(zip_path, data_dir, folder)
        if not keep_zips:
            zip_path.unlink()
    still_missing = missing_files(data_dir)
    if still_missing:
        raise PipelineError(f"after unpacking, {data_dir} still lacks {', '.join(still_missing)}")
    return needed
