"""Tests of captioning/data/karpathy.py and prepare_text.py --karpathy-json: the Karpathy-split
JSON reader.

The fixture tests/fixtures/karpathy_coco_tiny.json has the exact layout of dataset_coco.json
(filepath train2014/val2014, cocoid, sentids, sentences with raw and tokens) for six made-up
images, one per split plus a restval. Two tests write a Karpathy-format JSON from the real
Flickr8k text files: both readers prepare the same data from it, and check_dataset.py finds the
shared images complete.
"""
import json

import pytest
from PIL import Image

import check_dataset
import prepare_text
from captioning.data import karpathy, text
from captioning.utils import PipelineError, run_cli
from helpers import FIXTURE



def fixture_data():
    return json.loads(FIXTURE.read_text())


def write(tmp_path, data, name="dataset_coco.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def make_images_root(root, data):
    for image in data["images"]:
        path = root / image.get("filepath", "") / image["filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (90, 120, 150)).save(path)
    return root


def test_fixture_prepares_the_folder_prepare_text_makes(tmp_path):
    root = make_images_root(tmp_path / "coco", fixture_data())
    outputs, report = karpathy.prepare(FIXTURE, images_root=root, min_count=1)
    meta = karpathy.write_outputs(tmp_path / "data", outputs)
    data = tmp_path / "data"
    assert sorted(p.name for p in data.iterdir()) == [
        "descriptions.txt", "image_paths.json", "meta.json", "references.json", "splits.json",
        "tokenizer.json"]
    assert text.load_meta(data) == meta        # tokenizer.json matches meta.json's sha256
    splits = text.load_splits(data)
    # restval joins train, val becomes dev
    assert splits == {"train": ["COCO_train2014_000000000009", "COCO_train2014_000000000025",
                                "COCO_train2014_000000000030", "COCO_val2014_000000000042"],
                      "dev": ["COCO_val2014_000000000073"], "test": ["COCO_val2014_000000000074"]}
    assert report["restval_images"] == 1 and meta["input_report"]["restval_images"] == 1
    assert meta["source"] == {"karpathy_json": FIXTURE.name, "dataset": "coco"}
    assert meta["split_sizes"] == {"train": 4, "dev": 1, "test": 1}
    descriptions = text.load_descriptions(data)
    assert descriptions["COCO_val2014_000000000074"][0] == "a man with a red helmet on a small moped"
    assert text.load_references(data)["COCO_train2014_000000000025"][2] == \
        "The giraffe reaches up into the tree's branches."
    tokenizer = text.load_tokenizer(data)
    assert {"giraffe", "broccoli", "startseq", "endseq", "<unk>"} <= set(tokenizer["word_index"])
    # the image of every id, whichever COCO folder it is in
    files = karpathy.image_files(data, root)
    assert [f.relative_to(root).as_posix() for f in files][3:5] == [
        "val2014/COCO_val2014_000000000042.jpg", "val2014/COCO_val2014_000000000073.jpg"]
    assert all(f.is_file() for f in files)
    assert karpathy.image_files(data, root, ["COCO_val2014_000000000074"]) == [
        root / "val2014" / "COCO_val2014_000000000074.jpg"]
    with pytest.raises(PipelineError, match="image nope is not in"):
        karpathy.image_files(data, root, ["nope"])


def broken(change):
    data = fixture_data()
    change(data["images"])
    return data


def _set(record, key, value):
    record[key] = value


BAD_INPUTS = {
    "unknown split": (lambda im: _set(im[2], "split", "holdout"),
                      "unknown split 'holdout' for images\\[2\\] COCO_train2014_000000000030.jpg"),
    "empty sentence list": (lambda im: _set(im[1], "sentences", []),
                            "empty sentence list for images\\[1\\] COCO_train2014_000000000025"),
    "blank sentences only": (lambda im: _set(im[1], "sentences", [{"raw": "  ", "tokens": []}]),
                             "empty sentence list for images\\[1\\]"),
    "duplicate id": (lambda im: _set(im[4], "filename", "COCO_val2014_000000000042.jpg"),
                     "duplicate image id COCO_val2014_000000000042: "
                     "val2014/COCO_val2014_000000000042.jpg and val2014/COCO_val2014_000000000042.jpg"),
    "same name in both folders": (lambda im: _set(im[0], "filepath", "val2014") or
                                  _set(im[3], "filename", "COCO_train2014_000000000009.jpg"),
                                  "duplicate image id COCO_train2014_000000000009"),
    "no filename": (lambda im: im[0].pop("filename"), "images\\[0\\] has no filename"),
    "sentence without raw": (lambda im: im[5]["sentences"][0].pop("raw"), "has no raw text"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_nothing_is_written(tmp_path, case):
    change, message = BAD_INPUTS[case]
    path = write(tmp_path, broken(change))
    out = tmp_path / "data"
    with pytest.raises(PipelineError, match=message) as info:
        karpathy.write_outputs(out, karpathy.prepare(path, min_count=1)[0])
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert not out.exists()


def test_missing_image_malformed_json_and_no_images_list(tmp_path):
    data = fixture_data()
    root = make_images_root(tmp_path / "coco", data)
    (root / "val2014" / "COCO_val2014_000000000073.jpg").unlink()
    (root / "train2014" / "COCO_train2014_000000000009.jpg").unlink()
    with pytest.raises(PipelineError, match="image file missing: .*train2014/"
                       "COCO_train2014_000000000009.jpg and 1 more \\(check_dataset.py"):
        karpathy.prepare(FIXTURE, images_root=root)
    assert karpathy.missing_files(root, [karpathy.read_images(FIXTURE)[1][i][1] for i in (0, 4)]) \
        == ["train2014/COCO_train2014_000000000009.jpg", "val2014/COCO_val2014_000000000073.jpg"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(PipelineError, match="is not valid JSON") as info:
        karpathy.prepare(bad)
    assert "\n" not in str(info.value)
    for content, message in [({"dataset": "coco"}, "no images\\[\\] list"), ([1, 2], "no images"),
                             ({"images": []}, "no images in"),
                             ({"images": [{"filename": "x.jpg", "split": "restval",
                                           "sentences": [{"raw": "a dog"}]}]}, None)]:
        path = write(tmp_path, content, "other.json")
        if message is None:   # restval alone is a training set
            assert karpathy.prepare(path)[0]["splits"]["train"] == ["x"]
            continue
        with pytest.raises(PipelineError, match=message):
            karpathy.prepare(path)


def karpathy_json_from_official_files(text_dir, path):
    """dataset_flickr8k.json's layout, built from Flickr8k.token.txt and the three split files
    with a parser of its own (not captioning.data.text's), raw captions as in the token file."""
    captions = {}
    for line in (text_dir / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines():
        name, _, caption = line.partition("\t")
        captions.setdefault(name.split("#")[0], []).append(caption)
    images, sentid = [], 0
    for split, file_name in [("train", "Flickr_8k.trainImages.txt"),
                             ("val", "Flickr_8k.devImages.txt"),
                             ("test", "Flickr_8k.testImages.txt")]:
        for name in (text_dir / file_name).read_text(encoding="utf-8").split():
            sentences = [{"raw": c, "tokens": c.lower().split(), "imgid": len(images),
                          "sentid": sentid + k} for k, c in enumerate(captions[name])]
            sentid += len(sentences)
            images.append({"filename": name, "imgid": len(images), "split": split,
                           "sentences": sentences, "sentids": [s["sentid"] for s in sentences]})
    path.write_text(json.dumps({"images": images, "dataset": "flickr8k"}))
    return path


@pytest.mark.parametrize("cleaning", ["default", "tutorial"])
def test_flickr8k_json_and_official_files_give_the_same_data(flickr8k_dir, tmp_path, cleaning):
    text_dir = flickr8k_dir / "Flickr8k_text"
    json_path = karpathy_json_from_official_files(text_dir, tmp_path / "dataset_flickr8k.json")
    official, _ = text.prepare(text_dir, cleaning)
    ours, report = karpathy.prepare(json_path, cleaning=cleaning)
    assert ours["splits"] == official["splits"]
    assert [len(ours["splits"][s]) for s in ("train", "dev", "test")] == [6000, 1000, 1000]
    assert ours["tokenizer"] == official["tokenizer"]
    in_splits = [i for ids in official["splits"].values() for i in ids]
    assert ours["descriptions"] == {i: official["descriptions"][i] for i in sorted(in_splits)}
    assert ours["references"] == {i: official["references"][i] for i in sorted(in_splits)}
    for split, ids in official["splits"].items():
        assert text.encode_captions(ours["tokenizer"], ours["descriptions"], ids) == \
            text.encode_captions(official["tokenizer"], official["descriptions"], ids)
    # every meta field but the ones naming the inputs
    differ = {"inputs", "input_report", "source", "n_images_with_captions"}
    assert {k: v for k, v in ours["meta"].items() if k not in differ} == \
        {k: v for k, v in official["meta"].items() if k not in differ}
    assert report["restval_images"] == 0
    if cleaning == "tutorial":
        assert (ours["meta"]["vocab_size"], ours["meta"]["max_length"]) == (7579, 34)


def test_prepare_text_cli_reads_a_karpathy_json(tmp_path, capsys):
    root = make_images_root(tmp_path / "coco", fixture_data())
    out = tmp_path / "data"
    argv = ["--karpathy-json", str(FIXTURE), "--images-root", str(root), "--output-dir", str(out),
            "--min-count", "1"]
    assert run_cli(prepare_text.main, argv, tensorflow=False) == 0
    printed = capsys.readouterr().out
    assert "1 restval images joined to train" in printed and "train 4 dev 1 test 1" in printed
    assert karpathy.load_image_paths(out)["COCO_val2014_000000000074"] == \
        "val2014/COCO_val2014_000000000074.jpg"
    (root / "train2014" / "COCO_train2014_000000000025.jpg").unlink()
    assert run_cli(prepare_text.main, [*argv[:-4], "--output-dir", str(tmp_path / "x")],
                   tensorflow=False) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "image file missing: " in err and not (tmp_path / "x").exists()
    assert run_cli(prepare_text.main, ["--images-root", str(root)], tensorflow=False) == 1
    assert "--images-root goes with --karpathy-json" in capsys.readouterr().err
    with pytest.raises(SystemExit):      # argparse: one source or the other
        prepare_text.main(["--karpathy-json", str(FIXTURE), "--text-dir", str(tmp_path)])
    assert "not allowed with argument" in capsys.readouterr().err


def test_check_dataset_finds_the_shared_flickr8k_copy_complete(flickr8k_dir, tmp_path, capsys):
    json_path = karpathy_json_from_official_files(flickr8k_dir / "Flickr8k_text",
                                                  tmp_path / "dataset_flickr8k.json")
    images = flickr8k_dir / "Flicker8k_Dataset"
    assert run_cli(check_dataset.main, ["--karpathy-json", str(json_path), "--images-root",
                                        str(images)], tensorflow=False) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:4] == ["  split train: 6,000 ok", "  split val: 1,000 ok", "  split test: 1,000 ok"]
    assert "  folder .: 8,091 image files (the official release has 8,091)" in out
    assert "  images: 0 missing, 91 files not in the JSON (not used)" in out and out[-1] == "ok"
