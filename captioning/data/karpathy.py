"""The Karpathy splits (dataset_flickr8k.json, dataset_flickr30k.json, dataset_coco.json) -> the
same prepared text folder that prepare_text.py makes from the official Flickr8k files.

Reads one JSON file of A. Karpathy's caption_datasets.zip (the splits every captioning paper
reports on; captioning/data/datasets.py says where it lives):

    {"dataset": "coco" | "flickr8k" | "flickr30k",
     "images": [{"filename": "COCO_val2014_000000391895.jpg",
                 "filepath": "val2014",             # COCO only: the folder under the images root
                 "split": "train" | "restval" | "val" | "test",
                 "sentences": [{"raw": "A man with a red helmet ...", "tokens": [...], ...}, ...],
                 "imgid": ..., "sentids": [...], "cocoid": ...}, ...]}

Only filename, filepath, split and sentences[].raw are used: the raw captions are cleaned with
the same rules as the official files (clean_caption; Karpathy's `tokens` are his own cleaning,
not ours), so a vocabulary made from dataset_flickr8k.json equals the one made from
Flickr8k.token.txt (tests/test_karpathy.py shows it on the real files).

Splits: train -> train, val -> dev, test -> test, and restval -> train. restval is the 30,504
COCO val2014 images outside Karpathy's 5,000 val and 5,000 test; every paper since his trains on
them ("train+restval", 113,287 images), so they join train here; meta.json's input_report counts
them (restval_images).

Image ids: the file name without its extension (what extract_features.py keys features by). COCO
names carry their folder (COCO_train2014_..., COCO_val2014_...), so ids are unique across the two
folders; a JSON in which two images have the same id anyway is refused.

Writes (write_outputs): prepare_text.py's five files (descriptions.txt, tokenizer.json,
splits.json, references.json, meta.json; see prepare_text.py's docstring), plus
    image_paths.json  {image_id: "filepath/filename"}: each image's file relative to the images
                      root (COCO: "val2014/COCO_val2014_000000391895.jpg"; Flickr: the file
                      name), sorted by id; later stages find an image by id through it
                      (image_files). Written before meta.json, which is last as always.
meta.json also records source {"karpathy_json": file name, "dataset": the JSON's "dataset"} and
inputs {file name: sha256}; its input_report counts restval_images, empty_raw_captions (a
sentence whose raw text is blank: skipped) and captions_empty_after_cleaning.

Bad input is a one-line PipelineError and nothing is written: malformed JSON or a record without
its fields, an unknown split name, an image with no (non-blank) sentence, two images with the
same id, or (with an images root) an image file that is not there.
"""
import os
from collections import Counter
from pathlib import Path

from captioning.data import text
from captioning.utils import PipelineError, read_json, sha256_file, write_json

# Karpathy's split name -> the split of splits.json
SPLITS = {"train": "train", "restval": "train", "val": "dev", "test": "test"}
IMAGE_PATHS_FILE = "image_paths.json"
REPORT_KEYS = ("restval_images", "empty_raw_captions", "captions_empty_after_cleaning")


# ---- reading the JSON -----------------------------------------------------------------------
def read_images(json_path):
    """Parse a Karpathy JSON -> (dataset name or None, [(image_id, relative path, split of
    splits.json, Karpathy's split, [raw captions])]) in file order, every record checked.

    Blank raw captions are left out (counted by prepare); an image left with none, an unknown
    split, a duplicate id or a record without filename/split/sentences is a PipelineError.
    """
    json_path = Path(json_path)
    data = read_json(json_path)   # a missing file or malformed JSON: one line naming it
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise PipelineError(f"not a Karpathy split file: no images[] list ({json_path})")
    records, seen = [], {}
    for n, image in enumerate(images):
        where = f"images[{n}]"
        if not isinstance(image, dict):
            raise PipelineError(f"malformed Karpathy JSON: {where} is not an object ({json_path})")
        filename, split = image.get("filename"), image.get("split")
        sentences = image.get("sentences")
        if not isinstance(filename, str) or not filename.strip():
            raise PipelineError(f"malformed Karpathy JSON: {where} has no filename ({json_path})")
        where = f"{where} {filename}"
        if split not in SPLITS:
            raise PipelineError(f"unknown split {split!r} for {where} (expected "
                                f"{', '.join(SPLITS)}) ({json_path})")
        if not isinstance(sentences, list):
            raise PipelineError(f"malformed Karpathy JSON: {where} has no sentences list ({json_path})")
        raws = []
        for sentence in sentences:
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if not isinstance(raw, str):
                raise PipelineError(f"malformed Karpathy JSON: a sentence of {where} has no raw "
                                    f"text ({json_path})")
            raws.append(raw.strip())
        if not any(raws):
            raise PipelineError(f"empty sentence list for {where} ({json_path})")
        relative = Path(image.get("filepath") or "", filename).as_posix()
        image_id = Path(filename).stem
        if image_id in seen:
            raise PipelineError(f"duplicate image id {image_id}: {seen[image_id]} and {relative} "
                                f"({json_path})")
        seen[image_id] = relative
        records.append((image_id, relative, SPLITS[split], split, raws))
    if not records:
        raise PipelineError(f"no images in {json_path}")
    return (data.get("dataset") if isinstance(data.get("dataset"), str) else None), records


