"""U-Nets (DDPM++, NCSN++, ADM) and EDM's preconditioning wrappers, extended for Patch Diffusion.

Parameter and buffer names match NVlabs/edm, so EDM's and the official Patch Diffusion code's snapshots load
with strict=True (training/snapshot.py, docs/compatibility.md). The preconditioners feed the network `pos_channels` extra pixel-coordinate
channels next to the (scaled) noisy image; `pos_channels=0` is the plain EDM baseline.
"""

from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch.nn.functional import silu

from torch_utils import persistence

#----------------------------------------------------------------------------
# Layers.

def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """Random tensor from one of EDM's init modes: {xavier,kaiming}_{uniform,normal}."""
    family, _, dist = mode.partition('_')
    variances = {'xavier': 2 / (fan_in + fan_out), 'kaiming': 1 / fan_in}
    if family not in variances or dist not in ('uniform', 'normal'):
        raise ValueError(f'invalid init mode "{mode}"')
    var = variances[family]
    if dist == 'uniform':
        return np.sqrt(3 * var) * (torch.rand(*shape) * 2 - 1)
    return np.sqrt(var) * torch.randn(*shape)


@persistence.persistent_class
class Linear(torch.nn.Module):
    """Fully connected layer with EDM's weight init."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init_mode: str = 'kaiming_normal', init_weight: float = 1, init_bias: float = 0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)


def _upsample2x(x: torch.Tensor, f: torch.Tensor, padding: int) -> torch.Tensor:
    channels = x.shape[1]
    return torch.nn.functional.conv_transpose2d(x, f.mul(4).tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=padding)


def _downsample2x(x: torch.Tensor, f: torch.Tensor, padding: int) -> torch.Tensor:
    channels = x.shape[1]
    return torch.nn.functional.conv2d(x, f.tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=padding)


@persistence.persistent_class
class Conv2d(torch.nn.Module):
    """2D convolution (kernel=0: none) with optional 2x FIR up/downsampling, EDM's weight init."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 up: bool = False, down: bool = False, resample_filter: Sequence[float] = (1, 1),
                 fused_resample: bool = False, init_mode: str = 'kaiming_normal',
                 init_weight: float = 1, init_bias: float = 0):
        if up and down:
            raise ValueError('Conv2d cannot both upsample and downsample')
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = torch.nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight) if kernel else None
        self.bias = torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum().square()
        self.register_buffer('resample_filter', f if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if f is None else (f.shape[-1] - 1) // 2
        if self.fused_resample and w is not None and self.up:
            x = torch.nn.functional.conv2d(_upsample2x(x, f, w_pad + f_pad), w)
        elif self.fused_resample and w is not None and self.down:
            x = _downsample2x(torch.nn.functional.conv2d(x, w, padding=w_pad + f_pad), f, 0)
        else:
            if self.up:
                x = _upsample2x(x, f, f_pad)
            if self.down:
                x = _downsample2x(x, f, f_pad)
            if w is not None:
                x = torch.nn.functional.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


@persistence.persistent_class
class GroupNorm(torch.nn.Module):
    """Group normalization that uses fewer groups when channels are scarce (EDM's variant)."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


ATTN_IMPLS = ('sdpa', 'explicit')  # torch's scaled_dot_product_attention, or attention as EDM's einsums


class _AttentionWeights(torch.autograd.Function):
    """softmax over k of q.k / sqrt(c), computed in float32 but saved in the input dtype."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        scale = 1 / np.sqrt(k.shape[1])
        w = torch.einsum('ncq,nck->nqk', q.float(), k.float() * scale).softmax(dim=2).to(q.dtype)
        ctx.save_for_backward(q, k, w)
        return w

    @staticmethod
    def backward(ctx, dw: torch.Tensor):
        q, k, w = ctx.saved_tensors
        scale = 1 / np.sqrt(k.shape[1])
        w, dw = w.float(), dw.float()
        ds = w * (dw - (dw * w).sum(dim=2, keepdim=True))
        dq = torch.einsum('nck,nqk->ncq', k.float(), ds) * scale
        dk = torch.einsum('ncq,nqk->nck', q.float(), ds) * scale
        return dq.to(q.dtype), dk.to(k.dtype)

#----------------------------------------------------------------------------
# U-Net block and timestep embeddings.

@persistence.persistent_class
class UNetBlock(torch.nn.Module):
    """Residual block with optional 2x up/downsampling and self-attention (DDPM++, NCSN++ and ADM)."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: Optional[int] = None,
                 channels_per_head: int = 64, dropout: float = 0, skip_scale: float = 1, eps: float = 1e-5,
                 resample_filter: Sequence[float] = (1, 1), resample_proj: bool = False,
                 adaptive_scale: bool = True, init: dict = {}, init_zero: dict = {'init_weight': 0},
                 init_attn: Optional[dict] = None, attn_impl: str = 'sdpa'):
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f'attn_impl must be one of {ATTN_IMPLS}, got "{attn_impl}"')
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale
        self.attn_impl = attn_impl

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if in_channels != out_channels or up or down:
            # A pure resampling skip (kernel 0) has no weights unless resample_proj asks for a 1x1 projection.
            kernel = 1 if resample_proj or in_channels != out_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down, resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **(init if init_attn is None else init_attn))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        residual = x if self.skip is None else self.skip(x)
        x = self.conv0(silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = silu(self.norm1(x + params))
        x = self.conv1(torch.nn.functional.dropout(x, p=self.dropout, training=self.training))
        x = (x + residual) * self.skip_scale
        if self.num_heads:
            x = (self.proj(self._attention(self.qkv(self.norm2(x)))) + x) * self.skip_scale
        return x

    def _attention(self, qkv: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention over the pixels of a [N, 3C, H, W] qkv tensor; returns [N, C, H, W]."""
        # The qkv channels are laid out as [head, channel, q/k/v]; checkpoints depend on this order.
        n, c, h, w = qkv.shape
        c //= 3
        if self.attn_impl == 'explicit':
            q, k, v = qkv.reshape(n * self.num_heads, c // self.num_heads, 3, h * w).unbind(2)
            return torch.einsum('nqk,nck->ncq', _AttentionWeights.apply(q, k), v).reshape(n, c, h, w)
        # -> [q/k/v, n, head, pixel, channel]; contiguous because fused kernels need a unit stride in the last dim.
        qkv = qkv.reshape(n, self.num_heads, c // self.num_heads, 3, h * w).permute(3, 0, 1, 4, 2).contiguous()
        a = torch.nn.functional.scaled_dot_product_attention(*qkv.unbind(0))
        return a.transpose(2, 3).reshape(n, c, h, w)


@persistence.persistent_class
class PositionalEmbedding(torch.nn.Module):
    """Sinusoidal timestep embedding [cos, sin] (DDPM++ and ADM)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        exponents = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** exponents
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


@persistence.persistent_class
class FourierEmbedding(torch.nn.Module):
    """Random Fourier feature timestep embedding [cos, sin] (NCSN++)."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.outer(x, (2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


def _drop_labels(labels: torch.Tensor, p: float, training: bool, batch_size: int) -> torch.Tensor:
    if not (training and p):
        return labels
    keep = torch.rand([batch_size, 1], device=labels.device) >= p
    return labels * keep.to(labels.dtype)

#----------------------------------------------------------------------------
# U-Nets.

@persistence.persistent_class
class SongUNet(torch.nn.Module):
    """DDPM++ / NCSN++ U-Net of Song et al. (score_sde), as re-implemented in EDM."""

    def __init__(self,
        img_resolution: int,                            # Nominal resolution: names modules, places attention.
        in_channels: int,                               # Input channels (image + coordinate channels).
        out_channels: int,                              # Output channels.
        label_dim: int = 0,                             # Class label dimensionality, 0 = unconditional.
        augment_dim: int = 0,                           # Augmentation label dimensionality, 0 = none.
        model_channels: int = 128,                      # Base channel count.
        channel_mult: Sequence[int] = (1, 2, 2, 2),     # Channel multiplier per resolution level.
        channel_mult_emb: int = 4,                      # Embedding width as a multiple of model_channels.
        num_blocks: int = 4,                            # Residual blocks per level.
        attn_resolutions: Sequence[int] = (16,),        # Nominal resolutions with self-attention.
        dropout: float = 0.10,                          # Dropout inside the residual blocks.
        label_dropout: float = 0,                       # Probability of zeroing class labels in training.
        embedding_type: str = 'positional',             # 'positional' (DDPM++) or 'fourier' (NCSN++).
        channel_mult_noise: int = 1,                    # Noise embedding width: 1 (DDPM++), 2 (NCSN++).
        encoder_type: str = 'standard',                 # 'standard' (DDPM++), 'skip' or 'residual' (NCSN++).
        decoder_type: str = 'standard',                 # 'standard' or 'skip'.
        resample_filter: Sequence[float] = (1, 1),      # (1, 1) for DDPM++, (1, 3, 3, 1) for NCSN++.
        attn_impl: str = 'sdpa',                        # Self-attention: 'sdpa' or 'explicit' (EDM's einsums).
    ):
        for name, value, allowed in [('embedding_type', embedding_type, ('fourier', 'positional')),
                                     ('encoder_type', encoder_type, ('standard', 'skip', 'residual')),
                                     ('decoder_type', decoder_type, ('standard', 'skip'))]:
            if value not in allowed:
                raise ValueError(f'{name} must be one of {allowed}, got "{value}"')
        super().__init__()
        self.img_resolution = img_resolution
        self.channel_mult = list(channel_mult)
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        init_attn = dict(init_mode='xavier_uniform', init_weight=np.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5),
                            eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=init_attn, attn_impl=attn_impl)

        if embedding_type == 'positional':
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        self.enc = torch.nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f'{res}x{res}_conv'] = Conv2d(cout, model_channels, kernel=3, **init)
                cout = model_channels
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == 'skip':
                    self.enc[f'{res}x{res}_aux_down'] = Conv2d(caux, caux, kernel=0, down=True, resample_filter=resample_filter)
                    self.enc[f'{res}x{res}_aux_skip'] = Conv2d(caux, cout, kernel=1, **init)
                elif encoder_type == 'residual':
                    self.enc[f'{res}x{res}_aux_residual'] = Conv2d(caux, cout, kernel=3, down=True, resample_filter=resample_filter,
                                                                  fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cout, model_channels * mult,
                                                                attention=res in attn_resolutions, **block_kwargs)
                cout = model_channels * mult
        skips = [block.out_channels for name, block in self.enc.items() if '_aux_' not in name]

        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cout + skips.pop(), model_channels * mult, attention=attn, **block_kwargs)
                cout = model_channels * mult
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    self.dec[f'{res}x{res}_aux_up'] = Conv2d(out_channels, out_channels, kernel=0, up=True, resample_filter=resample_filter)
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(cout, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: Optional[torch.Tensor],
                augment_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # [cos, sin] -> [sin, cos], as in score_sde
        if self.map_label is not None:
            labels = _drop_labels(class_labels, self.label_dropout, self.training, x.shape[0])
            emb = emb + self.map_label(labels * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer1(silu(self.map_layer0(emb))))

        skips = []
        aux = x
        for name, block in self.enc.items():
            if name.endswith('_aux_down'):
                aux = block(aux)
            elif name.endswith('_aux_skip'):
                x = skips[-1] = x + block(aux)
            elif name.endswith('_aux_residual'):
                x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        out = None
        for name, block in self.dec.items():
            if name.endswith('_aux_up'):
                out = block(out)
            elif name.endswith('_aux_norm'):
                tmp = block(x)
            elif name.endswith('_aux_conv'):
                tmp = block(silu(tmp))
                out = tmp if out is None else out + tmp
            else:
                if '_block' in name:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return out


@persistence.persistent_class
class DhariwalUNet(torch.nn.Module):
    """ADM U-Net of Dhariwal & Nichol (guided-diffusion), as re-implemented in EDM."""

    def __init__(self,
        img_resolution: int,                            # Nominal resolution: names modules, places attention.
        in_channels: int,                               # Input channels (image + coordinate channels).
        out_channels: int,                              # Output channels.
        label_dim: int = 0,                             # Class label dimensionality, 0 = unconditional.
        augment_dim: int = 0,                           # Augmentation label dimensionality, 0 = none.
        model_channels: int = 192,                      # Base channel count.
        channel_mult: Sequence[int] = (1, 2, 3, 4),     # Channel multiplier per resolution level.
        channel_mult_emb: int = 4,                      # Embedding width as a multiple of model_channels.
        num_blocks: int = 3,                            # Residual blocks per level.
        attn_resolutions: Sequence[int] = (32, 16, 8),  # Nominal resolutions with self-attention.
        dropout: float = 0.10,                          # Dropout inside the residual blocks.
        label_dropout: float = 0,                       # Probability of zeroing class labels in training.
        attn_impl: str = 'sdpa',                        # Self-attention: 'sdpa' or 'explicit' (EDM's einsums).
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.channel_mult = list(channel_mult)
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=np.sqrt(1 / 3), init_bias=np.sqrt(1 / 3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero,
                            attn_impl=attn_impl)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = None
        if label_dim:
            self.map_label = Linear(label_dim, emb_channels, bias=False, init_mode='kaiming_normal', init_weight=np.sqrt(label_dim))

        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f'{res}x{res}_conv'] = Conv2d(cout, model_channels * mult, kernel=3, **init)
                cout = model_channels * mult
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cout, model_channels * mult,
                                                                attention=res in attn_resolutions, **block_kwargs)
                cout = model_channels * mult
        skips = [block.out_channels for block in self.enc.values()]

        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cout + skips.pop(), model_channels * mult,
                                                                attention=res in attn_resolutions, **block_kwargs)
                cout = model_channels * mult
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: Optional[torch.Tensor],
                augment_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(_drop_labels(class_labels, self.label_dropout, self.training, x.shape[0]))
        emb = silu(emb)

        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for name, block in self.dec.items():
            if '_block' in name:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(silu(self.out_norm(x)))


