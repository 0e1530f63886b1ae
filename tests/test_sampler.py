"""Tests for training/sampler.py (EDM sampler, coordinates, guidance, inpainting) and patch.outpaint_grid."""

import math

import pytest
import torch

from training.patch import coordinate_grid, outpaint_grid
from training.sampler import edm_sampler, karras_sigmas

#----------------------------------------------------------------------------
# Toy nets with the interface of the preconditioned networks.

class GaussianDenoiser:
    """Ideal denoiser of data ~ N(mu, s^2 I): D(x; sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2)."""

    sigma_min = 0
    sigma_max = float('inf')
    pos_channels = 0
    label_dim = 0

    def __init__(self, mu=0.3, s=0.5):
        self.mu, self.s = mu, s

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def __call__(self, x, sigma, class_labels=None):
        return (self.s ** 2 * x + sigma ** 2 * self.mu) / (self.s ** 2 + sigma ** 2)

    def exact(self, x_T, sigma_T, sigma=0):
        """Exact probability-flow ODE solution at sigma from x_T at sigma_T."""
        return self.mu + (x_T - self.mu) * math.sqrt(self.s ** 2 + sigma ** 2) / math.sqrt(self.s ** 2 + sigma_T ** 2)


class RecordingNet:
    """Shrinks x towards a label-dependent constant and records the arguments of every call."""

    sigma_min = 0.002
    sigma_max = 80
    label_dim = 3

    def __init__(self, pos_channels=0):
        self.pos_channels = pos_channels
        self.calls = []
        self.v = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def __call__(self, x, sigma, **kwargs):
        self.calls.append(dict(x=x.clone(), sigma=sigma, **kwargs))
        out = x / (1 + sigma ** 2)
        labels = kwargs.get('class_labels')
        if labels is not None:
            out = out + torch.tanh(labels.to(torch.float64) @ self.v)[:, None, None, None]
        return out.to(torch.float32) # like the real nets, whose output is float32


def seeded_randn_like(seed):
    gen = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)

#----------------------------------------------------------------------------
# Time steps.

def test_karras_sigmas_schedule():
    t = karras_sigmas(18)
    assert t.dtype == torch.float64 and t.shape == (19,)
    assert t[0].item() == pytest.approx(80) and t[-2].item() == pytest.approx(0.002) and t[-1].item() == 0
    assert bool((t[1:] < t[:-1]).all())
    i = torch.arange(18, dtype=torch.float64)
    ref = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert torch.allclose(t[:-1], ref, rtol=1e-12)
    assert karras_sigmas(1).tolist() == [80, 0]

def test_karras_sigmas_clamped_and_rounded_by_net():
    class Net:
        sigma_min, sigma_max = 0.02, 10
        def round_sigma(self, sigma):
            return torch.as_tensor(sigma).mul(100).round().div(100)
    t = karras_sigmas(10, net=Net())
    assert t[0].item() == 10 and t[-2].item() == 0.02
    assert torch.equal(t, (t * 100).round() / 100)

@pytest.mark.parametrize('kwargs', [dict(num_steps=0), dict(num_steps=5, sigma_min=0), dict(num_steps=5, sigma_min=2, sigma_max=1)])
def test_karras_sigmas_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        karras_sigmas(**kwargs)

#----------------------------------------------------------------------------
# Analytic model.

N_SAMPLES = 4096

