"""Autoguidance (Karras et al. 2024): edm_sampler's guide/guidance, generate.py and fid.py --guide, EDM2's conventions."""

import os

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import fid
import generate
from training.networks import EDMPrecond
from training.patch import outpaint_grid
from training.sampler import check_guide, edm_sampler, generate_images, karras_sigmas
from training.snapshot import load_network, save_network_snapshot

CPU = torch.device('cpu')

#----------------------------------------------------------------------------
# Networks.

def tiny_net(seed: int, label_dim: int = 0, pos_channels: int = 0, img_resolution: int = 16, model_channels: int = 8) -> EDMPrecond:
    """A small EDM net with weights moved away from zero (untrained, its zero output layer would hide the guide)."""
    torch.manual_seed(seed)
    net = EDMPrecond(img_resolution=img_resolution, img_channels=3, label_dim=label_dim, pos_channels=pos_channels,
                     model_channels=model_channels, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[]).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.requires_grad_(False)


class LinearNet:
    """The ideal denoiser of N(b, a I) plus label.v: (a x + sigma^2 b) / (a + sigma^2) + label.v, linear in x; in float32 like
    the real nets, and records the keyword arguments of every call."""

    sigma_min, sigma_max, img_channels, img_resolution = 0.002, 80, 1, 8

    def __init__(self, a: float, b: float, label_dim: int = 0, pos_channels: int = 0):
        self.a, self.b, self.label_dim, self.pos_channels = a, b, label_dim, pos_channels
        self.v = torch.arange(1, label_dim + 1, dtype=torch.float64)
        self.calls = []

    def __call__(self, x, sigma, **kwargs):
        self.calls.append(kwargs)
        out = (self.a * x + sigma ** 2 * self.b) / (self.a + sigma ** 2)
        if kwargs.get('class_labels') is not None:
            out = out + (kwargs['class_labels'].to(torch.float64) @ self.v)[:, None, None, None]
        return out.to(torch.float32)


def counted(net):
    """`net` wrapped to count its calls in .calls."""
    def call(*args, **kwargs):
        call.calls += 1
        return net(*args, **kwargs)
    call.calls = 0
    for name in ('img_channels', 'img_resolution', 'label_dim', 'pos_channels', 'round_sigma'):
        setattr(call, name, getattr(net, name))
    return call

#----------------------------------------------------------------------------
# The sampler.

@pytest.mark.parametrize('label_dim', [0, 3])
def test_guidance_one_is_the_main_networks_sampler_and_never_calls_the_guide(label_dim):
    net, guide = tiny_net(0, label_dim), counted(tiny_net(1, label_dim, model_channels=4))
    with torch.no_grad():
        plain = generate_images(net, [0, 1, 5], CPU, num_steps=4, S_churn=10)
        guided = generate_images(net, [0, 1, 5], CPU, num_steps=4, S_churn=10, guide=guide, guidance=1)
    assert torch.equal(plain, guided) and guide.calls == 0
    with torch.no_grad():
        assert not torch.equal(plain, generate_images(net, [0, 1, 5], CPU, num_steps=4, S_churn=10, guide=guide, guidance=2))


@pytest.mark.parametrize('guidance', [2.5, 0.3, -1.0])
def test_two_heun_steps_by_hand(guidance):
    """Two Heun steps (80 -> 0.002 with the correction, then Euler into 0) with D = D_guide + W (D_main - D_guide), written out."""
    main, guide = LinearNet(0.9, 0.01, label_dim=2), LinearNet(0.5, -0.02, label_dim=2)
    latents = torch.randn([3, 1, 8, 8], generator=torch.Generator().manual_seed(3))
    labels = torch.eye(2)[[0, 1, 1]]
    out = edm_sampler(main, latents, labels, num_steps=2, guide=guide, guidance=guidance)

    def D(x, sigma):
        m, g = ((net.a * x + sigma ** 2 * net.b) / (net.a + sigma ** 2) + (labels.double() @ net.v)[:, None, None, None] for net in (main, guide))
        return g + guidance * (m - g)
    t0, t1 = karras_sigmas(2)[:2].tolist()
    x = latents.double() * t0
    d = (x - D(x, t0)) / t0
    x1 = x + (t1 - t0) * d
    x1 = x + (t1 - t0) * (0.5 * d + 0.5 * (x1 - D(x1, t1)) / t1)
    assert out.dtype == torch.float64 and torch.allclose(out, D(x1, t1), rtol=1e-6, atol=1e-5)
    assert len(main.calls) == len(guide.calls) == 3


