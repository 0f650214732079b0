"""Where Flickr8k, Flickr30k and MS-COCO 2014 and their Karpathy splits come from, their expected
sizes, and the check of a user's local copy against a Karpathy JSON (check_dataset.py's engine).

None of these files could be downloaded on the machines this project is built on (no network
but the package registries): the addresses and counts below are the published ones, as every
captioning paper since 2015 reports them, not measured here. Flickr8k's are also what
download_flickr8k.py fetches and the tests read (8,091 images; 6,000 / 1,000 / 1,000).

    dataset    images (official release)          Karpathy JSON             train (+restval) / val / test
    flickr8k   8,091                              dataset_flickr8k.json     6,000 / 1,000 / 1,000
    flickr30k  31,783                             dataset_flickr30k.json    29,000 / 1,014 / 1,000
    coco       123,287 = 82,783 train2014         dataset_coco.json         82,783 + 30,504 restval
                         + 40,504 val2014                                   = 113,287 / 5,000 / 5,000

The JSON lists fewer images than some releases hold: 8,000 of Flickr8k's 8,091, 31,014 of
Flickr30k's 31,783 (Karpathy's Flickr30k is an earlier copy); the files it does not list are
counted, not reported as errors. COCO's val and test are both drawn from val2014; restval is the
rest of val2014 and trains with train (captioning/data/karpathy.py).

The images root check_dataset.py expects: Flickr8k the folder of the JPEGs (Flicker8k_Dataset/),
Flickr30k the folder of the JPEGs (flickr30k-images/), COCO the folder holding train2014/ and
val2014/ (the JSON's filepath names them).
"""
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from captioning.data import karpathy
from captioning.data.images import IMAGE_EXTENSIONS
from captioning.utils import PipelineError

KARPATHY_ZIP = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"


@dataclass(frozen=True)
class Dataset:
    name: str
    karpathy_json: str          # the file inside KARPATHY_ZIP
    images: int                 # image files in the official release
    splits: dict                # Karpathy split name -> images in the JSON
    folders: dict               # folder under the images root -> image files in the release
    sources: list = field(default_factory=list)   # (what, where) lines for the user


DATASETS = {
    "flickr8k": Dataset(
        "flickr8k", "dataset_flickr8k.json", 8091,
        {"train": 6000, "val": 1000, "test": 1000}, {"": 8091},
        [("images and text (Flickr8k_Dataset.zip, Flickr8k_text.zip)",
          "python download_flickr8k.py (the course's copies; the original needs the University "
          "of Illinois request form, https://forms.illinois.edu/sec/1713398)"),
         ("Karpathy splits (dataset_flickr8k.json)", KARPATHY_ZIP)]),
    "flickr30k": Dataset(
        "flickr30k", "dataset_flickr30k.json", 31783,
        {"train": 29000, "val": 1014, "test": 1000}, {"": 31783},
        [("images (flickr30k-images.tar.gz, after agreeing to the terms)",
          "request form at https://shannon.cs.illinois.edu/DenotationGraph/"),
         ("Karpathy splits (dataset_flickr30k.json)", KARPATHY_ZIP)]),
    "coco": Dataset(
        "coco", "dataset_coco.json", 123287,
        {"train": 82783, "restval": 30504, "val": 5000, "test": 5000},
        {"train2014": 82783, "val2014": 40504},
        [("train2014 images (13 GB)", "http://images.cocodataset.org/zips/train2014.zip"),
         ("val2014 images (6 GB)", "http://images.cocodataset.org/zips/val2014.zip"),
         ("captions (not needed with the Karpathy JSON)",
          "http://images.cocodataset.org/annotations/annotations_trainval2014.zip"),
         ("Karpathy splits (dataset_coco.json)", KARPATHY_ZIP)]),
}


def get(name):
    if name not in DATASETS:
        raise PipelineError(f"unknown dataset {name!r} (choose from {', '.join(DATASETS)})")
    return DATASETS[name]


def source_lines(name):
    """Where the files of dataset `name` live, one line each, and what the release holds."""
    dataset = get(name)
    lines = [f"{name}: {dataset.images:,} images; Karpathy splits "
             + ", ".join(f"{split} {n:,}" for split, n in dataset.splits.items())]
    lines += [f"  {what}: {where}" for what, where in dataset.sources]
    return lines


def _image_files(folder):
    try:
        with os.scandir(folder) as entries:
            return {e.name for e in entries
                    if e.is_file() and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def check(json_path, images_root=None, dataset=None):
    """Check a Karpathy JSON (and the images under `images_root`) against the published counts.

    dataset: flickr8k | flickr30k | coco, or None for the JSON's own "dataset" field. Returns a
    dict: dataset, json, counts {Karpathy split: images in the JSON}, expected {split: count} (or
    {} for a dataset this module does not know), count_problems [lines], and with an images
    root: missing [relative paths, JSON order], not_in_json (image files in the image folders
    that the JSON does not list), folders {folder: image files found}. A JSON that cannot be
    read is a PipelineError (karpathy.read_images's checks).
    """
    name, records = karpathy.read_images(json_path)
    name = dataset or name
    expected = DATASETS[name].splits if name in DATASETS else {}
    counts = Counter(record[3] for record in records)
    counts = {split: counts.get(split, 0) for split in karpathy.SPLITS if split in counts
              or split in expected}
    problems = [f"split {split}: {counts.get(split, 0):,} images, expected {n:,}"
                for split, n in expected.items() if counts.get(split, 0) != n]
    problems += [f"split {split}: {n:,} images, expected none"
                 for split, n in counts.items() if expected and split not in expected and n]
    result = {"dataset": name, "json": str(json_path), "counts": counts, "expected": expected,
              "count_problems": problems}
    if images_root is not None:
        root = Path(images_root)
        if not root.is_dir():
            raise PipelineError(f"images root not found ({root})")
        listed = [record[1] for record in records]
        result["missing"] = karpathy.missing_files(root, listed)
        folders = sorted({relative.rpartition("/")[0] for relative in listed})
        found = {folder: _image_files(root / folder) for folder in folders}
        in_json = {(relative.rpartition("/")[0], relative.rpartition("/")[2]) for relative in listed}
        result["folders"] = {folder: len(names) for folder, names in found.items()}
        result["not_in_json"] = sum(1 for folder, names in found.items() for n in names
                                    if (folder, n) not in in_json)
    return result


def report_lines(result):
    """check()'s result -> (ok, lines): a line per split, per image folder and per missing image."""
    lines = [f"{result['dataset'] or 'unknown dataset'} ({result['json']}): "
             f"{sum(result['counts'].values()):,} images"]
    for split, n in result["counts"].items():
        want = result["expected"].get(split)
        verdict = "" if want is None else (" ok" if want == n else f" EXPECTED {want:,}")
        lines.append(f"  split {split}: {n:,}{verdict}")
    if not result["expected"]:
        lines.append(f"  no published counts for {result['dataset']!r} (known: {', '.join(DATASETS)})")
    ok = not result["count_problems"]
    if "missing" in result:
        known = DATASETS.get(result["dataset"])
        for folder, n in result["folders"].items():
            release = known.folders.get(folder) if known else None
            also = f" (the official release has {release:,})" if release else ""
            lines.append(f"  folder {folder or '.'}: {n:,} image files{also}")
        lines.append(f"  images: {len(result['missing']):,} missing, "
                     f"{result['not_in_json']:,} files not in the JSON (not used)")
        lines += [f"missing: {relative}" for relative in result["missing"]]
        ok = ok and not result["missing"]
    return ok, lines
