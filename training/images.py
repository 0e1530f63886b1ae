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


def image_grid(images: torch.Tensor, cols: Optional[int] = None) -> PIL.Image.Image:
    """Tile uint8 [N, C, H, W] images into one picture, `cols` per row (default: about square)."""
    n, c, h, w = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = torch.zeros([c, rows * h, cols * w], dtype=torch.uint8)
    for i, image in enumerate(images.cpu()):
        r, k = divmod(i, cols)
        canvas[:, r * h:(r + 1) * h, k * w:(k + 1) * w] = image
    return to_pil(canvas)


def save_image_grid(images: torch.Tensor, path: str, cols: Optional[int] = None, min_tile: int = 128) -> None:
    """Write uint8 [N, C, H, W] images as one PNG grid (atomically), each enlarged to at least min_tile pixels wide."""
    # Nearest-neighbour by a whole factor: a 32x32 sample shown 1:1 is too small to judge, and every pixel stays exact.
    scale = max(1, math.ceil(min_tile / images.shape[-1]))
    grid = image_grid(images, cols)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_png(grid.resize((grid.width * scale, grid.height * scale), PIL.Image.NEAREST) if scale > 1 else grid, path)


def load_image(path: str, channels: int) -> torch.Tensor:
    """Read an image file as float [1, channels, H, W] in [-1, 1]; ValueError naming the file if unreadable."""
    try:
        with PIL.Image.open(path) as img:
            array = np.asarray(img.convert('L' if channels == 1 else 'RGB'))
    except (FileNotFoundError, PIL.UnidentifiedImageError, OSError) as err:
        raise ValueError(f'{path}: cannot read ({err})') from None
    array = array[:, :, np.newaxis] if array.ndim == 2 else array
    return to_float(torch.from_numpy(array.copy()).permute(2, 0, 1)[None])
