"""EDM sampler (Karras et al. 2022, Algorithm 2) with coordinate channels, classifier-free guidance, autoguidance and inpainting.

The one sampler shared by generate.py, the training previews, fid.py and the tests.
Patch Diffusion nets (pos_channels > 0) get the coordinates of the whole image at every
call, so a net trained on patches samples full images; plain EDM nets get no x_pos.
The state is kept in float64 for EDM's networks, as in EDM, and in float32 for EDM2's
(training.networks_edm2.EDM2Precond), as in EDM2's generate_images.py; the images come
back in that type. Autoguidance (Karras et al. 2024) mixes in a guide network the way
EDM2's sampler does: D = D_guide.lerp(D_main, guidance).
"""

import math
from typing import Callable, Optional, Sequence

import torch

from training.patch import coordinate_grid

#----------------------------------------------------------------------------

EDM2_NETWORKS = ('EDM2Precond',)  # class names of the networks sampled as EDM2's generate_images.py samples them

def is_edm2(net) -> bool:
    """Whether `net` is an EDM2 network, sampled with EDM2's conventions (float32 loop, churn noise drawn only where on)."""
    return type(net).__name__ in EDM2_NETWORKS

def _round_sigma(net, sigma: torch.Tensor) -> torch.Tensor:
    if not hasattr(net, 'round_sigma'):
        return sigma
    return torch.as_tensor(net.round_sigma(sigma), dtype=sigma.dtype, device=sigma.device)

def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80, rho: float = 7, net=None, device=None,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """EDM noise levels [num_steps + 1] in `dtype` (float64 as EDM, float32 as EDM2), from sigma_max down to sigma_min, then a final 0."""
    if num_steps < 1:
        raise ValueError(f'num_steps must be at least 1, got {num_steps}')
    sigma_min = max(sigma_min, getattr(net, 'sigma_min', 0))
    sigma_max = min(sigma_max, getattr(net, 'sigma_max', float('inf')))
    if not 0 < sigma_min <= sigma_max < float('inf'):
        raise ValueError(f'need 0 < sigma_min <= sigma_max < inf after clamping to the net, got sigma_min={sigma_min}, sigma_max={sigma_max}')
    ramp = torch.arange(num_steps, dtype=dtype, device=device) / max(num_steps - 1, 1) # one step: sigma_max, then 0
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    sigmas = _round_sigma(net, sigmas)
    return torch.cat([sigmas, torch.zeros_like(sigmas[:1])])

#----------------------------------------------------------------------------

def _positions(x_pos: Optional[torch.Tensor], latents: torch.Tensor) -> Optional[torch.Tensor]:
    """An explicit x_pos, checked and expanded to [N, 2, H, W] float32 on the latents' device; None stays None."""
    if x_pos is None:
        return None
    N, _, H, W = latents.shape
    if x_pos.ndim == 3:
        x_pos = x_pos.unsqueeze(0)
    if x_pos.ndim != 4 or x_pos.shape[0] not in (1, N) or x_pos.shape[2:] != latents.shape[2:]:
        raise ValueError(f'x_pos must have shape [2, {H}, {W}] or [{N}, 2, {H}, {W}], got {list(x_pos.shape)}')
    return x_pos.to(device=latents.device, dtype=torch.float32).expand(N, -1, -1, -1)

def _net_positions(net, x_pos: Optional[torch.Tensor], latents: torch.Tensor) -> Optional[torch.Tensor]:
    """What `net` gets as x_pos: None without coordinate input, else x_pos (from _positions) or the whole image's grid."""
    if getattr(net, 'pos_channels', 0) == 0:
        return None
    if x_pos is not None:
        return x_pos
    N, _, H, W = latents.shape
    if H != W:
        raise ValueError(f'latents are {H}x{W}: non-square images need an explicit x_pos (e.g. from outpaint_grid)')
    return coordinate_grid(H, H, device=latents.device).expand(N, -1, -1, -1)

