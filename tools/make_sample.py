"""Rebuild the bundled offline sample, data/sample/, from a full Flickr8k copy.

Usage: python tools/make_sample.py --source ../shared/flickr8k [--train 600 --dev 60 --test 60 --size 160]

Picks images at random (seed 0) from each official split, shrinks them to 160x160 JPEG
(quality 80, ~7 KB each; the encoders scale them back up to 224x224; 600 training images is
about the least for captions that differ between photos: docs/results.md, "The bundled
sample"), and writes the official layout so every script treats the sample like the real dataset:
  data/sample/Flicker8k_Dataset/<id>.jpg
  data/sample/Flickr8k_text/Flickr8k.token.txt           (their 5 captions each)
  data/sample/Flickr8k_text/Flickr_8k.{train,dev,test}Images.txt
"""
import argparse
import random
import shutil
from pathlib import Path

from PIL import Image

SPLITS = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt",
          "test": "Flickr_8k.testImages.txt"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--source", type=Path, default=Path("../shared/flickr8k"))
    parser.add_argument("--output", type=Path, default=Path("data/sample"))
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--dev", type=int, default=60)
    parser.add_argument("--test", type=int, default=60)
    parser.add_argument("--size", type=int, default=160, help="square side in pixels")
    args = parser.parse_args(argv)

    rng = random.Random(0)
    text_in, images_in = args.source / "Flickr8k_text", args.source / "Flicker8k_Dataset"
    text_out, images_out = args.output / "Flickr8k_text", args.output / "Flicker8k_Dataset"
    shutil.rmtree(args.output, ignore_errors=True)
    text_out.mkdir(parents=True)
    images_out.mkdir(parents=True)
    chosen = set()
    for split, filename in SPLITS.items():
        names = [n for n in (text_in / filename).read_text().split() if (images_in / n).is_file()]
        picked = sorted(rng.sample(sorted(names), getattr(args, split)))
        (text_out / filename).write_text("\n".join(picked) + "\n")
        chosen.update(picked)
    for name in sorted(chosen):
        with Image.open(images_in / name) as image:
            image.convert("RGB").resize((args.size, args.size), Image.BICUBIC).save(
                images_out / name, quality=80)
    lines = [line for line in (text_in / "Flickr8k.token.txt").read_text().splitlines()
             if line.split("#", 1)[0] in chosen]
    (text_out / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {len(chosen)} images and {len(lines)} captions to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
