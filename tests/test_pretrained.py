"""The shipped captioner (pretrained/merge-lite0): `generate_caption.py photo.jpg` works out of the box."""
import json

import pytest

import generate_caption as gc
from captioning.inference.captioner import Captioner
from conftest import REPO

PRETRAINED = REPO / "pretrained" / "merge-lite0"
DOG = "1001773457_577c3a7d70"      # the captions: "a black dog and a spotted dog are fighting"


def test_the_shipped_folder_is_self_contained():
    config = json.loads((PRETRAINED / "model.json").read_text())
    assert config["backbone"] == "lite0" and config["feature_dim"] == 1280
    assert config["variant"] == "merge" and config["vocab_size"] == 2532
    captioner = Captioner(PRETRAINED)          # tokenizer.json found beside the model
    assert captioner.backbone == "lite0"


@pytest.mark.slow
def test_default_model_captions_a_photo_of_any_size(flickr8k_dir, tmp_path, capsys):
    from PIL import Image
    photo = tmp_path / "dogs.png"               # another format and size than the training JPEGs
    Image.open(flickr8k_dir / "Flicker8k_Dataset" / f"{DOG}.jpg").resize((333, 500)).save(photo)
    assert gc.main([str(photo)]) == 0
    name, caption = capsys.readouterr().out.strip().split("\t")
    assert name == str(photo)
    assert "dog" in caption.split() and "endseq" not in caption
