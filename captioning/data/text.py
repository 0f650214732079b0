"""Caption text: cleaning, the vocabulary (tokenizer.json), encoding, and reading what prepare_text.py wrote.

Owns the file formats of prepare_text.py's outputs (descriptions.txt, tokenizer.json,
splits.json, references.json, meta.json; see prepare_text.py's docstring for each) and the
functions every later stage uses to read them back (load_tokenizer, load_meta,
load_descriptions, load_splits, load_references). Imports only captioning.utils.
"""
import re
import string
from collections import Counter
from pathlib import Path

import numpy as np

from captioning.utils import PipelineError, atomic_write, read_json, sha256_file, write_json

# ---- settings (argparse defaults) -------------------------------------------------------------
TEXT_DIR = "data/flickr8k/Flickr8k_text"        # where download_flickr8k.py unpacks it
OUTPUT_DIR = "data"
CLEANING = "default"                        # default | tutorial
MIN_COUNT = {"default": 5, "tutorial": 1}   # per cleaning mode, unless --min-count is given
OOV = {"default": "unk", "tutorial": "drop"}  # per cleaning mode, unless --oov is given
CAPTIONS_FILE = "Flickr8k.token.txt"
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt",
               "dev": "Flickr_8k.devImages.txt",
               "test": "Flickr_8k.testImages.txt"}

# ---- reserved tokens (later stages read these from tokenizer.json / meta.json, never retype) --
START_TOKEN = "startseq"
END_TOKEN = "endseq"
OOV_TOKEN = "<unk>"    # contains '<', '>' so no cleaned word (letters only) can collide with it
PAD_ID = 0

# every tolerated input problem, counted into meta.json's input_report and the summary line
REPORT_KEYS = ("blank_lines", "lines_without_tab", "empty_raw_captions", "bom", "crlf_lines",
               "train_ids_without_captions", "dev_ids_without_captions",
               "test_ids_without_captions", "captioned_ids_in_no_split",
               "captions_empty_after_cleaning")

_IMAGE_SUFFIX = re.compile(r"\.(jpe?g|png|bmp|gif)(\.\d+)?$", re.IGNORECASE)
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
_SPLIT_TABLE = str.maketrans("-/", "  ")


# ---- cleaning ---------------------------------------------------------------------------------
def clean_caption(text, cleaning=CLEANING):
    """Return the cleaned caption as space-separated words (no startseq/endseq)."""
    if cleaning == "tutorial":
        words = [w.lower().translate(_PUNCT_TABLE) for w in text.split()]
        return " ".join(w for w in words if len(w) > 1 and w.isalpha())
    if cleaning == "default":
        words = []
        for w in text.lower().translate(_SPLIT_TABLE).split():
            for suffix in ("'s", "\u2019s"):     # ASCII and typographic apostrophe
                if w.endswith(suffix):
                    w = w[: -len(suffix)]
            w = w.translate(_PUNCT_TABLE)
            if w and w.isalpha():
                words.append(w)
        return " ".join(words)
    raise PipelineError(f"unknown cleaning {cleaning!r} (expected default or tutorial)")


