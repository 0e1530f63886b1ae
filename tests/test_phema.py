"""Post-hoc EMA (training/phema.py, reconstruct_ema.py, train.py --phema).

1. sigma_rel <-> gamma, the inner product of two profiles against numerical integration, the least-squares solve;
2. PowerEMA's update, state and snapshot files; reconstruction of a toy trajectory against an EMA run directly;
3. train.py --phema: exact resume, 2 gloo ranks, reconstruct_ema.py end to end, and bad inputs.
"""

import math
import os

import numpy as np
import pytest
import scipy.integrate
import scipy.optimize
import torch
from click.testing import CliRunner

import reconstruct_ema
import training_helpers as h
from multiproc import run_ranks
from training import phema
from training.phema import PowerEMA, gamma_to_sigma_rel, reconstruct, sigma_rel_to_gamma, solve_coefficients
from training.snapshot import load_network, load_state

#----------------------------------------------------------------------------
# 1. The maths.


def test_sigma_rel_gamma_round_trip():
    for sigma_rel in np.geomspace(1e-4, 0.3, 60):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-12)
    for gamma in [-0.38, -0.2, 0.0, 0.5, 1.0, 3.0, 6.94, 16.97, 100.0, 1e4]:
        assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-9, abs=1e-9)


def test_known_values():
    # EDM2 quotes sigma_rel 0.05 <-> gamma 16.97 and 0.10 <-> 6.94; the formula gives:
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.9722, abs=1e-4)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.9372, abs=1e-4)
    assert gamma_to_sigma_rel(6.94) == pytest.approx(0.09997, abs=1e-5)
    assert gamma_to_sigma_rel(16.97) == pytest.approx(0.050005, abs=1e-6)
    assert gamma_to_sigma_rel(0.0) == pytest.approx(math.sqrt(1 / 12))  # a uniform average over [0, t]


def test_sigma_rel_range():
    # sigma_rel is 0 at gamma = -1, peaks at gamma = (sqrt 5 - 3) / 2 and falls back to 0: only the branch above the
    # peak is one-to-one, so sigma_rel must lie in (0, 0.30028].
    assert phema.SIGMA_REL_MAX == pytest.approx(0.3002831, abs=1e-7)
    assert gamma_to_sigma_rel(-0.999999) < 1e-3 and gamma_to_sigma_rel(-0.6) < phema.SIGMA_REL_MAX
    assert sigma_rel_to_gamma(phema.SIGMA_REL_MAX) == pytest.approx(phema.GAMMA_PEAK, abs=1e-4)
    for bad in [0.0, -0.1, 0.31, 1.0, float('nan')]:
        with pytest.raises(ValueError, match=r'sigma_rel=.* is out of range: it must be in \(0, 0.30028\]'):
            sigma_rel_to_gamma(bad)
    with pytest.raises(ValueError, match='gamma > -1'):
        gamma_to_sigma_rel(-1.0)


def _profile(t, gamma):
    return lambda tau: (gamma + 1) / t * (tau / t) ** gamma if tau <= t else 0.0  # (g+1) tau^g / t^(g+1), no overflow


@pytest.mark.parametrize('t_a,g_a,t_b,g_b', [(1.0, 6.94, 1.0, 16.97), (0.3, 6.94, 1.0, 16.97), (1.0, 16.97, 0.3, 6.94),
                                             (5e4, 2.0, 1e5, 0.5), (2e7, 100.0, 1e7, 40.0), (0.7, -0.3, 0.9, 0.0)])
def test_inner_product_against_quad(t_a, g_a, t_b, g_b):
    m = min(t_a, t_b)
    numeric = scipy.integrate.quad(lambda tau: _profile(t_a, g_a)(tau) * _profile(t_b, g_b)(tau), 0, m,
                                   epsabs=0, epsrel=1e-12, limit=200)[0]
    assert float(phema.inner_products(t_a, g_a, t_b, g_b)) == pytest.approx(numeric, rel=1e-8)
    assert float(phema.inner_products(t_b, g_b, t_a, g_a)) == pytest.approx(numeric, rel=1e-8)  # symmetric


