"""Non-leaking augmentation pipeline of EDM (Karras et al. 2022), built on the ideas of ADA (Karras et al. 2020).

Patch Diffusion applies this pipeline to the WHOLE image BEFORE cropping, so the patch
coordinates describe positions in the augmented image.

Each op is applied to a sample with probability (op multiplier) * p. The network is
conditioned on augment_labels [N, D] that describe what was applied, so augmentations do
not leak into generated images. Only enabled ops (multiplier > 0) contribute columns,
in this order (as in EDM):
  xflip 1, yflip 1, rotate_int 2, translate_int 2,               (exact pixel blitting)
  scale 1, rotate_frac 2, aniso 2, translate_frac 2,             (one anti-aliased resampling)
  brightness 1, contrast 1, lumaflip 1, hue 2, saturation 1.     (one colour matrix)
EDM's configuration (xflip, yflip, scale, rotate_frac, aniso, translate_frac) gives D = 9;
all eight geometric ops give D = 13. All ops are off by default.
"""

import math

import torch
import torch.nn.functional as F

from torch_utils import persistence

#----------------------------------------------------------------------------
# Helpers.

# Low-pass filter of the 'sym6' wavelet. Resampling is done at 2x resolution between an
# upsampling and a downsampling with this filter, which suppresses aliasing; for this
# orthogonal filter the round trip without a transform is the identity.
_SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
         0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
         -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)

def _matrix(dim: int, entries: dict, device: torch.device) -> torch.Tensor:
    """Identity matrices [N, dim, dim] with {(row, col): value} entries replaced; values are floats or tensors [N]."""
    num = max((v.shape[0] for v in entries.values() if torch.is_tensor(v)), default=1)
    m = torch.eye(dim, device=device).repeat(num, 1, 1)
    for (i, j), v in entries.items():
        m[:, i, j] = v
    return m

def _translate2d(tx, ty, device):
    return _matrix(3, {(0, 2): tx, (1, 2): ty}, device)

def _scale2d(sx, sy, device):
    return _matrix(3, {(0, 0): sx, (1, 1): sy}, device)

def _rotate2d(theta, device):
    return _matrix(3, {(0, 0): theta.cos(), (0, 1): -theta.sin(), (1, 0): theta.sin(), (1, 1): theta.cos()}, device)

def _rotate_about_luma(theta: torch.Tensor) -> torch.Tensor:
    """Rotations [N, 4, 4] of RGB space by angles theta [N] about the grey axis (Rodrigues' formula)."""
    v = torch.ones(3, device=theta.device) / math.sqrt(3)
    K = torch.tensor([[0, -1, 1], [1, 0, -1], [-1, 1, 0]], device=theta.device) / math.sqrt(3) # cross product with v
    c, s = theta.cos()[:, None, None], theta.sin()[:, None, None]
    m = torch.eye(4, device=theta.device).repeat(theta.shape[0], 1, 1)
    m[:, :3, :3] = c * torch.eye(3, device=theta.device) + s * K + (1 - c) * v.outer(v)
    return m

def _gate(w: torch.Tensor, prob: float) -> torch.Tensor:
    """Keep each sample's parameters w [N, ...] with probability prob, else zero them (= no-op)."""
    keep = torch.rand([w.shape[0]] + [1] * (w.ndim - 1), device=w.device) < prob
    return torch.where(keep, w, torch.zeros_like(w))

def _reflect(idx: torch.Tensor, size: int) -> torch.Tensor:
    """Map any integer index into [0, size) by mirroring at the borders (edge pixels not repeated)."""
    return size - 1 - (size - 1 - idx % (size * 2 - 2)).abs()

