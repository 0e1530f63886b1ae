"""End-to-end tests of train.py and training/training_loop.py on the CPU, at 16x16 with tiny networks.

1. every architecture with patches on and off trains, writes its run directory and snapshots that a fresh
   process loads (.pkl through load_network, .pt with weights_only=True) and runs;
2. N steps + resume for N more is bit-identical to 2N uninterrupted steps;
3. SIGTERM ends a run cleanly with a state file, and --resume=auto continues it;
4. 2-process DDP (gloo): same weights and patch sizes on both ranks, disjoint data, loss averaged over ranks;
5. bad inputs end with a one-line error and no traceback.
"""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import PIL.Image
import pytest
import torch

from multiproc import run_ranks
from training.patch import PatchSchedule
from training.snapshot import newest_state
import training_helpers as h

RES = 16


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> str:
    """64 demo:shapes images at 16x16."""
    return h.make_dataset(str(tmp_path_factory.mktemp('data') / 'shapes-16x16.zip'), resolution=RES, num=64)


def read_stats(run_dir: str) -> list:
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        return [json.loads(line) for line in f if line.strip()]


def replay_sizes(seed: int, total_nimg: int, batch: int = 8, real_p: float = 0.5) -> tuple:
    """(sizes, cur_nimg at the end) of the steps a stochastic run with this seed takes until total_nimg."""
    schedule = PatchSchedule(RES, real_p=real_p, seed=seed)
    sizes, nimg = [], 0
    while nimg < total_nimg:
        sizes.append(schedule.sample())
        nimg += batch * schedule.batch_multiplier(sizes[-1])
    return sizes, nimg


