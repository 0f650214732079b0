"""Shipped models out of the box: attention-lite0-ft-scst (the default) and merge-lite0 caption a
photo, and so does the ensemble of those two with attention-lite0-scst; vse-lite0 searches a folder."""
import json

import pytest

import generate_caption as gc
from captioning.inference.captioner import PRETRAINED_DIR, Captioner
from captioning.models import finetune
from conftest import REPO

PRETRAINED = REPO / "pretrained" / "attention-lite0-ft-scst"   # Lite0's top fine-tuned, then SCST
FROZEN = REPO / "pretrained" / "attention-lite0-scst"       # frozen grid + SCST: an ensemble member
MERGE = REPO / "pretrained" / "merge-lite0"
TUNED = REPO / "pretrained" / "attention-lite0-ft"          # the default's starting point
DOG = "1001773457_577c3a7d70"      # the captions: "a black dog and a spotted dog are fighting"


def test_the_shipped_folders_are_self_contained():
    assert PRETRAINED_DIR == str(PRETRAINED)
    config = json.loads((PRETRAINED / "model.json").read_text())
    assert config["variant"] == "attention" and config["backbone"] == "lite0"
    assert config["vocab_size"] == 2532 and config["grid"] == [7, 7]
    assert config["encoder_top"]["block"] == 15 and config["encoder_top"]["weights"] == "imagenet"
    assert config["scst"]["select_decoding"] == "beam" and config["scst"]["best_epoch"] == 4
    # the kept epoch only: no last.keras, no optimizer state, no checkpoints; the top beside it
    assert sorted(p.name for p in PRETRAINED.iterdir()) == [
        finetune.TOP_FILE, "meta.json", "model.json", "model.keras", "tokenizer.json"]
    assert Captioner(PRETRAINED).backbone == "lite0"      # tokenizer.json found beside the model
    config = json.loads((FROZEN / "model.json").read_text())
    assert config["grid"] == [7, 7] and "encoder_top" not in config and config["scst"]["best_epoch"] == 5
    assert sorted(p.name for p in FROZEN.iterdir()) == ["meta.json", "model.json", "model.keras", "tokenizer.json"]
    config = json.loads((TUNED / "model.json").read_text())
    assert config["encoder_top"] == json.loads((PRETRAINED / "model.json").read_text())["encoder_top"]
    assert sorted(p.name for p in TUNED.iterdir()) == [
        finetune.TOP_FILE, "meta.json", "model.json", "model.keras", "tokenizer.json"]
    config = json.loads((MERGE / "model.json").read_text())
    assert config["variant"] == "merge" and config["feature_dim"] == 1280
    assert Captioner(MERGE).backbone == "lite0"
    # one vocabulary: the three can decode together
    shas = {json.loads((d / "model.json").read_text())["tokenizer_sha256"] for d in (PRETRAINED, FROZEN, MERGE, TUNED)}
    assert len(shas) == 1


@pytest.mark.slow
def test_default_model_captions_a_photo_of_any_size(flickr8k_dir, tmp_path, capsys):
    from PIL import Image
    photo = tmp_path / "dogs.png"               # another format and size than the training JPEGs
    Image.open(flickr8k_dir / "Flicker8k_Dataset" / f"{DOG}.jpg").resize((333, 500)).save(photo)
    assert gc.main([str(photo)]) == 0
    name, caption = capsys.readouterr().out.strip().split("\t")
    assert name == str(photo)
    assert {"dog", "dogs"} & set(caption.split()) and "endseq" not in caption   # "two dogs are running ..."


@pytest.mark.slow
def test_the_merge_captioner_captions_the_same_photo(flickr8k_dir, capsys):
    assert gc.main([str(flickr8k_dir / "Flicker8k_Dataset" / f"{DOG}.jpg"), "--model", str(MERGE)]) == 0
    assert {"dog", "dogs"} & set(capsys.readouterr().out.split("\t")[1].split())


@pytest.mark.slow
def test_the_shipped_ensemble_captions_the_same_photo(flickr8k_dir, capsys):
    """The best captioner measured: the default (through its own top), the frozen-grid SCST
    model and merge, with beam 3 (docs/results.md)."""
    assert gc.main([str(flickr8k_dir / "Flicker8k_Dataset" / f"{DOG}.jpg"), "--beam", "3",
                    "--model", str(PRETRAINED), str(FROZEN), str(MERGE)]) == 0
    assert {"dog", "dogs"} & set(capsys.readouterr().out.split("\t")[1].split())


RETRIEVAL = REPO / "pretrained" / "vse-lite0"
SWIMMING_DOG = "3048597471_5697538daf"   # test split: "a brown dog is swimming through water ..."
NO_DOG = ["311146855_0b65fdb169", "1258913059_07c613f7ff", "241347760_d44c8d3a01",   # test split,
          "2339106348_2df90aa6a9", "3072172967_630e9c69d0", "3482062809_3b694322c4"]  # no dog in any caption


def test_the_shipped_retrieval_folder_is_self_contained():
    from captioning.retrieval import folder_search
    config = json.loads((RETRIEVAL / "model.json").read_text())
    assert config["backbone"] == "lite0" and config["feature_dim"] == 1280
    assert config["vocab_size"] == 2532 and (RETRIEVAL / "tokenizer.json").is_file()
    assert folder_search.default_model() == RETRIEVAL
    # model.keras only: no optimizer state, no epoch checkpoints
    assert sorted(p.name for p in RETRIEVAL.iterdir()) == ["model.json", "model.keras", "tokenizer.json"]


@pytest.mark.slow
def test_search_images_finds_the_dog_with_the_default_model(flickr8k_dir, tmp_path, capsys):
    import shutil

    import search_images
    photos = tmp_path / "photos"
    photos.mkdir()
    for image_id in [SWIMMING_DOG, *NO_DOG]:
        shutil.copy(flickr8k_dir / "Flicker8k_Dataset" / f"{image_id}.jpg", photos)
    assert search_images.main(["a dog swimming in the water", "--images", str(photos), "--top", "3",
                               "--cache-dir", str(tmp_path / "cache"),
                               "--html", str(tmp_path / "search.html")]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert [row[0] for row in rows] == ["1", "2", "3"]
    assert rows[0][2].endswith(f"{SWIMMING_DOG}.jpg")
    assert float(rows[0][1]) > float(rows[1][1])


@pytest.mark.slow
def test_the_default_model_with_consensus_on_a_photo(flickr8k_dir, tmp_path, capsys):
    """Photos embedded by the backbone of the features file (Lite0; the shared reference pickle
    records none, so the model's), the full Flickr8k training captions voting."""
    from captioning.data import text
    outputs, _ = text.prepare(flickr8k_dir / "Flickr8k_text")
    text.write_outputs(tmp_path / "data", outputs)
    photo = str(flickr8k_dir / "Flicker8k_Dataset" / f"{DOG}.jpg")
    consensus = ["--consensus", str(flickr8k_dir / "features_efficientnet_lite0.pkl"),
                 "--consensus-data", str(tmp_path / "data")]
    assert gc.main([photo, "--beam", "5"]) == 0
    plain = capsys.readouterr().out
    assert gc.main([photo, *consensus, "--consensus-weight", "1"]) == 0
    assert capsys.readouterr().out == plain
    assert gc.main([photo, *consensus]) == 0
    assert {"dog", "dogs"} & set(capsys.readouterr().out.split("\t")[1].split())
