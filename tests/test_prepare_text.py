"""Tests for prepare_text.py (stage 3): cleaning, vocabulary, sequences, bad input, real data."""
import json

import numpy as np
import pytest

import prepare_text
from captioning.data import text as pt
from captioning.utils import PipelineError, run_cli

TRAIN_CAPTIONS = {  # tiny corpus: 2 train images, 1 dev, 1 test; each a `#n` caption list
    "img_a": ["A dog runs on the grass .", "The dog's ball is red .", "A dog runs ."],
    "img_b": ["A cat sits on the table .", "Two cats play ."],
    "img_c": ["A zebra runs .", "A dog sits ."],
    "img_d": ["A cat jumps !", "A snow-covered hill ."],
}


def write_text_dir(folder, captions=TRAIN_CAPTIONS, splits=None, token_bytes=None):
    """Write an official-layout text folder into `folder`; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    if token_bytes is None:
        lines = [f"{i}.jpg#{n}\t{c}" for i, caps in captions.items() for n, c in enumerate(caps)]
        token_bytes = ("\n".join(lines) + "\n").encode("utf-8")
    (folder / pt.CAPTIONS_FILE).write_bytes(token_bytes)
    splits = splits or {"train": ["img_a", "img_b"], "dev": ["img_c"], "test": ["img_d"]}
    for name, file_name in pt.SPLIT_FILES.items():
        (folder / file_name).write_text("".join(f"{i}.jpg\n" for i in splits[name]))
    return folder


# ---- cleaning ---------------------------------------------------------------------------------
def test_clean_caption_tutorial_matches_the_tutorial_rules():
    text = "A child in a pink dress is climbing up a set of stairs in an entry way ."
    assert pt.clean_caption(text, "tutorial") == \
        "child in pink dress is climbing up set of stairs in an entry way"
    # punctuation deleted inside tokens, digits and 1-letter tokens dropped, 's glued on
    assert pt.clean_caption("The dog's T-shirt, 3 dogs & hat's", "tutorial") == \
        "the dogs tshirt dogs hats"


def test_clean_caption_default_keeps_a_and_drops_possessive():
    assert pt.clean_caption("A dog's ball , a dog 's toy .", "default") == "a dog ball a dog toy"
    assert pt.clean_caption("A snow-covered hill and/or 3 T-shirts!", "default") == \
        "a snow covered hill and or t shirts"
    with pytest.raises(PipelineError):
        pt.clean_caption("x", "fancy")


# ---- vocabulary -------------------------------------------------------------------------------
def test_create_tokenizer_ids_by_count_then_alphabetical():
    tok = pt.create_tokenizer(["b a", "a c", "startseq a b endseq"])
    # counts: a 3, startseq 3, endseq 3, b 2, c 1 -> ties alphabetical
    assert tok["word_index"] == {"a": 1, "endseq": 2, "startseq": 3, "b": 4, "c": 5}
    assert tok["oov_token"] is None and tok["pad_id"] == 0


def test_create_tokenizer_min_count_and_unk():
    tok = pt.create_tokenizer(["a a b", "a c d"], min_count=2, oov_token="<unk>")
    # kept: a 3; <unk> counts b, c, d = 3; sentinels 2 each
    assert tok["word_index"] == {"<unk>": 1, "a": 2, "endseq": 3, "startseq": 4}
    assert pt.encode_caption(tok, "a zebra b") == [4, 2, 1, 1, 3]
    dropped = pt.create_tokenizer(["a a b", "a c d"], min_count=2, oov_token=None)
    assert pt.encode_caption(dropped, "a zebra b") == [3, 1, 2]   # unknown words silently gone


def test_encode_decode_round_trip_and_idempotent_sentinels():
    tok = pt.create_tokenizer(["a cat sits on the table", "a dog"])
    ids = pt.encode_caption(tok, "a cat sits on the table")
    assert ids == pt.encode_caption(tok, "startseq a cat sits on the table endseq")
    assert pt.decode_ids(tok, [0, 0] + ids) == \
        ["startseq", "a", "cat", "sits", "on", "the", "table", "endseq"]
    with pytest.raises(PipelineError, match="not in the vocabulary"):
        pt.decode_ids(tok, [999])


def test_create_input_data_for_one_image_course_table():
    tok = pt.create_tokenizer(["a cat sits on the table"])
    w = tok["word_index"]
    photo = np.arange(4, dtype=np.float32)
    x_img, x_txt, y = pt.create_input_data_for_one_image(
        tok, 10, ["startseq a cat sits on the table endseq"], photo)
    words = ["startseq", "a", "cat", "sits", "on", "the", "table", "endseq"]
    ids = [w[x] for x in words]
    expected_x = np.zeros((7, 10), dtype=np.int32)
    for i in range(1, 8):
        expected_x[i - 1, 10 - i:] = ids[:i]          # pre-padded with 0, like pad_sequences
    assert x_img.shape == (7, 4) and (x_img == photo).all()
    np.testing.assert_array_equal(x_txt, expected_x)
    np.testing.assert_array_equal(y, ids[1:])
    table = [(" ".join(pt.decode_ids(tok, row)), pt.decode_ids(tok, [t])[0])
             for row, t in zip(x_txt, y)]
    assert table == [("startseq", "a"), ("startseq a", "cat"), ("startseq a cat", "sits"),
                     ("startseq a cat sits", "on"), ("startseq a cat sits on", "the"),
                     ("startseq a cat sits on the", "table"),
                     ("startseq a cat sits on the table", "endseq")]
    _, _, y1 = pt.create_input_data_for_one_image(tok, 10, ["a cat sits on the table"], photo,
                                                  one_hot=True)
    assert y1.shape == (7, len(w) + 1) and (y1.argmax(1) == ids[1:]).all() and y1.sum() == 7


def test_pad_sequences_truncates_at_the_front_like_keras():
    np.testing.assert_array_equal(pt.pad_sequences([[1, 2, 3, 4], [5]], 3),
                                  [[2, 3, 4], [0, 0, 5]])


# ---- the stage on small files -----------------------------------------------------------------
def test_main_writes_all_files_with_contract_formats(tmp_path, capsys):
    text_dir = write_text_dir(tmp_path / "text")
    out = tmp_path / "data"
    assert prepare_text.main(["--text-dir", str(text_dir), "--output-dir", str(out),
                    "--min-count", "2"]) == 0
    meta = pt.load_meta(out)
    tok = pt.load_tokenizer(out / "tokenizer.json")
    # training words (default cleaning): a 3, dog 3, the 3, on 2, runs 2 -> kept; the rest
    # (grass, ball, is, red, cat, sits, table, two, cats, play: once each) -> <unk>
    assert meta["min_count"] == 2 and meta["oov_token"] == "<unk>" == tok["oov_token"]
    assert tok["word_index"] == {"<unk>": 1, "startseq": 3, "endseq": 2, "a": 4, "dog": 5,
                                 "the": 6, "on": 7, "runs": 8}
    assert meta["vocab_size"] == 9
    assert meta["max_length"] == 8        # startseq a dog runs on the grass endseq
    assert pt.load_splits(out) == {"train": ["img_a", "img_b"], "dev": ["img_c"],
                                   "test": ["img_d"]}
    desc = pt.load_descriptions(out / "descriptions.txt")
    assert desc["img_a"] == ["a dog runs on the grass", "the dog ball is red", "a dog runs"]
    assert desc["img_d"][1] == "a snow covered hill"
    refs = json.loads((out / "references.json").read_text())
    assert refs["img_a"][1] == "The dog's ball is red ."
    assert set(meta["inputs"]) == {pt.CAPTIONS_FILE, *pt.SPLIT_FILES.values()}
    assert "vocab_size 9 max_length 8" in capsys.readouterr().out
    encoded = pt.encode_captions(tok, desc, ["img_c"])
    assert [pt.decode_ids(tok, ids) for _, ids in encoded] == [
        ["startseq", "a", "<unk>", "runs", "endseq"], ["startseq", "a", "dog", "<unk>", "endseq"]]


def test_same_input_gives_identical_files(tmp_path):
    text_dir = write_text_dir(tmp_path / "text")
    for run in ("one", "two"):
        assert prepare_text.main(["--text-dir", str(text_dir), "--output-dir", str(tmp_path / run)]) == 0
    for name in ("descriptions.txt", "tokenizer.json", "splits.json", "references.json",
                 "meta.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_messy_input_is_counted_in_one_summary_line(tmp_path, capsys):
    lines = ["img_a.jpg#0\tA dog runs .", "", "   ", "no tab here",
             "img_a.jpg#1\tA dog sits .", "img_b.jpg#0\tA cat !", "img_b.jpg#1\t",
             "img_c.jpg#0\tA cat runs .", "img_d.jpg#0\t3 4 ."]
    token = ("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8")
    text_dir = write_text_dir(tmp_path / "text", token_bytes=token,
                              splits={"train": ["img_a", "img_b", "ghost"],
                                      "dev": ["img_c"], "test": ["img_d", "ghost2"]})
    out = tmp_path / "data"
    assert prepare_text.main(["--text-dir", str(text_dir), "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    summary = [line for line in printed if line.startswith("input:")]
    assert summary == ["input: 2 blank lines, 1 lines without tab, 1 empty captions, 1 BOM, "
                       "9 CRLF lines; split ids without captions: train 1, dev 0, test 1; "
                       "0 captioned ids in no split; 1 captions empty after cleaning"]
    assert pt.load_splits(out)["train"] == ["img_a", "img_b"]      # ghost left out
    assert pt.load_descriptions(out)["img_d"] == [""]               # kept, like the tutorial
    report = pt.load_meta(out)["input_report"]
    assert report["bom"] == 1 and report["train_ids_without_captions"] == 1


@pytest.mark.parametrize("broken", ["bytes", "missing"])
def test_bad_files_are_one_line_errors_and_write_nothing(tmp_path, capsys, broken):
    token = "img_a.jpg#0\tA dog .\nimg_b.jpg#0\tA cat .\n".encode() + b"img_b.jpg#1\tA \xff\xfe\n"
    text_dir = write_text_dir(tmp_path / "text",
                              token_bytes=token if broken == "bytes" else None)
    if broken == "missing":
        (text_dir / pt.SPLIT_FILES["dev"]).unlink()
    out = tmp_path / "data"
    assert run_cli(prepare_text.main, ["--text-dir", str(text_dir), "--output-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    if broken == "bytes":
        assert f"({text_dir / pt.CAPTIONS_FILE}, line 3)" in err
    else:
        assert "missing file" in err and pt.SPLIT_FILES["dev"] in err
    assert not out.exists()


def test_overlapping_splits_are_an_error(tmp_path):
    text_dir = write_text_dir(tmp_path / "text",
                              splits={"train": ["img_a", "img_c"], "dev": ["img_c"],
                                      "test": ["img_d"]})
    with pytest.raises(PipelineError, match="img_c is in both train and dev"):
        prepare_text.main(["--text-dir", str(text_dir), "--output-dir", str(tmp_path / "d")])


def test_load_meta_rejects_a_changed_tokenizer(tmp_path):
    text_dir = write_text_dir(tmp_path / "text")
    out = tmp_path / "data"
    prepare_text.main(["--text-dir", str(text_dir), "--output-dir", str(out)])
    tok = json.loads((out / "tokenizer.json").read_text())
    tok["word_index"]["zzz"] = len(tok["word_index"]) + 1
    (out / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(PipelineError, match="tokenizer_sha256"):
        pt.load_meta(out)
    pt.load_tokenizer(out)                        # still a valid tokenizer on its own
    tok["word_index"]["gap"] = 99
    (out / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(PipelineError, match="without gaps"):
        pt.load_tokenizer(out)


# ---- the real Flickr8k text files -------------------------------------------------------------
@pytest.mark.slow
def test_tutorial_cleaning_reproduces_published_numbers(flickr8k_dir, tmp_path, capsys):
    out = tmp_path / "tutorial"
    assert prepare_text.main(["--text-dir", str(flickr8k_dir / "Flickr8k_text"), "--output-dir", str(out),
                    "--cleaning", "tutorial"]) == 0
    assert "vocab_size 7579 max_length 34" in capsys.readouterr().out
    meta = pt.load_meta(out)
    assert (meta["vocab_size"], meta["max_length"]) == (7579, 34)
    assert meta["oov_token"] is None and meta["min_count"] == 1
    assert meta["split_sizes"] == {"train": 6000, "dev": 1000, "test": 1000}
    assert meta["inputs"][pt.CAPTIONS_FILE].startswith("1e1f3a37")
    report = meta["input_report"]
    # 8092 captioned ids, 8000 in the splits; every split id has captions
    assert report["captioned_ids_in_no_split"] == 92
    assert report["train_ids_without_captions"] == report["dev_ids_without_captions"] == 0
    desc = pt.load_descriptions(out)
    assert len(desc) == 8092 and all(len(c) == 5 for c in desc.values())
    assert "2258277193_586949ec62" in desc          # the caption id with no image
    assert "a" not in pt.load_tokenizer(out)["word_index"]


def test_default_cleaning_on_real_captions(flickr8k_dir, tmp_path):
    out = tmp_path / "default"
    assert prepare_text.main(["--text-dir", str(flickr8k_dir / "Flickr8k_text"),
                    "--output-dir", str(out)]) == 0
    meta, tok = pt.load_meta(out), pt.load_tokenizer(out)
    index = tok["word_index"]
    assert index["a"] == 1 and "<unk>" in index and meta["oov_token"] == "<unk>"
    assert all(w.isalpha() for w in index if w != "<unk>")
    assert meta["vocab_size"] == len(index) + 1 and meta["max_length"] >= 34
    assert 0 < meta["oov_rate_by_split"]["train"] < 0.05
