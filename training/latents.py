"""Latent Patch Diffusion: the Stable Diffusion VAE (diffusers' AutoencoderKL, an optional extra) between pixels and latents.

Images are encoded once into the moments (mean and std) of the VAE's posterior; training draws a fresh latent
mean + std * noise from them at every step and scales it by `scale` (0.18215 for Stable Diffusion), as the official
code does when it runs the encoder on every step. Samples go back through the decoder.
"""

import os
from typing import Callable, Optional, Tuple

import torch

from training.images import to_float
from training.sampler import to_uint8

SD_VAE = 'stabilityai/sd-vae-ft-ema'
SD_SCALE = 0.18215
INSTALL_HINT = 'pip install -r requirements-latent.txt'


class LatentError(ValueError):
    """The VAE cannot be used: diffusers is missing, or the VAE cannot be found or loaded; the message says which."""


def import_autoencoder() -> type:
    """diffusers.AutoencoderKL, or a LatentError that says how to install the optional extra."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise LatentError(f'latent diffusion needs the optional package diffusers ({err}); install it with: {INSTALL_HINT}') \
            from None
    return AutoencoderKL


def _vae_from(name_or_path: str, load: Callable) -> object:
    """load(AutoencoderKL, name_or_path), with a LatentError naming the VAE when it cannot be found or read."""
    AutoencoderKL = import_autoencoder()
    try:
        return load(AutoencoderKL, name_or_path)
    except (OSError, ValueError) as err:
        where = 'directory' if os.path.isdir(name_or_path) else 'hub id'
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LatentError(f'cannot load the VAE {where} "{name_or_path}" ({first_line}); without a network, download it '
                          'elsewhere (AutoencoderKL.save_pretrained) and pass a local path instead') from None


def load_vae(name_or_path: str, device: torch.device = torch.device('cpu')) -> torch.nn.Module:
    """An AutoencoderKL from a local directory (save_pretrained layout) or a Hugging Face hub id, in eval mode."""
    # low_cpu_mem_usage=False: no warning about the missing `accelerate` package.
    vae = _vae_from(name_or_path, lambda cls, name: cls.from_pretrained(name, low_cpu_mem_usage=False))
    return vae.eval().requires_grad_(False).to(device)


def vae_shape(config: dict) -> Tuple[int, int]:
    """(latent channels, pixels per latent along each side) of an AutoencoderKL config."""
    return config['latent_channels'], 2 ** (len(config['block_out_channels']) - 1)


def vae_config(name_or_path: str) -> dict:
    """An AutoencoderKL's config without loading its weights (what train.py needs to check the latent size)."""
    return dict(_vae_from(name_or_path, lambda cls, name: cls.load_config(name)))


def sample_latents(moments: torch.Tensor, scale: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Scaled latents (mean + std * noise) * scale [N, C, h, w] from posterior moments [N, 2C, h, w] (mean, std)."""
    mean, std = moments.to(torch.float32).chunk(2, dim=1)
    noise = torch.randn(mean.shape, generator=generator, device=mean.device)
    return (mean + std * noise) * scale


class LatentCodec:
    """Pixels <-> scaled latents with one VAE; uint8 images in, float latents out, and back."""

    def __init__(self, vae: str = SD_VAE, scale: float = SD_SCALE, device: torch.device = torch.device('cpu')):
        self.name = vae
        self.scale = scale
        self.device = torch.device(device)
        self.vae = load_vae(vae, self.device)
        self.channels, self.factor = vae_shape(self.vae.config)

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """Posterior moments [N, 2C, R/f, R/f] (mean, std; unscaled, float32) of uint8 images [N, 3, R, R]."""
        pixels = to_float(images.to(self.device))
        posterior = self.vae.encode(pixels).latent_dist
        return torch.cat([posterior.mean, posterior.std], dim=1).to(torch.float32)

    def encode(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Scaled latent samples of uint8 images: what training on the fly feeds the network."""
        return sample_latents(self.encode_moments(images), self.scale, generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """uint8 images [N, 3, R, R] from scaled latents [N, C, h, w]."""
        return to_uint8(self.vae.decode(latents.to(self.device, torch.float32) / self.scale).sample)


def latent_decoder(net: torch.nn.Module, device: torch.device, vae: Optional[str] = None) -> Optional[Callable]:
    """The decoder for a network trained on latents (its `latent` setting; `vae` overrides the VAE path), else None."""
    latent = getattr(net, 'latent', None)
    if not latent:
        return None
    return LatentCodec(vae or latent['vae'], latent['scale'], device).decode
