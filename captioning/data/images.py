"""Image files -> RGB pixels, the same way for every encoder, photo, video frame and upload.

Owns what counts as an image file (IMAGE_EXTENSIONS), how any PIL mode becomes 8-bit RGB
(EXIF rotation applied; alpha composited on white; 16-bit, CMYK and palette converted) and the
resize to the encoder's input size (whole frame, aspect ratio not kept, as the course's
load_img(target_size=...) does). Encoder-specific scaling (VGG16's BGR mean subtraction,
Lite0's (x - 127) / 128) is the encoder's business, not this module's.
"""
import functools
import importlib
import io
from pathlib import Path

import numpy as np

from captioning.utils import PipelineError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BACKGROUND = (255, 255, 255)   # transparent pixels become white before the RGB conversion
RESIZE_FILTER = "bilinear"     # PIL filter; antialiased when shrinking (load_img's "nearest" aliases)
FAST_JPEG = True               # decode plain RGB JPEGs with simplejpeg where installed (see fast_jpeg)
ORIENTATION = 0x0112           # the EXIF tag PIL's exif_transpose obeys (values 2..8 turn the image)


def list_images(folder):
    """Image files directly in `folder`, sorted by name; other files are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PipelineError(f"image folder not found ({folder})")
    return sorted((p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS), key=lambda p: p.name)


def expand_paths(paths):
    """Files and folders (every image directly in a folder, sorted) -> (image paths,
    [(path, reason)] for those that do not exist and for folders without images)."""
    images, missing = [], []
    for path in map(Path, paths):
        if path.is_dir():
            found = list_images(path)
            images.extend(found)
            if not found:
                missing.append((path, "no images in folder"))
        elif path.is_file():
            images.append(path)
        else:
            missing.append((path, "no such file or folder"))
    return images, missing


def to_rgb(img):
    """Any PIL mode -> 8-bit RGB: alpha composited on white, 16-bit scaled, CMYK/palette converted."""
    from PIL import Image
    if img.mode == "RGB":
        return img   # convert("RGB") would copy it (~0.1 ms an image in extract_features.py)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grayscale PNG/TIFF: 0..65535
        gray = (np.asarray(img, dtype=np.float32) / 257.0).round().astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if (img.mode == "P" and "transparency" in img.info) or img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def open_rgb(path, data=None):
    """Decode an image file fully -> PIL RGB image (EXIF rotation applied); `data`: the file's
    bytes when the caller has read them already (they are not read again).

    Raises PipelineError naming the file when it cannot be decoded (corrupt, truncated, empty,
    not an image, or larger than PIL's decompression-bomb limit).
    """
    from PIL import Image, ImageOps
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as img:
            img.load()  # decode now, so truncated data fails here and not later
            ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of an upright photo
            return to_rgb(img)
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
    """An image file -> uint8 RGB array (height, width, 3), resized to `size`; the same pixels
    whether fast_jpeg or PIL decodes it."""
    data = read_bytes(path) if FAST_JPEG and simplejpeg() is not None else None
    array = fast_jpeg(path, data)
    if array is None:
        return resize_rgb(open_rgb(path, data), size, resize_filter)
    if array.shape[:2] == tuple(size):
        return array
    from PIL import Image
    return resize_rgb(Image.fromarray(array), size, resize_filter)


def read_bytes(path):
    """The file's bytes; PipelineError naming it when it cannot be read (missing, a folder,
    no permission), worded as open_rgb words it."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise PipelineError(f"cannot read image ({Path(path).name}: {exc.strerror or exc})") from None


@functools.lru_cache(maxsize=1)
def simplejpeg():
    """The simplejpeg module, or None where it is not installed (PIL then decodes every file)."""
    try:
        return importlib.import_module("simplejpeg")
    except ImportError:
        return None


def fast_jpeg(path, data=None):
    """uint8 RGB array of a plain JPEG (3 colour channels, no EXIF turn) decoded by simplejpeg,
    or None for any other file, where simplejpeg is missing or FAST_JPEG is off, and for any
    file it refuses (PIL then decodes it, or says what is wrong with it).

    Why: simplejpeg hands libjpeg-turbo's output straight to numpy in about half PIL's time,
    and in extract_features.py that time is taken from the network's cores. PIL decodes with the same libjpeg-turbo and the same
    settings (accurate integer IDCT, smooth chroma upsampling), so the pixels are identical;
    tests/test_extract_features.py compares both decoders, pixel for pixel. `data`: the
    file's bytes, when the caller has read them (PIL then reuses them for any other file).
    """
    module = simplejpeg() if FAST_JPEG else None
    if module is None:
        return None
    from PIL import Image
    try:
        data = Path(path).read_bytes() if data is None else data
        with Image.open(io.BytesIO(data)) as img:   # reads the header only
            if (img.format != "JPEG" or img.mode != "RGB"
                    or img.getexif().get(ORIENTATION, 1) in range(2, 9)):
                return None
            shape = (img.height, img.width, 3)
        array = module.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False)
    except Exception:  # noqa: BLE001 - any refusal: PIL decodes the file and reports it properly
        return None
    return array if array.shape == shape else None