def test_solve_is_exact_for_a_stored_profile_and_reports_a_residual_otherwise():
    gammas = [sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)]
    times = np.linspace(1e5, 1e6, 10)
    stored_t, stored_g = [t for t in times for _ in gammas], [g for _ in times for g in gammas]
    x, residual = solve_coefficients(stored_t, stored_g, 1e6, gammas[1])
    assert residual < 1e-12 and x[-1] == pytest.approx(1, abs=1e-6) and np.abs(x[:-1]).max() < 1e-6
    _, between = solve_coefficients(stored_t, stored_g, 1e6, sigma_rel_to_gamma(0.07))
    _, far = solve_coefficients(stored_t[-2:], stored_g[-2:], 1e6, sigma_rel_to_gamma(0.25))
    assert between < 1e-4 < phema.RESIDUAL_WARNING < far


# EDM2's grid: profiles 0.05 and 0.10 stored every 8 Mi images up to 128 Mi, targets 0.03..0.20 at the last one.
GRID_T = [k * 8 << 20 for k in range(1, 17)]
GRID_STORED = [(t, s) for t in GRID_T for s in (0.05, 0.10)]
GRID_TARGETS = [round(0.03 + 0.01 * i, 2) for i in range(18)]


def _gamma_by_bisection(sigma_rel):
    """gamma of a sigma_rel from its definition sqrt((g+1) / ((g+2)^2 (g+3))), decreasing for g above 0.3."""
    return scipy.optimize.brentq(lambda g: math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) - sigma_rel, 0.3, 1e6, xtol=1e-14, rtol=1e-15)


def _edm2_coefficients(stored, target_t, target_sigma_rel):
    """Written out from the EDM2 paper's appendix: for profiles p(tau) = (g+1) tau^g / t^(g+1) on [0, t], with
    t_a <= t_b, <p_a, p_b> = (g_a+1)(g_b+1) / (g_a+g_b+1) * (t_a/t_b)^g_b / t_b; solve A x = b, then x / sum(x)."""
    def dot(ta, sa, tb, sb):
        (ta, ga), (tb, gb) = sorted([(ta, _gamma_by_bisection(sa)), (tb, _gamma_by_bisection(sb))])
        return (ga + 1) * (gb + 1) / (ga + gb + 1) * (ta / tb) ** gb / tb
    A = np.array([[dot(*i, *j) for j in stored] for i in stored])
    b = np.array([dot(*i, target_t, target_sigma_rel) for i in stored])
    x = np.linalg.solve(A, b)
    return x / x.sum()


def _grid_coefficients(target_sigma_rel):
    return solve_coefficients([t for t, _ in GRID_STORED], [sigma_rel_to_gamma(s) for _, s in GRID_STORED],
                              GRID_T[-1], sigma_rel_to_gamma(target_sigma_rel))


@pytest.mark.parametrize('target', GRID_TARGETS)
def test_coefficients_sum_to_one_and_match_edm2s_solve(target):
    x, residual = _grid_coefficients(target)
    assert x.sum() == pytest.approx(1, abs=1e-12)
    np.testing.assert_allclose(x, _edm2_coefficients(GRID_STORED, GRID_T[-1], target), rtol=0, atol=1e-9 * np.abs(x).max())
    # The residual is that of the normalised x, recomputed by Gauss-Legendre quadrature between the snapshot times.
    density = lambda t, sigma_rel, tau: np.where(tau <= t, (_gamma_by_bisection(sigma_rel) + 1) / t
                                                 * (tau / t) ** _gamma_by_bisection(sigma_rel), 0.0)
    nodes, node_weights = np.polynomial.legendre.leggauss(80)
    error = norm = 0.0
    for a, b in zip([0] + GRID_T[:-1], GRID_T):
        tau, w = (a + b) / 2 + (b - a) / 2 * nodes, (b - a) / 2 * node_weights
        wanted = density(GRID_T[-1], target, tau)
        error += w @ (sum(c * density(t, s, tau) for c, (t, s) in zip(x, GRID_STORED)) - wanted) ** 2
        norm += w @ wanted ** 2
    assert residual == pytest.approx(error / norm, rel=1e-6, abs=1e-12)


