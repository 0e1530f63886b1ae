"""Training as EDM2 trains (issue 28): its loss with learned uncertainty, its inverse-square-root learning rate,
train.py's --arch=edm2 --precond=edm2 with its optimizer and EMA settings, the edm2 presets, and a tiny run end to end.

Post-hoc EMA's coefficients against EDM2's are in tests/test_phema.py.
"""

import json
import math
import os
import re

import click
import pytest
import torch

import training_helpers as h
from training.loss import EDM2Loss, PatchEDM2Loss
from training.patch import crop_patches
from training.training_loop import lr_decay_factor, optimizer_step, ramped_lr, step_full_nimg

#----------------------------------------------------------------------------
# 1. The loss.


class StubEDM2(torch.nn.Module):
    """D = 0.5 x (plus its coordinate channels, which the loss must ignore), logvar = u0 + ln(sigma); records its calls."""

    def __init__(self, u0: float = 0.3):
        super().__init__()
        self.u0 = torch.nn.Parameter(torch.tensor(u0))
        self.calls = []

    def forward(self, x, sigma, x_pos=None, class_labels=None, return_logvar=False):
        self.calls.append(dict(x=x, sigma=sigma, x_pos=x_pos, class_labels=class_labels, return_logvar=return_logvar))
        D = 0.5 * x if x_pos is None else torch.cat([0.5 * x, x_pos], dim=1)
        return D, (self.u0 + sigma.log()).reshape(-1, 1, 1, 1)


def _replay(generator):
    return torch.Generator().set_state(generator.get_state())


@pytest.mark.parametrize('patch', [False, True])
def test_loss_equals_hand_computation(patch):
    images, labels = torch.randn(5, 3, 16, 16), torch.eye(5)
    gen = torch.Generator().manual_seed(3)
    replay = _replay(gen)
    net = StubEDM2()
    loss_fn = PatchEDM2Loss(P_mean=-0.4, P_std=1.0) if patch else EDM2Loss()
    loss = loss_fn(net, images, 8 if patch else None, labels=labels, generator=gen)

    y = crop_patches(images, 8, generator=replay)[0] if patch else images  # the same draws in the same order
    sigma = (torch.randn([5, 1, 1, 1], generator=replay) * 1.0 - 0.4).exp()
    n = torch.randn(y.shape, generator=replay) * sigma
    weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    logvar = 0.3 + sigma.log()
    torch.testing.assert_close(loss, weight / logvar.exp() * (0.5 * (y + n) - y) ** 2 + logvar)
    assert loss.shape == ((5, 3, 8, 8) if patch else (5, 3, 16, 16))
    call = net.calls[0]
    assert call['return_logvar'] and call['class_labels'] is labels and (call['x_pos'] is not None) == patch


def test_edm2_defaults_and_no_augmentation_labels():
    loss_fn = EDM2Loss()
    assert (loss_fn.P_mean, loss_fn.P_std, loss_fn.sigma_data) == (-0.4, 1.0, 0.5)  # EDM2's training_loop.py
    pipe = lambda x: (x, torch.zeros(x.shape[0], 9))
    with pytest.raises(ValueError, match='no augmentation labels'):
        loss_fn(StubEDM2(), torch.randn(2, 3, 8, 8), augment_pipe=pipe)
    loss_fn(StubEDM2(), torch.randn(2, 3, 8, 8), augment_pipe=lambda x: (x.flip(3), None))  # a pipe without labels is fine


class ConstantImages:
    """next_round(multiplier): 8 x multiplier images, each one constant value c_i, with no labels."""

    def __init__(self):
        self.images = torch.arange(1, 9, dtype=torch.float32).reshape(8, 1, 1, 1).expand(8, 3, 16, 16) / 8

    def __call__(self, multiplier):
        return self.images.repeat(multiplier, 1, 1, 1), None


class ZeroDenoiser(torch.nn.Module):
    """D = 0 and logvar = one learnable scalar u: the loss per element is weight e^-u c_i^2 + u."""

    def __init__(self, u):
        super().__init__()
        self.u = torch.nn.Parameter(torch.tensor(float(u)))
        self.sigmas = []

    def forward(self, x, sigma, x_pos=None, class_labels=None, return_logvar=False):
        self.sigmas.append(sigma.detach())
        return torch.zeros_like(x), self.u.expand(x.shape[0]).reshape(-1, 1, 1, 1)


def _grad_u(u, size, loss_norm):
    torch.manual_seed(0)
    net = ZeroDenoiser(u)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    optimizer_step(net, optimizer, PatchEDM2Loss(), ConstantImages(), size, 1, 1, 0.0, loss_norm=loss_norm)
    return float(net.u.grad), net.sigmas[0]


