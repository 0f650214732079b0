"""Render the README's picture: one photo with its generated and reference captions below it.

Usage: python tools/render_example.py --captions results/flickr8k/captions.tsv \
           --images data/flickr8k/Flicker8k_Dataset --id IMAGE_ID --output docs/example.jpg

Reads a captions.tsv written by evaluate_bleu.py (id, generated caption, references).
"""
import argparse
import csv
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WIDTH = 448          # pixels; the photo is scaled to this width
MARGIN = 10
LINE_HEIGHT = 18


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--captions", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--output", type=Path, default=Path("docs/example.jpg"))
    args = parser.parse_args(argv)
    with open(args.captions, encoding="utf-8") as handle:
        rows = {row[0]: row for row in csv.reader(handle, delimiter="\t")}
    image_id, generated, *references = rows[args.id]
    photo = Image.open(args.images / f"{image_id}.jpg").convert("RGB")
    photo = photo.resize((WIDTH, round(photo.height * WIDTH / photo.width)))
    lines = textwrap.wrap(f"model: {generated}", 60) + [""]
    for ref in references[:2]:
        lines += textwrap.wrap(f"human: {ref}", 60)
    canvas = Image.new("RGB", (WIDTH, photo.height + 2 * MARGIN + LINE_HEIGHT * len(lines)), "white")
    canvas.paste(photo, (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for k, line in enumerate(lines):
        draw.text((MARGIN, photo.height + MARGIN + k * LINE_HEIGHT), line, fill="black", font=font)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.output, quality=85)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
