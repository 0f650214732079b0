"""Fetch the Flickr8k release files and unpack them into the layout the scripts expect.

Usage:
    python download_flickr8k.py --data-dir data/flickr8k [--yes] [--keep-zips] [--base-url URL]

Reads nothing but the network. Writes, under --data-dir:
    Flickr8k_text/Flickr8k.token.txt               captions, `<image>.jpg#<n>\\t<caption>`
    Flickr8k_text/Flickr_8k.{train,dev,test}Images.txt   the official splits (6000/1000/1000)
    Flickr8k_text/...                              the rest of Flickr8k_text.zip
    Flicker8k_Dataset/<image>.jpg                  8091 photos (the release's own spelling)
    downloads/<zip>.part                           only while a download is unfinished

Where the files come from and how they are checked: captioning/data/download.py.
`--base-url` (or $FLICKR8K_BASE_URL) points at a mirror holding both zips.
Interrupted? Run the same command again: a partial zip resumes where it stopped.
Offline, it stops with one line naming the files to put where.
"""
import argparse
import sys
from pathlib import Path

from captioning.data.download import BASE_URL, ensure_flickr8k
from captioning.utils import HelpFormatter, run_cli

DEFAULT_DATA_DIR = Path("data/flickr8k")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help="where Flickr8k_text/ and Flicker8k_Dataset/ go")
    parser.add_argument("--base-url", default=None,
                        help=f"mirror holding both zips (default $FLICKR8K_BASE_URL or {BASE_URL})")
    parser.add_argument("--yes", action="store_true", help="download without asking")
    parser.add_argument("--keep-zips", action="store_true", help="keep the zips after unpacking")
    args = parser.parse_args(argv)
    fetched = ensure_flickr8k(args.data_dir, args.base_url, args.yes, args.keep_zips)
    print(f"Flickr8k ready in {args.data_dir}" +
          (f" (downloaded {', '.join(fetched)})" if fetched else " (already there)"))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, tensorflow=False))
