"""Latent Patch Diffusion: the Stable Diffusion VAE (diffusers' AutoencoderKL, an optional extra) between pixels and latents.

Images are encoded once into the moments (mean and std) of the VAE's posterior; training draws a fresh raw latent
mean + std * noise from them at every step and normalises it to raw * scale + bias, as the official code does when it
runs the encoder on every step. Samples go back through the decoder as (x - bias) / scale. Two normalisations are
named (latent_setting): 'sd', Stable Diffusion's one scale 0.18215 with no bias and pixels in [-1, 1], and 'edm2',
EDM2's per-channel scale and bias with pixels in [0, 1].
"""

import dataclasses
import os
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from training.images import to_float
from training.sampler import to_uint8

SD_VAE = 'stabilityai/sd-vae-ft-ema'
SD_SCALE = 0.18215
# EDM2's normalisation: the defaults of StabilityVAEEncoder in NVlabs/edm2 training/encoders.py, which its img512
# presets (train_edm2.py) use unchanged: each channel's assumed raw mean and std of sd-vae-ft-mse's latents of pixels
# in [0, 1], mapped to mean 0 and std 0.5.
EDM2_VAE = 'stabilityai/sd-vae-ft-mse'
EDM2_RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
EDM2_RAW_STD = (4.17, 4.62, 3.71, 3.28)
EDM2_FINAL_MEAN, EDM2_FINAL_STD = 0.0, 0.5
LATENT_NORMS = ('sd', 'edm2')
SIGNED, UNIT = '-1..1', '0..1'  # the pixel range the VAE sees: Stable Diffusion's, or EDM2's
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


Channels = Union[float, Sequence[float]]  # one value for every channel, or one per channel


def channel_normalisation(raw_mean: Sequence[float], raw_std: Sequence[float], final_mean: float,
                          final_std: float) -> Tuple[List[float], List[float]]:
    """Per-channel (scale, bias) taking raw latents of raw_mean, raw_std to final_mean, final_std, in float32 as EDM2 does."""
    scale = np.float32(final_std) / np.asarray(raw_std, dtype=np.float32)
    bias = np.float32(final_mean) - np.asarray(raw_mean, dtype=np.float32) * scale
    return [float(v) for v in scale], [float(v) for v in bias]


def latent_setting(norm: str = 'sd', vae: Optional[str] = None) -> dict:
    """The `latent` setting of a named normalisation ('sd' or 'edm2'), with that normalisation's VAE unless `vae` is given."""
    if norm == 'sd':
        return dict(vae=vae or SD_VAE, scale=SD_SCALE)
    if norm == 'edm2':
        scale, bias = channel_normalisation(EDM2_RAW_MEAN, EDM2_RAW_STD, EDM2_FINAL_MEAN, EDM2_FINAL_STD)
        return dict(vae=vae or EDM2_VAE, scale=scale, bias=bias, pixels=UNIT)
    raise ValueError(f'unknown latent normalisation "{norm}"; known are {", ".join(LATENT_NORMS)}')


def latent_record(meta: dict) -> dict:
    """The `latent` setting held in a record such as a latent data set's "latents" entry: vae, scale, bias and pixels."""
    return {key: meta[key] for key in ('vae', 'scale', 'bias', 'pixels') if key in meta}


def _per_channel(value: Union[float, Tuple[float, ...]], x: torch.Tensor) -> Union[float, torch.Tensor]:
    """A float as it is; per-channel values as a float32 [1, C, 1, 1] tensor on x's device."""
    if isinstance(value, float):
        return value
    if len(value) != x.shape[1]:
        raise ValueError(f'{len(value)} per-channel latent values for {x.shape[1]} latent channels')
    return torch.tensor(value, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)


@dataclasses.dataclass(frozen=True)
class LatentNorm:
    """Raw VAE latents <-> final latents (raw * scale + bias, per channel or for all), and the pixel range the VAE sees."""

    scale: Channels = SD_SCALE
    bias: Channels = 0.0
    pixels: str = SIGNED

    def __post_init__(self):
        if self.pixels not in (SIGNED, UNIT):
            raise ValueError(f'latent pixel range "{self.pixels}" is neither {SIGNED} nor {UNIT}')
        for name in ('scale', 'bias'):
            value = getattr(self, name)
            object.__setattr__(self, name, float(value) if np.ndim(value) == 0 else tuple(map(float, value)))

    @classmethod
    def of(cls, latent: dict) -> 'LatentNorm':
        """The normalisation of a `latent` setting; without bias or pixels, those of Stable Diffusion (0, [-1, 1])."""
        return cls(**{key: value for key, value in latent_record(latent).items() if key != 'vae'})

    def to_vae(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images as float32 pixels in the VAE's range."""
        return to_float(images) if self.pixels == SIGNED else images.to(torch.float32) / 255

    def to_uint8(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE's output pixels as uint8: rounded as EDM does for [-1, 1], truncated as EDM2 does for [0, 1]."""
        return to_uint8(pixels) if self.pixels == SIGNED else pixels.clamp(0, 1).mul(255).to(torch.uint8)

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        """Final latents raw * scale + bias."""
        return raw * _per_channel(self.scale, raw) + _per_channel(self.bias, raw)

    def raw(self, final: torch.Tensor) -> torch.Tensor:
        """Raw latents (final - bias) / scale, what the VAE decodes."""
        return (final - _per_channel(self.bias, final)) / _per_channel(self.scale, final)

    def sample(self, moments: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Final latents of mean + std * noise [N, C, h, w] from posterior moments [N, 2C, h, w] (mean, std)."""
        mean, std = moments.to(torch.float32).chunk(2, dim=1)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device)
        return self.normalise(mean + std * noise)


class LatentCodec:
    """Pixels <-> final latents with one VAE and one LatentNorm; uint8 images in, float latents out, and back."""

    def __init__(self, vae: str = SD_VAE, scale: Channels = SD_SCALE, device: torch.device = torch.device('cpu'),
                 bias: Channels = 0.0, pixels: str = SIGNED):
        self.name = vae
        self.norm = LatentNorm(scale, bias, pixels)
        self.device = torch.device(device)
        self.vae = load_vae(vae, self.device)
        self.channels, self.factor = vae_shape(self.vae.config)

    @classmethod
    def of(cls, latent: dict, device: torch.device = torch.device('cpu'), vae: Optional[str] = None) -> 'LatentCodec':
        """The codec of a `latent` setting (a network's, a data set's or latent_setting()'s); `vae` overrides its VAE."""
        norm = LatentNorm.of(latent)
        return cls(vae or latent['vae'], norm.scale, device, norm.bias, norm.pixels)

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """Posterior moments [N, 2C, R/f, R/f] (mean, std; raw, float32) of uint8 images [N, 3, R, R]."""
        posterior = self.vae.encode(self.norm.to_vae(images.to(self.device))).latent_dist
        return torch.cat([posterior.mean, posterior.std], dim=1).to(torch.float32)

    def encode(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Final latent samples of uint8 images: what training on the fly feeds the network."""
        return self.norm.sample(self.encode_moments(images), generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """uint8 images [N, 3, R, R] from final latents [N, C, h, w]."""
        return self.norm.to_uint8(self.vae.decode(self.norm.raw(latents.to(self.device, torch.float32))).sample)


def latent_decoder(net: torch.nn.Module, device: torch.device, vae: Optional[str] = None) -> Optional[Callable]:
    """The decoder for a network trained on latents (its `latent` setting; `vae` overrides the VAE path), else None."""
    latent = getattr(net, 'latent', None)
    if not latent:
        return None
    return LatentCodec.of(latent, device, vae).decode
