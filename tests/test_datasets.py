"""Tests of check_dataset.py and captioning/data/datasets.py: the published counts and the check
of a local copy against a Karpathy JSON (the tiny COCO-format fixture; test_karpathy.py checks a
Flickr8k JSON made from the shared text files against the shared images)."""
import json

from PIL import Image

import check_dataset
from captioning.data import datasets
from captioning.utils import run_cli
from helpers import FIXTURE



def make_images_root(root):
    """The fixture's image files (8x8 JPEGs) under `root`, in their COCO folders."""
    for image in json.loads(FIXTURE.read_text())["images"]:
        path = root / image["filepath"] / image["filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (90, 120, 150)).save(path)
    return root


def test_published_counts_add_up():
    coco = datasets.get("coco")
    assert sum(coco.folders.values()) == coco.images == 82783 + 40504 == 123287
    assert coco.splits["train"] + coco.splits["restval"] == 113287
    assert coco.splits["train"] == coco.folders["train2014"]     # val/test/restval are val2014's
    assert sum(n for s, n in coco.splits.items() if s != "train") == coco.folders["val2014"]
    assert datasets.get("flickr30k").splits == {"train": 29000, "val": 1014, "test": 1000}
    assert datasets.get("flickr8k").splits == {"train": 6000, "val": 1000, "test": 1000}
    lines = datasets.source_lines("flickr30k")
    assert "31,783 images" in lines[0] and any(datasets.KARPATHY_ZIP in line for line in lines)


def test_fixture_counts_and_one_line_per_missing_image(tmp_path, capsys):
    root = make_images_root(tmp_path / "coco")
    (root / "val2014" / "COCO_val2014_000000000073.jpg").unlink()
    (root / "train2014" / "stray.jpg").write_bytes(b"")
    result = datasets.check(FIXTURE, root)
    assert result["counts"] == {"train": 3, "restval": 1, "val": 1, "test": 1}
    assert result["missing"] == ["val2014/COCO_val2014_000000000073.jpg"]
    assert result["not_in_json"] == 1 and result["folders"] == {"train2014": 4, "val2014": 2}
    assert len(result["count_problems"]) == 4          # a fixture is not COCO's size
    assert run_cli(check_dataset.main, ["--karpathy-json", str(FIXTURE), "--images-root",
                                        str(root)], tensorflow=False) == 2
    out = capsys.readouterr().out.splitlines()
    assert "missing: val2014/COCO_val2014_000000000073.jpg" in out
    assert "  split restval: 1 EXPECTED 30,504" in out and out[-1].startswith("problems found")


def test_cli_where_and_one_line_errors(tmp_path, capsys):
    assert run_cli(check_dataset.main, ["--where", "coco"], tensorflow=False) == 0
    out = capsys.readouterr().out
    assert "train2014.zip" in out and "113,287" not in out and "restval 30,504" in out
    bad = tmp_path / "dataset_coco.json"
    for content, message in [("{", "is not valid JSON"),
                             (json.dumps({"images": [{"filename": "a.jpg", "split": "dev",
                                                      "sentences": [{"raw": "x"}]}]}),
                              "unknown split 'dev'")]:
        bad.write_text(content)
        assert run_cli(check_dataset.main, ["--karpathy-json", str(bad)], tensorflow=False) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    assert run_cli(check_dataset.main, [], tensorflow=False) == 1
    assert "pass --karpathy-json" in capsys.readouterr().err
    assert run_cli(check_dataset.main, ["--karpathy-json", str(FIXTURE), "--images-root",
                                        str(tmp_path / "none")], tensorflow=False) == 1
    assert "images root not found" in capsys.readouterr().err