EDM2_CHECKOUT = os.path.join(h.REPO, '.baselines', 'edm2')


@pytest.mark.skipif(not os.path.isfile(os.path.join(EDM2_CHECKOUT, 'training', 'phema.py')), reason='no EDM2 checkout in .baselines/edm2')
def test_coefficients_match_edm2s_own_solver():
    import json
    import subprocess
    t, s = [t for t, _ in GRID_STORED], [s for _, s in GRID_STORED]
    code = ('import json, training.phema as p; '
            f'print(json.dumps(p.solve_posthoc_coefficients({t}, {s}, {GRID_T[-1]}, {GRID_TARGETS}).tolist()))')
    proc = subprocess.run([h.PYTHON, '-c', code], cwd=EDM2_CHECKOUT, capture_output=True, text=True, timeout=120,
                          env=dict(h.subprocess_env(), PYTHONPATH=EDM2_CHECKOUT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = np.array(json.loads(proc.stdout))  # [stored, target]
    for j, target in enumerate(GRID_TARGETS):  # measured: equal to 2e-13
        np.testing.assert_allclose(_grid_coefficients(target)[0], theirs[:, j], rtol=0, atol=1e-10)


def test_halflife_to_sigma_rel_approximates_the_exponential_profile():
    h, t = 1000.0, 1e5  # weights 2^(-(t - tau) / h) on [0, t]: std h / ln 2 once t >> h
    tau = np.linspace(0, t, 2_000_001)
    w = 2.0 ** (-(t - tau) / h)
    mean = np.sum(w * tau) / np.sum(w)
    std = math.sqrt(np.sum(w * (tau - mean) ** 2) / np.sum(w))
    assert phema.halflife_to_sigma_rel(h, t) == pytest.approx(std / t, rel=1e-3)

#----------------------------------------------------------------------------
# 2. PowerEMA and reconstruction on a toy trajectory.


class Toy(torch.nn.Module):
    def __init__(self, n: int = 64):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n))
        self.register_buffer('b', torch.zeros(3))


PHASES = torch.linspace(0, 2 * math.pi, 64)


def test_update_beta_and_first_step():
    net = Toy()
    ema = PowerEMA(net, [0.1])
    gamma = ema.gammas[0]
    with torch.no_grad():
        net.w.fill_(3.0)
        net.b.fill_(5.0)
    ema.update(net, 0, 8)  # the first step: beta = 0, the profile takes the net's weights
    assert torch.equal(ema.profiles[0].w, net.w) and torch.equal(ema.profiles[0].b, net.b)
    with torch.no_grad():
        net.w.fill_(1.0)
    ema.update(net, 8, 32)  # a x4 patch step from 8 to 40 images
    beta = (1 - 32 / 40) ** (gamma + 1)
    assert ema.profiles[0].w[0].item() == pytest.approx(beta * 3 + (1 - beta), rel=1e-6)
    # Each step's weight in the profile is the integral of p over that step: here 1 - beta over [8, 40].
    assert 1 - beta == pytest.approx(1 - (8 / 40) ** (gamma + 1), rel=1e-12)


