"""EDM2's magnitude-preserving U-Net and its preconditioner, extended for Patch Diffusion's coordinate channels.

The network of Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models" (CVPR 2024),
written for this project from the paper and checked against NVlabs/edm2 (docs/compatibility.md). Every layer keeps
activations at unit magnitude: weights are normalised per output channel in every call (and, in training, the
stored weights are replaced by their normalised version), and sums, concatenations and the SiLU are rescaled so
that unit-variance inputs give unit-variance outputs. There are no biases and no group norms.

Parameter and buffer names and shapes are EDM2's (`unet.*`, `logvar_fourier.*`, `logvar_linear.*`), so its
snapshots load with strict=True (training/snapshot.py). With `pos_channels` > 0 the first convolution takes the
coordinate channels between the image and the U-Net's constant channel.
"""

import functools
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

from torch_utils import persistence
from training.networks import PrecondBase, edm_scalings

#----------------------------------------------------------------------------
# Magnitude-preserving operations.

def normalize(x: torch.Tensor, dim: Optional[Sequence[int]] = None, eps: float = 1e-4) -> torch.Tensor:
    """x divided by its root mean square over `dim` (default: all but the first), plus eps, computed in float32."""
    dim = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    rms = torch.add(eps, norm, alpha=np.sqrt(norm.numel() / x.numel()))  # eps + norm / sqrt(elements per slice)
    return x / rms.to(x.dtype)