def test_guide_without_coordinates_or_labels_guides_a_main_net_with_both():
    main, guide = LinearNet(0.9, 0.01, label_dim=2, pos_channels=2), LinearNet(0.5, 0.0)
    edm_sampler(main, torch.randn([2, 1, 8, 8]), torch.eye(2), num_steps=3, guide=guide, guidance=2)
    assert all(call['x_pos'].shape == (2, 2, 8, 8) and call['class_labels'] is not None for call in main.calls)
    assert all('x_pos' not in call and call['class_labels'] is None for call in guide.calls) and len(guide.calls) == 5


def test_real_networks_with_and_without_coordinates_and_outpainting():
    main, guide = tiny_net(0, 3, pos_channels=2), tiny_net(1, 0, model_channels=4)
    canvas = dict(x_pos=outpaint_grid(16, 16, 24, 0, 4), inpaint=(torch.zeros([1, 3, 16, 24]), torch.ones([1, 1, 16, 24])))
    with torch.no_grad():
        for kwargs in [{}, canvas]:
            guided, plain = (generate_images(main, [0, 1], CPU, num_steps=3, guide=guide, guidance=w, **kwargs) for w in (1.7, 1))
            assert guided.shape[-1] == (24 if kwargs else 16) and not torch.equal(guided, plain)


class Mixed(torch.nn.Module):
    """One net whose output is what the sampler should compute from (main, guide, guidance): float64 lerp, main first."""

    def __init__(self, main, guide, guidance):
        super().__init__()
        self.main, self.guide, self.guidance = main, guide, guidance
        self.img_channels, self.img_resolution, self.label_dim, self.pos_channels = 3, 16, main.label_dim, main.pos_channels

    def forward(self, x, sigma, class_labels=None, x_pos=None):
        D = self.main(x, sigma, class_labels=class_labels, x_pos=x_pos).double()
        return self.guide(x, sigma, class_labels=class_labels).double().lerp(D, self.guidance)


@pytest.mark.parametrize('settings', [dict(), dict(solver='euler'), dict(S_churn=40, S_min=0.1, S_max=5, S_noise=1.003),
                                      dict(class_idx=2, num_steps=5, rho=3), dict(inpaint=True), dict(outpaint=True)])
def test_every_sampler_option_works_with_autoguidance(settings):
    """Autoguided sampling equals sampling one net that computes the autoguided denoiser itself, with every option."""
    settings = {'num_steps': 4, **settings}
    main, guide = tiny_net(0, 3, pos_channels=2), tiny_net(1, 3, model_channels=4)
    known, fill = torch.rand([1, 3, 16, 16]) * 2 - 1, torch.ones([1, 1, 16, 16])
    fill[..., :8] = 0
    if settings.pop('inpaint', False):
        settings['inpaint'] = (known, fill)
    if settings.pop('outpaint', False):
        pad = torch.nn.functional.pad
        settings.update(x_pos=outpaint_grid(16, 16, 20, 0, 2), inpaint=(pad(known, [2, 2]), pad(fill, [2, 2], value=1)))
    with torch.no_grad():
        ours = generate_images(main, [0, 3, 4], CPU, guide=guide, guidance=2.2, **settings)
        by_hand = generate_images(Mixed(main, guide, 2.2), [0, 3, 4], CPU, **settings)
    assert torch.equal(ours, by_hand)


@pytest.mark.parametrize('kwargs, message', [
    (dict(guidance=2), 'needs a guide network'),
    (dict(guidance=2, cfg=1.5), 'cannot be combined'),
])
def test_impossible_guidance_is_refused(kwargs, message):
    kwargs.setdefault('guide', LinearNet(1, 0, label_dim=2) if 'cfg' in kwargs else None)
    with pytest.raises(ValueError, match=message):
        edm_sampler(LinearNet(1, 0, label_dim=2), torch.randn([2, 1, 8, 8]), torch.eye(2), num_steps=2, **kwargs)


def test_cfg_with_an_unused_guide_is_plain_cfg():
    main = LinearNet(1, 0, label_dim=2)
    out = edm_sampler(main, torch.ones([2, 1, 8, 8]), torch.eye(2), num_steps=1, cfg=1.5, guide=LinearNet(0, 0), guidance=1)
    assert torch.equal(out, edm_sampler(main, torch.ones([2, 1, 8, 8]), torch.eye(2), num_steps=1, cfg=1.5))


