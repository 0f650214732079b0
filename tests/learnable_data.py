"""A tiny Flickr8k-format dataset that a tiny model learns in a few seconds (shared by tests).

Three kinds of image, told apart by their features (a one-hot kind code plus noise):
    dog  "A dog." three times and "A dog runs on the green grass near the water." twice
    cat  "A cat sits on a red ball." five times
    man  "A man rides a bike." five times
So a trained model says "a dog" and then hesitates: p(endseq) ~ 0.6 against "runs" ~ 0.4. The
greedy caption is "a dog"; a one-beam search with length normalisation (alpha 0.7) prefers the
long caption (log 0.4 / 10**0.7 > log 0.6 / 3**0.7): the trap a length-normalised "greedy" falls into
instead of the argmax loop. The captions of a kind are its references on dev/test too, so dev BLEU is far
from zero once the model has learnt.
"""
import numpy as np

import prepare_text
from captioning.data.text import SPLIT_FILES
from captioning.data.features import save_features

CAPTIONS = {
    "dog": ["A dog."] * 3 + ["A dog runs on the green grass near the water."] * 2,
    "cat": ["A cat sits on a red ball."] * 5,
    "man": ["A man rides a bike."] * 5,
}
SPLIT_SIZES = {"train": 8, "dev": 2, "test": 2}   # images per kind
FEATURE_DIM = 8
# a small model and a high learning rate: it learns the three kinds in ~8 epochs of 15 batches
TRAIN_ARGS = ["--embed-dim", "16", "--units", "32", "--batch-size", "8", "--learning-rate", "0.01",
              "--dropout", "0.1", "--seed", "5", "--verbose", "0", "--recipe", "tutorial"]


def make_learnable(root, seed=0):
    """Flickr8k text files -> prepare_text.py -> root/data; features -> root/features.pkl.

    Returns (features_path, data_dir, {split: [image ids]}).
    """
    rng = np.random.default_rng(seed)
    text_dir, data_dir = root / "Flickr8k_text", root / "data"
    text_dir.mkdir(parents=True)
    token_lines, features, splits = [], {}, {}
    for split, per_kind in SPLIT_SIZES.items():
        splits[split] = []
        for k, (kind, captions) in enumerate(CAPTIONS.items()):
            for n in range(per_kind):
                image_id = f"{split}_{kind}_{n}"
                splits[split].append(image_id)
                token_lines += [f"{image_id}.jpg#{i}\t{c}" for i, c in enumerate(captions)]
                code = np.zeros(FEATURE_DIM, np.float32)
                code[k] = 3.0
                features[image_id] = code + rng.normal(0, 0.3, FEATURE_DIM).astype(np.float32)
    (text_dir / "Flickr8k.token.txt").write_text("\n".join(token_lines) + "\n")
    for split, name in SPLIT_FILES.items():
        (text_dir / name).write_text("".join(f"{i}.jpg\n" for i in splits[split]))
    assert prepare_text.main(["--text-dir", str(text_dir), "--output-dir", str(data_dir)]) == 0
    save_features(root / "features.pkl", features)
    return root / "features.pkl", data_dir, splits