def _toy_run(tmp_path, sigma_rels, direct_sigma_rels, steps=2000, every=100):
    """PowerEMA along theta_t = sin(t / 50 + phase) with random dt in 1..4, snapshots every `every` steps."""
    net = Toy()
    stored, direct = PowerEMA(net, sigma_rels), [PowerEMA(net, [s]) for s in direct_sigma_rels]
    gen = torch.Generator().manual_seed(0)
    cur, paths = 0, []
    for step in range(steps):
        dt = int(torch.randint(1, 5, [], generator=gen))
        with torch.no_grad():
            net.w.copy_(torch.sin((cur + dt) / 50 + PHASES))
            net.b.fill_(step)
        for ema in [stored, *direct]:
            ema.update(net, cur, dt)
        cur += dt
        if (step + 1) % every == 0:
            paths.append(str(tmp_path / phema.phema_snapshot_name(cur).replace('.pt', f'-{step}.pt')))
            phema.save_phema_snapshot(paths[-1], stored, cur)
    return stored, {s: d.profiles[0].w for s, d in zip(direct_sigma_rels, direct)}, paths, cur


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    g07 = sigma_rel_to_gamma(0.07)
    wrong = [0.05, gamma_to_sigma_rel(1.2 * g07)]  # another stored length, and 0.07's gamma off by 20%
    return _toy_run(tmp_path_factory.mktemp('toy'), (0.05, 0.10), [0.07, *wrong]) + (wrong,)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


TOY_TOLERANCE = 1.5e-2  # relative L2; measured 0.49% for 0.07 from 20 snapshots of 0.05 and 0.10


def test_reconstruct_own_profile(toy):
    stored, _, paths, cur = toy[:4]
    results = reconstruct(paths, [0.05, 0.10])
    for k, result in enumerate(results):
        assert result['nimg'] == cur and result['used'] == len(paths) and result['residual'] < 1e-12
        assert _rel(result['weights']['w'], stored.profiles[k].w) < 1e-5
        assert torch.equal(result['weights']['b'], stored.profiles[k].b)  # buffers: the newest snapshot's


def test_reconstruct_unstored_sigma_rel_matches_direct_ema(toy):
    _, direct, paths, _ = toy[:4]
    result, = reconstruct(paths, [0.07])
    error = _rel(result['weights']['w'], direct[0.07])
    assert result['residual'] < 1e-4 and error < TOY_TOLERANCE
    for wrong in toy[4]:  # the same tolerance tells a wrong length apart
        assert _rel(result['weights']['w'], direct[wrong]) > 2 * TOY_TOLERANCE
    # A target time before the last snapshot uses only the snapshots up to it.
    earlier, = reconstruct(paths, [0.07], target_nimg=int(torch.load(paths[9], weights_only=True)['cur_nimg']))
    assert earlier['used'] == 10


def test_state_dict_and_snapshot_load_weights_only(toy, tmp_path):
    stored, _, paths, cur = toy[:4]
    torch.save(stored.state_dict(), tmp_path / 'state.pt')
    fresh = PowerEMA(Toy(), (0.05, 0.10))
    fresh.load_state_dict(torch.load(tmp_path / 'state.pt', weights_only=True))
    net = Toy()
    for ema in (stored, fresh):
        ema.update(net, cur, 3)
    assert all(torch.equal(a.w, b.w) for a, b in zip(stored.profiles, fresh.profiles))
    data = torch.load(paths[-1], weights_only=True)
    assert data['format'] == 'phema-1' and data['sigma_rels'] == [0.05, 0.10] and len(data['profiles']) == 2
    assert data['gammas'] == pytest.approx([16.9722, 6.9372], abs=1e-4) and isinstance(data['cur_nimg'], int)
    with pytest.raises(ValueError, match=r'profiles \[0.05, 0.1\], not \[0.05\]'):
        PowerEMA(Toy(), [0.05]).load_state_dict(stored.state_dict())

#----------------------------------------------------------------------------
# 3. Training with --phema.

COMMON = ['--patch=on', '--real_p=0.5', '--seed=7', '--dropout=0.1', '--augment=0.5', '--nosubdir', *h.TINY]


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> str:
    return h.make_dataset(str(tmp_path_factory.mktemp('data') / 'shapes-16x16.zip'), resolution=16, num=64)


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'Traceback' not in proc.stdout + proc.stderr