@pytest.mark.parametrize('size', [16, 4])
def test_logvar_learns_the_same_uncertainty_under_both_loss_norms(size):
    # Every patch pixel of image i is c_i, so the gradient of the step's loss in u vanishes at
    # u* = ln(mean_i weight_i c_i^2) whatever the patch size and the normalisation: 'image' sums over the patch's
    # pixels, 'pixel' multiplies that by (R/s)^2, and both scale the logvar term with the squared error.
    _, sigma = _grad_u(0.0, size, 'image')
    weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    u_star = math.log(float((weight.flatten() * (torch.arange(1, 9) / 8) ** 2).mean()))
    for norm in ('image', 'pixel'):
        assert abs(_grad_u(u_star, size, norm)[0]) < 1e-4
    image, pixel = _grad_u(u_star + 1, size, 'image')[0], _grad_u(u_star + 1, size, 'pixel')[0]
    assert image > 0 and pixel == pytest.approx(image * (16 / size) ** 2, rel=1e-5)

#----------------------------------------------------------------------------
# 2. The learning rate.


def test_inv_sqrt_schedule_against_hand_values():
    # EDM2-S at 64x64: ref_lr 0.0100, 35000 reference batches of 2048, ramp-up over 10 Mimg.
    t_ref = 35000 * 2048
    lr = lambda t: ramped_lr(0.01, t, 10_000) * lr_decay_factor('inv-sqrt', t, t_ref)
    assert lr(2_500_000) == pytest.approx(0.0025, rel=1e-12)        # a quarter into the ramp-up, before t_ref
    assert lr(t_ref) == pytest.approx(0.01, rel=1e-12)              # sqrt(max(1, 1)) = 1
    assert lr(4 * t_ref) == pytest.approx(0.005, rel=1e-12)         # 1 / sqrt(4)
    assert lr_decay_factor('none', 4 * t_ref, t_ref) == 1.0
    with pytest.raises(ValueError, match='inv-sqrt'):
        lr_decay_factor('cosine', 1, 1)