def missing_files(images_root, relative_paths):
    """The relative paths with no file under images_root, in the order given. Each folder is
    listed once (os.scandir), not stat'ed per image: 123,287 COCO names check in a second."""
    root, listed = Path(images_root), {}
    missing = []
    for relative in relative_paths:
        folder, _, name = relative.rpartition("/")
        if folder not in listed:
            try:
                with os.scandir(root / folder) as entries:
                    listed[folder] = {e.name for e in entries if e.is_file()}
            except (FileNotFoundError, NotADirectoryError):
                listed[folder] = set()
        if name not in listed[folder]:
            missing.append(relative)
    return missing


# ---- the stage --------------------------------------------------------------------------------
def prepare(json_path, images_root=None, cleaning=text.CLEANING, min_count=None, oov=None):
    """Read and clean a Karpathy JSON in memory -> (outputs dict, report Counter), outputs as
    captioning.data.text.prepare's plus "image_paths" {image_id: relative path}.

    With `images_root`, every image file must exist under it (one missing is a PipelineError
    that counts the others; check_dataset.py lists them all).
    """
    json_path = Path(json_path)
    min_count = text.MIN_COUNT[cleaning] if min_count is None else min_count
    oov = text.OOV[cleaning] if oov is None else oov
    if min_count < 1:
        raise PipelineError(f"--min-count must be >= 1 (got {min_count})")
    dataset, records = read_images(json_path)
    if images_root is not None:
        missing = missing_files(images_root, [r[1] for r in records])
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise PipelineError(f"image file missing: {Path(images_root) / missing[0]}{more} "
                                f"(check_dataset.py lists them) ({json_path})")

    report = Counter({key: 0 for key in REPORT_KEYS})
    raw, splits, paths = {}, {name: [] for name in text.SPLIT_FILES}, {}
    for image_id, relative, split, karpathy_split, raws in records:
        report["empty_raw_captions"] += sum(1 for r in raws if not r)
        report["restval_images"] += karpathy_split == "restval"
        raw[image_id] = [r for r in raws if r]
        splits[split].append(image_id)
        paths[image_id] = relative
    splits = {name: sorted(ids) for name, ids in splits.items()}
    if not splits["train"]:
        raise PipelineError(f"no training image (split train or restval) ({json_path})")
    outputs = text.build_outputs(raw, splits, report, cleaning, min_count, oov)
    outputs["meta"].update(
        source={"karpathy_json": json_path.name, "dataset": dataset},
        inputs={json_path.name: sha256_file(json_path)}, n_images_with_captions=len(raw),
        input_report=dict(sorted(report.items())))
    outputs["image_paths"] = {i: paths[i] for i in sorted(paths)}
    return outputs, report


def write_outputs(output_dir, outputs):
    """Write image_paths.json, then prepare_text.py's five files (meta.json last); each atomically."""
    write_json(Path(output_dir) / IMAGE_PATHS_FILE, outputs["image_paths"])
    return text.write_outputs(output_dir, outputs)


def summary_line(report):
    """The one line that reports what was tolerated or converted in the JSON."""
    return (f"input: {report['restval_images']} restval images joined to train, "
            f"{report['empty_raw_captions']} blank captions skipped, "
            f"{report['captions_empty_after_cleaning']} captions empty after cleaning")


# ---- finding the images later -----------------------------------------------------------------
def load_image_paths(data_dir):
    """Read image_paths.json (a prepared folder, or the file itself) -> {image_id: relative path}."""
    path = Path(data_dir)
    if path.is_dir():
        path = path / IMAGE_PATHS_FILE
    paths = read_json(path)
    if not isinstance(paths, dict) or not all(isinstance(v, str) for v in paths.values()):
        raise PipelineError(f"not an image path map {{image_id: path}} ({path})")
    return paths


def image_files(data_dir, images_root, ids=None):
    """The image files of a prepared Karpathy folder: [images_root / relative path] sorted by id
    (all images, or those of `ids`). An id without an entry is a PipelineError."""
    paths = load_image_paths(data_dir)
    wanted = sorted(paths) if ids is None else sorted(ids)
    unknown = [i for i in wanted if i not in paths]
    if unknown:
        raise PipelineError(f"image {unknown[0]} is not in {Path(data_dir) / IMAGE_PATHS_FILE}")
    return [Path(images_root) / paths[i] for i in wanted]