def _one_line_error(proc, *words):
    assert proc.returncode != 0 and 'Traceback' not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith('Error:')]
    assert len(errors) == 1 and all(w in errors[0] for w in words), proc.stderr[-2000:]
    return errors[0]


def test_resume_with_phema_is_bit_identical(data, tmp_path):
    common = [f'--data={data}', *COMMON, '--phema=0.05,0.1', '--tick=0.05', '--snap=1000', '--dump=1000']
    long_dir, short_dir = tmp_path / 'long', tmp_path / 'short'
    for proc in h.run_train_parallel([f'--outdir={long_dir}', '--duration=0.0004', *common],
                                     [f'--outdir={short_dir}', '--duration=0.0002', *common]):
        _ok(proc)
    state_path = short_dir / 'training-state-000000.pt'
    short = load_state(str(state_path))
    proc = h.run_train(f'--outdir={short_dir}', '--duration=0.0004', f'--resume={state_path}', *common)
    _ok(proc)
    resumed = load_state(str(state_path))
    long = load_state(str(long_dir / 'training-state-000000.pt'))
    assert short['cur_nimg'] < resumed['cur_nimg'] == long['cur_nimg']
    assert h.assert_states_equal(resumed, long, ['phema', 'ema', 'net', 'cur_nimg']) > 50
    assert not torch.equal(short['phema']['profiles'][0]['model.enc.16x16_conv.weight'],
                           long['phema']['profiles'][0]['model.enc.16x16_conv.weight'])
    snapshots = [torch.load(d / 'phema-snapshot-000000.pt', weights_only=True) for d in (short_dir, long_dir)]
    assert snapshots[0]['cur_nimg'] == long['cur_nimg']
    assert h.assert_states_equal(*snapshots, ['profiles', 'cur_nimg', 'gammas', 'sigma_rels']) > 50
    # The two profiles differ from each other and from the classic EMA.
    p0, p1 = (long['phema']['profiles'][k]['model.enc.16x16_conv.weight'] for k in (0, 1))
    assert not torch.equal(p0, p1) and not torch.equal(p0, long['ema']['model.enc.16x16_conv.weight'])

    # Resuming a state trained without --phema, or with other profiles, is refused in one line.
    plain = tmp_path / 'plain'
    _ok(h.run_train(f'--outdir={plain}', '--duration=0.00001', f'--data={data}', *COMMON))
    proc = h.run_train(f'--outdir={plain}', '--duration=0.0002', '--resume=auto', f'--data={data}', *COMMON, '--phema=0.1')
    _one_line_error(proc, '--phema', 'trained without --phema')
    proc = h.run_train(f'--outdir={short_dir}', '--duration=0.0006', f'--resume={state_path}', *common[:-4], '--phema=0.1')
    _one_line_error(proc, '--phema', 'not [0.1]', 'same --phema')


def test_train_rejects_bad_phema(data, tmp_path):
    proc = h.run_train(f'--outdir={tmp_path}', f'--data={data}', *h.TINY, '--phema=0.05,0.5', '--dry-run')
    _one_line_error(proc, '--phema', 'sigma_rel=0.5 is out of range')
    proc = h.run_train(f'--outdir={tmp_path}', f'--data={data}', *h.TINY, '--phema=0.05,abc', '--dry-run')
    _one_line_error(proc, '--phema', 'not a comma-separated list')


