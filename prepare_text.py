"""Stage 3: clean the Flickr8k captions, build the vocabulary, splits and startseq/endseq sequences.

Usage:
    python prepare_text.py --text-dir data/flickr8k/Flickr8k_text --output-dir data/
    python prepare_text.py --text-dir DIR --output-dir /tmp/x --cleaning tutorial   # 7579 / 34
    python prepare_text.py --text-dir DIR --cleaning default --min-count 5 --oov unk
    python prepare_text.py --karpathy-json dataset_coco.json --output-dir data/coco --images-root data/coco

--karpathy-json FILE reads a Karpathy split file (dataset_flickr8k.json, dataset_flickr30k.json,
dataset_coco.json) instead of --text-dir and writes the same files, plus image_paths.json
({image_id: path under the images root}); restval joins train, val becomes dev. With
--images-root every image it lists must be there. captioning/data/karpathy.py has the details;
docs/datasets.md the whole path to Flickr30k and COCO.

Reads (from --text-dir, the official Flickr8k text files):
    Flickr8k.token.txt          `<image>.jpg#<n>\\t<caption>` per line (UTF-8; a BOM, CRLF
                                endings, blank lines and lines without a tab are tolerated:
                                counted, skipped where needed, reported in one summary line).
    Flickr_8k.trainImages.txt   one image file name per line (likewise dev, test). A listed id
    Flickr_8k.devImages.txt     without captions is counted and left out of splits.json; an id
    Flickr_8k.testImages.txt    listed in two splits is an error (it would leak test data).
Undecodable bytes or a missing file stop the run with `error: ... (file, line N)` before
anything is written.

Writes (into --output-dir, each file atomically; meta.json last, so a reader that checks
meta["tokenizer_sha256"] never mixes an old and a new vocabulary):
    descriptions.txt  `image_id word word ...` per line: the cleaned caption WITHOUT startseq /
                      endseq, 5 lines per image (in the token file's order), images sorted by
                      id, UTF-8, `\\n` endings. A caption that cleaning empties stays as a line
                      holding only the id (the tutorial keeps it too: "startseq endseq").
    tokenizer.json    {"word_index": {word: id}, "oov_token": "<unk>" or null,
                       "start_token": "startseq", "end_token": "endseq", "pad_id": 0,
                       "cleaning": ..., "min_count": ...}
                      built from the TRAINING split only. ids 1..vocab_size-1, contiguous,
                      by descending training count (startseq/endseq counted once per caption,
                      "<unk>" counted as the rare words it replaces), ties alphabetical.
                      id 0 is padding and is not in word_index.
    splits.json       {"train": [...], "dev": [...], "test": [...]} sorted image ids (no .jpg)
                      that have captions.
    references.json   {image_id: [original caption text, ...]} for every captioned image: the
                      raw captions (only surrounding whitespace stripped), for "standard" BLEU.
    meta.json         vocab_size (max id + 1, padding included), max_length (tokens of the
                      longest encoded TRAINING caption, startseq and endseq included),
                      start_token, end_token, pad_id, oov_token, oov_policy, cleaning,
                      min_count, split_sizes, longest_caption_by_split, oov_rate_by_split
                      (share of caption words mapped to <unk> or dropped), input_report (the
                      bad-input counts), inputs ({file name: sha256}), tokenizer_sha256.

Cleaning (`clean_caption`):
    tutorial  exactly J. Brownlee's Flickr8k tutorial: split on whitespace, lowercase, delete
              string.punctuation characters from each token, drop tokens of length <= 1 and
              tokens that are not all letters. OOV policy: unknown words are silently dropped
              (what keras' old Tokenizer.texts_to_sequences did), oov_token null, min_count 1.
              Gives vocab_size 7579 and max_length 34 on the official files.
    default   lowercase; hyphens and slashes split words ("snow-covered" -> "snow covered",
              so compounds become common words instead of rare ones); the possessive "'s" is
              removed ("dog's" -> "dog", a lone "'s" token disappears); other punctuation is
              deleted; tokens that are not all letters are dropped; one-letter words are KEPT
              ("a" is the commonest word). Words seen fewer than --min-count (5) times in the
              training captions become "<unk>" (oov_token "<unk>"); the decoder must forbid
              that id (and the pad id 0) when generating.
"""
import argparse
import sys

from captioning.data import karpathy
from captioning.data.text import (CLEANING, MIN_COUNT, OOV, OUTPUT_DIR, TEXT_DIR,  # noqa: F401
                             create_input_data_for_one_image, create_tokenizer, prepare,
                             summary_line, write_outputs)
from captioning.utils import HelpFormatter, PipelineError, run_cli


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=HelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text-dir", default=TEXT_DIR, help="folder of the official text files")
    source.add_argument("--karpathy-json", metavar="FILE", default=None,
                        help="read this Karpathy split file (dataset_coco.json, ...) instead")
    parser.add_argument("--images-root", metavar="DIR", default=None,
                        help="with --karpathy-json: check that every image it lists is under DIR")
    parser.add_argument("--output-dir", default=OUTPUT_DIR, help="where the files go")
    parser.add_argument("--cleaning", default=CLEANING, choices=sorted(MIN_COUNT),
                        help="tutorial = Brownlee's rules (7579/34); default = ours, see the docstring")
    parser.add_argument("--min-count", type=int, default=None,
                        help=f"keep words seen at least this often in training; "
                             f"None = per cleaning {MIN_COUNT}")
    parser.add_argument("--oov", choices=["unk", "drop"], default=None,
                        help=f"rare/unknown words -> <unk> or dropped; None = per cleaning {OOV}")
    args = parser.parse_args(argv)
    if args.karpathy_json:
        outputs, report = karpathy.prepare(args.karpathy_json, args.images_root, args.cleaning,
                                           args.min_count, args.oov)
        meta = karpathy.write_outputs(args.output_dir, outputs)
        print(karpathy.summary_line(report))
    else:
        if args.images_root:
            raise PipelineError("--images-root goes with --karpathy-json")
        outputs, report = prepare(args.text_dir, args.cleaning, args.min_count, args.oov)
        meta = write_outputs(args.output_dir, outputs)
        print(summary_line(report))
    sizes = meta["split_sizes"]
    print(f"cleaning {meta['cleaning']}, min_count {meta['min_count']}, oov_token "
          f"{meta['oov_token']}; images train {sizes['train']} dev {sizes['dev']} "
          f"test {sizes['test']}")
    print(f"vocab_size {meta['vocab_size']} max_length {meta['max_length']} -> {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, tensorflow=False))