MODELS = {'SongUNet': SongUNet, 'DhariwalUNet': DhariwalUNet}

#----------------------------------------------------------------------------
# Patch sizes.

def min_input_size(channel_mult: Sequence[int]) -> int:
    """Smallest spatial size a U-Net with these per-level multipliers accepts; valid sizes are its multiples."""
    return 2 ** (len(channel_mult) - 1)


def check_patch_size(channel_mult: Sequence[int], size: Union[int, Sequence[int]]) -> None:
    """Raise ValueError unless both sides of `size` (int or (height, width)) are positive multiples of min_input_size."""
    height, width = size if isinstance(size, (tuple, list)) else (size, size)
    step = min_input_size(channel_mult)
    shown = str(height) if height == width else f'{height}x{width}'
    if min(height, width) < step:
        problem = 'too small'
    elif height % step or width % step:
        problem = f'not a multiple of {step}'
    else:
        return
    levels = len(channel_mult) - 1
    mult = '[' + ','.join(str(m) for m in channel_mult) + ']'
    raise ValueError(f'patch size {shown} is {problem} for channel_mult {mult}: each side must be '
                     f'a multiple of {step} ({levels} downsampling level{"" if levels == 1 else "s"})')

#----------------------------------------------------------------------------
# Preconditioning.

