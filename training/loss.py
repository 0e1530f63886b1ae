"""Denoising score-matching losses: EDM, VP and VE, on whole images or on random patches.

The losses differ only in how they draw the noise level sigma and the weight
(`noise_level`); EDM2's also learns the uncertainty of the error per noise level (`weighted_error`). The Patch* variants crop one random patch per sample after
augmentation and give the network the patch's pixel coordinates (x_pos); the plain
variants train on whole images and call the network without x_pos, as EDM does.
Each call returns the per-element loss [N, C, s, s]; the training loop reduces it.
"""

from typing import Callable, Optional

import torch

from torch_utils import persistence
from training.patch import crop_patches

#----------------------------------------------------------------------------

class DenoisingLoss:
    """Shared body of all losses; subclasses define noise_level(), `patches` selects patch training."""

    patches = False

    def noise_level(self, num: int, device: torch.device, generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw sigma [num, 1, 1, 1] and the loss weight [num, 1, 1, 1]."""
        raise NotImplementedError

    def __call__(self, net: Callable, images: torch.Tensor, patch_size: Optional[int] = None, labels: Optional[torch.Tensor] = None,
            augment_pipe: Optional[Callable] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Per-element loss [N, C, s, s]; patch_size None means the whole image. generator drives crop, sigma and noise."""
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        resolution = y.shape[-1]
        patch_size = resolution if patch_size is None else patch_size
        net_kwargs = {}
        if self.patches:
            y, net_kwargs['x_pos'] = crop_patches(y, patch_size, generator=generator)
        elif patch_size != resolution:
            raise ValueError(f'{type(self).__name__} trains on whole images: patch_size must be None or {resolution}, got {patch_size}; use a Patch* loss')
        sigma, weight = self.noise_level(y.shape[0], y.device, generator)
        n = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype) * sigma
        return self.weighted_error(net, y, y + n, sigma, weight, class_labels=labels, augment_labels=augment_labels, **net_kwargs)

    def weighted_error(self, net: Callable, y: torch.Tensor, y_noisy: torch.Tensor, sigma: torch.Tensor,
                       weight: torch.Tensor, **net_kwargs) -> torch.Tensor:
        """weight * (D(y_noisy) - y)^2 per element; the network may also return its coordinate channels, which are not scored."""
        D_yn = net(y_noisy, sigma, **net_kwargs)
        return weight * (D_yn[:, :y.shape[1]] - y) ** 2

#----------------------------------------------------------------------------
# Noise-level distributions and weights of EDM, VP and VE (Karras et al. 2022, Table 1).

@persistence.persistent_class
class EDMLoss(DenoisingLoss):
    """EDM loss: ln(sigma) ~ N(P_mean, P_std^2), weight (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def noise_level(self, num, device, generator):
        rnd_normal = torch.randn([num, 1, 1, 1], generator=generator, device=device)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        return sigma, weight

@persistence.persistent_class
class VPLoss(DenoisingLoss):
    """Variance-preserving loss: t ~ U(epsilon_t, 1), sigma = sigma_VP(t), weight 1 / sigma^2."""

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, epsilon_t: float = 1e-5):
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Noise level of the VP SDE at time t."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * t ** 2 + self.beta_min * t).exp() - 1).sqrt()

    def noise_level(self, num, device, generator):
        rnd_uniform = torch.rand([num, 1, 1, 1], generator=generator, device=device)
        sigma = self.sigma(1 + rnd_uniform * (self.epsilon_t - 1))
        return sigma, 1 / sigma ** 2

@persistence.persistent_class
class VELoss(DenoisingLoss):
    """Variance-exploding loss: ln(sigma) ~ U(ln sigma_min, ln sigma_max), weight 1 / sigma^2."""

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def noise_level(self, num, device, generator):
        rnd_uniform = torch.rand([num, 1, 1, 1], generator=generator, device=device)
        sigma = self.sigma_min * (self.sigma_max / self.sigma_min) ** rnd_uniform
        return sigma, 1 / sigma ** 2

@persistence.persistent_class
class EDM2Loss(EDMLoss):
    """EDM2's loss with learned uncertainty (Karras et al. 2024, eq. 21): weight / exp(u) * (D - y)^2 + u per element.

    u = logvar(sigma) [N, 1, 1, 1] comes from the network (EDM2Precond, return_logvar=True); EDM's weight and
    log-normal sigma with EDM2's defaults. EDM2 networks take no augmentation labels.
    """

    def __init__(self, P_mean: float = -0.4, P_std: float = 1.0, sigma_data: float = 0.5):
        super().__init__(P_mean=P_mean, P_std=P_std, sigma_data=sigma_data)

    def weighted_error(self, net, y, y_noisy, sigma, weight, augment_labels=None, **net_kwargs):
        if augment_labels is not None:
            raise ValueError('EDM2 networks take no augmentation labels: train them without augmentation (--augment=0)')
        D_yn, logvar = net(y_noisy, sigma, return_logvar=True, **net_kwargs)
        return weight / logvar.exp() * (D_yn[:, :y.shape[1]] - y) ** 2 + logvar

#----------------------------------------------------------------------------
# Patch Diffusion: the same losses on random patches with coordinate channels.

@persistence.persistent_class
class PatchEDMLoss(EDMLoss):
    """EDM loss on random patches; the network gets the patch coordinates as x_pos."""
    patches = True

@persistence.persistent_class
class PatchVPLoss(VPLoss):
    """VP loss on random patches; the network gets the patch coordinates as x_pos."""
    patches = True

@persistence.persistent_class
class PatchVELoss(VELoss):
    """VE loss on random patches; the network gets the patch coordinates as x_pos."""
    patches = True

@persistence.persistent_class
class PatchEDM2Loss(EDM2Loss):
    """EDM2 loss on random patches; the network gets the patch coordinates as x_pos."""
    patches = True

#----------------------------------------------------------------------------
