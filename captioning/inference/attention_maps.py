"""Attention maps: where a grid captioner looked for each word, drawn over the picture.

Owns word_panels (one panel per generated word: the picture lit where the word's attention
weights are high, the word written under it, panels in rows) and its PNG bytes. The weights
come from decoding.attention_weights, reshaped to the grid (H, W): Show, Attend and Tell's
alphas, or the Transformer's last cross-attention averaged over its heads. Each map is scaled
to its own maximum, so a panel shows where that word looked, not how sharply.
Reads and writes no files (callers write the PNG atomically). Uses PIL only.
"""
import io

import numpy as np

PANEL = 160           # pixels per panel side
COLUMNS = 6           # panels per row
LABEL = 18            # pixels under each panel for its word
FLOOR = 0.25          # brightness of the least-attended cells (1 = the most attended)


def word_panels(image, words, maps, panel=PANEL, columns=COLUMNS):
    """PIL RGB image: a panel per word, the picture (or grey when None) lit by its map.

    words: L words; maps: (L, H, W) non-negative weights (rows of the grid, then columns, as
    the model saw the picture). The whole frame is squeezed to a square, as the encoders do.
    """
    from PIL import Image, ImageDraw
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 3 or len(maps) != len(words):
        raise ValueError(f"need one (H, W) map per word: {len(words)} words, maps {maps.shape}")
    base = (image.convert("RGB").resize((panel, panel), Image.BILINEAR) if image is not None
            else Image.new("RGB", (panel, panel), (128, 128, 128)))
    pixels = np.asarray(base, dtype=np.float64)
    columns = max(1, min(columns, len(words)))
    rows = max(1, -(-len(words) // columns))
    sheet = Image.new("RGB", (columns * panel, rows * (panel + LABEL)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (word, weights) in enumerate(zip(words, maps)):
        peak = weights.max()
        scaled = weights / peak if peak > 0 else np.ones_like(weights)
        # the grid upsampled smoothly to the panel (PIL's bilinear resize of a float image)
        light = np.asarray(Image.fromarray(scaled.astype(np.float32))
                           .resize((panel, panel), Image.BILINEAR), dtype=np.float64)
        lit = pixels * (FLOOR + (1 - FLOOR) * np.clip(light, 0, 1))[:, :, None]
        x, y = (k % columns) * panel, (k // columns) * (panel + LABEL)
        sheet.paste(Image.fromarray(lit.round().astype(np.uint8)), (x, y))
        draw.text((x + 4, y + panel + 3), word, fill=(0, 0, 0))
    return sheet


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