def edm_scalings(sigma: torch.Tensor, sigma_data: float) -> tuple:
    """EDM's (c_skip, c_out, c_in, c_noise) for noise levels sigma (Table 1 of Karras et al. 2022; EDM2 keeps them)."""
    var = sigma ** 2 + sigma_data ** 2
    return sigma_data ** 2 / var, sigma * sigma_data / var.sqrt(), 1 / var.sqrt(), sigma.log() / 4


class PrecondBase(torch.nn.Module):
    """What every preconditioner shares: its interface attributes, input checks, label handling and network dtype.

    Subclasses provide `model`, the U-Net (its `channel_mult` sets the valid patch sizes).
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool, use_bf16: bool,
                 pos_channels: int, latent: Optional[dict]):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.use_bf16 = use_bf16
        self.pos_channels = pos_channels
        self.latent = dict(latent) if latent else None  # samples are decoded with this VAE (training/latents.py)

    def round_sigma(self, sigma) -> torch.Tensor:
        """Noise level the network actually supports closest to sigma (identity here)."""
        return torch.as_tensor(sigma)

    def model_dtype(self, device: torch.device, force_fp32: bool = False) -> torch.dtype:
        """Dtype of the network call: bf16 if use_bf16 (any device), fp16 if use_fp16 on CUDA, else fp32."""
        if force_fp32:
            return torch.float32
        if self.use_bf16:
            return torch.bfloat16
        if self.use_fp16 and device.type == 'cuda':
            return torch.float16
        return torch.float32

    def check_inputs(self, x: torch.Tensor, x_pos: Optional[torch.Tensor]) -> None:
        """Raise ValueError unless x, x_pos and the patch size fit this network."""
        if x.shape[1] != self.img_channels:
            raise ValueError(f'x has {x.shape[1]} channels, expected img_channels={self.img_channels}')
        if self.pos_channels == 0 and x_pos is not None:
            raise ValueError('x_pos was given but the network has pos_channels=0 (built without coordinate input)')
        if self.pos_channels and x_pos is None:
            raise ValueError(f'x_pos is required: the network takes {self.pos_channels} coordinate channels (pos_channels)')
        if x_pos is not None and (x_pos.shape[1] != self.pos_channels or x_pos.shape[2:] != x.shape[2:]):
            raise ValueError(f'x_pos has shape {list(x_pos.shape)}, expected [N, {self.pos_channels}, {x.shape[2]}, {x.shape[3]}]')
        check_patch_size(self.model.channel_mult, tuple(x.shape[2:]))

    def float_inputs(self, x: torch.Tensor, sigma: Union[torch.Tensor, float], class_labels: Optional[torch.Tensor]):
        """(x, sigma [N, 1, 1, 1], class labels or None) in float32; missing labels of a conditional net are zeros."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        return x, sigma, class_labels

    @staticmethod
    def with_coordinates(x_in: torch.Tensor, x_pos: Optional[torch.Tensor]) -> torch.Tensor:
        """The network input: the scaled image, then the coordinate channels unscaled (if any)."""
        return x_in if x_pos is None else torch.cat([x_in, x_pos.to(torch.float32)], dim=1)


