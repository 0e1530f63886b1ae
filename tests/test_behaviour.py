"""Behaviour that silently changes every result when wrong, each stated independently of the code under test:
preconditioning inputs, per-seed labels, FID with non-commuting covariances, labels of subsets and mirrors,
atomic writes, and gradient accumulation."""

import json
import math
import os

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch

import fid
from training.dataset import ImageFolderDataset
from training.networks import EDMPrecond
from training.sampler import generate_images
from training.snapshot import atomic_write, newest_state
from training.phema import update_ema
from training.training_loop import ema_beta, optimizer_step, ramped_lr


def tiny_net(**kwargs) -> EDMPrecond:
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=16, img_channels=3, model_channels=8, channel_mult=[1, 2], num_blocks=1,
                     attn_resolutions=[], dropout=0, **kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # the zero-initialised output layer would hide what the inputs do
    return net


def test_inner_network_gets_c_in_times_x_and_the_raw_coordinates():
    net = tiny_net().eval()
    seen = []
    net.model.register_forward_pre_hook(lambda module, args: seen.append(args))
    g = torch.Generator().manual_seed(0)
    x, x_pos = torch.randn([2, 3, 16, 16], generator=g), torch.rand([2, 2, 16, 16], generator=g) * 2 - 1
    sigma = torch.tensor([0.2, 3.0])
    net(x, sigma, x_pos)
    inputs, noise_labels = seen[0][0], seen[0][1]
    c_in = (1 / (sigma ** 2 + 0.5 ** 2).sqrt()).reshape(-1, 1, 1, 1)  # EDM, Table 1
    assert torch.allclose(inputs[:, :3], c_in * x, rtol=1e-6, atol=0) and torch.equal(inputs[:, 3:], x_pos)
    assert torch.allclose(noise_labels, sigma.log() / 4)


class LabelRecorder(torch.nn.Module):
    """A conditional 'network' that returns zeros and records the labels of every call."""
    img_channels, img_resolution, label_dim, pos_channels, sigma_min, sigma_max = 3, 8, 5, 0, 0, float('inf')

    def __init__(self):
        super().__init__()
        self.labels = []

    def forward(self, x, sigma, class_labels=None, **kwargs):
        self.labels.append(class_labels.argmax(1))
        return torch.zeros_like(x)


def classes_of(seeds):
    net = LabelRecorder()
    generate_images(net, seeds, torch.device('cpu'), num_steps=2)
    return dict(zip(seeds, net.labels[0].tolist()))


def test_random_class_of_image_k_depends_only_on_seed_k():
    alone = {seed: classes_of([seed])[seed] for seed in range(8)}
    assert classes_of(list(range(8))) == alone and classes_of([7, 3, 5]) == {s: alone[s] for s in (7, 3, 5)}
    torch.manual_seed(123)  # the global generator plays no part
    assert classes_of([2, 6]) == {2: alone[2], 6: alone[6]}
    assert len(set(alone.values())) > 1


def test_fid_with_non_commuting_covariances():
    # 2x2 by hand: S1 S2 has trace 20 and determinant det(S1) det(S2) = 1.75 * 9 = 15.75, and for a 2x2 matrix A with
    # positive eigenvalues tr sqrt(A) = sqrt(tr A + 2 sqrt(det A)), so tr sqrt(S1 S2) = sqrt(20 + 2 sqrt(15.75)).
    s1, s2 = np.array([[2.0, 1.5], [1.5, 2.0]]), np.array([[1.0, 0.0], [0.0, 9.0]])
    assert not np.allclose(s1 @ s2, s2 @ s1)
    mu1, mu2 = np.array([0.5, -1.0]), np.array([0.0, 1.0])
    expected = 0.25 + 4 + 4 + 10 - 2 * math.sqrt(20 + 2 * math.sqrt(15.75))
    assert fid.calculate_fid(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12)
    wrong = 0.25 + 4 + 4 + 10 - 2 * np.trace(scipy.linalg.sqrtm(s1) @ scipy.linalg.sqrtm(s2)).real
    assert abs(wrong - expected) > 0.2  # the test tells sqrtm(S1) sqrtm(S2) apart from sqrtm(S1 S2)
    # 64 dimensions, random non-commuting covariances: scipy's sqrtm of the product in float64, as EDM computes it.
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=[200, 64]) @ rng.normal(size=[64, 64]), rng.normal(size=[200, 64]) * rng.uniform(0.5, 2, size=64)
    c1, c2, m1, m2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False), a.mean(0), b.mean(0)
    reference = np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
    assert fid.calculate_fid(m1, c1, m2, c2) == pytest.approx(reference, rel=1e-9)


