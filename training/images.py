"""Reading and writing images: single PNGs, sample grids, and input images for in- and outpainting."""

import io
import math
import os
from typing import Optional

import numpy as np
import PIL.Image
import torch

from training.snapshot import atomic_write


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images as the networks take them: float32 in [-1, 1]."""
    return images.to(torch.float32) / 127.5 - 1


def to_pil(image: torch.Tensor) -> PIL.Image.Image:
    """A uint8 [C, H, W] tensor (C = 1 or 3) as a PIL image."""
    array = image.detach().cpu().permute(1, 2, 0).numpy()
    return PIL.Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array, 'L' if array.shape[2] == 1 else 'RGB')


def save_png(image: PIL.Image.Image, path: str) -> None:
    """Write a PNG atomically."""
    buffer = io.BytesIO()
    image.save(buffer, format='png')
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


GRID_BORDER = 2        # pixels of grey around each cell of a grid, so that samples on black backgrounds stay apart
GRID_BORDER_LEVEL = 128


def image_grid(images: torch.Tensor, cols: Optional[int] = None, scale: int = 1, border: int = GRID_BORDER) -> PIL.Image.Image:
    """Tile uint8 [N, C, H, W] images, each enlarged `scale` times by nearest neighbour, into one picture, `cols` per
    row (default: about square), with `border` grey pixels around and between the cells; empty cells stay black."""
    n, c, h, w = images.shape
    h, w = h * scale, w * scale
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = torch.full([c, rows * h + (rows + 1) * border, cols * w + (cols + 1) * border], GRID_BORDER_LEVEL, dtype=torch.uint8)
    for i in range(rows * cols):
        r, k = divmod(i, cols)
        top, left = border + r * (h + border), border + k * (w + border)
        image = images[i].cpu().repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2) if i < n else 0
        canvas[:, top:top + h, left:left + w] = image
    return to_pil(canvas)


def save_image_grid(images: torch.Tensor, path: str, cols: Optional[int] = None, min_tile: int = 128) -> None:
    """Write uint8 [N, C, H, W] images as one PNG grid (atomically), each enlarged to at least min_tile pixels wide."""
    # Nearest-neighbour by a whole factor: a 32x32 sample shown 1:1 is too small to judge, and every pixel stays exact.
    scale = max(1, math.ceil(min_tile / images.shape[-1]))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_png(image_grid(images, cols, scale), path)


def load_image(path: str, channels: int) -> torch.Tensor:
    """Read an image file as float [1, channels, H, W] in [-1, 1]; ValueError naming the file if unreadable."""
    try:
        with PIL.Image.open(path) as img:
            array = np.asarray(img.convert('L' if channels == 1 else 'RGB'))
    except (FileNotFoundError, PIL.UnidentifiedImageError, OSError) as err:
        raise ValueError(f'{path}: cannot read ({err})') from None
    array = array[:, :, np.newaxis] if array.ndim == 2 else array
    return to_float(torch.from_numpy(array.copy()).permute(2, 0, 1)[None])