@pytest.fixture(scope='module')
def gaussian_runs():
    net = GaussianDenoiser()
    latents = torch.randn([N_SAMPLES, 1, 4, 4], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    heun = edm_sampler(net, latents)
    euler = edm_sampler(net, latents, solver='euler')
    return net, latents, heun, euler

# 50 Heun steps scale x_T - mu by the exact factor to within 1% (measured: 0.6%); 50 Euler steps are off by about 6%.
DISC_REL = 0.01

def test_gaussian_heun_matches_exact_ode_solution(gaussian_runs):
    net, latents, heun, euler = gaussian_runs
    assert heun.dtype == torch.float64 and heun.shape == latents.shape
    exact = net.exact(latents * 80, 80)
    heun_err = ((heun - exact) / (exact - net.mu)).abs().max().item()
    euler_err = ((euler - exact) / (exact - net.mu)).abs().max().item()
    assert heun_err < DISC_REL
    assert heun_err < euler_err / 5

def _check_statistics(x, net, disc_rel):
    """Mean and std within 4 standard errors of the estimates, widened by the relative discretisation error."""
    n = x.numel()
    assert abs(x.mean().item() - net.mu) < 4 * net.s / math.sqrt(n) * (1 + disc_rel) # the error scales the noise, not mu
    assert abs(x.std().item() - net.s) < 4 * net.s / math.sqrt(2 * n) + disc_rel * net.s

def test_gaussian_sample_statistics(gaussian_runs):
    net, _, heun, euler = gaussian_runs
    _check_statistics(heun, net, DISC_REL)
    # Same latents: the sampling noise in the std cancels, leaving Euler's larger bias.
    assert abs(heun.std().item() - net.s) < abs(euler.std().item() - net.s)

def test_gaussian_with_churn_keeps_statistics():
    net = GaussianDenoiser()
    latents = torch.randn([N_SAMPLES, 1, 4, 4], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = edm_sampler(net, latents, randn_like=seeded_randn_like(2), S_churn=5, S_min=0.05, S_max=50)
    _check_statistics(x, net, 2 * DISC_REL) # churn (gamma = 0.1 here) adds a first-order error

def test_deterministic_and_seeded_stochastic_runs_repeat():
    net = GaussianDenoiser()
    latents = torch.randn([8, 1, 4, 4], generator=torch.Generator().manual_seed(3))
    assert torch.equal(edm_sampler(net, latents, num_steps=10), edm_sampler(net, latents, num_steps=10))
    churn = dict(num_steps=10, S_churn=20)
    a = edm_sampler(net, latents, randn_like=seeded_randn_like(4), **churn)
    b = edm_sampler(net, latents, randn_like=seeded_randn_like(4), **churn)
    assert torch.equal(a, b)
    assert not torch.equal(a, edm_sampler(net, latents, randn_like=seeded_randn_like(5), **churn))
    assert not torch.equal(a, edm_sampler(net, latents, num_steps=10))

#----------------------------------------------------------------------------
# Coordinates.

@pytest.mark.parametrize('solver, calls', [('heun', 2 * 6 - 1), ('euler', 6)])
def test_patch_net_gets_full_grid_at_every_call(solver, calls):
    net = RecordingNet(pos_channels=2)
    edm_sampler(net, torch.randn([3, 1, 8, 8]), num_steps=6, solver=solver)
    assert len(net.calls) == calls
    grid = coordinate_grid(8, 8).expand(3, 2, 8, 8)
    for call in net.calls:
        assert call['x_pos'].dtype == torch.float32 and torch.equal(call['x_pos'], grid)
        assert call['x_pos'][:, :, 0, 0].eq(-1).all() and call['x_pos'][:, :, -1, -1].eq(1).all()

def test_plain_net_is_called_without_x_pos():
    net = RecordingNet(pos_channels=0)
    edm_sampler(net, torch.randn([2, 1, 8, 8]), num_steps=3)
    assert len(net.calls) == 5 and all('x_pos' not in call for call in net.calls)
    edm_sampler(net, torch.randn([2, 1, 12, 12]), num_steps=3, x_pos=outpaint_grid(8, 12, 12, top=2, left=2))  # outpainting
    assert len(net.calls) == 10 and all('x_pos' not in call for call in net.calls)

def test_explicit_x_pos_overrides():
    net = RecordingNet(pos_channels=2)
    grid = outpaint_grid(8, 12, 12, top=2, left=2)
    edm_sampler(net, torch.randn([2, 1, 12, 12]), num_steps=2, x_pos=grid)
    assert all(torch.equal(call['x_pos'], grid.expand(2, 2, 12, 12)) for call in net.calls)
    per_sample = torch.randn([2, 2, 8, 8])
    net.calls.clear()
    edm_sampler(net, torch.randn([2, 1, 8, 8]), num_steps=2, x_pos=per_sample)
    assert all(torch.equal(call['x_pos'], per_sample) for call in net.calls)

#----------------------------------------------------------------------------
# Classifier-free guidance.

@pytest.mark.parametrize('pos_channels', [0, 2])
def test_guided_step_matches_hand_computed_guidance(pos_channels):
    net = RecordingNet(pos_channels=pos_channels)
    latents = torch.randn([4, 1, 8, 8], generator=torch.Generator().manual_seed(6))
    labels = torch.eye(3)[torch.tensor([0, 1, 2, 1])]
    cfg = 2.5
    # One step jumps from sigma_max straight to 0, so the output is the guided denoiser at sigma_max.
    out = edm_sampler(net, latents, labels, num_steps=1, cfg=cfg)
    assert len(net.calls) == 1
    call = net.calls[0]
    assert call['x'].shape[0] == 8 and torch.equal(call['class_labels'], torch.cat([labels, torch.zeros_like(labels)]))
    if pos_channels:
        assert call['x_pos'].shape == (8, 2, 8, 8)
    x = latents.to(torch.float64) * 80
    hand = RecordingNet()
    D_cond = hand(x, 80.0, class_labels=labels).to(torch.float64)
    D_uncond = hand(x, 80.0, class_labels=torch.zeros_like(labels)).to(torch.float64)
    assert torch.allclose(out, D_uncond + cfg * (D_cond - D_uncond), atol=1e-6)
    assert not torch.allclose(out, D_cond, atol=1e-3)

def test_cfg_one_is_plain_conditional_call():
    net = RecordingNet()
    latents = torch.randn([4, 1, 8, 8])
    labels = torch.eye(3)[torch.tensor([2, 0, 1, 1])]
    out = edm_sampler(net, latents, labels, num_steps=1, cfg=1)
    assert len(net.calls) == 1 and net.calls[0]['x'].shape[0] == 4 and torch.equal(net.calls[0]['class_labels'], labels)
    assert torch.allclose(out, RecordingNet()(latents.to(torch.float64) * 80, 80.0, class_labels=labels).to(torch.float64))

def test_guided_sampling_uses_one_batched_call_per_evaluation():
    net = RecordingNet()
    edm_sampler(net, torch.randn([4, 1, 8, 8]), torch.eye(3)[[0, 1, 2, 0]], num_steps=4, cfg=3)
    assert len(net.calls) == 2 * 4 - 1 and all(call['x'].shape[0] == 8 for call in net.calls)

#----------------------------------------------------------------------------
# Inpainting and outpainting.

def _left_half_known(R):
    mask = torch.ones([1, 1, R, R])
    mask[..., :R // 2] = 0
    return mask

@pytest.mark.parametrize('mask_shape', ['broadcast', 'full'])
def test_inpaint_keeps_known_pixels(mask_shape):
    N, C, R = 4, 3, 8
    known = torch.rand([N, C, R, R]) * 2 - 1
    mask = _left_half_known(R)
    if mask_shape == 'full':
        mask = mask.expand(N, C, R, R).clone()
    latents = torch.randn([N, C, R, R], generator=torch.Generator().manual_seed(7))
    out = edm_sampler(GaussianDenoiser(), latents, num_steps=8, inpaint=(known, mask), randn_like=seeded_randn_like(8))
    keep = (mask == 0).expand(N, C, R, R)
    assert torch.allclose(out[keep], known[keep].to(torch.float64), atol=1e-6, rtol=0)
    assert (out[~keep] - known[~keep]).abs().min() > 0

def test_inpaint_noises_known_pixels_to_the_current_sigma():
    N, C, R = 2, 1, 8
    known = torch.rand([N, C, R, R], dtype=torch.float64)
    mask = _left_half_known(R)
    latents = torch.randn([N, C, R, R], generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    net = RecordingNet()
    edm_sampler(net, latents, num_steps=3, inpaint=(known, mask), randn_like=seeded_randn_like(10))
    first = net.calls[0]['x']
    noise = torch.randn([N, C, R, R], generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    assert torch.allclose(first[..., :R // 2], (known + 80 * noise)[..., :R // 2])
    assert torch.equal(first[..., R // 2:], (latents * 80)[..., R // 2:])

def test_fully_known_mask_returns_the_input():
    known = torch.rand([2, 3, 8, 8]) * 2 - 1
    out = edm_sampler(GaussianDenoiser(), torch.randn_like(known), num_steps=5, inpaint=(known, torch.zeros([1, 1, 8, 8])))
    assert torch.allclose(out, known.to(torch.float64), atol=1e-6, rtol=0)

def test_outpainting_with_outpaint_grid():
    R, H, W, top, left = 8, 12, 16, 2, 4
    image = torch.rand([1, 1, R, R]) * 2 - 1
    known = torch.zeros([1, 1, H, W])
    known[..., top:top + R, left:left + R] = image
    mask = torch.ones([1, 1, H, W])
    mask[..., top:top + R, left:left + R] = 0
    net = RecordingNet(pos_channels=2)
    out = edm_sampler(net, torch.randn([1, 1, H, W]), num_steps=4, x_pos=outpaint_grid(R, H, W, top, left), inpaint=(known, mask))
    assert torch.allclose(out[..., top:top + R, left:left + R], image.to(torch.float64), atol=1e-6, rtol=0)
    assert torch.equal(net.calls[0]['x_pos'][0, :, top:top + R, left:left + R], coordinate_grid(R, R))

def test_outpaint_grid_extends_coordinate_grid():
    R = 8
    for H, W, top, left in [(8, 8, 0, 0), (12, 16, 2, 4), (10, 9, 2, 1)]:
        grid = outpaint_grid(R, H, W, top, left)
        assert grid.shape == (2, H, W) and grid.dtype == torch.float32
        assert torch.equal(grid[:, top:top + R, left:left + R], coordinate_grid(R, R))
    grid = outpaint_grid(R, 12, 16, 2, 4, dtype=torch.float64)
    step = 2 / (R - 1)
    assert grid[0, 0, 0].item() == pytest.approx(-1 - 4 * step) and grid[1, 0, 0].item() == pytest.approx(-1 - 2 * step)
    assert grid[0, -1, -1].item() == pytest.approx(1 + 4 * step) and grid[1, -1, -1].item() == pytest.approx(1 + 2 * step)
    assert bool((grid[0, :, :4] < -1).all()) and bool((grid[1, :2] < -1).all())
    assert bool((grid[0, :, 12:] > 1).all()) and bool((grid[1, 10:] > 1).all())
    assert torch.allclose(grid[0].diff(dim=1), torch.full([12, 15], step, dtype=torch.float64))

@pytest.mark.parametrize('kwargs', [dict(resolution=1, height=4, width=4), dict(resolution=8, height=0, width=4)])
def test_outpaint_grid_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        outpaint_grid(top=0, left=0, **kwargs)

#----------------------------------------------------------------------------
# Argument checks.

@pytest.mark.parametrize('case', ['solver', 'steps', 'cfg_without_labels', 'known_shape', 'mask_shape', 'mask_values', 'x_pos_shape', 'non_square'])
def test_edm_sampler_rejects_bad_arguments(case):
    latents = torch.randn([2, 1, 8, 8])
    known, mask = torch.zeros_like(latents), torch.ones([1, 1, 8, 8])
    net, kwargs = RecordingNet(), {}
    if case == 'solver':
        kwargs = dict(solver='rk4')
    elif case == 'steps':
        kwargs = dict(num_steps=0)
    elif case == 'cfg_without_labels':
        kwargs = dict(cfg=2)
    elif case == 'known_shape':
        kwargs = dict(inpaint=(known[:, :, :4], mask))
    elif case == 'mask_shape':
        kwargs = dict(inpaint=(known, torch.ones([1, 2, 8, 8])))
    elif case == 'mask_values':
        kwargs = dict(inpaint=(known, mask * 2))
    elif case == 'x_pos_shape':
        kwargs = dict(x_pos=torch.zeros([2, 4, 4]))
    elif case == 'non_square':
        net, latents = RecordingNet(pos_channels=2), torch.randn([2, 1, 8, 6])
    with pytest.raises(ValueError):
        edm_sampler(net, latents, **kwargs)
    assert not net.calls

def test_cfg_without_labels_is_fine_at_one():
    out = edm_sampler(RecordingNet(), torch.randn([2, 1, 8, 8]), num_steps=2, cfg=1)
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()

#----------------------------------------------------------------------------

#----------------------------------------------------------------------------
# Seed for seed with EDM: its sampler (Karras et al. 2022, Algorithm 2, as EDM's generate.py runs it) restated here.

def edm_restated(net, seeds, num_steps, class_idx=None, sigma_min=0.002, sigma_max=80, rho=7, S_churn=0, S_min=0,
                 S_max=float('inf'), S_noise=1):
    """EDM's generate.py for one batch: latents, then a class drawn for every seed (overwritten by class_idx), then
    Heun steps that draw churn noise at every step, scaled by 0 where gamma is 0."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def randn(shape, dtype=torch.float32):
        return torch.stack([torch.randn(shape[1:], generator=g, dtype=dtype) for g in generators])

    latents = randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution])
    labels = None
    if net.label_dim:
        labels = torch.eye(net.label_dim)[torch.stack([torch.randint(net.label_dim, size=[], generator=g) for g in generators])]
        if class_idx is not None:
            labels[:, :] = 0
            labels[:, class_idx] = 1
    sigma_min, sigma_max = max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max)
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([torch.as_tensor(net.round_sigma(t), dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x = latents.to(torch.float64) * t[0]
    for k in range(num_steps):
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t[k] <= S_max else 0
        t_hat = torch.as_tensor(net.round_sigma(t[k] + gamma * t[k]), dtype=torch.float64)
        x_hat = x + (t_hat ** 2 - t[k] ** 2).sqrt() * S_noise * randn(x.shape, dtype=torch.float64)
        d = (x_hat - net(x_hat, t_hat, class_labels=labels).to(torch.float64)) / t_hat
        x_next = x_hat + (t[k + 1] - t_hat) * d
        if k < num_steps - 1:
            d_next = (x_next - net(x_next, t[k + 1], class_labels=labels).to(torch.float64)) / t[k + 1]
            x_next = x_hat + (t[k + 1] - t_hat) * (0.5 * d + 0.5 * d_next)
        x = x_next
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


class RoundedNet(torch.nn.Module):
    """A network whose noise levels are limited to [0.01, 20] and rounded to 3 significant digits (like iDDPM's
    discrete levels): EDM clamps its schedule to the net and rounds every level it uses, including t_hat."""

    sigma_min, sigma_max = 0.01, 20.0

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.img_channels, self.img_resolution, self.label_dim = net.img_channels, net.img_resolution, net.label_dim

    def round_sigma(self, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        scale = 10 ** (2 - sigma.clamp(min=1e-30).log10().floor())
        return (sigma * scale).round() / scale

    def forward(self, x, sigma, class_labels=None):
        return self.net(x, sigma, class_labels=class_labels)


T8 = karras_sigmas(8)  # the schedule of the 8-step runs below, to put S_min and S_max exactly on a step


@pytest.mark.parametrize('mode', ['deterministic', 'always-churn', 'limited-churn', 'class-and-churn', 'churn-below-one',
                                  'churn-bounds-on-steps', 'rho-3', 'rounded-net-with-churn'])
def test_generate_images_equals_edm_seed_for_seed(mode):
    from training.networks import EDMPrecond
    from training.sampler import generate_images
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=16, img_channels=3, label_dim=3, pos_channels=0, model_channels=8, channel_mult=[1, 2],
                     num_blocks=1, attn_resolutions=[]).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    settings = {'deterministic': dict(),
                'always-churn': dict(S_churn=40, S_noise=1.003),
                'limited-churn': dict(S_churn=40, S_min=0.1, S_max=5, S_noise=1.003),  # 4 of the 8 steps churn
                'class-and-churn': dict(S_churn=40, S_min=0.1, S_max=5, class_idx=1),
                'churn-below-one': dict(S_churn=0.5),  # gamma = 0.5 / 8, below the sqrt(2) - 1 cap
                'churn-bounds-on-steps': dict(S_churn=40, S_min=T8[5].item(), S_max=T8[2].item()),  # both bounds included
                'rho-3': dict(rho=3),
                'rounded-net-with-churn': dict(S_churn=40, S_min=0.05, S_max=10)}[mode]
    if mode == 'rounded-net-with-churn':
        net = RoundedNet(net)
    class_idx = settings.pop('class_idx', None)
    seeds = [0, 1, 2, 7]
    with torch.no_grad():
        ours = generate_images(net, seeds, torch.device('cpu'), class_idx=class_idx, num_steps=8, **settings)
        reference = edm_restated(net, seeds, 8, class_idx=class_idx, **settings)
    assert (ours != reference).sum() == 0


#----------------------------------------------------------------------------
# Settings and inputs that silently change samples when mishandled.

def test_sampler_defaults_are_edms():
    """50 deterministic Heun steps from sigma 80 to 0.002 with rho 7 (Karras et al. 2022, Table 1)."""
    import inspect
    defaults = {name: p.default for name, p in inspect.signature(edm_sampler).parameters.items() if p.default is not p.empty}
    assert {k: defaults[k] for k in ('num_steps', 'sigma_min', 'sigma_max', 'rho', 'S_churn', 'S_min', 'S_max', 'S_noise',
                                     'solver', 'cfg')} == dict(num_steps=50, sigma_min=0.002, sigma_max=80, rho=7, S_churn=0,
                                                               S_min=0, S_max=float('inf'), S_noise=1, solver='heun', cfg=1.0)

def test_deterministic_sampling_draws_no_noise():
    def no_noise(x):
        raise AssertionError('S_churn=0 drew noise')
    edm_sampler(GaussianDenoiser(), torch.randn([2, 1, 4, 4]), randn_like=no_noise, num_steps=4)

def test_coordinate_channels_in_the_output_are_dropped():
    """A net that returns its 2 coordinate channels after the image's gives the same samples as one that does not."""
    class WithCoordinates(RecordingNet):
        def __call__(self, x, sigma, **kwargs):
            out = super().__call__(x, sigma, **kwargs)
            return torch.cat([out, kwargs['x_pos']], dim=1)
    latents = torch.randn([2, 3, 8, 8], generator=torch.Generator().manual_seed(0))
    labels = torch.eye(3)[:2]
    plain = edm_sampler(RecordingNet(pos_channels=2), latents, labels, num_steps=4)
    assert torch.equal(edm_sampler(WithCoordinates(pos_channels=2), latents, labels, num_steps=4), plain)

def test_net_without_a_pos_channels_attribute_gets_no_coordinates():
    calls = []
    def net(x, sigma, class_labels=None):  # a bare function: no pos_channels, no x_pos argument
        calls.append(sigma)
        return x * 0
    edm_sampler(net, torch.randn([1, 1, 4, 4]), num_steps=2)
    assert len(calls) == 3

def test_coordinates_reach_the_net_as_float32():
    net = RecordingNet(pos_channels=2)
    edm_sampler(net, torch.randn([2, 3, 8, 8]), torch.eye(3)[:2], num_steps=2, x_pos=coordinate_grid(8, 8).double())
    assert all(call['x_pos'].dtype == torch.float32 for call in net.calls)

@pytest.mark.parametrize('what', ['x_pos', 'known', 'mask'])
def test_inputs_with_an_extra_dimension_are_refused(what):
    latents = torch.randn([1, 3, 8, 8])
    x_pos = coordinate_grid(8, 8)[None]
    known, mask = torch.zeros([1, 3, 8, 8]), torch.ones([1, 1, 8, 8])
    wrong = dict(x_pos=x_pos[None], known=known[None], mask=mask[None])[what]  # 5 dimensions, first sizes still fit
    kwargs = dict(x_pos=wrong if what == 'x_pos' else x_pos, inpaint=(wrong if what == 'known' else known, wrong if what == 'mask' else mask))
    with pytest.raises(ValueError, match=what if what == 'x_pos' else f'inpaint {what}'):
        edm_sampler(RecordingNet(pos_channels=2), latents, torch.eye(3)[:1], num_steps=2, **kwargs)

def test_float32_known_image_is_kept_exactly_where_the_mask_is_zero():
    known = torch.rand([1, 3, 8, 8]) * 2 - 1  # float32, as images are
    mask = torch.ones([1, 1, 8, 8], dtype=torch.float32)
    mask[..., :4] = 0
    out = edm_sampler(RecordingNet(), torch.randn([2, 3, 8, 8]), torch.eye(3)[:2], num_steps=3, inpaint=(known, mask))
    assert out.dtype == torch.float64 and torch.equal(out[..., :4], known.double().expand(2, -1, -1, -1)[..., :4])

def test_karras_sigmas_edge_cases():
    assert karras_sigmas(2, sigma_min=0.5, sigma_max=2).tolist() == pytest.approx([2, 0.5, 0], rel=1e-12)  # one ramp step
    assert karras_sigmas(3, sigma_min=1, sigma_max=1).tolist() == pytest.approx([1, 1, 1, 0], rel=1e-12)
    with pytest.raises(ValueError, match='sigma_max'):
        karras_sigmas(3, sigma_max=float('inf'))

def test_karras_sigmas_are_float64_whatever_round_sigma_returns():
    class Float32Rounding:
        def round_sigma(self, sigma):
            return torch.as_tensor(sigma, dtype=torch.float32)
    t = karras_sigmas(4, net=Float32Rounding())
    assert t.dtype == torch.float64 and torch.equal(t[:-1], karras_sigmas(4).float().double()[:-1])

def test_seeds_wrap_modulo_2_to_the_32_as_in_edm():
    from training.sampler import StackedRandomGenerator
    assert torch.equal(StackedRandomGenerator('cpu', [2 ** 32 + 5, 5]).randn([2, 3]).diff(dim=0), torch.zeros([1, 3]))

def test_class_index_bounds():
    from training.sampler import generate_images
    net = RecordingNet()
    net.img_channels, net.img_resolution = 3, 4
    generate_images(net, [0], torch.device('cpu'), class_idx=0, num_steps=1)
    assert torch.equal(net.calls[-1]['class_labels'], torch.tensor([[1.0, 0, 0]]))
    generate_images(net, [0], torch.device('cpu'), class_idx=2, num_steps=1)
    for bad in (-1, 3):
        with pytest.raises(ValueError, match=f'class {bad} is outside'):
            generate_images(net, [0], torch.device('cpu'), class_idx=bad, num_steps=1)

def test_decoder_gets_the_samples_and_its_images_are_returned():
    from training.sampler import generate_images
    net, seen = RecordingNet(), []
    net.img_channels, net.img_resolution = 3, 4
    def decoder(samples):
        seen.append(samples)
        return torch.full([len(samples), 3, 8, 8], 7, dtype=torch.uint8)
    images = generate_images(net, [0, 1], torch.device('cpu'), decoder=decoder, num_steps=2)
    assert torch.equal(images, torch.full([2, 3, 8, 8], 7, dtype=torch.uint8))
    undecoded = generate_images(net, [0, 1], torch.device('cpu'), num_steps=2)  # the same seeds: the same samples
    assert torch.equal(((seen[0] * 127.5 + 128).clip(0, 255)).to(torch.uint8), undecoded)