def test_patch_steps_count_their_compute():
    # batch 8: a full step counts 8, a step of 2x 8 R/2 patches 4, a step of 4x 8 R/4 patches 2.
    assert [step_full_nimg(8, m, 64 // m, 64) for m in (1, 2, 4)] == [8, 4, 2]


def assert_clean_exit(proc):
    assert proc.returncode == 0, f'exit code {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    assert 'Traceback' not in proc.stdout + proc.stderr, proc.stderr[-3000:]


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> str:
    return h.make_dataset(str(tmp_path_factory.mktemp('data') / 'shapes-16x16.zip'), resolution=16, num=64)


EDM2_TINY = [*h.TINY, '--arch=edm2', '--precond=edm2', '--augment=0', '--lr=1e-3', '--seed=0', '--nosubdir',
             '--lr-decay=inv-sqrt', '--lr-ref-batches=5']


@pytest.fixture(scope='module')
def runs(data, tmp_path_factory):
    """Two tiny EDM2 runs: on patches with EDM2's EMA settings, and on full images for 50 steps of 8."""
    root = tmp_path_factory.mktemp('runs')
    patch = ['--patch=on', '--ema=0', '--phema=0.05,0.10', '--duration=0.0003', '--tick=0.1']
    full = ['--patch=off', '--duration=0.0004', '--tick=0.1']
    procs = h.run_train_parallel([f'--outdir={root / "patch"}', f'--data={data}', *EDM2_TINY, *patch],
                                 [f'--outdir={root / "full"}', f'--data={data}', *EDM2_TINY, *full], timeout=400)
    for proc in procs:
        assert_clean_exit(proc)
    return {name: root / name for name in ('patch', 'full')}


def _state(run_dir):
    from training.snapshot import load_state
    return load_state(str(run_dir / 'training-state-000000.pt'))  # weights-only: the lr and full_nimg are plain floats


def test_inv_sqrt_schedule_reaches_the_optimizer(runs):
    # Full images: 50 steps to 400 images, the last taken at t = 392 with t_ref = 5 x 8 = 40.
    state = _state(runs['full'])
    assert state['cur_nimg'] == 400 and state['full_nimg'] == 400
    assert [g['lr'] for g in state['optimizer']['param_groups']] == [pytest.approx(1e-3 / math.sqrt(392 / 40), rel=1e-9)]
    assert state['optimizer']['param_groups'][0]['betas'] == (0.9, 0.99)  # EDM2's Adam
    # Patches: t counts full-image equivalents, less than the images (kimg); the last step counted 8, 4 or 2.
    state = _state(runs['patch'])
    assert state['full_nimg'] < state['cur_nimg']
    lr = state['optimizer']['param_groups'][0]['lr']
    assert any(lr == pytest.approx(1e-3 / math.sqrt((state['full_nimg'] - d) / 40), rel=1e-9) for d in (8, 4, 2))

#----------------------------------------------------------------------------
# 3. End to end: a tiny EDM2 network on patches writes a snapshot that loads and samples.


def test_tiny_edm2_run_on_patches_snapshots_loads_and_samples(runs):
    from training.networks_edm2 import EDM2Precond
    from training.phema import find_phema_snapshots
    from training.sampler import generate_images
    from training.snapshot import load_network
    run = runs['patch']
    net = load_network(str(run))
    assert isinstance(net, EDM2Precond) and net.pos_channels == 2
    images = generate_images(net, seeds=range(2), device=torch.device('cpu'), num_steps=4)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.uint8
    state = _state(run)
    # --ema=0: no classic EMA; the snapshot holds the trained weights (EDM2 keeps only the post-hoc profiles).
    assert all(torch.equal(state['ema'][k], v) for k, v in state['net'].items())
    assert len(find_phema_snapshots(str(run))) == 1 and state['phema']['sigma_rels'] == [0.05, 0.10]
    options = json.loads((run / 'training_options.json').read_text())
    assert options['loss_kwargs']['class_name'] == 'training.loss.PatchEDM2Loss'

#----------------------------------------------------------------------------
# 4. train.py's options and the presets.


def _config(name=None, **overrides):
    from train import build_config, preset_options
    return build_config(preset_options(name, **overrides), 'd', 64, world_size=1)


def test_edm2_options_map_to_edm2s_network_loss_and_optimizer():
    c = _config(arch='edm2', precond='edm2', augment=0, cbase=64, cres='1,2', blocks=2, attn='8', dropout=0.1, p_mean=-1.0)
    assert c.network_kwargs == dict(class_name='training.networks_edm2.EDM2Precond', pos_channels=2, model_channels=64,
                                    channel_mult=[1, 2], num_blocks=2, attn_resolutions=[8], dropout=0.1,
                                    use_fp16=False, use_bf16=False)
    assert c.loss_kwargs == dict(class_name='training.loss.PatchEDM2Loss', P_mean=-1.0)
    assert c.optimizer_kwargs.betas == [0.9, 0.99] and c.optimizer_kwargs.eps == 1e-8
    assert _config(arch='edm2', precond='edm2', augment=0, patch='off').loss_kwargs.class_name == 'training.loss.EDM2Loss'
    assert _config().optimizer_kwargs.betas == [0.9, 0.999]  # EDM's, unchanged


@pytest.mark.parametrize('overrides, flag, words', [
    (dict(arch='edm2', augment=0), '--precond', 'needs --precond=edm2'),
    (dict(precond='edm2', augment=0), '--arch', 'not ddpmpp'),
    (dict(arch='edm2', precond='edm2'), '--augment', 'no augmentation labels'),
    (dict(arch='edm2', precond='edm2', augment=0, cond=True, label_dropout=0.1), '--label-dropout', 'no label dropout'),
])
def test_edm2_rejects_what_does_not_fit(overrides, flag, words):
    with pytest.raises(click.BadParameter, match=words) as err:
        _config(**overrides)
    assert err.value.param_hint == flag and '\n' not in err.value.message


def _edm2_table():
    """train_edm2.py's config_presets, read from the EDM2 checkout: {name: {key: number}}."""
    path = os.path.join(h.REPO, '.baselines', 'edm2', 'train_edm2.py')
    if not os.path.isfile(path):
        pytest.skip('no EDM2 checkout in .baselines/edm2')
    table = {}
    for name, body in re.findall(r"'(edm2-[\w-]+)':\s*dnnlib\.EasyDict\(([^)]*)\)", open(path).read()):
        table[name] = {k: eval(v, {}) for k, v in re.findall(r'(\w+)=([\d.<>-]+)', body)}  # numbers and <<, nothing else
    return table


@pytest.mark.parametrize('name', ['edm2-img64-s', 'edm2-img64-xs', 'edm2-img512-s'])
def test_presets_carry_edm2s_numbers(name):
    edm2 = _edm2_table()[name]
    c = _config(name)
    assert c.batch_size == edm2['batch'] and c.network_kwargs.model_channels == edm2['channels']
    assert c.optimizer_kwargs.lr == edm2['lr'] and c.lr_ref_batches == edm2['decay'] and c.lr_decay == 'inv-sqrt'
    assert c.network_kwargs.dropout == edm2['dropout']
    assert (c.loss_kwargs.P_mean, c.loss_kwargs.P_std) == (edm2['P_mean'], edm2['P_std'])
    assert c.total_kimg * 1000 == pytest.approx(edm2['duration'], rel=1e-12)
    assert c.ema_halflife_kimg == 0 and c.phema_sigma_rels == [0.05, 0.10] and c.lr_rampup_kimg == 10_000
    assert c.kimg_per_tick * 1000 == 128 << 10 and c.kimg_per_tick * 1000 * c.snapshot_ticks == 8 << 20


def test_presets_through_dry_run(tmp_path):
    data64 = h.make_dataset(str(tmp_path / 'shapes-64x64.zip'), resolution=64, num=4)
    proc = h.run_train('--preset=edm2-img64-s', f'--data={data64}', f'--outdir={tmp_path}/runs', '--cond=False',
                       '--device=cpu', '--dry-run', timeout=120)
    assert_clean_exit(proc)
    printed = json.loads(proc.stdout[proc.stdout.index('{'):proc.stdout.rindex('}') + 1])
    assert printed['network_kwargs']['class_name'] == 'training.networks_edm2.EDM2Precond'
    assert (printed['lr_decay'], printed['lr_ref_batches'], printed['ema_halflife_kimg']) == ('inv-sqrt', 35000, 0)
    # edm2-img512-s trains on latents: tests/test_latents.py runs its dry run on EDM2-normalised latents.