@pytest.mark.parametrize('guide, message', [
    (LinearNet(1, 0, label_dim=3), 'label_dim=3'),
    (LinearNet(1, 0, label_dim=2), None),
    (LinearNet(1, 0, label_dim=0), None),  # unconditional: EDM2's classifier-free guidance presets guide with one
])
def test_check_guide(guide, message):
    if message is None:
        check_guide(LinearNet(1, 0, label_dim=2), guide)
        return
    with pytest.raises(ValueError, match=message):
        check_guide(LinearNet(1, 0, label_dim=2), guide)
    guide.label_dim, guide.img_resolution = 2, 16
    with pytest.raises(ValueError, match='img_resolution=16'):
        check_guide(LinearNet(1, 0, label_dim=2), guide)

#----------------------------------------------------------------------------
# EDM2's conventions: float32 loop and schedule, churn noise drawn only where churn is on.

class EDM2Precond(LinearNet):
    """Named like training.networks_edm2.EDM2Precond: sampled with EDM2's conventions."""


def test_edm2_networks_run_in_float32_and_edm_networks_in_float64():
    latents = torch.randn([2, 1, 8, 8])
    edm2 = edm_sampler(EDM2Precond(0.9, 0.01), latents, num_steps=3)
    edm = edm_sampler(LinearNet(0.9, 0.01), latents, num_steps=3)
    assert edm2.dtype == torch.float32 and edm.dtype == torch.float64 and torch.allclose(edm2.double(), edm, rtol=1e-4, atol=1e-3)
    assert torch.equal(edm_sampler(LinearNet(0.9, 0.01), latents, num_steps=3, dtype=torch.float32), edm2)
    assert edm_sampler(EDM2Precond(0.9, 0.01), latents, num_steps=3, dtype=torch.float64).dtype == torch.float64
    assert karras_sigmas(5, dtype=torch.float32).dtype == torch.float32
    known, mask = torch.rand([1, 1, 8, 8]) * 2 - 1, torch.ones([1, 1, 8, 8])
    mask[..., :4] = 0
    painted = edm_sampler(EDM2Precond(0.9, 0.01), latents, num_steps=3, inpaint=(known, mask), guide=LinearNet(0.5, 0), guidance=2)
    assert painted.dtype == torch.float32 and torch.equal(painted[..., :4], known.expand(2, -1, -1, -1)[..., :4])


def test_edm2_networks_draw_churn_noise_only_where_churn_is_on():
    t = karras_sigmas(6)
    for net, draws in [(EDM2Precond(1, 0), 3), (LinearNet(1, 0), 6)]:  # S_min/S_max take in steps 1-3 of 0-5
        drawn = []
        edm_sampler(net, torch.randn([1, 1, 8, 8]), num_steps=6, S_churn=5, S_min=t[3].item() * 0.99, S_max=t[1].item() * 1.01,
                    randn_like=lambda x: drawn.append(1) or torch.zeros_like(x))
        assert len(drawn) == draws

#----------------------------------------------------------------------------
# generate.py and fid.py.

@pytest.fixture(scope='module')
def snapshots(tmp_path_factory):
    """Tiny snapshots: a conditional main net, a smaller guide, an unconditional one and one of another resolution."""
    root = tmp_path_factory.mktemp('autoguidance')
    for name, net in [('main', tiny_net(0, 3)), ('guide', tiny_net(1, 3, model_channels=4)), ('uncond', tiny_net(2, 0)),
                      ('res8', tiny_net(3, 3, img_resolution=8))]:
        save_network_snapshot(str(root / name), dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs={}))
    return root


def run_generate(snapshots, *args):
    return CliRunner().invoke(generate.main, ['--network', str(snapshots / 'main.pkl'), '--device', 'cpu', '--steps', '3',
                                              *[str(a) for a in args]])