def _ddp_phema(run_dir: str, data: str):
    """On each of 2 gloo ranks: PowerEMA next to DDP on different data, then a short training_loop with phema."""
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch_utils import distributed, misc
    from training.training_loop import training_loop
    distributed.init('cpu')
    rank = distributed.get_rank()
    torch.manual_seed(rank)  # different initial weights and data per rank; DDP broadcasts rank 0's weights
    net = torch.nn.Linear(4, 3)
    ema = PowerEMA(net, [0.05, 0.1])
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    ema.reset(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(20):
        optimizer.zero_grad()
        ddp(torch.randn(8, 4)).square().mean().backward()
        optimizer.step()
        ema.update(net, step * 16, 16)
    for profile in ema.profiles:
        misc.check_ddp_consistency(profile)
    profiles = [{k: v.clone() for k, v in p.state_dict().items()} for p in ema.profiles]
    with torch.no_grad():
        ema.profiles[1].bias[0] += rank  # the check notices a profile that drifted on one rank (the last tensor it checks,
        # so that rank 0 is not left waiting in a broadcast that rank 1 skipped)
    try:
        misc.check_ddp_consistency(ema.profiles[1])
        mismatch = None
    except RuntimeError as err:
        mismatch = str(err)
    training_loop(  # the phema snapshot checks every profile against rank 0's before writing
        run_dir=run_dir, dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=data),
        data_loader_kwargs=dict(num_workers=0), network_kwargs=h.tiny_songunet_kwargs(),
        loss_kwargs=dict(class_name='training.loss.PatchEDMLoss'),
        optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=2e-3, betas=[0.9, 0.999], eps=1e-8),
        patch_kwargs=dict(real_p=0.5), seed=3, batch_size=8, total_kimg=0.1, kimg_per_tick=0.05,
        lr_rampup_kimg=0, snapshot_ticks=None, state_dump_ticks=1000, phema_sigma_rels=[0.05, 0.1],
        phema_snapshot_ticks=1, device=torch.device('cpu'))
    dist.barrier()
    dist.destroy_process_group()
    return dict(rank=rank, profiles=profiles, mismatch=mismatch)


def test_two_ranks_keep_identical_profiles(data, tmp_path):
    results = run_ranks(_ddp_phema, 2, str(tmp_path), data)
    for k in range(2):
        for name, tensor in results[0]['profiles'][k].items():
            assert torch.equal(tensor, results[1]['profiles'][k][name]), name
    assert results[0]['mismatch'] is None and 'bias differs between rank 1 and rank 0' in results[1]['mismatch']
    snap = torch.load(tmp_path / 'phema-snapshot-000000.pt', weights_only=True)
    state = load_state(str(tmp_path / 'training-state-000000.pt'))
    assert snap['cur_nimg'] == state['cur_nimg'] >= 100
    assert h.assert_states_equal(dict(p=snap['profiles']), dict(p=state['phema']['profiles']), ['p']) > 50


@pytest.fixture(scope='module')
def phema_run(data, tmp_path_factory) -> str:
    """A tiny run with --phema and three phema snapshots (at about 0.5, 1.5 and 2.5 kimg)."""
    run_dir = str(tmp_path_factory.mktemp('phema-run'))
    _ok(h.run_train(f'--outdir={run_dir}', f'--data={data}', *COMMON, '--duration=0.0025', '--tick=0.5', '--snap=2',
                    '--phema=0.05,0.1', '--phema-snap=1'))
    return run_dir


def _cli(*args):
    return CliRunner().invoke(reconstruct_ema.main, [str(a) for a in args])