def assert_clean_exit(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f'exit code {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    assert 'Traceback' not in proc.stdout + proc.stderr, proc.stderr[-3000:]

#----------------------------------------------------------------------------
# 1. Every architecture, patches on and off: run directory and snapshots that a fresh process can use.

ARCH_OPTIONS = {
    'ddpmpp': ['--arch=ddpmpp'],
    'ncsnpp': ['--arch=ncsnpp'],
    'adm': ['--arch=adm', '--cbase=32'],  # ADM's attention needs 64 channels per head: 32 * 2 at 8x8
}

LOAD_SCRIPT = textwrap.dedent('''
    import json, pickle, sys, torch
    import dnnlib
    from training.snapshot import load_network
    from training.patch import coordinate_grid
    res = int(sys.argv[1])
    for pkl, pt, patch in zip(sys.argv[2::3], sys.argv[3::3], sys.argv[4::3]):
        patch = patch == 'on'
        net = load_network(pkl)
        weights = torch.load(pt, weights_only=True)
        net_pt = dnnlib.construct_class_by_name(class_name=weights['class_name'], **weights['init_kwargs'])
        net_pt.load_state_dict(weights['state_dict'])
        net_pt.eval()
        net_pt2 = load_network(pt)
        size = res // 2 if patch else res
        torch.manual_seed(0)
        x = torch.randn([2, net.img_channels, size, size])
        sigma = torch.tensor([0.5, 2.0])
        x_pos = coordinate_grid(res, size, top=3, left=5).expand(2, -1, -1, -1) if patch else None
        with torch.no_grad():
            outs = [n(x, sigma, x_pos=x_pos) for n in (net, net_pt, net_pt2)]
        with open(pkl, 'rb') as f:
            keys = sorted(pickle.load(f).keys())
        print(json.dumps(dict(
            module=type(net).__module__, cls=type(net).__name__, cls_pt=type(net_pt).__name__,
            pos_channels=net.pos_channels, shape=list(outs[0].shape), finite=bool(outs[0].isfinite().all()),
            same=all(torch.equal(outs[0], o) for o in outs[1:]), pkl_keys=keys,
            training=net.training, grad=any(p.requires_grad for p in net.parameters()))))
''')


def check_run_dir(run_dir: str, arch: str, patch: str) -> None:
    """The files of a finished run of test_architectures_train_and_snapshots_load_in_fresh_process."""
    assert os.path.basename(run_dir).startswith(f'00000-shapes-16x16-uncond-{arch}-edm-{"patch0.5" if patch == "on" else "full"}')
    files = os.listdir(run_dir)
    for name in ('training_options.json', 'log.txt', 'stats.jsonl', 'network-snapshot-000000.pkl',
                 'network-snapshot-000000.pt', 'training-state-000000.pt'):
        assert name in files, files
    assert not [f for f in files if f.endswith('.tmp')], files  # atomic writes leave no temporaries

    with open(os.path.join(run_dir, 'training_options.json')) as f:
        options = json.load(f)
    assert options['network_kwargs']['model_type'] == ('DhariwalUNet' if arch == 'adm' else 'SongUNet')
    assert options['network_kwargs']['pos_channels'] == (2 if patch == 'on' else 0)
    assert options['loss_kwargs']['class_name'] == ('training.loss.PatchEDMLoss' if patch == 'on' else 'training.loss.EDMLoss')
    assert (options['patch_kwargs'] is None) == (patch == 'off')
    assert options['seed'] == 1 and options['batch_size'] == 8

    with open(os.path.join(run_dir, 'log.txt')) as f:
        log = f.read()
    assert 'tick 0 ' in log and 'Exiting...' in log
    stats = read_stats(run_dir)
    assert len(stats) >= 2  # 60 images at 8 (or more) per step and 20 per tick
    for record in stats:
        loss = record['Loss/loss']
        assert loss['num'] > 0 and math.isfinite(loss['mean']) and loss['mean'] > 0
        assert record['progress']['kimg'] > 0
    if patch == 'off':
        assert {record['Patch/size']['mean'] for record in stats} == {float(RES)}
    state = torch.load(os.path.join(run_dir, 'training-state-000000.pt'), map_location='cpu', weights_only=False)
    assert state['cur_nimg'] >= 60 and state['seed'] == 1 and (state['schedule'] is None) == (patch == 'off')


@pytest.mark.parametrize('arch', list(ARCH_OPTIONS))
def test_architectures_train_and_snapshots_load_in_fresh_process(data, tmp_path, arch):
    patches = ['on', 'off']
    procs = h.run_train_parallel(*[[f'--outdir={tmp_path / patch}', f'--data={data}', *h.TINY, *ARCH_OPTIONS[arch],
                                    f'--patch={patch}', '--seed=1', '--duration=0.00006', '--tick=0.02', '--snap=1',
                                    '--dump=1'] for patch in patches])
    load_args = []
    for patch, proc in zip(patches, procs):
        assert_clean_exit(proc)
        run_dir = h.only_run_dir(str(tmp_path / patch))
        check_run_dir(run_dir, arch, patch)
        load_args += [os.path.join(run_dir, 'network-snapshot-000000.pkl'),
                      os.path.join(run_dir, 'network-snapshot-000000.pt'), patch]

    # A fresh process (nothing of the training process in memory) loads both snapshots and runs them.
    proc = subprocess.run([sys.executable, '-c', LOAD_SCRIPT, str(RES), *load_args], cwd=str(tmp_path),
                          env=h.subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.strip().splitlines()[-2:]]
    for patch, result in zip(patches, results):
        size = RES // 2 if patch == 'on' else RES
        assert result['module'] == 'training.networks'  # built from this project's code: no code stored in the pickle ran
        assert result['cls'] == result['cls_pt'] == 'EDMPrecond'
        assert result['pos_channels'] == (2 if patch == 'on' else 0)
        assert result['shape'][0] == 2 and result['shape'][2:] == [size, size] and result['shape'][1] >= 3
        assert result['finite'] and result['same']  # .pkl and .pt hold the same network
        assert result['pkl_keys'] == ['augment_pipe', 'dataset_kwargs', 'ema', 'loss_fn', 'training_options']
        assert result['training'] is False and result['grad'] is False

    # generate.py, as a user runs it, makes a grid from the freshly trained run directory.
    if arch == 'ddpmpp':
        grid = tmp_path / 'grid.png'
        proc = subprocess.run([sys.executable, os.path.join(h.REPO, 'generate.py'), f'--network={h.only_run_dir(str(tmp_path / "on"))}',
                               '--seeds=0-3', '--steps=3', '--device=cpu', f'--grid={grid}'], cwd=str(tmp_path),
                              env=h.subprocess_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert PIL.Image.open(grid).size == (2 * 128 + 3 * 2, 2 * 128 + 3 * 2)  # 2x2 samples, each shown 128 px wide, 2-pixel borders


#----------------------------------------------------------------------------
# 2. Exact resume.

def test_resume_is_bit_identical_to_uninterrupted_run(data, tmp_path):
    # Patches on with real_p=0.5 (sizes 16, 8, 4 take 8, 16, 32 images), dropout and augmentation on, so the
    # data order, the patch schedule, the crop positions, noise, dropout and augmentation RNGs must all resume.
    common = [f'--data={data}', *h.TINY, '--patch=on', '--real_p=0.5', '--seed=7', '--dropout=0.1', '--augment=0.5',
              '--tick=0.05', '--snap=1000', '--dump=1000', '--nosubdir']
    short_nimg, long_nimg = 200, 400
    long_dir, short_dir = tmp_path / 'long', tmp_path / 'short'

    for proc in h.run_train_parallel([f'--outdir={long_dir}', f'--duration={long_nimg / 1e6}', *common],
                                     [f'--outdir={short_dir}', f'--duration={short_nimg / 1e6}', *common]):
        assert_clean_exit(proc)
    state_path = short_dir / 'training-state-000000.pt'
    short = torch.load(state_path, map_location='cpu', weights_only=False)
    long = torch.load(long_dir / 'training-state-000000.pt', map_location='cpu', weights_only=False)

    # cur_nimg counts images times the batch multiplier; the short run stopped where the long run passed.
    short_sizes, expected_short = replay_sizes(7, short_nimg)
    long_sizes, expected_long = replay_sizes(7, long_nimg)
    assert short_sizes == long_sizes[:len(short_sizes)]
    assert short['cur_nimg'] == expected_short and long['cur_nimg'] == expected_long
    assert len(set(short_sizes)) >= 2 and len(set(long_sizes[len(short_sizes):])) >= 2
    assert len(long_sizes) - len(short_sizes) >= 5  # the resumed part is a real stretch of training
    assert not torch.equal(short['net']['model.enc.16x16_conv.weight'], long['net']['model.enc.16x16_conv.weight'])

    proc = h.run_train(f'--outdir={short_dir}', f'--duration={long_nimg / 1e6}', f'--resume={state_path}', *common)
    assert_clean_exit(proc)
    assert f'Resuming from "{state_path}"' in proc.stdout
    resumed = torch.load(state_path, map_location='cpu', weights_only=False)
    assert resumed['cur_nimg'] == long['cur_nimg'] and resumed['consumed'] == long['consumed']
    compared = h.assert_states_equal(resumed, long, ['net', 'ema', 'optimizer', 'rng', 'schedule', 'cur_nimg',
                                                     'consumed', 'seed'])
    assert compared > 50
    assert resumed['optimizer']['state'] and all(int(s['step']) == len(long_sizes) for s in resumed['optimizer']['state'].values())

    # The stats of the resumed run continue the kimg count.
    stats = read_stats(str(short_dir))
    kimgs = [record['progress']['kimg'] for record in stats]
    assert kimgs == sorted(kimgs) and kimgs[-1] == long['cur_nimg'] / 1e3

#----------------------------------------------------------------------------
# 3. SIGTERM and --resume=auto.

def _wait_for_stats(run_parent: str, min_lines: int, proc: subprocess.Popen, timeout: float = 120) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f'train.py exited early with {proc.returncode}'
        dirs = [os.path.join(run_parent, n) for n in os.listdir(run_parent)] if os.path.isdir(run_parent) else []
        for d in dirs:
            path = os.path.join(d, 'stats.jsonl')
            if os.path.isfile(path):
                with open(path) as f:
                    if sum(1 for line in f if line.endswith('\n')) >= min_lines:
                        return d
        time.sleep(0.2)
    raise AssertionError(f'no {min_lines} lines in stats.jsonl after {timeout} s')


def _terminate_and_wait(proc: subprocess.Popen, log_path: str) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    with open(log_path) as f:
        output = f.read()
    assert proc.returncode == 0, output[-3000:]
    assert 'Traceback' not in output
    return output


def test_sigterm_saves_state_and_resume_auto_continues(data, tmp_path):
    outdir = str(tmp_path / 'runs')
    args = h.train_cmd(f'--outdir={outdir}', f'--data={data}', *h.TINY, '--seed=3', '--duration=1000', '--tick=0.02',
                       '--snap=1000', '--dump=1000')
    first_log = str(tmp_path / 'first.out')
    with open(first_log, 'w') as out:
        proc = subprocess.Popen(args, cwd=h.REPO, env=h.subprocess_env(), stdout=out, stderr=subprocess.STDOUT)
        run_dir = _wait_for_stats(outdir, 2, proc)
        output = _terminate_and_wait(proc, first_log)
    assert 'Stopped on a signal; state saved.' in output
    state_path = newest_state(run_dir)
    assert state_path is not None
    first = torch.load(state_path, map_location='cpu', weights_only=False)
    first_stats = read_stats(run_dir)
    assert first['cur_nimg'] == round(first_stats[-1]['progress']['kimg'] * 1000) > 0

    second_log = str(tmp_path / 'second.out')
    with open(second_log, 'w') as out:
        proc = subprocess.Popen(args + ['--resume=auto'], cwd=h.REPO, env=h.subprocess_env(), stdout=out,
                                stderr=subprocess.STDOUT)
        assert _wait_for_stats(outdir, len(first_stats) + 2, proc) == run_dir  # the same run directory
        output = _terminate_and_wait(proc, second_log)
    assert f'Resuming from "{state_path}"' in output
    assert os.listdir(outdir) == [os.path.basename(run_dir)]
    second = torch.load(newest_state(run_dir), map_location='cpu', weights_only=False)
    assert second['cur_nimg'] > first['cur_nimg'] and second['cur_tick'] > first['cur_tick']
    kimgs = [record['progress']['kimg'] for record in read_stats(run_dir)]
    assert kimgs == sorted(kimgs) and kimgs[len(first_stats)] > kimgs[len(first_stats) - 1]
    with open(os.path.join(run_dir, 'log.txt')) as f:
        log = f.read()
    assert log.count('Stopped on a signal; state saved.') == 2 and 'Resuming from' in log

#----------------------------------------------------------------------------
# 4. Two processes with gloo.

def test_ddp_two_ranks(data, tmp_path):
    seed, batch_gpu = 5, 2  # batch 8 over 2 ranks = 4 per rank = 2 accumulation rounds of 2
    run_dir = str(tmp_path)
    # ema_rampup_ratio=None: the EMA is not overwritten by the first step, so it must start equal on all ranks
    # (the snapshot's check_ddp_consistency(ema) raises otherwise).
    results = run_ranks(h.ddp_train, 2, run_dir, data, seed, 0.2, 0.05, None, batch_gpu)
    r0, r1 = results
    assert (r0['rank'], r1['rank']) == (0, 1)

    # Same weights on both ranks, and the same as rank 0's final state file.
    assert r0['params'].keys() == r1['params'].keys()
    for name in r0['params']:
        assert torch.equal(r0['params'][name], r1['params'][name]), name
    state = torch.load(os.path.join(run_dir, 'training-state-000000.pt'), map_location='cpu', weights_only=False)
    for name, value in state['net'].items():
        assert torch.equal(value, r0['params'][name]), name
    assert len(state['rng']) == 2 and not torch.equal(state['rng'][0]['torch'], state['rng'][1]['torch'])

    # Same patch sizes on both ranks, as PatchSchedule(seed) draws them; every round takes its share of images.
    sizes = [c['size'] for c in r0['calls']]
    assert sizes == [c['size'] for c in r1['calls']]
    step_sizes, total = replay_sizes(seed, 200)
    assert sizes == [s for s in step_sizes for _ in range(2)]
    assert len(set(step_sizes)) >= 2 and state['cur_nimg'] == total
    multiplier = {RES: 1, RES // 2: 2, RES // 4: 4}
    for c in r0['calls'] + r1['calls']:
        assert c['images'] == batch_gpu * multiplier[c['size']]

    # Disjoint data within every epoch: 64 images, 32 per rank per epoch.
    served0, served1 = r0['served'], r1['served']
    assert len(served0) == len(served1) == state['consumed'] >= 64
    for epoch in range(len(served0) // 32):
        part0, part1 = served0[epoch * 32:(epoch + 1) * 32], served1[epoch * 32:(epoch + 1) * 32]
        assert len(set(part0)) == len(set(part1)) == 32
        assert not set(part0) & set(part1) and set(part0) | set(part1) == set(range(64))

    # The logged loss of every tick is the mean over both ranks' loss elements of that tick.
    stats = read_stats(run_dir)
    assert len(stats) >= 2
    calls = list(zip(r0['calls'], r1['calls']))
    i = 0
    for record in stats:
        count = 0
        sums = [0.0, 0.0]
        while count < record['Loss/loss']['num']:
            c0, c1 = calls[i]
            assert c0['count'] == c1['count']
            count += c0['count'] + c1['count']
            sums[0] += c0['sum']
            sums[1] += c1['sum']
            i += 1
        assert count == record['Loss/loss']['num']
        rank_means = [s / (count / 2) for s in sums]
        assert record['Loss/loss']['mean'] == pytest.approx(sum(rank_means) / 2, rel=1e-9, abs=0)
        assert rank_means[0] != rank_means[1]  # the ranks really saw different data
    assert i == len(calls)

def test_torchrun_train_py_two_processes(data, tmp_path):
    # train.py itself under torchrun, without --seed: rank 0 draws the seed and the run directory and broadcasts
    # them. One step per tick, so each stats line holds one step: both ranks report the same patch size.
    outdir = tmp_path / 'runs'
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           os.path.join(h.REPO, 'train.py'), f'--outdir={outdir}', f'--data={data}', *h.TINY,
                           '--duration=0.0001', '--tick=0.001'],
                          cwd=h.REPO, env=h.subprocess_env(), capture_output=True, text=True, timeout=240)
    assert_clean_exit(proc)
    run_dir = h.only_run_dir(str(outdir))
    assert '-gpus2-batch8-' in os.path.basename(run_dir)
    with open(os.path.join(run_dir, 'training_options.json')) as f:
        seed = json.load(f)['seed']
    state = torch.load(os.path.join(run_dir, 'training-state-000000.pt'), map_location='cpu', weights_only=False)
    assert state['seed'] == seed and len(state['rng']) == 2
    stats = read_stats(run_dir)
    step_sizes, total = replay_sizes(seed, 100)
    assert state['cur_nimg'] == total and len(stats) == len(step_sizes)
    for record, size in zip(stats, step_sizes):
        assert record['Patch/size'] == dict(num=2, mean=float(size), std=0.0)
        multiplier = RES // size if size < RES else 1  # sizes 16, 8, 4 take 1, 2, 4 times the batch of 8
        assert record['Loss/loss']['num'] == 8 * multiplier * 3 * size * size


#----------------------------------------------------------------------------
# 5. Bad inputs: one-line errors, no traceback.

def _bad(tmp_path, *args) -> tuple:
    proc = h.run_train(*args, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert 'Traceback' not in output, output[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith('Error:')]
    assert len(errors) == 1, proc.stderr
    return errors[0], proc


def test_error_missing_data_option(tmp_path):
    error, _ = _bad(tmp_path, f'--outdir={tmp_path}/runs', *h.TINY)
    assert "Missing option '--data'" in error
    assert not os.path.exists(tmp_path / 'runs')


def test_error_data_path_missing(tmp_path):
    missing = str(tmp_path / 'nope.zip')
    error, _ = _bad(tmp_path, f'--outdir={tmp_path}/runs', f'--data={missing}', *h.TINY)
    assert '--data' in error and missing in error and 'no such' in error
    assert not os.path.exists(tmp_path / 'runs')


def test_error_resolution_network_cannot_take(data, tmp_path):
    # 16x16 with three downsamplings: inputs must be multiples of 8, but the smallest patch is 16 // 4 = 4.
    error, _ = _bad(tmp_path, f'--outdir={tmp_path}/runs', f'--data={data}', *h.TINY, '--cres=1,2,2,2')
    assert data in error and 'patch size 4' in error and 'multiple of 8' in error
    assert not os.path.exists(tmp_path / 'runs')


def test_error_real_p_out_of_range(data, tmp_path):
    error, _ = _bad(tmp_path, f'--outdir={tmp_path}/runs', f'--data={data}', *h.TINY, '--real_p=1.5')
    assert '--real_p' in error and '1.5' in error


def test_error_batch_does_not_split(data, tmp_path):
    error, _ = _bad(tmp_path, f'--outdir={tmp_path}/runs', f'--data={data}', *h.TINY, '--batch=10', '--batch-gpu=4')
    assert '--batch=10' in error and '--batch-gpu=4' in error
    assert not os.path.exists(tmp_path / 'runs')


def test_error_unknown_preset(data, tmp_path):
    error, _ = _bad(tmp_path, f'--outdir={tmp_path}/runs', f'--data={data}', '--preset=nope')
    assert 'nope' in error and 'preset' in error and 'demo' in error  # names the ones there are


@pytest.fixture(scope='module')
def one_step_run(data, tmp_path_factory) -> str:
    """Run directory of a one-step training run (a real state file and snapshot to break)."""
    run_dir = str(tmp_path_factory.mktemp('one-step'))
    assert_clean_exit(h.run_train(f'--outdir={run_dir}', f'--data={data}', *h.TINY, '--seed=0', '--duration=0.000001',
                                  '--nosubdir'))
    return run_dir


@pytest.mark.parametrize('kind', ['truncated', 'garbage', 'not-a-state'])
def test_error_bad_state_file(data, tmp_path, one_step_run, kind):
    with open(os.path.join(one_step_run, 'training-state-000000.pt'), 'rb') as f:
        good = f.read()
    bad = tmp_path / 'bad' / 'training-state-000000.pt'
    bad.parent.mkdir()
    if kind == 'truncated':
        bad.write_bytes(good[:len(good) // 2])
    elif kind == 'garbage':
        bad.write_bytes(b'this is not a state file\n')
    else:
        with open(os.path.join(one_step_run, 'network-snapshot-000000.pt'), 'rb') as f:
            bad.write_bytes(f.read())  # a valid torch file, but a network snapshot
    error, _ = _bad(tmp_path, f'--outdir={tmp_path}/runs', f'--data={data}', *h.TINY, f'--resume={bad}')
    assert str(bad) in error
    if kind == 'not-a-state':
        assert 'not a training-state file' in error
    else:
        assert 'corrupt or truncated' in error


def test_resume_past_duration_with_progressive_schedule(data, tmp_path, one_step_run):
    # The state has 8 images; resuming with a 1-image duration and the progressive schedule (which needs progress
    # in [0, 1]) must finish cleanly rather than fail on progress = 8 / 1.
    state_path = tmp_path / 'training-state-000000.pt'
    with open(os.path.join(one_step_run, 'training-state-000000.pt'), 'rb') as f:
        state_path.write_bytes(f.read())
    proc = h.run_train(f'--outdir={tmp_path}', f'--data={data}', *h.TINY, '--progressive=True',
                       '--duration=0.000001', f'--resume={state_path}')
    assert_clean_exit(proc)
    assert torch.load(state_path, map_location='cpu', weights_only=False)['cur_nimg'] > 8


def test_error_resume_path_missing(data, tmp_path):
    error, _ = _bad(tmp_path, f'--outdir={tmp_path}/runs', f'--data={data}', *h.TINY, f'--resume={tmp_path}/none.pt')
    assert '--resume' in error and 'none.pt' in error


def test_dry_run_prints_options_and_writes_nothing(data, tmp_path):
    outdir = tmp_path / 'runs'
    proc = h.run_train(f'--outdir={outdir}', f'--data={data}', '--preset=demo', '--batch=16', '--dry-run', timeout=120)
    assert_clean_exit(proc)
    assert 'Dry run; exiting.' in proc.stdout
    printed = json.loads(proc.stdout[proc.stdout.index('{'):proc.stdout.rindex('}') + 1])
    assert printed['batch_size'] == 16                                # the flag overrides the preset
    assert printed['network_kwargs']['model_channels'] == 32          # from configs/demo.json
    assert printed['run_dir'] == os.path.join(str(outdir), '00000-shapes-16x16-uncond-ddpmpp-edm-patch0.5-gpus1-batch16-fp32')
    assert printed['resume_state'] is None
    assert os.listdir(tmp_path) == []


def test_lr_cooldown_reaches_the_optimizer(data, tmp_path):
    # Full-image steps of 8 images: 50 steps to 400 images, the last taken at 392. With the last half cooling
    # down, that step's lr is 1e-3 * (400 - 392) / 200, and the tick averages fall with the schedule.
    run_dir = tmp_path / 'run'
    assert_clean_exit(h.run_train(f'--outdir={run_dir}', f'--data={data}', *h.TINY, '--patch=off', '--lr=1e-3',
                                  '--lr-cooldown=0.5', '--duration=0.0004', '--tick=0.1', '--seed=0', '--nosubdir'))
    state = torch.load(run_dir / 'training-state-000000.pt', map_location='cpu', weights_only=False)
    assert state['cur_nimg'] == 400
    assert [group['lr'] for group in state['optimizer']['param_groups']] == [pytest.approx(1e-3 * 8 / 200, rel=1e-9)]
    # The first tick ends after the step that passes 100 images: steps at 0, 8, ..., 96, the first at lr 0 (a
    # ramp-up of 0 images still starts from 0, as in EDM). Each tick then starts where the last one passed its
    # 100 images (104, 208, 312), so the last tick's steps at 312..392 average 1e-3 * mean(88, 80, ..., 8) / 200.
    # The stats are float32 averages.
    lrs = [record['Progress/lr']['mean'] for record in read_stats(run_dir)]
    assert lrs[0] == pytest.approx(1e-3 * 12 / 13, rel=1e-6)
    assert lrs[-1] == pytest.approx(1e-3 * (88 + 8) / 2 / 200, rel=1e-6)


def test_noise_level_flags_reach_the_edm_loss_only():
    import click
    import dnnlib
    from train import build_config, preset_options
    loss = dnnlib.util.construct_class_by_name(
        **build_config(preset_options('demo', p_mean=-0.6, p_std=1.0), 'd', 16, world_size=1).loss_kwargs)
    assert (loss.P_mean, loss.P_std) == (-0.6, 1.0)  # the flags override the demo preset's (-0.4, 1.6)
    default = dnnlib.util.construct_class_by_name(**build_config(preset_options(), 'd', 16, world_size=1).loss_kwargs)
    assert (default.P_mean, default.P_std) == (-1.2, 1.2)  # EDM's
    with pytest.raises(click.BadParameter, match='--precond=edm, not vp'):
        build_config(preset_options('demo', precond='vp', p_std=1.0), 'd', 16, world_size=1)


def test_loader_prefetches_enough_for_the_largest_batch_multiplier():
    from train import build_config, preset_options
    patch = build_config(preset_options('demo', workers=2), 'd', 32, world_size=1).data_loader_kwargs
    full = build_config(preset_options('demo', workers=2, patch='off'), 'd', 32, world_size=1).data_loader_kwargs
    none = build_config(preset_options('demo', workers=0), 'd', 32, world_size=1).data_loader_kwargs
    assert (patch.prefetch_factor, full.prefetch_factor, none.prefetch_factor) == (8, 2, None)
    assert patch.persistent_workers and not none.persistent_workers


def test_labels_are_not_dropped_unless_asked():
    """EDM and the official code drop no labels: --cond alone and the cifar10-32 preset give 0, the ImageNet preset 0.1."""
    from train import build_config, main, preset_options, resolve_options
    ctx = main.make_context('train.py', ['--outdir=o', '--data=d', '--cond=True'])
    assert build_config(resolve_options(ctx, ctx.params), 'd', 32, world_size=1).network_kwargs.label_dropout == 0
    assert build_config(preset_options('cifar10-32'), 'd', 32, world_size=1).network_kwargs.label_dropout == 0
    assert build_config(preset_options('imagenet256-latent'), 'd', 32, world_size=1).network_kwargs.label_dropout == 0.1
