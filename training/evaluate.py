"""Quality measures that need no downloaded network: held-out denoising loss at fixed noise levels."""

from typing import Dict, Sequence

import torch

from training.patch import coordinate_grid

HELDOUT_SIGMAS = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)


@torch.no_grad()
def heldout_loss(net: torch.nn.Module, images: torch.Tensor, sigmas: Sequence[float] = HELDOUT_SIGMAS, seed: int = 0,
                 batch: int = 64, sigma_data: float = 0.5) -> Dict[str, float]:
    """EDM-weighted denoising loss of `net` on whole images in [-1, 1], per fixed sigma and averaged over them.

    The noise is fixed by `seed`, so two networks scored on the same images see the same noisy inputs.
    """
    device = next(net.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    resolution = images.shape[-1]
    x_pos = coordinate_grid(resolution, resolution, device=device) if getattr(net, 'pos_channels', 0) else None
    result = {}
    for sigma in sigmas:
        total = 0.0
        for start in range(0, len(images), batch):
            y = images[start:start + batch].to(device, torch.float32)
            noise = torch.randn(y.shape, generator=generator).to(device) * sigma
            kwargs = dict(x_pos=x_pos.expand(len(y), -1, -1, -1)) if x_pos is not None else {}
            denoised = net(y + noise, torch.full([len(y)], sigma, device=device), **kwargs)
            weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
            total += (weight * (denoised - y).square()).mean(dim=(1, 2, 3)).sum().item()
        result[f'sigma={sigma:g}'] = total / len(images)
    result['mean'] = sum(result.values()) / len(sigmas)
    return result
