"""Any picture of a digit -> the 784 values the network reads, made the way MNIST was made.

LeCun et al. built MNIST from scanned digits by fitting each one, aspect ratio kept, into a
20x20 box (anti-aliasing gives the grey levels), then placing that box in a 28x28 field so that
the digit's centre of mass sits at the centre: white digit on black, values 0-255 (divided by
255 for the network). A photo or drawing that skips any of these steps (dark ink on white
paper, a digit filling the frame, off centre) is far from anything the network has seen and
gets confident nonsense; ``to_mnist`` repeats the steps for any size, colour and layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mnist_pipeline.core.errors import DataError

SIDE, BOX = 28, 20
#: Grey levels (0-1, after contrast stretching) below this count as background: paper
#: texture and JPEG noise would otherwise widen the crop and pull the centre of mass. Low
#: enough to keep a digit's faint anti-aliased edge: an MNIST test image goes through
#: ``to_mnist`` with every pixel within 0.05 of where it was.
NOISE_FLOOR = 0.05
#: A picture whose darkest and brightest parts differ by less than this has no digit.
MIN_CONTRAST = 0.1


def load_image(path: str | Path) -> np.ndarray:
    """A picture file as grey levels in [0, 1] (float, any size); DataError if it is not one.

    Transparent parts count as white paper; a photo's EXIF orientation is applied."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                paper = Image.new("RGBA", image.size, "white")
                image = Image.alpha_composite(paper, image.convert("RGBA"))
            if image.mode.startswith("I;16"):  # 16-bit grey: convert("L") would clip it
                grey = np.asarray(image, dtype=np.float32) / 65535.0
            else:
                grey = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except UnidentifiedImageError:
        raise DataError("not an image file (Pillow cannot read it)") from None
    except Image.DecompressionBombError as exc:
        raise DataError(f"image too large to read safely ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or damaged file
        raise DataError(f"cannot read the image ({exc})") from None
    if grey.size == 0:
        raise DataError("the image is empty")
    return grey


def to_mnist(grey: np.ndarray) -> np.ndarray:
    """Grey levels (h, w) in [0, 1], either polarity -> float32 (28, 28) in [0, 1], MNIST-style."""
    digit = _ink(grey)
    rows, cols = np.nonzero(digit)
    if rows.size == 0:
        raise DataError("no digit found: the image is blank")
    digit = digit[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    box = _fit_box(digit)
    return _centre_by_mass(box)


def _ink(grey: np.ndarray) -> np.ndarray:
    """White ink on a black background, contrast stretched to [0, 1], noise removed.

    The background is what the border mostly shows: light borders mean dark ink on light
    paper, which is inverted."""
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    background = float(np.median(border))
    ink = 1.0 - grey if background > 0.5 else grey.copy()
    background = 1.0 - background if background > 0.5 else background
    peak = float(ink.max())
    if peak - background < MIN_CONTRAST:
        raise DataError("no digit found: the image has (almost) no contrast")
    ink = np.clip((ink - background) / (peak - background), 0.0, 1.0)
    ink[ink < NOISE_FLOOR] = 0.0
    return ink


def _fit_box(digit: np.ndarray) -> np.ndarray:
    """Scale so the longer side is 20 pixels, keeping the aspect ratio (anti-aliased)."""
    h, w = digit.shape
    scale = BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = Image.fromarray(np.round(digit * 255).astype(np.uint8))
    resized = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(resized, dtype=np.float32) / 255.0


def _centre_by_mass(box: np.ndarray) -> np.ndarray:
    """Place ``box`` in a 28x28 field with its centre of mass at the field's centre."""
    h, w = box.shape
    total = float(box.sum())
    rows, cols = np.indices(box.shape)
    # In pixel indices, as MNIST did it: its digits' centres of mass average (14.0, 14.0)
    # (measured on the test set), half a pixel off the geometric centre 13.5.
    cy = float((rows * box).sum()) / total
    cx = float((cols * box).sum()) / total
    top = int(np.clip(round(SIDE / 2 - cy), 0, SIDE - h))
    left = int(np.clip(round(SIDE / 2 - cx), 0, SIDE - w))
    field = np.zeros((SIDE, SIDE), dtype=np.float32)
    field[top : top + h, left : left + w] = box
    return field


def image_to_pixels(path: str | Path) -> np.ndarray:
    """A picture file -> the network's input: float32 (784,) in [0, 1]."""
    return to_mnist(load_image(path)).reshape(-1)
