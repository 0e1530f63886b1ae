"""Tests for training/loss.py with toy networks that follow the Precond call signature."""

import pytest
import torch

from training.loss import EDMLoss, PatchEDMLoss, PatchVELoss, PatchVPLoss, VELoss, VPLoss
from training.patch import coordinate_grid, crop_patches

#----------------------------------------------------------------------------
# Toy networks.

class CoordNet(torch.nn.Module):
    """Toy patch denoiser: convolves image + 2 coordinate channels; records its inputs."""

    def __init__(self, img_channels=3, out_channels=None):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(img_channels + 2, out_channels or img_channels, 3, padding=1)
        self.calls = []

    def forward(self, x, sigma, x_pos=None, class_labels=None, force_fp32=False, augment_labels=None):
        inputs = torch.cat([x, x_pos], dim=1)
        self.calls.append(dict(inputs=inputs, sigma=sigma, x_pos=x_pos, class_labels=class_labels, augment_labels=augment_labels))
        return self.conv(inputs)

class PlainNet(torch.nn.Module):
    """Toy EDM denoiser without x_pos: outputs zeros, so the loss is weight * y^2; records sigma."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, sigma, class_labels=None, force_fp32=False, augment_labels=None):
        self.calls.append(dict(x=x, sigma=sigma, class_labels=class_labels))
        return torch.zeros_like(x)

def _clone(generator):
    return torch.Generator().set_state(generator.get_state())

#----------------------------------------------------------------------------

def test_patch_loss_shape_and_coordinate_channels():
    images = torch.randn(4, 3, 16, 16)
    net = CoordNet()
    loss = PatchEDMLoss()(net, images, 8)
    assert loss.shape == (4, 3, 8, 8)
    assert net.calls[0]['inputs'].shape == (4, 5, 8, 8)
    # A network that also returns its coordinate channels is still scored on image channels only.
    assert PatchEDMLoss()(CoordNet(out_channels=5), images, 8).shape == (4, 3, 8, 8)

def test_patch_loss_equals_hand_computation():
    images, labels = torch.randn(5, 3, 16, 16), torch.eye(5)
    gen = torch.Generator().manual_seed(42)
    replay = _clone(gen)
    net = CoordNet()
    loss = PatchEDMLoss(P_mean=-1.0, P_std=1.5, sigma_data=0.4)(net, images, 4, labels=labels, generator=gen)

    # Same draws in the same order: crop positions, ln(sigma), noise.
    y, coords = crop_patches(images, 4, generator=replay)
    sigma = (torch.randn([5, 1, 1, 1], generator=replay) * 1.5 - 1.0).exp()
    n = torch.randn(y.shape, generator=replay) * sigma
    with torch.no_grad():
        D = net.conv(torch.cat([y + n, coords], dim=1))
    weight = (sigma ** 2 + 0.4 ** 2) / (sigma * 0.4) ** 2
    torch.testing.assert_close(loss, weight * (D - y) ** 2)
    assert torch.equal(net.calls[0]['x_pos'], coords)
    assert torch.equal(net.calls[0]['sigma'], sigma)
    assert net.calls[0]['class_labels'] is labels

def test_augment_pipe_is_applied_to_whole_image_before_cropping():
    images = torch.randn(3, 3, 8, 8)
    aug_labels = torch.ones(3, 9)
    pipe = lambda x: (x.flip(3), aug_labels)
    gen = torch.Generator().manual_seed(0)
    replay = _clone(gen)
    net = CoordNet()
    PatchEDMLoss()(net, images, 4, augment_pipe=pipe, generator=gen)
    y, _ = crop_patches(images.flip(3), 4, generator=replay)
    sigma = (torch.randn([3, 1, 1, 1], generator=replay) * 1.2 - 1.2).exp()
    n = torch.randn(y.shape, generator=replay) * sigma
    torch.testing.assert_close(net.calls[0]['inputs'][:, :3], y + n)
    assert net.calls[0]['augment_labels'] is aug_labels

@pytest.mark.parametrize('patch_size', [16, None])
def test_full_size_patch_uses_full_grid(patch_size):
    net = CoordNet()
    loss = PatchEDMLoss()(net, torch.randn(3, 3, 16, 16), patch_size)
    assert loss.shape == (3, 3, 16, 16)
    assert torch.equal(net.calls[0]['x_pos'], coordinate_grid(16, 16).expand(3, 2, 16, 16))

def test_plain_loss_calls_net_without_x_pos():
    net = PlainNet() # forward() has no x_pos argument: passing one would raise TypeError
    images = torch.randn(4, 3, 8, 8)
    loss = EDMLoss()(net, images)
    assert loss.shape == images.shape
    assert EDMLoss()(net, images, 8).shape == images.shape
    with pytest.raises(ValueError, match='patch_size'):
        EDMLoss()(net, images, 4)

def _sigma_and_weight(loss_fn, num=4000):
    """Run loss_fn with a zero network on ones: the loss equals the weight; return (sigma, weight) per sample."""
    net = PlainNet()
    images = torch.ones(num, 1, 2, 2)
    loss = loss_fn(net, images, generator=torch.Generator().manual_seed(0))
    return net.calls[0]['sigma'].flatten(), loss[:, 0, 0, 0]

def test_edm_sigma_distribution_and_weight():
    sigma, weight = _sigma_and_weight(EDMLoss())
    torch.testing.assert_close(weight, (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2)
    assert abs(sigma.log().mean().item() + 1.2) < 0.1
    assert abs(sigma.log().std().item() - 1.2) < 0.1

def test_vp_sigma_and_weight():
    loss_fn = VPLoss()
    sigma, weight = _sigma_and_weight(loss_fn)
    torch.testing.assert_close(weight, 1 / sigma ** 2)
    sigma_max = (torch.tensor(0.5 * 19.9 + 0.1).exp() - 1).sqrt()
    torch.testing.assert_close(loss_fn.sigma(1.0), sigma_max)
    assert sigma.min() >= loss_fn.sigma(1e-5) * (1 - 1e-4) and sigma.max() <= sigma_max * (1 + 1e-4)

def test_ve_sigma_and_weight():
    sigma, weight = _sigma_and_weight(VELoss())
    torch.testing.assert_close(weight, 1 / sigma ** 2)
    assert sigma.min() >= 0.02 * (1 - 1e-5) and sigma.max() <= 100 * (1 + 1e-5)
    # ln(sigma) is uniform on [ln 0.02, ln 100]: its mean is the midpoint.
    assert abs(sigma.log().mean().item() - (torch.tensor(0.02).log() + torch.tensor(100.0).log()).item() / 2) < 0.15

@pytest.mark.parametrize('loss_cls, plain_cls', [(PatchVPLoss, VPLoss), (PatchVELoss, VELoss)])
def test_patch_vp_ve_losses(loss_cls, plain_cls):
    net = CoordNet()
    gen = torch.Generator().manual_seed(0)
    replay = _clone(gen)
    loss = loss_cls()(net, torch.randn(4, 3, 16, 16), 8, generator=gen)
    assert loss.shape == (4, 3, 8, 8)
    assert net.calls[0]['x_pos'].shape == (4, 2, 8, 8)
    sigma = net.calls[0]['sigma']
    # Same noise-level distribution as the plain variant, after the crop draws.
    crop_patches(torch.zeros(4, 1, 16, 16), 8, generator=replay)
    plain_sigma, _ = plain_cls().noise_level(4, torch.device('cpu'), replay)
    assert torch.equal(sigma, plain_sigma)

def test_same_generator_seed_gives_same_loss():
    images = torch.randn(4, 3, 16, 16)
    net = CoordNet()
    a = PatchEDMLoss()(net, images, 8, generator=torch.Generator().manual_seed(9))
    b = PatchEDMLoss()(net, images, 8, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)

#----------------------------------------------------------------------------

#----------------------------------------------------------------------------
# End to end with the real networks: one call gives a patch batch with coordinates and a loss on it.

@pytest.mark.parametrize('model_type, model_kwargs', [
    ('SongUNet', dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])),
    ('SongUNet', dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], embedding_type='fourier',
                      encoder_type='residual', resample_filter=[1, 3, 3, 1])),
    ('DhariwalUNet', dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])),
])
@pytest.mark.parametrize('patch_size', [16, 8, 4])
def test_patch_loss_with_real_networks(model_type, model_kwargs, patch_size):
    from training.augment import AugmentPipe
    from training.networks import EDMPrecond
    torch.manual_seed(0)
    net = EDMPrecond(16, 3, label_dim=4, model_type=model_type, augment_dim=9, **model_kwargs)
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    labels = torch.nn.functional.one_hot(torch.arange(6) % 4, 4).float()
    pipe = AugmentPipe(p=0.5, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    loss = PatchEDMLoss()(net, images, patch_size, labels=labels, augment_pipe=pipe, generator=torch.Generator().manual_seed(1))
    assert loss.shape == (6, 3, patch_size, patch_size) and torch.isfinite(loss).all()
    loss.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters() if p.requires_grad)

#----------------------------------------------------------------------------
# The noise-level formulas at points where their value is known by hand: the draws are replaced by constants.

def _noise_level_at(monkeypatch, loss_fn, draw: float) -> torch.Tensor:
    """sigma of noise_level() when every torch.rand / torch.randn draw returns `draw`."""
    constant = lambda size, **kwargs: torch.full(size, draw)  # noqa: E731
    monkeypatch.setattr(torch, 'rand', constant)
    monkeypatch.setattr(torch, 'randn', constant)
    sigma, _ = loss_fn.noise_level(3, torch.device('cpu'), None)
    monkeypatch.undo()
    return sigma.flatten()

def test_vp_sigma_inside_the_interval():
    """sigma_VP(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) at t = 0.5 and 0.1 (t = 1 alone cannot tell t^2 from t^3)."""
    loss_fn = VPLoss()
    for t in (0.5, 0.1):
        expected = (torch.tensor(0.5 * 19.9 * t * t + 0.1 * t, dtype=torch.float64).exp() - 1).sqrt()
        torch.testing.assert_close(loss_fn.sigma(torch.tensor(t, dtype=torch.float64)), expected, rtol=1e-12, atol=0)

@pytest.mark.parametrize('draw, t', [(0.0, 1.0), (1.0, 1e-5), (0.5, 0.5 + 0.5e-5)])
def test_vp_noise_level_maps_uniform_draws_onto_epsilon_to_one(monkeypatch, draw, t):
    """t = 1 + u (epsilon_t - 1): u = 0 gives t = 1, u = 1 gives t = epsilon_t."""
    loss_fn = VPLoss()
    torch.testing.assert_close(_noise_level_at(monkeypatch, loss_fn, draw), loss_fn.sigma(torch.full([3], t)))

@pytest.mark.parametrize('draw, sigma', [(0.0, 0.02), (1.0, 100.0), (0.5, (0.02 * 100) ** 0.5)])
def test_ve_noise_level_is_log_uniform_between_its_bounds(monkeypatch, draw, sigma):
    torch.testing.assert_close(_noise_level_at(monkeypatch, VELoss(), draw), torch.full([3], sigma))

@pytest.mark.parametrize('draw', [0.0, 1.0, -2.0])
def test_edm_noise_level_is_exp_of_p_mean_plus_p_std_times_the_draw(monkeypatch, draw):
    expected = torch.full([3], -1.2 + 1.2 * draw, dtype=torch.float64).exp().float()
    torch.testing.assert_close(_noise_level_at(monkeypatch, EDMLoss(), draw), expected)

def test_noise_has_the_images_dtype():
    """Float64 images get float64 noise: a float32 draw would round the noise before it is added."""
    net = PlainNet()
    PatchEDMLoss()(lambda x, sigma, x_pos=None, **kwargs: net(x, sigma), torch.zeros(2, 1, 4, 4, dtype=torch.float64), 4,
                   generator=torch.Generator().manual_seed(0))
    x = net.calls[0]['x']  # the images are zeros, so the network's input is the noise itself
    assert x.dtype == torch.float64 and not torch.equal(x, x.float().double())  # float64 draws, not float32 ones