def test_generate_with_guide_gives_generate_images_autoguided(snapshots, tmp_path):
    for guide in ['guide.pkl', 'uncond.pkl']:
        result = run_generate(snapshots, '--seeds', '0-2', '--class', 1, '--grid', tmp_path / 'g.png', '--outdir', tmp_path / guide,
                              '--guide', snapshots / guide, '--guidance', 2.5)
        assert result.exit_code == 0, result.output
        written = np.stack([np.asarray(PIL.Image.open(tmp_path / guide / f'{s:06d}.png')) for s in range(3)])
        with torch.no_grad():
            expected = generate_images(load_network(str(snapshots / 'main.pkl')), [0, 1, 2], CPU, class_idx=1, num_steps=3,
                                       guide=load_network(str(snapshots / guide)), guidance=2.5)
        assert np.array_equal(written, expected.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize('args, message', [
    (['--guide', '{res8}', '--guidance', 2], '--guide: the guide has img_resolution=8, the network 16'),
    (['--guide', '{nowhere}', '--guidance', 2], 'Invalid value for --guide: '),
    (['--guidance', 2], '--guidance=2.0 needs --guide'),
    (['--guide', '{guide}', '--guidance', 2, '--cfg', 1.5], 'cannot be combined'),
])
def test_generate_guide_errors_are_one_line(snapshots, tmp_path, args, message):
    paths = dict(res8=snapshots / 'res8.pkl', nowhere=snapshots / 'nowhere.pkl', guide=snapshots / 'guide.pkl')
    result = run_generate(snapshots, '--grid', tmp_path / 'g.png', *[str(a).format(**paths) for a in args])
    assert result.exit_code == 2 and 'Traceback' not in result.output and message in result.output, result.output
    assert message in result.output.strip().splitlines()[-1] and not (tmp_path / 'g.png').exists()


def test_fid_calc_samples_with_the_guide(snapshots, tmp_path):
    """fid.py calc --network --guide samples with the guide: at --guidance 1 the unguided score, at 3 another one."""
    def calc(*extra):
        result = CliRunner().invoke(fid.main, ['calc', '--network', str(snapshots / 'main.pkl'), '--ref', str(tmp_path / 'ref.npz'),
                                               '--num', '6', '--steps', '3', '--detector', str(tmp_path / 'det.pt'), '--device', 'cpu',
                                               '--workers', '0', *[str(a) for a in extra]])
        assert result.exit_code == 0, result.output
        return [line for line in result.stdout.splitlines() if line.startswith('FID ')]
    torch.jit.save(torch.jit.script(MeanColour()), str(tmp_path / 'det.pt'))
    with torch.no_grad():
        real = generate_images(load_network(str(snapshots / 'uncond.pkl')), list(range(6)), CPU, num_steps=3)
    fid.np.savez(str(tmp_path / 'ref.npz'), **fid.compute_feature_stats([real], MeanColour(), CPU))
    unguided, same, guided = calc(), calc('--guide', snapshots / 'guide.pkl'), calc('--guide', snapshots / 'guide.pkl', '--guidance', 3)
    assert unguided and unguided == same and guided != unguided


class MeanColour(torch.nn.Module):
    """A stand-in detector: per-channel means and standard deviations of the uint8 images."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = x.to(torch.float32) / 255
        return torch.cat([x.mean([2, 3]), x.std([2, 3])], dim=1)

#----------------------------------------------------------------------------
# Against EDM2's own sampler: images that bench/check_autoguidance.py stored from NVlabs/edm2's generate_images.py.

EDM2_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'edm2-autoguidance.pt')


@pytest.fixture(scope='module')
def edm2_data():
    return torch.load(EDM2_DATA)


def test_stored_edm2_inputs_are_ours(edm2_data):
    """The networks, seeds and modes are the bench's, and our per-seed generator draws EDM2's noise."""
    from bench import check_autoguidance
    from training.sampler import StackedRandomGenerator
    assert edm2_data['networks'] == check_autoguidance.NETWORKS and edm2_data['seeds'] == check_autoguidance.SEEDS
    assert edm2_data['modes'] == check_autoguidance.MODES
    # torch's vectorised normal sampler rounds differently by CPU kernel: AVX2 against default differ by up to 1.8e-6
    # at values up to 4.1, 4 float32 ulps (4.8e-7 each there); 8e-6 leaves 4x that.
    noise = StackedRandomGenerator(CPU, edm2_data['seeds']).randn(list(edm2_data['noise'].shape))
    torch.testing.assert_close(noise, edm2_data['noise'], rtol=0, atol=8e-6)


@pytest.mark.parametrize('dtype', ['float16', 'float32'])
def test_autoguided_images_equal_edm2s(edm2_data, dtype):
    """Every mode gives EDM2's uint8 images for the same networks and seeds, up to float32 rounding: stored on another
    machine, the images may differ where a value sits at a rounding boundary, so at most 4 of a mode's 3072 values may
    differ, by 1. Measured: 0 on the machine that stored them, 1 with ATEN_CPU_CAPABILITY=default there; EDM2's own
    sampler run beside ours (bench/check_autoguidance.py) gives 0 in every mode."""
    from bench import check_autoguidance
    nets = check_autoguidance.rebuilt_networks(getattr(torch, dtype))
    for mode in edm2_data['modes']:
        counts = check_autoguidance.count_differing(check_autoguidance.sample_ours(nets, mode), edm2_data['images'][mode, dtype])
        assert counts['differing'] <= 4 and counts['max_diff'] <= 1, (mode, counts)