class _Precond(PrecondBase):
    """Shared part of EDM's preconditioners: builds the network and runs D(x; sigma) from c_skip, c_out, c_in, c_noise."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool, use_bf16: bool,
                 model_type: str, pos_channels: int, latent: Optional[dict], model_kwargs: dict, out_factor: int = 1):
        if model_type not in MODELS:
            raise ValueError(f'unknown model_type "{model_type}", expected one of {sorted(MODELS)}')
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, use_bf16, pos_channels, latent)
        self.model = MODELS[model_type](img_resolution=img_resolution, in_channels=img_channels + pos_channels,
                                        out_channels=img_channels * out_factor, label_dim=label_dim, **model_kwargs)

    def scalings(self, sigma: torch.Tensor):
        """Return (c_skip, c_out, c_in, c_noise) for noise levels sigma of shape [N, 1, 1, 1]."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, sigma: Union[torch.Tensor, float], x_pos: Optional[torch.Tensor] = None,
                class_labels: Optional[torch.Tensor] = None, force_fp32: bool = False, **model_kwargs) -> torch.Tensor:
        """Denoise x (image channels only) at noise level sigma; x_pos holds the patch's pixel coordinates."""
        self.check_inputs(x, x_pos)
        x, sigma, class_labels = self.float_inputs(x, sigma, class_labels)
        dtype = self.model_dtype(x.device, force_fp32)
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        x_in = self.with_coordinates(c_in * x, x_pos)
        F_x = self.model(x_in.to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        return c_skip * x + c_out * F_x[:, :self.img_channels].to(torch.float32)  # iDDPM's extra (variance) channels unused


@persistence.persistent_class
class VPPrecond(_Precond):
    """Variance preserving (VP) preconditioning of Song et al., as in EDM."""

    def __init__(self,
        img_resolution: int,                # Nominal image resolution.
        img_channels: int,                  # Image channels (without coordinate channels).
        label_dim: int = 0,                 # Class label dimensionality, 0 = unconditional.
        use_fp16: bool = False,             # Run the network in float16 on CUDA?
        use_bf16: bool = False,             # Run the network in bfloat16 (any device)?
        beta_d: float = 19.9,               # Extent of the noise level schedule.
        beta_min: float = 0.1,              # Initial slope of the noise level schedule.
        M: int = 1000,                      # Number of timesteps of the original DDPM formulation.
        epsilon_t: float = 1e-5,            # Smallest t used in training.
        model_type: str = 'SongUNet',       # 'SongUNet' or 'DhariwalUNet'.
        pos_channels: int = 2,              # Coordinate channels concatenated to the input, 0 = none.
        latent: Optional[dict] = None,      # VAE latent space the images live in, dict(vae=name, scale=factor); None = pixels.
        **model_kwargs,                     # Passed on to the network.
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, use_bf16, model_type, pos_channels, latent,
                         model_kwargs)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))

    def scalings(self, sigma: torch.Tensor):
        """VP scalings; the network sees (M - 1) * t(sigma)."""
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)

    def sigma(self, t) -> torch.Tensor:
        """Noise level at time t."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * t ** 2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma) -> torch.Tensor:
        """Time t at which the noise level is sigma."""
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d


@persistence.persistent_class
class VEPrecond(_Precond):
    """Variance exploding (VE) preconditioning of Song et al., as in EDM."""

    def __init__(self,
        img_resolution: int,                # Nominal image resolution.
        img_channels: int,                  # Image channels (without coordinate channels).
        label_dim: int = 0,                 # Class label dimensionality, 0 = unconditional.
        use_fp16: bool = False,             # Run the network in float16 on CUDA?
        use_bf16: bool = False,             # Run the network in bfloat16 (any device)?
        sigma_min: float = 0.02,            # Smallest supported noise level.
        sigma_max: float = 100,             # Largest supported noise level.
        model_type: str = 'SongUNet',       # 'SongUNet' or 'DhariwalUNet'.
        pos_channels: int = 2,              # Coordinate channels concatenated to the input, 0 = none.
        latent: Optional[dict] = None,      # VAE latent space the images live in, dict(vae=name, scale=factor); None = pixels.
        **model_kwargs,                     # Passed on to the network.
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, use_bf16, model_type, pos_channels, latent,
                         model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def scalings(self, sigma: torch.Tensor):
        """VE scalings; the network sees log(sigma / 2)."""
        return 1, sigma, 1, (0.5 * sigma).log()


@persistence.persistent_class
class iDDPMPrecond(_Precond):
    """Improved DDPM preconditioning (Nichol and Dhariwal 2021) as EDM defines it: noise levels limited to M discrete
    values u[0..M-1], the network outputs twice the image channels (the second half, the variance, is unused)."""

    def __init__(self,
        img_resolution: int,                # Nominal image resolution.
        img_channels: int,                  # Image channels (without coordinate channels).
        label_dim: int = 0,                 # Class label dimensionality, 0 = unconditional.
        use_fp16: bool = False,             # Run the network in float16 on CUDA?
        use_bf16: bool = False,             # Run the network in bfloat16 (any device)?
        C_1: float = 0.001,                 # Timestep adjustment at low noise levels.
        C_2: float = 0.008,                 # Timestep adjustment at high noise levels.
        M: int = 1000,                      # Number of discretisation steps of the original DDPM formulation.
        model_type: str = 'DhariwalUNet',   # 'SongUNet' or 'DhariwalUNet'.
        pos_channels: int = 2,              # Coordinate channels concatenated to the input, 0 = none.
        latent: Optional[dict] = None,      # VAE latent space the images live in, dict(vae=name, scale=factor); None = pixels.
        **model_kwargs,                     # Passed on to the network.
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, use_bf16, model_type, pos_channels, latent,
                         model_kwargs, out_factor=2)
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        u = torch.zeros(M + 1)
        for j in range(M, 0, -1):  # u[j - 1] from u[j], as in EDM (Karras et al. 2022, Table 1)
            u[j - 1] = ((u[j] ** 2 + 1) / (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=C_1) - 1).sqrt()
        self.register_buffer('u', u)
        self.sigma_min = float(u[M - 1])
        self.sigma_max = float(u[0])

    def alpha_bar(self, j) -> torch.Tensor:
        """The cosine schedule's alpha-bar at step j."""
        return (0.5 * np.pi * torch.as_tensor(j) / self.M / (self.C_2 + 1)).sin() ** 2

    def round_sigma(self, sigma, return_index: bool = False) -> torch.Tensor:
        """The nearest of the M supported noise levels u (or its index), found with EDM's cdist so that ties agree."""
        sigma = torch.as_tensor(sigma)
        index = torch.cdist(sigma.to(self.u.device).to(torch.float32).reshape(1, -1, 1), self.u.reshape(1, -1, 1)).argmin(2)
        result = index if return_index else self.u[index.flatten()].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)

    def scalings(self, sigma: torch.Tensor):
        """iDDPM scalings; the network sees M - 1 - the index of the nearest supported noise level."""
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), c_noise