def _inpaint_tensors(inpaint: tuple[torch.Tensor, torch.Tensor], latents: torch.Tensor,
                     dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated (known, mask) in `dtype` on the latents' device."""
    known, mask = inpaint
    N, C, H, W = latents.shape
    if known.ndim != 4 or known.shape[0] not in (1, N) or known.shape[1:] != latents.shape[1:]:
        raise ValueError(f'inpaint known must have shape [{N} or 1, {C}, {H}, {W}], got {list(known.shape)}')
    if mask.ndim != 4 or mask.shape[0] not in (1, N) or mask.shape[1] not in (1, C) or mask.shape[2:] != latents.shape[2:]:
        raise ValueError(f'inpaint mask must have shape [{N} or 1, {C} or 1, {H}, {W}], got {list(mask.shape)}')
    mask = mask.to(device=latents.device, dtype=dtype)
    if bool(((mask < 0) | (mask > 1)).any()):
        raise ValueError('inpaint mask values must be in [0, 1] (1 = generate, 0 = known)')
    return known.to(device=latents.device, dtype=dtype).expand(N, -1, -1, -1), mask

def _check_guidance(class_labels: Optional[torch.Tensor], cfg: float, guide: Optional[Callable], guidance: float) -> None:
    """Refuse guidance settings that cannot be carried out."""
    if cfg != 1 and class_labels is None:
        raise ValueError(f'classifier-free guidance (cfg={cfg}) needs class_labels; use cfg=1 for unconditional sampling')
    if guidance != 1 and guide is None:
        raise ValueError(f'autoguidance (guidance={guidance}) needs a guide network; use guidance=1 without one')
    if guidance != 1 and cfg != 1:
        raise ValueError(f'classifier-free guidance (cfg={cfg}) and autoguidance (guidance={guidance}) cannot be combined; '
                         'set one of them to 1')

def _denoiser(net: Callable, class_labels: Optional[torch.Tensor], x_pos: Optional[torch.Tensor], cfg: float,
              dtype: torch.dtype) -> Callable:
    """D(x, sigma) of one net, in `dtype`; with cfg != 1 classifier-free guided, both halves in one batched call."""
    guided = cfg != 1  # the unconditional half gets the all-zero label, as dropped in training
    labels = torch.cat([class_labels, torch.zeros_like(class_labels)]) if guided else class_labels
    net_kwargs = {} if x_pos is None else dict(x_pos=torch.cat([x_pos, x_pos]) if guided else x_pos)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        D = net(torch.cat([x, x]) if guided else x, sigma, class_labels=labels, **net_kwargs)
        D = D[:, :x.shape[1]].to(dtype) # a net may also return its coordinate channels
        if not guided:
            return D
        D_cond, D_uncond = D.chunk(2)
        return D_uncond + cfg * (D_cond - D_uncond)
    return denoise

def _autoguided(main: Callable, guide: Callable, guidance: float) -> Callable:
    """D_guide + guidance (D_main - D_guide), computed as EDM2's sampler does: main net first, then torch.lerp."""
    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        D = main(x, sigma)
        return guide(x, sigma).lerp(D, guidance)
    return denoise

def check_guide(net, guide) -> None:
    """Raise ValueError (one line) if `guide` cannot guide `net`: other image channels or resolution, or other classes.

    An unconditional guide of a conditional net is allowed (EDM2's classifier-free guidance presets are exactly that).
    """
    for name in ('img_channels', 'img_resolution'):
        if getattr(guide, name, None) != getattr(net, name, None):
            raise ValueError(f'the guide has {name}={getattr(guide, name, None)}, the network {getattr(net, name, None)}')
    if guide.label_dim not in (0, net.label_dim):
        raise ValueError(f'the guide has label_dim={guide.label_dim}, the network {net.label_dim} (a guide must have the same '
                         'classes or be unconditional)')

def edm_sampler(
    net: Callable, latents: torch.Tensor, class_labels: Optional[torch.Tensor] = None, randn_like: Callable = torch.randn_like,
    num_steps: int = 50, sigma_min: float = 0.002, sigma_max: float = 80, rho: float = 7,
    S_churn: float = 0, S_min: float = 0, S_max: float = float('inf'), S_noise: float = 1,
    solver: str = 'heun', cfg: float = 1.0, x_pos: Optional[torch.Tensor] = None,
    inpaint: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    guide: Optional[Callable] = None, guidance: float = 1.0, dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Turn latents ~ N(0, I) [N, C, H, W] into images [N, C, H, W] (in `dtype`) with EDM's Heun or Euler sampler.

    guide, guidance: autoguidance, D = D_guide + guidance (D_main - D_guide); a guide without class labels or coordinate
    input is called without them. dtype: the loop's float type; None = float32 for EDM2 networks (is_edm2) as EDM2's
    sampler, float64 otherwise as EDM's.
    """
    if solver not in ('heun', 'euler'):
        raise ValueError(f"solver must be 'heun' or 'euler', got {solver!r}")
    if latents.ndim != 4:
        raise ValueError(f'latents must have shape [N, C, H, W], got {list(latents.shape)}')
    _check_guidance(class_labels, cfg, guide, guidance)
    edm2 = is_edm2(net)
    dtype = dtype or (torch.float32 if edm2 else torch.float64)
    t_steps = karras_sigmas(num_steps, sigma_min, sigma_max, rho, net=net, device=latents.device, dtype=dtype)
    x_pos = _positions(x_pos, latents)
    known, mask = _inpaint_tensors(inpaint, latents, dtype) if inpaint is not None else (None, None)
    denoise = _denoiser(net, class_labels, _net_positions(net, x_pos, latents), cfg, dtype)
    if guidance != 1:
        guide_labels = None if getattr(guide, 'label_dim', None) == 0 else class_labels
        denoise = _autoguided(denoise, _denoiser(guide, guide_labels, _net_positions(guide, x_pos, latents), 1, dtype), guidance)

    def keep_known(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Replace the known pixels by the known image noised to sigma (RePaint); exact at mask 0 and 1."""
        if known is None:
            return x
        return torch.lerp(known + sigma * randn_like(x), x, mask)

    x_next = keep_known(latents.to(dtype) * t_steps[0], t_steps[0])
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next

        # Churn: raise the noise level to t_hat by adding fresh noise. For EDM's nets the noise is drawn at every step,
        # also where S_min/S_max switch churn off, as EDM's sampler does; for EDM2's only where it is on, as EDM2's
        # sampler does: the same seeds then give the reference's images.
        t_hat, x_hat = t_cur, x_cur
        churn_on = S_min <= t_cur <= S_max
        if S_churn > 0 and (churn_on or not edm2):
            gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if churn_on else 0
            t_hat = _round_sigma(net, t_cur + gamma * t_cur)
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)

        # Euler step, then Heun's correction except into sigma = 0.
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if solver == 'heun' and i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        x_next = keep_known(x_next, t_next)
    return x_next

# Named sampler settings: 'adm' is EDM's stochastic sampler as used for ImageNet with ADM (Karras et al. 2022, Table 5).
SAMPLERS = {
    'edm': dict(),
    'adm': dict(num_steps=256, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003),
}

#----------------------------------------------------------------------------
# Seeded generation: image k depends only on seed k, whatever the batch or world size.

class StackedRandomGenerator:
    """One torch.Generator per seed; draws of shape [N, ...] take row i from generator i."""

    def __init__(self, device: torch.device, seeds: Sequence[int]):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def randn(self, size: Sequence[int], **kwargs) -> torch.Tensor:
        """Standard normal draws, one row per seed."""
        assert size[0] == len(self.generators)
        return torch.stack([torch.randn(size[1:], generator=gen, device=self.device, **kwargs) for gen in self.generators])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """randn() with the shape, dtype and layout of x."""
        return self.randn(x.shape, dtype=x.dtype, layout=x.layout)

    def randint(self, high: int, size: Sequence[int]) -> torch.Tensor:
        """Integers in [0, high), one row per seed."""
        assert size[0] == len(self.generators)
        return torch.stack([torch.randint(high, size=size[1:], generator=gen, device=self.device) for gen in self.generators])


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Map images in [-1, 1] to uint8 [0, 255], rounding as EDM does."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)


def generate_images(net: Callable, seeds: Sequence[int], device: torch.device, class_idx: Optional[int] = None,
                    decoder: Optional[Callable] = None, sampler: Optional[Callable] = None, **sampler_kwargs) -> torch.Tensor:
    """Sample one image per seed with edm_sampler (or `sampler`, called the same way); returns uint8 [N, C, H, W] on the device.

    Latents, random class labels (when the net is conditional and class_idx is None) and churn noise come from
    per-seed generators. `decoder` turns the samples of a latent-space net into uint8 images (see
    training.latents.latent_decoder). `sampler_kwargs` go to edm_sampler (num_steps, cfg, solver, x_pos, inpaint, guide,
    guidance, ...).
    """
    rnd = StackedRandomGenerator(device, seeds)
    height = width = net.img_resolution
    if sampler_kwargs.get('x_pos') is not None:
        height, width = sampler_kwargs['x_pos'].shape[-2:]
    latents = rnd.randn([len(seeds), net.img_channels, height, width])
    class_labels = None
    if net.label_dim:
        if class_idx is not None and not 0 <= class_idx < net.label_dim:
            raise ValueError(f'class {class_idx} is outside [0, {net.label_dim}) for this network')
        indices = rnd.randint(net.label_dim, size=[len(seeds)])  # drawn even for a fixed class, as EDM does, for its churn noise
        if class_idx is not None:
            indices = torch.full_like(indices, class_idx)
        class_labels = torch.nn.functional.one_hot(indices, net.label_dim).to(torch.float32)
    images = (sampler or edm_sampler)(net, latents, class_labels=class_labels, randn_like=rnd.randn_like, **sampler_kwargs)
    return decoder(images).to(device) if decoder is not None else to_uint8(images)

#----------------------------------------------------------------------------