def test_labels_follow_their_images_with_max_images_and_xflip(tmp_path):
    """Each image's pixels encode its stored label, so a label read for the wrong file shows."""
    labels = {}
    for i in range(20):
        label = (i * 7) % 5
        PIL.Image.fromarray(np.full([8, 8, 3], 40 * label + i % 2, dtype=np.uint8)).save(tmp_path / f'img{i:02d}.png')
        labels[f'img{i:02d}.png'] = label
    (tmp_path / 'dataset.json').write_text(json.dumps(dict(labels=[[name, label] for name, label in labels.items()])))
    for max_size, xflip in [(None, False), (7, False), (7, True), (None, True)]:
        dataset = ImageFolderDataset(str(tmp_path), max_size=max_size, xflip=xflip, use_labels=True, random_seed=3)
        assert len(dataset) == (max_size or 20) * (2 if xflip else 1)
        for idx in range(len(dataset)):
            image, label = dataset[idx]
            assert int(np.argmax(label)) == int(image[0, 0, 0]) // 40, (max_size, xflip, idx)


def test_atomic_write_that_fails_half_way_keeps_the_old_file(tmp_path):
    path = tmp_path / 'snapshot.pkl'
    path.write_bytes(b'old contents')

    def fails(f):
        f.write(b'half of the new')
        raise RuntimeError('disk full')
    with pytest.raises(RuntimeError, match='disk full'):
        atomic_write(str(path), fails)
    assert path.read_bytes() == b'old contents' and os.listdir(tmp_path) == ['snapshot.pkl']
    atomic_write(str(path), lambda f: f.write(b'new'))
    assert path.read_bytes() == b'new' and os.listdir(tmp_path) == ['snapshot.pkl']


def deterministic_loss(net, images, patch_size=None, labels=None, augment_pipe=None):
    """Per-pixel denoising error at a fixed sigma with noise derived from the images: no random numbers."""
    sigma = torch.full([len(images)], 0.7)
    noise = torch.sin(images * 37.0 + 1.0)
    return (net(images + 0.7 * noise, sigma, torch.zeros([len(images), 2, 16, 16])) - images).square()


@pytest.mark.parametrize('loss_norm', ['image', 'pixel'])
def test_gradient_accumulation_rounds_equal_one_round(loss_norm):
    images = torch.randn([8, 3, 16, 16], generator=torch.Generator().manual_seed(0))
    grads = {}
    for rounds in (1, 2, 4):
        net = tiny_net()
        optimizer = torch.optim.SGD(net.parameters(), lr=0)
        chunks = iter(images.chunk(rounds))
        optimizer_step(net, optimizer, deterministic_loss, lambda multiplier: (next(chunks), None), 16, 1, rounds, lr=0.0,
                       loss_norm=loss_norm)
        grads[rounds] = torch.cat([p.grad.flatten() for p in net.parameters()])
    # One round by hand: the loss summed over every pixel and divided by the number of images.
    net = tiny_net()
    deterministic_loss(net, images).sum().div(len(images)).backward()
    by_hand = torch.cat([p.grad.flatten() for p in net.parameters()])
    # The network computes in float32: summing 1, 2 or 4 rounds (or with 1 or 2 threads) moves a gradient by float32
    # rounding of the largest one, while a missing division by the rounds would move it by a factor of 2 or 4.
    tolerance = 1e-5 * by_hand.abs().max().item()
    for rounds in (1, 2, 4):
        torch.testing.assert_close(grads[rounds], by_hand, rtol=1e-4, atol=tolerance, msg=f'{rounds} rounds')


