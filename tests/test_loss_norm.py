"""--loss-norm: how much a patch step weighs, bit-exactness of 'image', and what resume keeps.

The expected gradients are stated in closed form; the 'image' step is compared with EDM's formula written
out here, not with the code under test.
"""

import json
import math
import os

import pytest
import torch

from training.loss import PatchEDMLoss
from training.training_loop import optimizer_step
import training_helpers as h

RES = 16
CHANNELS = 3
BATCH = 4


class ConstantOutput(torch.nn.Module):
    """D(x; sigma, pos) = w at every pixel: on all-zero images its error is w everywhere."""

    def __init__(self, value: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(value, dtype=torch.float64))

    def forward(self, x, sigma, class_labels=None, augment_labels=None, x_pos=None):
        return self.w.expand(x.shape)


def zero_rounds(multiplier: int):
    return torch.zeros([BATCH * multiplier, CHANNELS, RES, RES], dtype=torch.float64), torch.zeros([BATCH * multiplier, 0])


def step_gradient(loss_norm: str, size: int, num_rounds: int = 1) -> float:
    """d(step loss)/dw of one optimizer_step at this patch size, through the real PatchEDMLoss."""
    net = ConstantOutput(0.3)
    optimizer = torch.optim.SGD(net.parameters(), lr=0)
    loss_fn = PatchEDMLoss(P_std=0)  # every sample gets sigma = exp(P_mean), so every pixel has the same weight
    optimizer_step(net, optimizer, loss_fn, zero_rounds, size, RES // size, num_rounds, lr=0, loss_norm=loss_norm)
    return float(net.w.grad)


@pytest.mark.parametrize('num_rounds', [1, 3])
def test_patch_steps_weigh_equally_per_pixel_and_by_area_per_image(num_rounds):
    sigma, sigma_data, w = math.exp(-1.2), 0.5, 0.3  # the loss draws sigma in float32: agreement to ~1e-7
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    per_pixel = 2 * weight * w  # d/dw of weight * w^2
    for size in (RES, RES // 2, RES // 4):
        # 'pixel': the mean over the step's pixels times R^2, whatever the patch size.
        assert step_gradient('pixel', size, num_rounds) == pytest.approx(per_pixel * CHANNELS * RES ** 2, rel=1e-6)
        # 'image': the sum over one image's pixels, averaged over images: 1, 1/4, 1/16 of a full step.
        assert step_gradient('image', size, num_rounds) == pytest.approx(per_pixel * CHANNELS * size ** 2, rel=1e-6)
    ratios = [step_gradient('image', size) / step_gradient('image', RES) for size in (RES, RES // 2, RES // 4)]
    assert ratios == pytest.approx([1, 1 / 4, 1 / 16], rel=1e-6)


def test_unknown_loss_norm_is_rejected():
    with pytest.raises(ValueError, match="loss_norm must be one of"):
        step_gradient('mean', RES)


def tiny_patch_net(seed: int = 0) -> torch.nn.Module:
    from training.networks import EDMPrecond
    torch.manual_seed(seed)
    return EDMPrecond(img_resolution=RES, img_channels=CHANNELS, model_type='SongUNet', pos_channels=2, model_channels=8,
                      channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0)


def test_image_norm_is_edms_formula_bit_for_bit():
    images = torch.rand([BATCH * 4, CHANNELS, RES, RES], generator=torch.Generator().manual_seed(3)) * 2 - 1
    next_round = lambda multiplier: (images[:BATCH * multiplier], torch.zeros([BATCH * multiplier, 0]))  # noqa: E731
    loss_fn, sizes, lr = PatchEDMLoss(), [RES, RES // 2, RES // 4, RES // 2, RES], 1e-2

    net = tiny_patch_net()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    for step, size in enumerate(sizes):
        torch.manual_seed(100 + step)
        optimizer_step(net, optimizer, loss_fn, next_round, size, RES // size, 1, lr, loss_norm='image')

    # EDM's step, written out: sum over the pixels, divided by the step's number of images, then Adam.
    reference = tiny_patch_net()
    reference_optimizer = torch.optim.Adam(reference.parameters(), lr=lr)
    for step, size in enumerate(sizes):
        torch.manual_seed(100 + step)
        reference_optimizer.zero_grad(set_to_none=True)
        batch, _ = next_round(RES // size)
        loss = loss_fn(reference, batch, size)
        loss.sum().mul(1 / len(batch)).backward()
        for param in reference.parameters():
            torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        reference_optimizer.step()
    for (name, a), b in zip(net.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(net.state_dict()['model.enc.16x16_conv.weight'], tiny_patch_net().state_dict()['model.enc.16x16_conv.weight'])


def test_pixel_norm_changes_patch_steps_only():
    images = torch.rand([BATCH * 4, CHANNELS, RES, RES], generator=torch.Generator().manual_seed(4)) * 2 - 1
    next_round = lambda multiplier: (images[:BATCH * multiplier], torch.zeros([BATCH * multiplier, 0]))  # noqa: E731
    grads = {}
    for norm in ('image', 'pixel'):
        for size in (RES, RES // 2):
            net = tiny_patch_net()
            torch.manual_seed(7)
            optimizer_step(net, torch.optim.SGD(net.parameters(), lr=0), PatchEDMLoss(), next_round, size, RES // size, 1, 0,
                           loss_norm=norm)
            grads[norm, size] = torch.cat([p.grad.flatten() for p in net.parameters()])
    assert torch.equal(grads['image', RES], grads['pixel', RES])  # full-size steps: the very same numbers
    torch.testing.assert_close(grads['pixel', RES // 2], grads['image', RES // 2] * 4, rtol=1e-5, atol=1e-7)

#----------------------------------------------------------------------------
# train.py: recorded in the run, kept on resume, and old state files resume as 'image'.

@pytest.fixture(scope='module')
def data(tmp_path_factory) -> str:
    return h.make_dataset(str(tmp_path_factory.mktemp('data') / 'shapes-16x16.zip'), resolution=RES, num=64)


def test_state_without_loss_norm_resumes_as_image_and_matches_uninterrupted_run(data, tmp_path):
    common = [f'--data={data}', *h.TINY, '--patch=on', '--real_p=0.25', '--seed=5', '--tick=0.05', '--snap=1000',
              '--dump=1000', '--nosubdir']
    long_dir, short_dir = tmp_path / 'long', tmp_path / 'short'
    for proc in h.run_train_parallel([f'--outdir={long_dir}', '--duration=0.0004', '--loss-norm=image', *common],
                                     [f'--outdir={short_dir}', '--duration=0.0002', '--loss-norm=image', *common]):
        assert proc.returncode == 0, proc.stderr[-3000:]
    with open(long_dir / 'training_options.json') as f:
        assert json.load(f)['loss_norm'] == 'image'
    state_path = short_dir / 'training-state-000000.pt'
    state = torch.load(state_path, map_location='cpu', weights_only=False)
    assert state['loss_norm'] == 'image'
    del state['loss_norm']  # a state file from before the option existed
    torch.save(state, state_path)

    proc = h.run_train(f'--outdir={short_dir}', '--duration=0.0004', '--resume=auto', *common)  # default --loss-norm
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'trained with --loss-norm=image; the run keeps it' in proc.stdout
    with open(short_dir / 'training_options.json') as f:
        assert json.load(f)['loss_norm'] == 'image'
    resumed = torch.load(state_path, map_location='cpu', weights_only=False)
    long = torch.load(long_dir / 'training-state-000000.pt', map_location='cpu', weights_only=False)
    assert resumed['loss_norm'] == 'image'
    assert h.assert_states_equal(resumed, long, ['net', 'ema', 'optimizer', 'cur_nimg', 'consumed']) > 50


def test_pixel_and_image_runs_differ(data, tmp_path):
    common = [f'--data={data}', *h.TINY, '--patch=on', '--real_p=0', '--seed=5', '--tick=0.05', '--snap=1000',
              '--dump=1000', '--nosubdir', '--duration=0.0001']
    procs = h.run_train_parallel(*[[f'--outdir={tmp_path / norm}', f'--loss-norm={norm}', *common] for norm in ('image', 'pixel')])
    assert all(proc.returncode == 0 for proc in procs), [proc.stderr[-2000:] for proc in procs]
    states = [torch.load(tmp_path / norm / 'training-state-000000.pt', map_location='cpu', weights_only=False)
              for norm in ('image', 'pixel')]
    assert [s['loss_norm'] for s in states] == ['image', 'pixel']
    assert states[0]['cur_nimg'] == states[1]['cur_nimg']
    assert not torch.equal(states[0]['net']['model.enc.16x16_conv.weight'], states[1]['net']['model.enc.16x16_conv.weight'])