SILU_RMS = 0.596  # E[silu(z)^2]^(1/2) for z ~ N(0, 1)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU scaled to unit output magnitude for unit-variance input (paper, eq. 81)."""
    return torch.nn.functional.silu(x) / SILU_RMS


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """(1 - t) a + t b, rescaled so that independent unit-variance inputs give unit variance (eq. 88)."""
    return a.lerp(b, t) / np.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation that gives b the weight t and a the weight 1 - t, at unit total magnitude (eq. 103)."""
    na, nb = a.shape[dim], b.shape[dim]
    total = np.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (total / np.sqrt(na) * (1 - t)), b * (total / np.sqrt(nb) * t)], dim=dim)


def resample(x: torch.Tensor, taps: Sequence[float] = (1, 1), mode: str = 'keep') -> torch.Tensor:
    """x unchanged ('keep'), or up/downsampled 2x ('up', 'down') with the separable FIR filter `taps`, per channel."""
    if mode == 'keep':
        return x
    if mode not in ('up', 'down') or len(taps) % 2:
        raise ValueError(f'resample: mode must be keep, up or down and the filter even-length, got {mode}, {list(taps)}')
    f = torch.as_tensor(taps, dtype=torch.float32)
    f = f / f.sum()
    f = torch.outer(f, f)[None, None].to(x.dtype).to(x.device)
    channels, pad = x.shape[1], (len(taps) - 1) // 2
    if mode == 'down':
        return torch.nn.functional.conv2d(x, f.tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=(pad,))
    return torch.nn.functional.conv_transpose2d(x, (f * 4).tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=(pad,))

#----------------------------------------------------------------------------
# Layers.

@persistence.persistent_class
class MPFourier(torch.nn.Module):
    """Fourier features sqrt(2) cos(2 pi (f x + phi)) with random frequencies and phases: unit magnitude (eq. 75)."""

    def __init__(self, num_channels: int, bandwidth: float = 1):
        super().__init__()
        self.register_buffer('freqs', 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer('phases', 2 * np.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * np.sqrt(2)).to(x.dtype)


@persistence.persistent_class
class MPConv(torch.nn.Module):
    """Convolution (kernel [k, k]) or fully connected layer (kernel []) with unit-norm weights per output channel.

    Each call divides the weights by their norm and by sqrt(fan_in), so every output channel preserves the input's
    magnitude (eq. 47). In training mode the stored weights are first overwritten with their normalised version
    (forced weight normalisation, eq. 66), which keeps their scale, and so the effective learning rate, fixed.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__()
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain: Union[float, torch.Tensor] = 1) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(self.weight.to(torch.float32)))
        w = normalize(self.weight.to(torch.float32))
        w = (w * (gain / np.sqrt(w[0].numel()))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return torch.nn.functional.conv2d(x, w, padding=(w.shape[-1] // 2,))


def cosine_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Self-attention over the pixels of qkv [N, 3C, H, W] (channels laid out [head, channel, q/k/v]) with q, k and
    v normalised per pixel; returns [N, C, H, W]."""
    n, _, h, w = qkv.shape
    q, k, v = normalize(qkv.reshape(n, num_heads, -1, 3, h * w), dim=2).unbind(3)
    weights = torch.einsum('nhcq,nhck->nhqk', q, k / np.sqrt(q.shape[2])).softmax(dim=3)
    return torch.einsum('nhqk,nhck->nhcq', weights, v).reshape(n, -1, h, w)


@persistence.persistent_class
class Block(torch.nn.Module):
    """Encoder or decoder block: optional resampling, a residual branch modulated by the embedding, and optional
    cosine self-attention (paper, fig. 21). Encoder blocks project and pixel-normalise their input first."""

    def __init__(self,
        in_channels: int,                       # Input channels.
        out_channels: int,                      # Output channels.
        emb_channels: int,                      # Embedding channels.
        flavor: str = 'enc',                    # 'enc' or 'dec'.
        resample_mode: str = 'keep',            # 'keep', 'up' or 'down'.
        resample_filter: Sequence[int] = (1, 1),  # FIR filter of the resampling.
        attention: bool = False,                # Self-attention after the residual branch?
        channels_per_head: int = 64,            # Channels per attention head.
        dropout: float = 0,                     # Dropout inside the residual branch.
        res_balance: float = 0.3,               # Weight of the residual branch against the main branch.
        attn_balance: float = 0.3,              # Weight of the attention against the main branch.
        clip_act: Optional[float] = 256,        # Clip the output to [-clip_act, clip_act]; None = no clipping.
    ):
        if flavor not in ('enc', 'dec'):
            raise ValueError(f'flavor must be "enc" or "dec", got "{flavor}"')
        super().__init__()
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = list(resample_filter)
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == 'enc' else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample_filter, self.resample_mode)
        if self.flavor == 'enc':
            x = normalize(x if self.conv_skip is None else self.conv_skip(x), dim=1)  # pixel norm
        y = self._residual(x, emb)
        if self.flavor == 'dec' and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            x = mp_sum(x, self.attn_proj(cosine_attention(self.attn_qkv(x), self.num_heads)), t=self.attn_balance)
        return x if self.clip_act is None else x.clip(-self.clip_act, self.clip_act)

    def _residual(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The residual branch: conv, scale by 1 + the embedding's projection, conv."""
        y = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * scale[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = torch.nn.functional.dropout(y, p=self.dropout)
        return self.conv_res1(y)

#----------------------------------------------------------------------------
# U-Net.

@persistence.persistent_class
class UNet(torch.nn.Module):
    """EDM2's U-Net (paper, fig. 21): encoder and decoder Blocks, skips joined by mp_cat, output scaled by a learned
    gain (zero at init). A constant channel of ones is appended to the input."""

    def __init__(self,
        img_resolution: int,                    # Nominal resolution: names modules, places attention.
        in_channels: int,                       # Input channels (image + coordinate channels; the ones are added here).
        out_channels: int,                      # Output channels.
        label_dim: int = 0,                     # Class label dimensionality, 0 = unconditional.
        model_channels: int = 192,              # Base channel count.
        channel_mult: Sequence[int] = (1, 2, 3, 4),  # Channel multiplier per resolution level.
        channel_mult_noise: Optional[int] = None,    # Noise embedding width / model_channels; None = channel_mult[0].
        channel_mult_emb: Optional[int] = None,      # Embedding width / model_channels; None = max(channel_mult).
        num_blocks: int = 3,                    # Blocks per level in the encoder (the decoder has one more).
        attn_resolutions: Sequence[int] = (16, 8),   # Nominal resolutions with self-attention.
        label_balance: float = 0.5,             # Weight of the class embedding against the noise embedding.
        concat_balance: float = 0.5,            # Weight of the main path against the skip in the decoder.
        **block_kwargs,                         # Passed on to Block.
    ):
        super().__init__()
        self.channel_mult = list(channel_mult)
        widths = [model_channels * m for m in channel_mult]
        noise_channels = model_channels * channel_mult_noise if channel_mult_noise is not None else widths[0]
        emb_channels = model_channels * channel_mult_emb if channel_mult_emb is not None else max(widths)
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = torch.nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(noise_channels)
        self.emb_noise = MPConv(noise_channels, emb_channels, kernel=[])
        self.emb_label = MPConv(label_dim, emb_channels, kernel=[]) if label_dim else None
        block = functools.partial(Block, emb_channels=emb_channels, **block_kwargs)
        self.enc = self._encoder(img_resolution, in_channels + 1, widths, num_blocks, attn_resolutions, block)
        skips = [module.out_channels for module in self.enc.values()]
        self.dec = self._decoder(img_resolution, widths, num_blocks, attn_resolutions, skips, block)
        self.out_conv = MPConv(widths[0], out_channels, kernel=[3, 3])

    @staticmethod
    def _encoder(resolution: int, cin: int, widths: List[int], num_blocks: int, attn: Sequence[int],
                 block) -> torch.nn.ModuleDict:
        enc = torch.nn.ModuleDict()
        cout = cin
        for level, width in enumerate(widths):
            res = resolution >> level
            if level == 0:
                enc[f'{res}x{res}_conv'] = MPConv(cout, width, kernel=[3, 3])
                cout = width
            else:
                enc[f'{res}x{res}_down'] = block(cout, cout, flavor='enc', resample_mode='down')
            for idx in range(num_blocks):
                enc[f'{res}x{res}_block{idx}'] = block(cout, width, flavor='enc', attention=res in attn)
                cout = width
        return enc

    @staticmethod
    def _decoder(resolution: int, widths: List[int], num_blocks: int, attn: Sequence[int], skips: List[int],
                 block) -> torch.nn.ModuleDict:
        dec = torch.nn.ModuleDict()
        cout = widths[-1]
        for level in reversed(range(len(widths))):
            res = resolution >> level
            if level == len(widths) - 1:
                dec[f'{res}x{res}_in0'] = block(cout, cout, flavor='dec', attention=True)
                dec[f'{res}x{res}_in1'] = block(cout, cout, flavor='dec')
            else:
                dec[f'{res}x{res}_up'] = block(cout, cout, flavor='dec', resample_mode='up')
            for idx in range(num_blocks + 1):
                dec[f'{res}x{res}_block{idx}'] = block(cout + skips.pop(), widths[level], flavor='dec', attention=res in attn)
                cout = widths[level]
        return dec

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: Optional[torch.Tensor]) -> torch.Tensor:
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(class_labels * np.sqrt(class_labels.shape[1])), t=self.label_balance)
        emb = mp_silu(emb)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, module in self.enc.items():
            x = module(x) if name.endswith('_conv') else module(x, emb)
            skips.append(x)
        for name, module in self.dec.items():
            if '_block' in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = module(x, emb)
        return self.out_conv(x, gain=self.out_gain)

#----------------------------------------------------------------------------
# Preconditioning.

@persistence.persistent_class
class EDM2Precond(PrecondBase):
    """EDM's preconditioning around EDM2's U-Net, with EDM2's learned uncertainty u(sigma) (`return_logvar`)."""

    inputs_after_coordinates = 1  # the U-Net's constant channel follows the coordinates (torch_utils.misc, --transfer)

    def __init__(self,
        img_resolution: int,                # Nominal image resolution.
        img_channels: int,                  # Image channels (without coordinate channels).
        label_dim: int = 0,                 # Class label dimensionality, 0 = unconditional.
        use_fp16: bool = True,              # Run the network in float16 on CUDA?
        use_bf16: bool = False,             # Run the network in bfloat16 (any device)?
        sigma_data: float = 0.5,            # Expected standard deviation of the training data.
        logvar_channels: int = 128,         # Fourier features of the uncertainty estimate.
        pos_channels: int = 0,              # Coordinate channels concatenated to the input, 0 = none.
        latent: Optional[dict] = None,      # VAE latent space the images live in (training/latents.py); None = pixels.
        **unet_kwargs,                      # Passed on to UNet (EDM2's names).
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, use_bf16, pos_channels, latent)
        self.sigma_data = sigma_data
        self.unet = UNet(img_resolution=img_resolution, in_channels=img_channels + pos_channels, out_channels=img_channels,
                         label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    @property
    def model(self) -> UNet:
        """The U-Net, under the name EDM's preconditioners give theirs (not a second entry in the state dict)."""
        return self.unet

    def forward(self, x: torch.Tensor, sigma: Union[torch.Tensor, float], x_pos: Optional[torch.Tensor] = None,
                class_labels: Optional[torch.Tensor] = None, force_fp32: bool = False, return_logvar: bool = False,
                **unet_kwargs):
        """D(x; sigma) in float32, and with return_logvar also the uncertainty log-variance [N, 1, 1, 1]."""
        self.check_inputs(x, x_pos)
        x, sigma, class_labels = self.float_inputs(x, sigma, class_labels)
        dtype = self.model_dtype(x.device, force_fp32)
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma, self.sigma_data)
        c_noise = c_noise.flatten()
        F_x = self.unet(self.with_coordinates(c_in * x, x_pos).to(dtype), c_noise, class_labels, **unet_kwargs)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if not return_logvar:
            return D_x
        return D_x, self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