@persistence.persistent_class
class EDMPrecond(_Precond):
    """EDM preconditioning (Karras et al. 2022), the default."""

    def __init__(self,
        img_resolution: int,                # Nominal image resolution.
        img_channels: int,                  # Image channels (without coordinate channels).
        label_dim: int = 0,                 # Class label dimensionality, 0 = unconditional.
        use_fp16: bool = False,             # Run the network in float16 on CUDA?
        use_bf16: bool = False,             # Run the network in bfloat16 (any device)?
        sigma_min: float = 0,               # Smallest supported noise level.
        sigma_max: float = float('inf'),    # Largest supported noise level.
        sigma_data: float = 0.5,            # Expected standard deviation of the training data.
        model_type: str = 'SongUNet',       # 'SongUNet' or 'DhariwalUNet'.
        pos_channels: int = 2,              # Coordinate channels concatenated to the input, 0 = none.
        latent: Optional[dict] = None,      # VAE latent space the images live in, dict(vae=name, scale=factor); None = pixels.
        **model_kwargs,                     # Passed on to the network.
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, use_bf16, model_type, pos_channels, latent,
                         model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data

    def scalings(self, sigma: torch.Tensor):
        """EDM scalings (Table 1 of Karras et al.); the network sees log(sigma) / 4."""
        return edm_scalings(sigma, self.sigma_data)
