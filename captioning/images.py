"""Image files -> RGB pixels, the same way for every encoder, photo, video frame and upload.

Owns what counts as an image file (IMAGE_EXTENSIONS), how any PIL mode becomes 8-bit RGB
(EXIF rotation applied; alpha composited on white; 16-bit, CMYK and palette converted) and the
resize to the encoder's input size (whole frame, aspect ratio not kept, as the course's
load_img(target_size=...) does). Encoder-specific scaling (VGG16's BGR mean subtraction,
Lite0's (x - 127) / 128) is the encoder's business, not this module's.
"""
from pathlib import Path

import numpy as np

from captioning.utils import PipelineError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BACKGROUND = (255, 255, 255)   # transparent pixels become white before the RGB conversion
RESIZE_FILTER = "bilinear"     # PIL filter; antialiased when shrinking (load_img's "nearest" aliases)


def list_images(folder):
    """Image files directly in `folder`, sorted by name; other files are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PipelineError(f"image folder not found ({folder})")
    return sorted((p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS), key=lambda p: p.name)


def to_rgb(img):
    """Any PIL mode -> 8-bit RGB: alpha composited on white, 16-bit scaled, CMYK/palette converted."""
    from PIL import Image
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grayscale PNG/TIFF: 0..65535
        gray = (np.asarray(img, dtype=np.float32) / 257.0).round().astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if (img.mode == "P" and "transparency" in img.info) or img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def open_rgb(path):
    """Decode an image file fully -> PIL RGB image (EXIF rotation applied).

    Raises PipelineError naming the file when it cannot be decoded (corrupt, truncated, empty,
    not an image, or larger than PIL's decompression-bomb limit).
    """
    from PIL import Image, ImageOps
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so truncated data fails here and not later
            return to_rgb(ImageOps.exif_transpose(img))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PipelineError(f"cannot read image ({Path(path).name}: {reason})") from None


def resize_rgb(img, size, resize_filter=RESIZE_FILTER):
    """PIL RGB image -> uint8 array (height, width, 3) of `size` = (height, width).

    An image already of that size is not resampled (the shared 224x224 JPEGs pass unchanged).
    """
    from PIL import Image
    height, width = size
    if img.size != (width, height):
        img = img.resize((width, height), getattr(Image.Resampling, resize_filter.upper()))
    return np.asarray(img, dtype=np.uint8)


def load_rgb(path, size, resize_filter=RESIZE_FILTER):
    """An image file -> uint8 RGB array (height, width, 3), resized to `size`."""
    return resize_rgb(open_rgb(path), size, resize_filter)