def test_reconstruct_ema_end_to_end(phema_run, tmp_path):
    from training.sampler import generate_images
    newest = sorted(n for n in os.listdir(phema_run) if n.startswith('phema-snapshot-'))[-1]
    stored = torch.load(os.path.join(phema_run, newest), weights_only=True)
    kimg = stored['cur_nimg'] // 1000
    result = _cli(f'--run={phema_run}', '--sigma-rel=0.05,0.07', '--halflife-kimg=0.1')
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith('sigma_rel')]
    assert len(lines) == 3 and 'snapshots used 3' in lines[0] and 'gamma 16.972' in lines[0]
    # A stored length: 0 up to the rounding of float64 terms of size 1 that cancel (~1e-16, and its last bits depend on
    # the machine's LAPACK), where an unstored length such as 0.07 leaves 2e-3.
    assert float(lines[0].split('relative residual')[1].split()[0]) < 1e-12
    net = load_network(os.path.join(phema_run, f'network-snapshot-{kimg:06d}-phema-0.05.pkl'))
    weights = load_network(os.path.join(phema_run, f'network-snapshot-{kimg:06d}-phema-0.05.pt')).state_dict()
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, weights[name])
        if tensor.is_floating_point():
            assert _rel(tensor, stored['profiles'][0][name]) < 1e-5, name
    assert os.path.isfile(os.path.join(phema_run, f'network-snapshot-{kimg:06d}-phema-halflife-0.1kimg.pkl'))
    images = generate_images(load_network(os.path.join(phema_run, f'network-snapshot-{kimg:06d}-phema-0.07.pkl')),
                             seeds=[0, 1], device=torch.device('cpu'), num_steps=3)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.uint8
    # The new names do not confuse the loader's choice of the newest snapshot of a run directory.
    plain = load_network(os.path.join(phema_run, f'network-snapshot-{kimg:06d}.pkl'))
    assert all(torch.equal(a, b) for a, b in zip(load_network(phema_run).state_dict().values(), plain.state_dict().values()))

    # --outdir, --at-kimg (the second phema snapshot is at 1520 images), and a too-long target's warning.
    result = _cli(f'--run={phema_run}', '--sigma-rel=0.25', '--at-kimg=1.52', f'--outdir={tmp_path / "out"}')
    assert result.exit_code == 0, result.output
    assert 'snapshots used 2' in result.output and 'Warning: sigma_rel 0.25: relative residual' in result.output
    assert os.listdir(tmp_path / 'out') and all('-000001-phema-0.25.' in n for n in os.listdir(tmp_path / 'out'))


def _cli_error(*args):
    result = _cli(*args)
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    errors = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert len(errors) == 1 and 'Traceback' not in result.output, result.output
    return errors[0]


def test_reconstruct_ema_bad_input(phema_run, data, tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert 'trained without --phema?' in _cli_error(f'--run={empty}', '--sigma-rel=0.1')
    assert 'no such directory' in _cli_error(f'--run={tmp_path / "missing"}', '--sigma-rel=0.1')
    assert 'sigma_rel=0.4 is out of range' in _cli_error(f'--run={phema_run}', '--sigma-rel=0.1,0.4')
    assert 'not a comma-separated list' in _cli_error(f'--run={phema_run}', '--sigma-rel=x')
    assert 'give --sigma-rel' in _cli_error(f'--run={phema_run}')
    assert 'after the newest phema snapshot' in _cli_error(f'--run={phema_run}', '--sigma-rel=0.1', '--at-kimg=50')
    assert 'halflife-100kimg' in _cli_error(f'--run={phema_run}', '--halflife-kimg=100')  # longer than any profile
    plain = tmp_path / 'plain'
    _ok(h.run_train(f'--outdir={plain}', f'--data={data}', *COMMON, '--duration=0.00001'))
    assert 'trained without --phema?' in _cli_error(f'--run={plain}', '--sigma-rel=0.1')
    only_phema = tmp_path / 'only-phema'
    only_phema.mkdir()
    newest = sorted(n for n in os.listdir(phema_run) if n.startswith('phema-snapshot-'))[-1]
    os.link(os.path.join(phema_run, newest), only_phema / newest)
    assert 'no network-snapshot-*.pkl' in _cli_error(f'--run={only_phema}', '--sigma-rel=0.1')
    os.link(os.path.join(plain, 'network-snapshot-000000.pkl'), only_phema / 'network-snapshot-000000.pkl')
    (only_phema / 'phema-snapshot-000009.pt').write_bytes(b'garbage')
    assert 'not a phema snapshot' in _cli_error(f'--run={only_phema}', '--sigma-rel=0.1')
