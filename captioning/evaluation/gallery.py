"""What a person opens after scoring: captions.tsv and gallery.html (inline thumbnails).

  write_captions_tsv  header + one row per image: image_id, generated caption, reference_1..N.
  gallery_html        rows of (image_id, thumbnail data URI, caption, references[, attention
                      panels]) -> one self-contained HTML page (no files beside it).
  thumbnail_data_uri, attention_data_uri   an image file -> a base64 JPEG/PNG data URI.
Used by captioning/evaluation/scoring.py (evaluate_bleu.py) and captioning/retrieval/folder_search.py.
"""
import base64
import html
import io

from captioning.inference import attention_maps
from captioning.utils import atomic_write

THUMBNAIL_PIXELS = 224     # longest side of a gallery thumbnail
MAP_PIXELS, MAP_COLUMNS = 48, 6   # grid models: attention panel side and panels per row (~15 KB)


def _cell(text):
    return " ".join(str(text).split())      # no tabs/newlines inside a TSV cell


def write_captions_tsv(path, ids, generated, references):
    with atomic_write(path) as handle:
        width = max((len(r) for r in references), default=5)
        handle.write("\t".join(["image_id", "generated"] +
                               [f"reference_{i}" for i in range(1, width + 1)]) + "\n")
        for image_id, words, refs in zip(ids, generated, references):
            handle.write("\t".join([image_id, _cell(" ".join(words))] + [_cell(r) for r in refs]) + "\n")


def thumbnail_data_uri(path, pixels=THUMBNAIL_PIXELS):
    """An image file -> 'data:image/jpeg;base64,...' thumbnail, or None if unreadable."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((pixels, pixels))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=80)
    except (OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def attention_data_uri(path, words, maps):
    """Per-word attention panels (captioning/inference/attention_maps.py) over the picture at `path`
    (grey when unreadable) -> 'data:image/png;base64,...'."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            picture = image.convert("RGB")
    except (OSError, ValueError, TypeError, AttributeError):
        picture = None
    sheet = attention_maps.word_panels(picture, words, maps, panel=MAP_PIXELS, columns=MAP_COLUMNS)
    return "data:image/png;base64," + base64.b64encode(attention_maps.png_bytes(sheet)).decode("ascii")


def gallery_html(rows, title):
    """rows: (image_id, data_uri or None, generated caption, [references][, attention panels
    data_uri]) -> HTML text. Rows with panels (grid models) show them under the caption."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif}figure{display:inline-block;width:300px;"
             "vertical-align:top;margin:8px}figcaption b{color:#036}li{font-size:85%}</style>",
             f"<h1>{html.escape(title)}</h1>"]
    for image_id, uri, caption, refs, *panels in rows:
        img = (f"<img src='{uri}' alt='{html.escape(image_id)}' width='224'>" if uri
               else "<p>(image not found)</p>")
        items = "".join(f"<li>{html.escape(r)}</li>" for r in refs)
        maps = (f"<br><img src='{panels[0]}' alt='attention per word' width='288'>"
                if panels and panels[0] else "")
        parts.append(f"<figure>{img}<figcaption><small>{html.escape(image_id)}</small><br>"
                     f"<b>{html.escape(caption)}</b>{maps}<ul>{items}</ul></figcaption></figure>")
    return "\n".join(parts) + "\n"