def two_steps(tmp_path, data, name, options):
    """train.py for one step, then resumed for a second (in the same run directory): the states after each."""
    import training_helpers as h
    outdir = tmp_path / name
    args = [f'--outdir={outdir}', f'--data={data}', *h.TINY, '--batch=8', '--tick=0.000001', '--snap=100', '--dump=1', '--seed=1',
            *options]
    load = lambda path: torch.load(path, map_location='cpu', weights_only=False)  # noqa: E731
    proc = h.run_train(*args, '--duration=0.000008')
    assert proc.returncode == 0, proc.stderr[-3000:]
    state_path = newest_state(h.only_run_dir(str(outdir)))
    first = load(state_path)
    proc = h.run_train(*args, f'--duration={(first["cur_nimg"] + 1) / 1e6}', f'--resume={state_path}')  # one more step
    assert proc.returncode == 0, proc.stderr[-3000:]
    return first, load(newest_state(h.only_run_dir(str(outdir))))


@pytest.mark.parametrize('case', ['rampup-binds', 'rampup-free-with-patches'])
def test_ema_and_learning_rate_follow_edms_formulas(tmp_path, case):
    """EMA: ema_2 = beta ema_1 + (1 - beta) net_2 with beta = 0.5 ** (step images / min(half-life, ratio * images so far));
    lr = base * min(1, images so far / ramp-up images). Half-life 20 images, lr ramp-up 40 images, batch 8."""
    import training_helpers as h
    data = h.make_dataset(str(tmp_path / 'data.zip'))
    ratio, options = {'rampup-binds': (0.5, ['--patch=off']), 'rampup-free-with-patches': (1000, ['--real_p=0'])}[case]
    s1, s2 = two_steps(tmp_path, data, case, ['--ema=0.00002', f'--ema-rampup={ratio}', '--lr-rampup=0.00004', '--lr=0.001', *options])
    n1, n2 = s1['cur_nimg'], s2['cur_nimg']
    assert n1 == 8 * (1 if case == 'rampup-binds' else s1['cur_nimg'] // 8) and n2 > n1
    # Step 1 starts from 0 images: lr 0 and an EMA that takes the network's weights.
    assert s1['optimizer']['param_groups'][0]['lr'] == 0
    for name, value in s1['ema'].items():
        assert torch.equal(value, s1['net'][name]), name
    assert s2['optimizer']['param_groups'][0]['lr'] == pytest.approx(0.001 * min(1, n1 / 40), rel=1e-12)
    beta = 0.5 ** ((n2 - n1) / min(20, ratio * n1))
    assert beta == pytest.approx(0.25 if case == 'rampup-binds' else 0.5 ** ((n2 - n1) / 20))  # 0.5 ** (8 / 4)
    changed = 0
    for name, value in s2['ema'].items():
        if value.is_floating_point() and name in dict(s2['net']):
            expected = beta * s1['ema'][name].double() + (1 - beta) * s2['net'][name].double()
            assert torch.allclose(value.double(), expected, rtol=1e-5, atol=1e-7), name
            changed += not torch.equal(s2['net'][name], s1['net'][name])
    assert changed > 10  # the second step moved the weights, so the check above has something to average


@pytest.mark.parametrize('cur_nimg, rampup_kimg, expected', [
    (0, 10, 0.0), (2500, 10, 0.25), (10000, 10, 1.0), (25000, 10, 1.0),  # linear in images, then flat
    (512, 0.001, 1.0), (0, 0, 0.0), (1, 0, 1.0)])                      # a ramp-up of 0 images is no ramp-up
def test_learning_rate_ramp_up_is_linear_in_images(cur_nimg, rampup_kimg, expected):
    assert ramped_lr(0.01, cur_nimg, rampup_kimg) == pytest.approx(0.01 * expected, rel=1e-12, abs=0)


@pytest.mark.parametrize('cur_nimg, expected', [
    (5000, 0.5), (60000, 1.0), (80000, 1.0),       # ramp-up over 10 kimg, flat until the last 20% of 100 kimg
    (90000, 0.5), (95000, 0.25), (99000, 0.05),    # then linear to zero: (100k - cur) / 20k
    (100000, 0.0), (104000, 0.0)])                 # past the end (a resume with a shorter --duration) stays at 0
def test_learning_rate_cools_down_linearly_to_zero(cur_nimg, expected):
    assert ramped_lr(0.01, cur_nimg, 10, total_kimg=100, cooldown=0.2) == pytest.approx(0.01 * expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize('cur_nimg, step_nimg, halflife_kimg, ratio, halflife_nimg', [
    (1000, 100, 0.5, 0.05, 50),          # ramp-up binds: half-life = 5% of the images so far
    (100000, 100, 0.5, 0.05, 500),       # it does not: 5% of 100k images exceeds 500
    (1000, 400, 0.5, None, 500),         # no ramp-up
    (1000, 400, 0.5, 0.5, 500),          # the two are equal
    (2000, 256, 10, 0.05, 100)])
def test_ema_beta_halves_the_old_weight_once_per_half_life(cur_nimg, step_nimg, halflife_kimg, ratio, halflife_nimg):
    assert ema_beta(cur_nimg, step_nimg, halflife_kimg, ratio) == pytest.approx(2 ** (-step_nimg / halflife_nimg), rel=1e-12)


def test_ema_beta_at_the_first_step_takes_the_network_weights():
    assert ema_beta(0, 64, 500, 0.05) == 0.0
    assert ema_beta(0, 64, 500, None) == pytest.approx(2 ** (-64 / 500000), rel=1e-12)


def test_update_ema_moves_each_parameter_by_one_minus_beta():
    ema, net = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    old = {name: p.detach().clone() for name, p in ema.named_parameters()}
    update_ema(ema, net, 0.75)
    for name, p in ema.named_parameters():
        torch.testing.assert_close(p, 0.75 * old[name] + 0.25 * dict(net.named_parameters())[name].detach(), rtol=1e-6, atol=0)


def _schedule_check(seed_offset_per_rank: int):
    import time
    from torch_utils import distributed, misc
    from training.patch import PatchSchedule
    distributed.init('cpu')
    rank = distributed.get_rank()
    schedule = PatchSchedule(32, seed=1 + rank * seed_offset_per_rank)
    start = time.time()
    try:
        misc.check_same_on_all_ranks(schedule.upcoming(64), 'the patch sizes of the next 64 steps')
        outcome = 'passed'
    except RuntimeError as err:
        outcome = str(err)
    seconds = time.time() - start
    torch.distributed.barrier()  # both ranks are done with the group before either tears it down
    torch.distributed.destroy_process_group()
    return outcome, seconds, schedule.upcoming(3) == [schedule.sample() for _ in range(3)]


def test_patch_sizes_that_differ_between_ranks_fail_at_once():
    from multiproc import run_ranks
    assert [r[0] for r in run_ranks(_schedule_check, 2, 0)] == ['passed', 'passed']
    results = run_ranks(_schedule_check, 2, 1)  # each rank seeds its own schedule
    for outcome, seconds, upcoming_is_next in results:
        assert 'the patch sizes of the next 64 steps differ between ranks' in outcome and seconds < 10 and upcoming_is_next


# --- optimizer_step: what a step does with its arguments, on a one-parameter model -------------------------------

class Weights(torch.nn.Module):
    """Four weights w, returned by forward(); with linear_loss the gradient of a step is exactly its coefficients."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4))
        self.calls = []

    def forward(self, images, *args, **kwargs):
        self.calls.append(dict(autocast=torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu')))
        return self.w


def linear_loss(coefficients: torch.Tensor, record: list):
    """A loss_fn whose loss is w . coefficients, split evenly over the images; it records what it was given."""
    def loss_fn(net, images, size, labels=None, augment_pipe=None):
        record.append(dict(images=images, labels=labels, augment_pipe=augment_pipe,
                           sync=getattr(net, 'require_backward_grad_sync', None)))
        return (net(images) * coefficients).sum().reshape(1, 1, 1, 1).expand(len(images), 1, 1, 1) / len(images)
    return loss_fn


def one_step(coefficients, lr=1.0, record=None, net=None, num_rounds=1, **kwargs):
    """The weights after one optimizer_step with SGD from zero."""
    net = net or Weights()
    optimizer = torch.optim.SGD(net.parameters(), lr=123.0)  # optimizer_step must replace this lr
    batch = (torch.zeros([1, 3, 4, 4]), torch.eye(3)[:1])
    optimizer_step(net, optimizer, linear_loss(torch.tensor(coefficients), [] if record is None else record),
                   lambda multiplier: batch, 4, 1, num_rounds, lr, **kwargs)
    return (net.module if hasattr(net, 'module') else net).w.detach()


def test_optimizer_step_sets_the_learning_rate_and_the_default_is_edms_image_norm():
    assert torch.equal(one_step([1.0, 2.0, -1.0, 0.5], lr=0.5), torch.tensor([-0.5, -1.0, 0.5, -0.25]))


def test_optimizer_step_replaces_nan_and_inf_gradients_as_edm_does():
    """EDM: nan -> 0, +inf -> 1e5, -inf -> -1e5, finite values untouched."""
    assert torch.equal(one_step([math.nan, math.inf, -math.inf, 2.0]), torch.tensor([0.0, -1e5, 1e5, -2.0]))


def test_optimizer_step_multiplies_the_loss_by_loss_scaling_without_a_scaler():
    assert torch.equal(one_step([1.0, 2.0, 0.0, -1.0], loss_scaling=4.0), torch.tensor([-4.0, -8.0, 0.0, 4.0]))


def test_optimizer_step_with_a_grad_scaler_unscales_before_the_update():
    scaler = torch.amp.GradScaler('cpu', init_scale=8.0)
    assert torch.equal(one_step([1.0, 2.0, 0.0, -1.0], scaler=scaler, loss_scaling=4.0), torch.tensor([-1.0, -2.0, 0.0, 1.0]))
    assert scaler.get_scale() == 8.0  # a finite step keeps the scale (growth comes after growth_interval steps)


def test_optimizer_step_passes_labels_augment_pipe_autocast_and_layout_to_the_loss():
    record, pipe, net = [], object(), Weights()
    one_step([1.0, 0, 0, 0], record=record, net=net, augment_pipe=pipe, autocast_dtype=torch.bfloat16, channels_last=True)
    call = record[0]
    assert torch.equal(call['labels'], torch.eye(3)[:1]) and call['augment_pipe'] is pipe
    assert call['images'].is_contiguous(memory_format=torch.channels_last)
    assert net.calls == [dict(autocast=torch.bfloat16)]  # the network ran under bfloat16 autocast
    one_step([1.0, 0, 0, 0], net=net)
    assert net.calls[-1] == dict(autocast=False)


def test_optimizer_step_reports_the_loss_as_loss_slash_loss(monkeypatch):
    from torch_utils import training_stats
    names = []
    monkeypatch.setattr(training_stats, 'report', lambda name, value: names.append(name))
    one_step([1.0, 0, 0, 0], num_rounds=2)
    assert names == ['Loss/loss', 'Loss/loss']


def test_optimizer_step_all_reduces_only_in_the_last_accumulation_round():
    from multiproc import free_port
    torch.distributed.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{free_port()}', rank=0, world_size=1)
    try:
        record = []
        one_step([1.0, 0, 0, 0], record=record, num_rounds=3, net=torch.nn.parallel.DistributedDataParallel(Weights()))
        assert [call['sync'] for call in record] == [False, False, True]
    finally:
        torch.distributed.destroy_process_group()
