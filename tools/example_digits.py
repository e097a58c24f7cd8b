"""Write ``digits/``: the picture files the README's and docs/serving.md's `predict` examples
read. Usage: ``python tools/example_digits.py [FOLDER]`` (default ``digits``), after ``make
repro`` (it reads the MNIST test images in ``data/raw``).

Pictures as people have them, not MNIST's format: test images enlarged, inverted to dark on
light, coloured, saved as JPEG; three digits drawn with Pillow (a pencil 3, a blue 7 on
paper, a font's 4 white on black); and a text file, which `predict` refuses in one line.
They are made here rather than committed: MNIST's images come from the mirror like the
pipeline's, and the same code makes the same files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mnist_pipeline.stages.artifacts import MNIST_FILES
from mnist_pipeline.stages.idx import read_idx

RAW = Path("data/raw")


def enlarged(image: np.ndarray, size: int) -> Image.Image:
    return Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC)


def coloured(image: np.ndarray, ink: tuple, paper: tuple) -> Image.Image:
    """A grey MNIST digit as ``ink`` on ``paper`` (RGB), at 4x."""
    alpha = np.asarray(enlarged(image, 112), dtype=np.float32)[..., None] / 255.0
    rgb = np.array(paper) * (1 - alpha) + np.array(ink) * alpha
    return Image.fromarray(rgb.round().astype(np.uint8), "RGB")


def drawn(digit: str) -> Image.Image:
    """A digit drawn as a person would, on paper (light background, dark or coloured ink)."""
    if digit == "3":  # pencil: grey strokes on white
        canvas = Image.new("L", (200, 240), 245)
        pen = ImageDraw.Draw(canvas)
        pen.arc((50, 30, 150, 120), start=200, end=90, fill=70, width=9)
        pen.arc((45, 110, 155, 210), start=270, end=160, fill=70, width=9)
        return canvas
    if digit == "7":  # blue ballpoint on off-white paper
        canvas = Image.new("RGB", (220, 260), (250, 246, 236))
        pen = ImageDraw.Draw(canvas)
        pen.line((50, 50, 170, 50), fill=(30, 60, 170), width=12)
        pen.line((170, 50, 90, 220), fill=(30, 60, 170), width=12)
        return canvas
    canvas = Image.new("L", (160, 160), 0)  # a font's glyph, white on black
    font = ImageFont.load_default(size=120)
    ImageDraw.Draw(canvas).text((40, 10), digit, fill=255, font=font)
    return canvas


def write(folder: Path) -> list[Path]:
    images = read_idx(RAW / MNIST_FILES["test_images"])
    labels = read_idx(RAW / MNIST_FILES["test_labels"])
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "drawn-3-pencil.png": drawn("3"),
        "drawn-7-blue-on-paper.png": drawn("7"),
        "font-4-white-on-black.png": drawn("4"),
    }
    for i in range(8):
        name = f"test{i}-label{labels[i]}"
        if i % 4 == 0:
            files[f"{name}.png"] = Image.fromarray(images[i])  # as MNIST has it
        elif i % 4 == 1:
            files[f"{name}-inverted-280px.png"] = enlarged(255 - images[i], 280)
        elif i % 4 == 2:
            files[f"{name}-red-on-blue.png"] = coloured(images[i], (200, 20, 20), (170, 200, 255))
        else:
            files[f"{name}.jpg"] = enlarged(images[i], 140)
    written = []
    for name, image in files.items():
        image.save(folder / name)
        written.append(folder / name)
    (folder / "notes.txt").write_text("not a picture: predict says so and goes on\n")
    return [*written, folder / "notes.txt"]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not (RAW / MNIST_FILES["test_images"]).exists():
        print(f"error: no MNIST test images in {RAW}: run `make repro` first", file=sys.stderr)
        return 1
    files = write(Path(args[0] if args else "digits"))
    print(f"wrote {len(files)} files to {files[0].parent}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