# ---- reading the official files ---------------------------------------------------------------
def _read_lines(path, report):
    """Decode a text file as UTF-8 and split it into lines, tolerating a BOM and CRLF endings.

    Counts BOMs and CRLF lines into `report`. Undecodable bytes are a PipelineError naming the
    file and the 1-based line.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"missing file ({path})")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise PipelineError(f"undecodable bytes, not UTF-8 ({path}, line {line})") from None
    if text.startswith("\ufeff"):
        text = text[1:]
        report["bom"] += 1
    lines = text.split("\n")       # not splitlines(): it also splits on \x0b, \x1c, \u2028...
    if lines and lines[-1] == "":
        lines.pop()                # the final newline does not start a line
    report["crlf_lines"] += sum(1 for line in lines if line.endswith("\r"))
    return [line.rstrip("\r") for line in lines]


def _image_id(name):
    """'1000268201_693b08cb0e.jpg#0' or '...jpg' -> '1000268201_693b08cb0e'.

    The real token file also has '2258277193_586949ec62.jpg.1#0' (the id without an image):
    the '.1' after the extension goes too, as in the tutorial's split('.')[0].
    """
    name = name.split("#", 1)[0].strip()
    return _IMAGE_SUFFIX.sub("", name)


def read_captions(path, report):
    """Parse Flickr8k.token.txt -> {image_id: [raw caption, ...]} in file order."""
    captions = {}
    for line in _read_lines(path, report):
        if not line.strip():
            report["blank_lines"] += 1
            continue
        key, tab, caption = line.partition("\t")
        caption = caption.strip()
        if not tab:
            report["lines_without_tab"] += 1
            continue
        if not caption or not key.strip():
            report["empty_raw_captions"] += 1
            continue
        captions.setdefault(_image_id(key), []).append(caption)
    return captions


def read_split(path, report):
    """Parse a Flickr_8k.*Images.txt file -> list of image ids in file order (no duplicates)."""
    ids = []
    for line in _read_lines(path, report):
        if not line.strip():
            report["blank_lines"] += 1
            continue
        ids.append(_image_id(line))
    return list(dict.fromkeys(ids))


# ---- vocabulary -------------------------------------------------------------------------------
def create_tokenizer(captions, min_count=1, oov_token=None,
                     start_token=START_TOKEN, end_token=END_TOKEN):
    """Build the vocabulary (the course's create_tokenizer) from cleaned training captions.

    `captions`: iterable of cleaned captions (strings, with or without the sentinels).
    Words seen fewer than `min_count` times are left out; with `oov_token` they are counted
    as that token instead (which is always in the vocabulary, so unseen dev/test words map to
    it). Returns the tokenizer.json dict; ids follow descending count, ties alphabetical.
    """
    counts = Counter()
    n_captions = 0
    for caption in captions:
        counts.update(_strip_sentinels(caption.split(), start_token, end_token))
        n_captions += 1
    kept = {w: c for w, c in counts.items() if c >= min_count}
    if oov_token is not None:
        kept[oov_token] = sum(c for w, c in counts.items() if c < min_count)
    kept[start_token] = kept[end_token] = n_captions
    order = sorted(kept, key=lambda w: (-kept[w], w))
    return {"word_index": {w: i for i, w in enumerate(order, start=PAD_ID + 1)},
            "oov_token": oov_token, "start_token": start_token, "end_token": end_token,
            "pad_id": PAD_ID, "min_count": min_count}


def _strip_sentinels(words, start_token, end_token):
    """Drop one leading start token and one trailing end token, so encoding is idempotent."""
    if words and words[0] == start_token:
        words = words[1:]
    if words and words[-1] == end_token:
        words = words[:-1]
    return words


def encode_caption(tokenizer, caption_words):
    """'a dog runs' -> [start_id, ids..., end_id], applying the tokenizer's OOV policy.

    Unknown words become oov_token's id, or are dropped when oov_token is null (tutorial).
    A caption that already carries startseq/endseq is not wrapped twice.
    """
    index = tokenizer["word_index"]
    start, end = tokenizer["start_token"], tokenizer["end_token"]
    oov_id = index.get(tokenizer["oov_token"]) if tokenizer.get("oov_token") else None
    ids = [index[start]]
    for word in _strip_sentinels(caption_words.split(), start, end):
        i = index.get(word, oov_id)
        if i is not None:
            ids.append(i)
    ids.append(index[end])
    return ids


def encode_captions(tokenizer, descriptions, ids):
    """All captions of the given images -> [(image_id, [ids...]), ...] (5 rows per image)."""
    return [(image_id, encode_caption(tokenizer, caption))
            for image_id in ids for caption in descriptions[image_id]]


def decode_ids(tokenizer, ids):
    """Ids -> words, one per id (does not stop at endseq); the pad id 0 is skipped.

    An id outside 1..vocab_size-1 is a PipelineError (a model/tokenizer mismatch).
    """
    index_word = {i: w for w, i in tokenizer["word_index"].items()}
    words = []
    for i in ids:
        i = int(i)
        if i == tokenizer.get("pad_id", PAD_ID):
            continue
        if i not in index_word:
            raise PipelineError(f"token id {i} is not in the vocabulary (1..{len(index_word)})")
        words.append(index_word[i])
    return words


def pad_sequences(sequences, max_length, value=PAD_ID):
    """Keras' pad_sequences defaults: pre-padding and pre-truncation -> int32 (N, max_length)."""
    out = np.full((len(sequences), max_length), value, dtype=np.int32)
    for row, seq in enumerate(sequences):
        seq = list(seq)[-max_length:] if max_length else []
        if seq:
            out[row, max_length - len(seq):] = seq
    return out


def create_input_data_for_one_image(tokenizer, max_length, captions, image_features,
                                    vocab_size=None, one_hot=False):
    """The course's per-image training rows: every (image, caption prefix -> next word).

    For each caption (cleaned words, sentinels optional) encoded as [s, w1, ..., wn, e], yields
    rows i = 1..n+1: prefix ids[:i] pre-padded with 0 to `max_length` (as the tutorial's
    pad_sequences) -> target ids[i]. Returns numpy arrays
      X_image (rows, D) float32 (the features repeated), X_text (rows, max_length) int32,
      y (rows,) int32 word ids, or (rows, vocab_size) float32 one-hot when one_hot=True
      (the tutorial's to_categorical; vocab_size defaults to max id + 1).
    """
    features = np.asarray(image_features, dtype=np.float32).reshape(-1)
    prefixes, targets = [], []
    for caption in captions:
        seq = encode_caption(tokenizer, caption)
        for i in range(1, len(seq)):
            prefixes.append(seq[:i])
            targets.append(seq[i])
    x_image = np.repeat(features[None, :], len(targets), axis=0)
    x_text = pad_sequences(prefixes, max_length)
    y = np.asarray(targets, dtype=np.int32)
    if one_hot:
        vocab_size = vocab_size or max(tokenizer["word_index"].values()) + 1
        y = np.eye(vocab_size, dtype=np.float32)[y]
    return x_image, x_text, y


# ---- loading what this stage wrote (used by train / generate / evaluate) ----------------------
def model_tokenizer_path(config, tokenizer_path, model_dir, hint="pass the tokenizer"):
    """The tokenizer.json a trained model must be read with: tokenizer_path (file or the folder
    holding it; default the data_dir recorded in model.json `config`), checked against the
    sha256 the model was trained with. PipelineError if missing or another vocabulary (its ids
    would decode to the wrong words)."""
    tok = Path(tokenizer_path if tokenizer_path is not None else config["data_dir"])
    if tok.is_dir():
        tok = tok / "tokenizer.json"
    if not tok.is_file():
        raise PipelineError(f"cannot check the vocabulary: missing file {tok} ({hint})")
    if sha256_file(tok) != config["tokenizer_sha256"]:
        raise PipelineError(f"tokenizer {tok} is not the one model {model_dir} was trained with")
    return tok


def load_tokenizer(path):
    """Read tokenizer.json (a file, or the folder holding it) and check its invariants."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    tok = read_json(path)
    try:
        index = tok["word_index"]
        ids = sorted(index.values())
        problems = []
        if ids != list(range(1, len(ids) + 1)):
            problems.append("ids are not 1..N without gaps")
        for key in ("start_token", "end_token"):
            if tok[key] not in index:
                problems.append(f"{key} {tok[key]!r} missing from word_index")
        if tok.get("oov_token") is not None and tok["oov_token"] not in index:
            problems.append(f"oov_token {tok['oov_token']!r} missing from word_index")
        if tok.get("pad_id", PAD_ID) != PAD_ID:
            problems.append(f"pad_id is {tok.get('pad_id')}, expected {PAD_ID}")
    except (KeyError, TypeError, AttributeError) as exc:
        raise PipelineError(f"not a tokenizer file, missing or bad field {exc} ({path})") from None
    if problems:
        raise PipelineError(f"bad tokenizer: {'; '.join(problems)} ({path})")
    return tok


def load_meta(data_dir):
    """Read meta.json and check that tokenizer.json is the one it was written with."""
    data_dir = Path(data_dir)
    meta = read_json(data_dir / "meta.json")
    tok_path = data_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise PipelineError(f"missing file {tok_path}")
    if sha256_file(tok_path) != meta.get("tokenizer_sha256"):
        raise PipelineError(f"tokenizer.json does not match meta.json's tokenizer_sha256; "
                            f"rerun prepare_text.py ({tok_path})")
    return meta


def load_descriptions(path):
    """Read descriptions.txt -> {image_id: [cleaned caption, ...]} (file order kept)."""
    path = Path(path)
    if path.is_dir():
        path = path / "descriptions.txt"
    descriptions = {}
    for line in _read_lines(path, Counter()):
        if not line.strip():
            continue
        image_id, _, caption = line.strip().partition(" ")
        descriptions.setdefault(image_id, []).append(caption.strip())
    return descriptions


def load_splits(data_dir):
    """Read splits.json -> {"train": [...], "dev": [...], "test": [...]}."""
    splits = read_json(Path(data_dir) / "splits.json")
    missing = [name for name in SPLIT_FILES if name not in splits]
    if missing:
        raise PipelineError(f"splits.json lacks {', '.join(missing)} ({Path(data_dir) / 'splits.json'})")
    return splits


def load_references(data_dir):
    """Read references.json -> {image_id: [original captions]}."""
    return read_json(Path(data_dir) / "references.json")


# ---- the stage --------------------------------------------------------------------------------
def prepare(text_dir, cleaning=CLEANING, min_count=None, oov=None):
    """Read and clean everything in memory. Returns (outputs dict, report Counter)."""
    text_dir = Path(text_dir)
    min_count = MIN_COUNT[cleaning] if min_count is None else min_count
    oov = OOV[cleaning] if oov is None else oov
    if min_count < 1:
        raise PipelineError(f"--min-count must be >= 1 (got {min_count})")
    report = Counter({key: 0 for key in REPORT_KEYS})   # zeros too, so every count is visible
    raw = read_captions(text_dir / CAPTIONS_FILE, report)
    splits, seen = {}, {}
    for name, file_name in SPLIT_FILES.items():
        ids = read_split(text_dir / file_name, report)
        for image_id in ids:
            if image_id in seen:
                raise PipelineError(f"image {image_id} is in both {seen[image_id]} and {name} "
                                    f"splits ({text_dir / file_name})")
            seen[image_id] = name
        report[f"{name}_ids_without_captions"] = sum(1 for i in ids if i not in raw)
        splits[name] = sorted(i for i in ids if i in raw)
    report["captioned_ids_in_no_split"] = sum(1 for i in raw if i not in seen)

    if not splits["train"]:
        raise PipelineError(f"no training image has captions ({text_dir / SPLIT_FILES['train']})")
    outputs = build_outputs(raw, splits, report, cleaning, min_count, oov)
    outputs["meta"].update(n_images_with_captions=len(raw),
                           input_report=dict(sorted(report.items())),
                           inputs={f: sha256_file(text_dir / f)
                                   for f in [CAPTIONS_FILE, *SPLIT_FILES.values()]})
    return outputs, report


def build_outputs(raw, splits, report, cleaning, min_count, oov):
    """{image_id: [raw caption, ...]} and splits -> prepare's outputs dict (descriptions,
    tokenizer, splits, references, meta without the fields naming the inputs: n_images_with_captions,
    input_report, inputs are the caller's). Shared by prepare and captioning.data.karpathy.
    Counts captions_empty_after_cleaning into report.
    """
    descriptions = {i: [clean_caption(c, cleaning) for c in raw[i]] for i in sorted(raw)}
    report["captions_empty_after_cleaning"] = sum(
        1 for caps in descriptions.values() for c in caps if not c)
    tokenizer = create_tokenizer((c for i in splits["train"] for c in descriptions[i]),
                                 min_count=min_count,
                                 oov_token=OOV_TOKEN if oov == "unk" else None)
    tokenizer["cleaning"] = cleaning
    index = tokenizer["word_index"]
    longest, oov_rate = {}, {}
    for name, ids in splits.items():
        encoded = encode_captions(tokenizer, descriptions, ids)
        longest[name] = max((len(seq) for _, seq in encoded), default=0)
        words = [w for i in ids for c in descriptions[i] for w in c.split()]
        oov_rate[name] = round(sum(1 for w in words if w not in index or w == OOV_TOKEN)
                               / max(len(words), 1), 6)
    meta = {"vocab_size": max(index.values()) + 1, "max_length": longest["train"],
            "start_token": START_TOKEN, "end_token": END_TOKEN, "pad_id": PAD_ID,
            "oov_token": tokenizer["oov_token"],
            "oov_policy": ("unknown and rare words map to oov_token; forbid its id when decoding"
                           if oov == "unk" else "unknown words are dropped (tutorial/Keras)"),
            "cleaning": cleaning, "min_count": min_count,
            "split_sizes": {name: len(ids) for name, ids in splits.items()},
            "longest_caption_by_split": longest, "oov_rate_by_split": oov_rate}
    return {"descriptions": descriptions, "tokenizer": tokenizer, "splits": splits,
            "references": {i: raw[i] for i in sorted(raw)}, "meta": meta}


def write_outputs(output_dir, outputs):
    """Write the five files atomically; meta.json last, carrying tokenizer.json's sha256."""
    output_dir = Path(output_dir)
    with atomic_write(output_dir / "descriptions.txt") as handle:
        for image_id, captions in outputs["descriptions"].items():
            for caption in captions:
                handle.write(f"{image_id} {caption}".rstrip() + "\n")
    write_json(output_dir / "splits.json", outputs["splits"])
    write_json(output_dir / "references.json", outputs["references"])
    write_json(output_dir / "tokenizer.json", outputs["tokenizer"])
    meta = dict(outputs["meta"], tokenizer_sha256=sha256_file(output_dir / "tokenizer.json"))
    write_json(output_dir / "meta.json", meta)
    return meta


def summary_line(report):
    """The one line that reports every tolerated input problem."""
    r = report
    return (f"input: {r['blank_lines']} blank lines, {r['lines_without_tab']} lines without tab, "
            f"{r['empty_raw_captions']} empty captions, {r['bom']} BOM, "
            f"{r['crlf_lines']} CRLF lines; split ids without captions: "
            f"train {r['train_ids_without_captions']}, dev {r['dev_ids_without_captions']}, "
            f"test {r['test_ids_without_captions']}; {r['captioned_ids_in_no_split']} captioned "
            f"ids in no split; {r['captions_empty_after_cleaning']} captions empty after cleaning")
