"""Random patches with pixel-coordinate channels, and the patch-size schedule of Patch Diffusion.

A pixel at row i, column j of an R x R image has coordinates
(x, y) = (j / (R - 1) * 2 - 1, i / (R - 1) * 2 - 1), so the top-left pixel is (-1, -1)
and the bottom-right pixel is (1, 1). A patch carries the coordinates it had in the
whole image, as two channels [x, y].
"""

from typing import List, Optional

import torch

#----------------------------------------------------------------------------
# Coordinates and cropping.

def _coordinates(rows: torch.Tensor, cols: torch.Tensor, resolution: int, dtype: torch.dtype) -> torch.Tensor:
    """Coordinate channels [..., 2, s, s] for pixel indices rows [..., s] and cols [..., s]."""
    compute_dtype = torch.promote_types(dtype, torch.float32) # half types lack the precision for large R
    x = (cols.to(compute_dtype) / (resolution - 1) * 2 - 1).to(dtype)
    y = (rows.to(compute_dtype) / (resolution - 1) * 2 - 1).to(dtype)
    size = rows.shape[-1]
    shape = rows.shape[:-1] + (size, size)
    return torch.stack([x.unsqueeze(-2).expand(shape), y.unsqueeze(-1).expand(shape)], dim=-3)

def _check_resolution(resolution: int, size: int) -> None:
    if resolution < 2:
        raise ValueError(f'resolution must be at least 2, got {resolution}')
    if not 1 <= size <= resolution:
        raise ValueError(f'patch size must be in [1, {resolution}] for resolution {resolution}, got {size}')

def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f'images must have shape [N, C, R, R], got {list(images.shape)}')

