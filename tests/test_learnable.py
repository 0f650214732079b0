"""Tests on a model that has learnt something: train.py on tests/learnable_data.py's three kinds of
image (one short training run per module), then selection by dev BLEU, evaluate_bleu.py and the
command line's greedy default checked on it."""
import csv
import json

import numpy as np
import pytest

import evaluate_bleu
import generate_caption
import train
from captioning.inference import decoding
from captioning.models import registry
from captioning.data.features import load_features
from learnable_data import TRAIN_ARGS, make_learnable

EPOCHS = 5


@pytest.fixture(scope="module")
def learnt(tmp_path_factory):
    """(root, features, data_dir, splits, run folder) after EPOCHS epochs with --select-by bleu."""
    root = tmp_path_factory.mktemp("learnable")
    features, data_dir, splits = make_learnable(root)
    assert train.main(["--features", str(features), "--data-dir", str(data_dir),
                       "--output-dir", str(root / "models"), "--name", "bleu", "--epochs", str(EPOCHS),
                       "--patience", str(EPOCHS), "--select-by", "bleu", *TRAIN_ARGS]) == 0
    return root, features, data_dir, splits, root / "models" / "bleu"


@pytest.mark.slow
def test_select_by_bleu_keeps_the_epoch_with_the_best_dev_bleu(learnt):
    root, features, data_dir, _, folder = learnt
    scores = [float(r["dev_bleu4"]) for r in csv.DictReader(open(folder / "history.csv"))]
    assert len(scores) == EPOCHS
    assert max(scores) > 0.5 and min(scores) < max(scores)      # learnt; the choice matters
    config = json.loads((folder / "model.json").read_text())
    assert config["best_epoch"] == 1 + scores.index(max(scores))   # first of equals wins
    assert config["best_dev_bleu4"] == pytest.approx(max(scores), abs=1e-6)
    # evaluate_bleu.py on the dev split scores the kept model.keras exactly as training did
    assert evaluate_bleu.main(["--features", str(features), "--data-dir", str(data_dir),
                               "--model", str(folder), "--split", "dev",
                               "--output", str(root / "eval")]) == 0
    result = json.loads((root / "eval" / "results.json").read_text())
    assert result["bleu"]["standard"]["bleu4"] == pytest.approx(config["best_dev_bleu4"], abs=1e-6)
    assert result["beam"] == 1


@pytest.mark.slow
def test_cli_default_is_the_course_greedy_loop_caption_for_caption(learnt, capsys):
    """The default decoding (--beam 1, --alpha left at its beam default) is greedy:
    the same captions as tutorial_greedy's one predict per word, on every image."""
    root, features, data_dir, splits, folder = learnt
    ids = splits["dev"] + splits["test"]          # 12 images, 4 of each kind
    capsys.readouterr()
    # the run folder's model.keras is accepted as --model as well as the folder
    assert generate_caption.main(["--model", str(folder / "model.keras"), "--data-dir", str(data_dir),
                                  "--features", str(features), "--ids", *ids]) == 0
    printed = dict(line.split("\t") for line in capsys.readouterr().out.splitlines())
    model, config, tokenizer = registry.load_captioner(folder, data_dir)
    id_to_word, start, end, banned = decoding.vocabulary(tokenizer)
    vectors = load_features(features)
    expected = {}
    for image_id in ids:
        slow = decoding.tutorial_greedy(model, vectors[image_id], start, end, config["max_length"], banned)
        expected[image_id] = " ".join(decoding.ids_to_words(id_to_word, slow, end))
    assert printed == expected
    assert {printed[i] for i in ids if "_cat_" in i} == {"a cat sits on a red ball"}
    assert len(set(printed.values())) == 3                      # one caption per kind


@pytest.mark.slow
def test_evaluate_bleu_limit_zero_is_a_one_line_error(learnt, capsys):
    from captioning.utils import run_cli
    root, features, data_dir, _, folder = learnt
    capsys.readouterr()
    rc = run_cli(evaluate_bleu.main, ["--features", str(features), "--data-dir", str(data_dir),
                                      "--model", str(folder), "--limit", "0",
                                      "--output", str(root / "limit0")])
    err = capsys.readouterr().err
    assert rc == 1 and err.strip().splitlines() == ["error: --limit must be at least 1 (got 0)"]
    assert not (root / "limit0").exists()


def test_captioner_takes_folder_or_model_file_and_pil_images(learnt):
    from PIL import Image
    from captioning.inference.captioner import Captioner
    root, features, data_dir, splits, folder = learnt
    vectors = load_features(features)
    by_folder = Captioner(folder, data_dir)
    by_file = Captioner(folder / "model.keras")                 # data_dir from model.json
    matrix = np.stack([vectors[i] for i in splits["test"]])
    assert by_folder.caption_features(matrix) == by_file.caption_features(matrix)
    assert by_folder.caption_words(matrix[:1]) == [by_folder.caption_features(matrix[:1])[0].split()]
    # images go through the injected encoder: here one that looks up the image's "kind"
    kinds = {"red": vectors[splits["test"][2]], "blue": vectors[splits["test"][4]]}

    def encode(images):
        return np.stack([kinds["red" if img.getpixel((0, 0))[0] > 128 else "blue"] for img in images])

    encode.width = by_folder.feature_dim
    captioner = Captioner(folder, data_dir, encode=encode)
    images = [Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))]
    assert captioner.caption_images(images) == by_folder.caption_features(np.stack(list(kinds.values())))
    encode.width = 3
    with pytest.raises(Exception, match="3-d"):
        captioner.caption_images(images)
