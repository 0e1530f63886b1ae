"""The built-in demo data set: mirror-symmetric images of shapes that all share one colour per image.

Each image is black with one filled shape (disk, square or triangle, 12 to 18 pixels wide at 32x32) drawn
in its left half and mirrored onto its right half, so the whole image is symmetric about its vertical centre
line, and both copies have the same pure colour (red, green or blue), picked per image. Getting either
property right needs the whole picture: a pixel's mirror partner is far away, and a patch that shows one copy
must agree in colour and shape with the copy it cannot see. The label is the colour (0 red, 1 green, 2 blue).
Image i depends only on (seed, i), so any prefix of the set is the same.
"""

import colorsys
from typing import Dict, Iterator, Tuple

import numpy as np
import torch

from training.images import to_float

NUM_CLASSES = 3              # colours, evenly spaced in hue: red, green, blue
COLOUR_NAMES = ('red', 'green', 'blue')  # label order
FOREGROUND_THRESHOLD = 96    # uint8 level above which a pixel counts as part of a shape (background is 0)
COLOUR_TOLERANCE = 0.25      # max deviation of a pixel's chromaticity from the image's median colour
SHAPE_RADIUS = (0.18, 0.28)  # range of a shape's radius (half its width), in units of the image side
HELDOUT_START = 10 ** 7      # images from this index on are never in a data set that dataset_tool.py makes by default


def make_image(index: int, resolution: int = 32, seed: int = 0) -> Tuple[np.ndarray, int]:
    """Image `index` of the demo set as a uint8 HWC array, with its colour label."""
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(NUM_CLASSES))
    colour = np.array(colorsys.hsv_to_rgb(label / NUM_CLASSES, 1.0, 1.0))

    centres = (np.arange(resolution) + 0.5) / resolution
    u, v = np.meshgrid(centres, centres)  # u: column, v: row, both in (0, 1)
    kind = rng.integers(3)
    r = rng.uniform(SHAPE_RADIUS[0], SHAPE_RADIUS[1])
    cx, cy = rng.uniform(r / 2, 0.5 - r / 4), rng.uniform(r, 1 - r)
    if kind == 0:
        mask = (u - cx) ** 2 + (v - cy) ** 2 <= r ** 2
    elif kind == 1:
        mask = (np.abs(u - cx) <= r) & (np.abs(v - cy) <= r)
    else:
        mask = (v >= cy - r) & (v <= cy + r) & (np.abs(u - cx) <= (v - (cy - r)) / 2)
    mask |= mask[:, ::-1]

    image = mask[:, :, np.newaxis] * np.round(colour * 255)
    return image.astype(np.uint8), label


def generate(num_images: int, resolution: int = 32, seed: int = 0) -> Iterator[Tuple[np.ndarray, int]]:
    """The first `num_images` images of the demo set with their labels."""
    for index in range(num_images):
        yield make_image(index, resolution, seed)


def heldout_images(num_images: int, resolution: int = 32, seed: int = 0) -> torch.Tensor:
    """Fresh demo images for evaluation (indices from HELDOUT_START), as float [N, 3, R, R] in [-1, 1]."""
    images = np.stack([make_image(HELDOUT_START + i, resolution, seed)[0] for i in range(num_images)])
    return to_float(torch.from_numpy(images).permute(0, 3, 1, 2))


def _as_nchw_uint8(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.uint8:
        raise ValueError(f'coherence_score expects uint8 RGB images of shape [N, 3, H, W], got {images.dtype} {list(images.shape)}')
    return images


def coherence_scores(images) -> np.ndarray:
    """Per-image coherence in [0, 1]: mirror symmetry of the shapes (IoU) times the share of one colour."""
    images = _as_nchw_uint8(images).astype(np.float64)
    scores = np.zeros(len(images))
    for i, image in enumerate(images):
        peak = image.max(axis=0)
        fg = peak > FOREGROUND_THRESHOLD
        if not fg.any():
            continue  # a blank image shows no shapes at all
        symmetry = (fg & fg[:, ::-1]).sum() / (fg | fg[:, ::-1]).sum()
        chroma = image[:, fg] / peak[fg]  # [3, num_fg]: colour with brightness divided out
        median = np.median(chroma, axis=1, keepdims=True)
        same_colour = (np.abs(chroma - median).max(axis=0) <= COLOUR_TOLERANCE).mean()
        scores[i] = symmetry * same_colour
    return scores


def coherence_score(images) -> float:
    """Mean coherence of uint8 [N, 3, H, W] images: about 1.0 for demo-set images, low when parts disagree."""
    return float(coherence_scores(images).mean())


def colours(images) -> np.ndarray:
    """Per-image colour label (0 red, 1 green, 2 blue) of the channel that dominates its shape pixels; -1 when blank."""
    images = _as_nchw_uint8(images)
    labels = np.full(len(images), -1)
    for i, image in enumerate(images.astype(np.int64)):
        fg = image.max(axis=0) > FOREGROUND_THRESHOLD
        if fg.any():
            labels[i] = int(image[:, fg].sum(axis=1).argmax())
    return labels


def colour_shares(images) -> Dict[str, float]:
    """Share of images whose shapes are mostly red, green and blue, and of blank ones ('none'); real data give 1/3 each."""
    labels = colours(images)
    shares = {name: float((labels == k).mean()) for k, name in enumerate(COLOUR_NAMES)}
    return dict(shares, none=float((labels == -1).mean()))