def coordinate_grid(resolution: int, size: int, top: int = 0, left: int = 0, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Coordinate channels [2, size, size] (x, y) of the size x size window at (top, left) of a resolution x resolution image."""
    _check_resolution(resolution, size)
    if not (0 <= top <= resolution - size and 0 <= left <= resolution - size):
        raise ValueError(f'top and left must be in [0, {resolution - size}], got top={top}, left={left}')
    idx = torch.arange(size, device=device)
    return _coordinates(idx + top, idx + left, resolution, dtype)

def random_positions(num: int, resolution: int, patch_size: int, generator: Optional[torch.Generator] = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniformly random top-left corners (top [num], left [num]) of patch_size patches in a resolution x resolution image."""
    _check_resolution(resolution, patch_size)
    top = torch.randint(resolution - patch_size + 1, [num], generator=generator, device=device)
    left = torch.randint(resolution - patch_size + 1, [num], generator=generator, device=device)
    return top, left

def _gather(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched crop without checks (a range check would cost a device sync per step)."""
    N, C, R, _ = images.shape
    idx = torch.arange(size, device=images.device)
    rows = top[:, None] + idx # [N, s]
    cols = left[:, None] + idx # [N, s]
    n = torch.arange(N, device=images.device)[:, None, None, None]
    c = torch.arange(C, device=images.device)[None, :, None, None]
    patches = images[n, c, rows[:, None, :, None], cols[:, None, None, :]]
    return patches, _coordinates(rows, cols, R, images.dtype)

def crop_at(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop images [N, C, R, R] at per-sample corners top [N], left [N]; return patches [N, C, s, s] and coordinates [N, 2, s, s]."""
    _check_images(images)
    N, _, R, _ = images.shape
    _check_resolution(R, size)
    top, left = torch.as_tensor(top, device=images.device), torch.as_tensor(left, device=images.device)
    if top.shape != (N,) or left.shape != (N,):
        raise ValueError(f'top and left must have shape [{N}], got {list(top.shape)} and {list(left.shape)}')
    if bool(((top < 0) | (top > R - size) | (left < 0) | (left > R - size)).any()):
        raise ValueError(f'top and left must be in [0, {R - size}] for patch size {size}')
    return _gather(images, top.long(), left.long(), size)

def crop_patches(images: torch.Tensor, patch_size: int, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop one uniformly random patch per sample; return patches [N, C, s, s] and coordinates [N, 2, s, s]."""
    _check_images(images)
    top, left = random_positions(images.shape[0], images.shape[2], patch_size, generator=generator, device=images.device)
    return _gather(images, top, left, patch_size)

#----------------------------------------------------------------------------
# Patch-size schedule.

class PatchSchedule:
    """Patch size per training step: stochastic (sizes drawn with probabilities) or progressive (smallest first)."""

    def __init__(self, resolution: int, real_p: float = 0.5, mode: str = 'stochastic', latent: bool = False, seed: int = 0):
        if not 0 <= real_p <= 1:
            raise ValueError(f'real_p must be in [0, 1], got {real_p}')
        if mode not in ('stochastic', 'progressive'):
            raise ValueError(f"mode must be 'stochastic' or 'progressive', got {mode!r}")
        if latent:
            self.sizes = (resolution, resolution // 2)
            self.probs = (real_p, 1 - real_p)
        else:
            self.sizes = (resolution, resolution // 2, resolution // 4)
            self.probs = (real_p, 3 / 5 * (1 - real_p), 2 / 5 * (1 - real_p))
        if self.sizes[-1] < 1:
            raise ValueError(f'resolution must be at least {2 ** (len(self.sizes) - 1)} so that the smallest patch is >= 1 pixel, got {resolution}')
        self.resolution = resolution
        self.real_p = real_p
        self.mode = mode
        self.latent = latent
        self.multipliers = (1, 2, 4)[:len(self.sizes)]
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, progress: Optional[float] = None) -> int:
        """Patch size for the next step; progressive mode needs progress in [0, 1], the fraction of training done."""
        if self.mode == 'stochastic':
            idx = torch.multinomial(torch.tensor(self.probs, dtype=torch.float64), 1, generator=self.generator)
            return self.sizes[int(idx)]
        if progress is None or not 0 <= progress <= 1:
            raise ValueError(f'progress must be in [0, 1] in progressive mode, got {progress}')
        end = 0.0
        for size, prob in zip(reversed(self.sizes), reversed(self.probs)):
            end += prob
            if progress < end:
                return size
        return self.resolution

    def upcoming(self, count: int, progress: Optional[float] = None) -> List[int]:
        """The sizes of the next `count` steps at `progress`, without drawing them (the generator is left as it was)."""
        state = self.generator.get_state()
        try:
            return [self.sample(progress) for _ in range(count)]
        finally:
            self.generator.set_state(state)

    def batch_multiplier(self, size: int) -> int:
        """How many times more images a step with this patch size takes than a full-resolution step."""
        if size not in self.sizes:
            raise ValueError(f'size must be one of {self.sizes}, got {size}')
        return self.multipliers[self.sizes.index(size)]

    @property
    def mean_batch_multiplier(self) -> float:
        """Expected batch multiplier under the size probabilities."""
        return sum(p * m for p, m in zip(self.probs, self.multipliers))

    def state_dict(self) -> dict:
        """State for exact resume: the generator state."""
        return {'generator': self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the state saved by state_dict()."""
        self.generator.set_state(state['generator'])

#----------------------------------------------------------------------------
# Outpainting.

def outpaint_grid(resolution: int, height: int, width: int, top: int, left: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Coordinate channels [2, height, width] of a canvas holding the resolution x resolution image at (top, left), extended linearly beyond [-1, 1]."""
    if resolution < 2:
        raise ValueError(f'resolution must be at least 2, got {resolution}')
    if height < 1 or width < 1:
        raise ValueError(f'height and width must be at least 1, got height={height}, width={width}')
    compute_dtype = torch.promote_types(dtype, torch.float32)
    # Same arithmetic as _coordinates, so the image's own pixels get exactly coordinate_grid's values.
    x = ((torch.arange(width, device=device) - left).to(compute_dtype) / (resolution - 1) * 2 - 1).to(dtype)
    y = ((torch.arange(height, device=device) - top).to(compute_dtype) / (resolution - 1) * 2 - 1).to(dtype)
    return torch.stack([x[None, :].expand(height, width), y[:, None].expand(height, width)])

#----------------------------------------------------------------------------