def _upsample2x(x: torch.Tensor, filt: torch.Tensor) -> torch.Tensor:
    """Zero-insertion 2x upsampling followed by the filter, separably in both dimensions."""
    C, K = x.shape[1], len(filt)
    start = K // 2 - 1 # aligns the filter's main tap with the input pixel
    x = F.conv_transpose2d(x, filt.view(1, 1, 1, K).tile(C, 1, 1, 1), stride=(1, 2), groups=C)
    x = x[:, :, :, start : start + (x.shape[3] - K + 2)]
    x = F.conv_transpose2d(x, filt.view(1, 1, K, 1).tile(C, 1, 1, 1), stride=(2, 1), groups=C)
    return x[:, :, start : start + (x.shape[2] - K + 2), :]

def _downsample2x(x: torch.Tensor, filt: torch.Tensor) -> torch.Tensor:
    """The filter followed by 2x decimation, separably in both dimensions."""
    C, K = x.shape[1], len(filt)
    x = F.conv2d(x, filt.view(1, 1, 1, K).tile(C, 1, 1, 1), stride=(1, 2), padding=(0, (K - 1) // 2), groups=C)
    return F.conv2d(x, filt.view(1, 1, K, 1).tile(C, 1, 1, 1), stride=(2, 1), padding=((K - 1) // 2, 0), groups=C)

def _resample(images: torch.Tensor, G_inv: torch.Tensor) -> torch.Tensor:
    """Warp images [N, C, H, W] by G_inv [N, 3, 3], which maps output to input pixel coordinates (origin at the image centre)."""
    N, C, H, W = images.shape
    device = images.device
    filt = torch.tensor(_SYM6, dtype=images.dtype, device=device)
    pad = len(_SYM6) // 4 # filter support in output pixels

    # Reflect-pad the input so that every output pixel, plus the filter support, reads inside it.
    cx, cy = (W - 1) / 2, (H - 1) / 2
    corners = torch.tensor([[-cx, cx, cx, -cx], [-cy, -cy, cy, cy], [1, 1, 1, 1]], device=device)
    corners = (G_inv @ corners)[:, :2, :].permute(1, 0, 2).flatten(1) # [xy, N * 4]
    margin = torch.cat([-corners, corners]).amax(dim=1) # [x0, y0, x1, y1]
    margin = margin + torch.tensor([pad * 2 - cx, pad * 2 - cy] * 2, device=device)
    margin = margin.clamp(min=0).minimum(torch.tensor([W - 1, H - 1] * 2, device=device))
    mx0, my0, mx1, my1 = margin.ceil().int().tolist()
    images = F.pad(images, [mx0, mx1, my0, my1], mode='reflect')
    G_inv = _translate2d((mx0 - mx1) / 2, (my0 - my1) / 2, device) @ G_inv

    # Resample at 2x resolution, with a margin of `pad` output pixels for the downsampling filter.
    images = _upsample2x(images, filt)
    G_inv = _scale2d(2, 2, device) @ G_inv @ _scale2d(0.5, 0.5, device)
    # Half-pixel alignment of the 2x grid, as in EDM (the filter's exact delay would give ~0.4 instead of 0.5).
    G_inv = _translate2d(-0.5, -0.5, device) @ G_inv @ _translate2d(0.5, 0.5, device)
    shape = [N, C, (H + pad * 2) * 2, (W + pad * 2) * 2]
    # affine_grid works in [-1, 1] coordinates of the output and input grids.
    G_inv = _scale2d(2 / images.shape[3], 2 / images.shape[2], device) @ G_inv @ _scale2d(shape[3] / 2, shape[2] / 2, device)
    grid = F.affine_grid(G_inv[:, :2, :].to(images.dtype), shape, align_corners=False)
    images = F.grid_sample(images, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
    return _downsample2x(images, filt)[:, :, pad : -pad, pad : -pad]

#----------------------------------------------------------------------------

@persistence.persistent_class
class AugmentPipe:
    """EDM's augmentation pipeline: images [N, C, H, W] -> (augmented images, augment_labels [N, D])."""

    def __init__(self, p: float = 1,
        xflip: float = 0, yflip: float = 0, rotate_int: float = 0, translate_int: float = 0, translate_int_max: float = 0.125,
        scale: float = 0, rotate_frac: float = 0, aniso: float = 0, translate_frac: float = 0, scale_std: float = 0.2,
        rotate_frac_max: float = 1, aniso_std: float = 0.2, aniso_rotate_prob: float = 0.5, translate_frac_std: float = 0.125,
        brightness: float = 0, contrast: float = 0, lumaflip: float = 0, hue: float = 0, saturation: float = 0,
        brightness_std: float = 0.2, contrast_std: float = 0.5, hue_max: float = 1, saturation_std: float = 1,
    ):
        self.p = float(p) # overall multiplier of every op's probability

        # Pixel blitting: probability multipliers; translate_int_max is relative to the image size.
        self.xflip = float(xflip)
        self.yflip = float(yflip)
        self.rotate_int = float(rotate_int)
        self.translate_int = float(translate_int)
        self.translate_int_max = float(translate_int_max)

        # Geometric transforms: probability multipliers; scale_std and aniso_std are log2 std devs,
        # rotate_frac_max is in full circles, translate_frac_std is relative to the image size.
        self.scale = float(scale)
        self.rotate_frac = float(rotate_frac)
        self.aniso = float(aniso)
        self.translate_frac = float(translate_frac)
        self.scale_std = float(scale_std)
        self.rotate_frac_max = float(rotate_frac_max)
        self.aniso_std = float(aniso_std)
        self.aniso_rotate_prob = float(aniso_rotate_prob)
        self.translate_frac_std = float(translate_frac_std)

        # Colour transforms: probability multipliers; contrast_std and saturation_std are log2 std devs,
        # hue_max is in full circles.
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.lumaflip = float(lumaflip)
        self.hue = float(hue)
        self.saturation = float(saturation)
        self.brightness_std = float(brightness_std)
        self.contrast_std = float(contrast_std)
        self.hue_max = float(hue_max)
        self.saturation_std = float(saturation_std)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment images [N, C, H, W]; return (images, augment_labels [N, D] float32)."""
        N, C, H, W = images.shape
        device = images.device
        labels = [torch.zeros([N, 0], device=device)]

        # Pixel blitting.
        if self.xflip > 0:
            w = _gate(torch.randint(2, [N, 1, 1, 1], device=device), self.xflip * self.p)
            images = torch.where(w == 1, images.flip(3), images)
            labels += [w]
        if self.yflip > 0:
            w = _gate(torch.randint(2, [N, 1, 1, 1], device=device), self.yflip * self.p)
            images = torch.where(w == 1, images.flip(2), images)
            labels += [w]
        if self.rotate_int > 0:
            # Rotation by w quarter turns as x-flip, y-flip and transpose; the labels are the two flips.
            w = _gate(torch.randint(4, [N, 1, 1, 1], device=device), self.rotate_int * self.p)
            images = torch.where((w == 1) | (w == 2), images.flip(3), images)
            images = torch.where((w == 2) | (w == 3), images.flip(2), images)
            images = torch.where((w == 1) | (w == 3), images.transpose(2, 3), images)
            labels += [(w == 1) | (w == 2), (w == 2) | (w == 3)]
        if self.translate_int > 0:
            w = _gate(torch.rand([N, 2, 1, 1], device=device) * 2 - 1, self.translate_int * self.p)
            tx = (w[:, :1] * (W * self.translate_int_max)).round().long()
            ty = (w[:, 1:] * (H * self.translate_int_max)).round().long()
            x = _reflect(torch.arange(W, device=device) - tx, W) # [N, 1, 1, W]
            y = _reflect(torch.arange(H, device=device)[:, None] + ty, H) # [N, 1, H, 1]
            n = torch.arange(N, device=device)[:, None, None, None]
            c = torch.arange(C, device=device)[None, :, None, None]
            images = images[n, c, y, x]
            labels += [tx / (W * self.translate_int_max), ty / (H * self.translate_int_max)]

        # Geometric transforms, composed into one matrix from output to input pixel coordinates.
        G_inv = torch.eye(3, device=device)
        if self.scale > 0:
            w = _gate(torch.randn([N], device=device), self.scale * self.p)
            s = (w * self.scale_std).exp2()
            G_inv = G_inv @ _scale2d(1 / s, 1 / s, device)
            labels += [w]
        if self.rotate_frac > 0:
            w = _gate((torch.rand([N], device=device) * 2 - 1) * (math.pi * self.rotate_frac_max), self.rotate_frac * self.p)
            G_inv = G_inv @ _rotate2d(w, device)
            labels += [w.cos() - 1, w.sin()]
        if self.aniso > 0:
            w = torch.randn([N], device=device)
            r = (torch.rand([N], device=device) * 2 - 1) * math.pi
            w = _gate(w, self.aniso * self.p)
            r = _gate(r, self.aniso_rotate_prob)
            s = (w * self.aniso_std).exp2()
            G_inv = G_inv @ _rotate2d(-r, device) @ _scale2d(1 / s, s, device) @ _rotate2d(r, device)
            labels += [w * r.cos(), w * r.sin()]
        if self.translate_frac > 0:
            w = _gate(torch.randn([N, 2], device=device), self.translate_frac * self.p)
            G_inv = G_inv @ _translate2d(-w[:, 0] * (W * self.translate_frac_std), -w[:, 1] * (H * self.translate_frac_std), device)
            labels += [w[:, 0], w[:, 1]]
        if max(self.scale, self.rotate_frac, self.aniso, self.translate_frac) > 0:
            images = _resample(images, G_inv)

        # Colour transforms, composed into one affine matrix on homogeneous RGB.
        I_4 = torch.eye(4, device=device)
        M = I_4
        luma = torch.tensor([1, 1, 1, 0], device=device) / math.sqrt(3)
        luma_proj = luma.outer(luma)
        if self.brightness > 0:
            w = _gate(torch.randn([N], device=device), self.brightness * self.p)
            b = w * self.brightness_std
            M = _matrix(4, {(0, 3): b, (1, 3): b, (2, 3): b}, device) @ M
            labels += [w]
        if self.contrast > 0:
            w = _gate(torch.randn([N], device=device), self.contrast * self.p)
            c = (w * self.contrast_std).exp2()
            M = _matrix(4, {(0, 0): c, (1, 1): c, (2, 2): c}, device) @ M
            labels += [w]
        if self.lumaflip > 0:
            w = _gate(torch.randint(2, [N, 1, 1], device=device), self.lumaflip * self.p)
            M = (I_4 - 2 * luma_proj * w) @ M
            labels += [w]
        if self.hue > 0:
            w = _gate((torch.rand([N], device=device) * 2 - 1) * (math.pi * self.hue_max), self.hue * self.p)
            M = _rotate_about_luma(w) @ M
            labels += [w.cos() - 1, w.sin()]
        if self.saturation > 0:
            w = _gate(torch.randn([N, 1, 1], device=device), self.saturation * self.p)
            M = (luma_proj + (I_4 - luma_proj) * (w * self.saturation_std).exp2()) @ M
            labels += [w]
        if max(self.brightness, self.contrast, self.lumaflip, self.hue, self.saturation) > 0:
            M = M.to(images.dtype)
            images = images.reshape(N, C, H * W)
            if C == 3:
                images = M[:, :3, :3] @ images + M[:, :3, 3:]
            elif C == 1:
                # Greyscale: average the RGB rows and apply the result to the single channel.
                M = M[:, :3, :].mean(dim=1, keepdim=True)
                images = images * M[:, :, :3].sum(dim=2, keepdim=True) + M[:, :, 3:]
            else:
                raise ValueError(f'colour augmentation needs RGB (3 channels) or greyscale (1 channel) images, got {C} channels')
            images = images.reshape(N, C, H, W)

        return images, torch.cat([x.to(torch.float32).reshape(N, -1) for x in labels], dim=1)

#----------------------------------------------------------------------------
