"""Smoke tests of the bench/ scripts on tiny networks on the CPU (a few seconds each)."""

import json
import os
import sys
import time

import psutil
import pytest
import torch
from click.testing import CliRunner

from bench import common, sample_speed, train_throughput, vs_official
from training.patch import PatchSchedule

TINY = ['--preset=demo', '--device=cpu', '--cbase=8']
OFFICIAL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.baselines', 'patch-diffusion')


@pytest.fixture(autouse=True)
def one_thread():
    """Keep to one CPU thread: the machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def invoke(main, args: list) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def expected_costs(resolution: int, real_p: float) -> tuple:
    """(pixel cost, images per step) of a stochastic schedule, straight from PatchSchedule."""
    schedule = PatchSchedule(resolution, real_p=real_p)
    cost = sum(p * m * (s / resolution) ** 2 for p, m, s in zip(schedule.probs, schedule.multipliers, schedule.sizes))
    return cost, schedule.mean_batch_multiplier


def test_train_throughput_all_configs(tmp_path):
    path = tmp_path / 'train.json'
    output = invoke(train_throughput.main, TINY + ['--batch-gpu=4', '--warmup=1', '--blocks=2', '--steps-per-block=1',
                                                   f'--json={path}'])
    result = json.loads(path.read_text())
    assert list(result['rows']) == ['full fp32', 'p=1.0 fp32', 'p=0.5 fp32', 'p=0.25 fp32', 'progressive fp32']
    rows = {row['config']: row for row in result['rows'].values()}
    for name in rows:
        assert name in output
    assert 'efficiency' in output and 's/step median' in output
    assert result['preset'] == 'demo' and result['batch_gpu'] == 4 and result['resolution'] == 32
    assert result['environment']['torch'] == torch.__version__ and result['environment']['device_name']

    for name, row in rows.items():
        assert row['steps'] == 2 and sum(row['size_counts'].values()) == 2
        assert len(row['block_sec_per_step']) == 2 and all(t > 0 for t in row['block_sec_per_step'])
        assert row['sec_per_step_mean'] > 0 and row['sec_per_step_median'] > 0
        assert row['images_per_sec'] > 0 and row['mpix_per_sec'] > 0 and row['peak_memory_gb'] > 0
        images = sum(4 * {32: 1, 16: 2, 8: 4}[int(s)] * n for s, n in row['size_counts'].items())
        assert row['images_per_sec'] == pytest.approx(images / (row['sec_per_step_mean'] * 2))
        assert row['images_per_sec_ratio'] == pytest.approx(row['images_per_sec'] / rows['full']['images_per_sec'])
        assert row['efficiency'] == pytest.approx(row['images_per_sec_ratio'] * row['expected_pixel_cost']
                                                  / row['expected_images_per_step'])

    full = rows['full']
    assert full['size_counts'] == {'32': 2}
    assert full['sec_per_step_ratio'] == 1 and full['images_per_sec_ratio'] == 1 and full['efficiency'] == 1
    assert (full['expected_pixel_cost'], full['expected_images_per_step']) == (1, 1)
    assert rows['p=1.0']['size_counts'] == {'32': 2}
    for name in ('p=0.5', 'progressive'):
        row = rows[name]
        assert (row['expected_pixel_cost'], row['expected_images_per_step']) == expected_costs(32, 0.5)
        assert row['expected_pixel_cost'] == pytest.approx(0.70, abs=1e-12)
        assert row['expected_images_per_step'] == pytest.approx(1.9, abs=1e-12)
        assert row['ideal_images_per_sec_ratio'] == pytest.approx(1.9 / 0.7)
    p25 = rows['p=0.25']
    assert (p25['expected_pixel_cost'], p25['expected_images_per_step']) == expected_costs(32, 0.25)


def test_train_throughput_subset_without_full(tmp_path):
    path = tmp_path / 'train.json'
    invoke(train_throughput.main, TINY + ['--batch-gpu=2', '--warmup=0', '--blocks=1', '--steps-per-block=1',
                                          '--configs=p=0.25', f'--json={path}'])
    row = json.loads(path.read_text())['rows']['p=0.25 fp32']
    assert row['images_per_sec'] > 0 and row['sec_per_step_ratio'] is None and row['efficiency'] is None


def test_progressive_block_sweeps_all_sizes_in_their_shares():
    schedule = PatchSchedule(32, real_p=0.5, mode='progressive')
    trainer = train_throughput.Trainer('progressive', 'fp32', None, None, None, None, schedule, 32, 0.0, 1.0)
    assert trainer.draw_sizes(10) == [8] * 2 + [16] * 3 + [32] * 5


def test_train_throughput_modes_report_speedup_over_fp32(tmp_path):
    path = tmp_path / 'modes.json'
    output = invoke(train_throughput.main, TINY + ['--batch-gpu=2', '--warmup=1', '--blocks=1', '--steps-per-block=1',
                                                   '--configs=full,p=0.5', '--modes=fp32,fp32+cl,bf16', f'--json={path}'])
    rows = json.loads(path.read_text())['rows']
    assert list(rows) == [f'{c} {m}' for m in ('fp32', 'fp32+cl', 'bf16') for c in ('full', 'p=0.5')]
    assert 'speedup vs fp32' in output and 'fp32-ref' not in output
    for key, row in rows.items():
        ref, full, full_ref = rows[f'{row["config"]} fp32'], rows[f'full {row["mode"]}'], rows['full fp32']
        assert row['speedup_vs_fp32'] == pytest.approx(ref['sec_per_step_mean'] / row['sec_per_step_mean'])
        assert row['images_per_sec_ratio'] == pytest.approx(row['images_per_sec'] / full['images_per_sec'])
        assert row['kimg_ratio_vs_full_fp32'] == pytest.approx(row['images_per_sec'] / full_ref['images_per_sec'])
    assert rows['full fp32']['speedup_vs_fp32'] == 1


def test_vs_official_per_kimg_by_hand():
    """p=0.5 at 32x32: probabilities 0.5, 0.3, 0.2 for 32, 16, 8 with x1, x2, x4 batches of 16."""
    schedule = PatchSchedule(32, real_p=0.5)
    seconds = {32: 0.5, 16: 0.25, 8: 0.125}
    images = 16 * (0.5 * 1 + 0.3 * 2 + 0.2 * 4)          # 30.4 images per step on average
    time = 0.5 * 0.5 + 0.3 * 0.25 + 0.2 * 0.125          # 0.35 s per step on average
    assert vs_official.per_kimg(seconds, schedule, 16, {32: 1, 16: 2, 8: 4}) == pytest.approx(images / time / 1e3, rel=1e-12)


def test_vs_official_uses_the_official_batch_multipliers_where_it_has_them():
    assert [vs_official.official_multiplier(64, s, 0) for s in (64, 32, 16)] == [1, 2, 4]
    assert [vs_official.official_multiplier(256, s, 0) for s in (256, 128, 64)] == [1, 2, 8]  # its table's 8x at 256
    assert vs_official.official_multiplier(32, 8, 4) == 4  # no entry for 8: this project's x4


def test_vs_official_speedups_are_official_time_over_ours():
    sizes, schedule = [32, 16, 8], PatchSchedule(32, real_p=0.5)
    mul = {32: 1, 16: 2, 8: 4}
    rounds = [{'official': dict(sec_per_step={'32': 1.0, '16': 0.6, '8': 0.4}, peak_gb=1, params=5),
               'fp32': dict(sec_per_step={'32': 0.5, '16': 0.3, '8': 0.2}, peak_gb=1, params=5)},
              {'official': dict(sec_per_step={'32': 3.0, '16': 0.6, '8': 0.4}, peak_gb=2, params=5),   # an outlier round
               'fp32': dict(sec_per_step={'32': 0.5, '16': 0.3, '8': 0.1}, peak_gb=1, params=5)},
              {'official': dict(sec_per_step={'32': 1.0, '16': 0.6, '8': 0.4}, peak_gb=1, params=5),
               'fp32': dict(sec_per_step={'32': 0.5, '16': 0.3, '8': 0.2}, peak_gb=1, params=5)}]
    rows = vs_official.summarize(rounds, ['official', 'fp32'], sizes, 16, schedule, {'official': mul, 'fp32': mul})
    assert rows['official']['sec_per_step'] == {32: 1.0, 16: 0.6, 8: 0.4}  # medians: the outlier drops out
    assert rows['fp32']['speedup_per_size'] == {32: 2.0, 16: 2.0, 8: 2.0}
    assert rows['fp32']['speedup_at_p'] == pytest.approx(2.0)
    assert rows['fp32']['p_vs_full'] == pytest.approx((0.5 + 0.6 + 0.8) / (0.25 + 0.09 + 0.04) * 0.5)
    assert rows['official']['peak_gb'] == 2


def test_vs_official_rejects_a_folder_that_is_not_the_official_code(tmp_path):
    result = CliRunner().invoke(vs_official.main, [f'--official={tmp_path}'])
    assert result.exit_code == 2 and 'training/patch_loss.py' in result.output


@pytest.mark.skipif(not os.path.isfile(os.path.join(OFFICIAL, 'training', 'patch_loss.py')),
                    reason=f'needs a checkout of the official Patch Diffusion code in {OFFICIAL}')
def test_vs_official_runs_the_official_code(tmp_path):
    path = tmp_path / 'vs.json'
    output = invoke(vs_official.main, [f'--official={OFFICIAL}', *TINY, '--batch-gpu=2', '--rounds=1', '--warmup=0',
                                       '--steps=1', '--profile', '--worker-timeout=600', f'--json={path}'])
    result = json.loads(path.read_text())
    assert set(result['rows']) == {'official', 'fp32'} and result['official_fallback_sizes'] == [8]
    assert result['rows']['official']['params'] == result['rows']['fp32']['params']  # the same network on both sides
    assert result['complete'] and 'warm-up s (compile)' in output
    for name, row in result['rows'].items():
        assert row['errors'] == [] and set(row['peak_gb_per_size']) == set(row['warmup_sec_per_size']) == {'32', '16', '8'}
        assert all(v > 0 for v in row['peak_gb_per_size'].values()) and all(v >= 0 for v in row['warmup_sec_per_size'].values())
        assert row['peak_gb'] >= max(row['peak_gb_per_size'].values())
        assert ('profile' in row) == (name == 'fp32')
    assert result['rows']['official']['precision_flags']['matmul_allow_tf32'] is False
    profile = result['rows']['fp32']['profile']
    assert set(profile) == {'32', '16', '8'} and all('Self CPU' in p['table'] for p in profile.values())


def test_bad_modes_option():
    result = CliRunner().invoke(train_throughput.main, TINY + ['--modes=fp32,tf64'])
    assert result.exit_code != 0 and 'choose from' in result.output
    result = CliRunner().invoke(train_throughput.main, TINY + ['--modes=fp16'])
    assert result.exit_code != 0 and 'needs CUDA' in result.output


def test_bad_configs_option():
    result = CliRunner().invoke(train_throughput.main, TINY + ['--configs=full,p=0.7'])
    assert result.exit_code != 0 and 'choose from' in result.output


def test_sample_speed(tmp_path):
    path = tmp_path / 'sample.json'
    output = invoke(sample_speed.main, TINY + ['--steps=2', '--batch=1,2', '--repeats=1', f'--json={path}'])
    result = json.loads(path.read_text())
    assert 'img/s' in output and result['steps'] == 2 and result['resolution'] == 32
    assert [row['batch'] for row in result['batches']] == [1, 2]
    for row in result['batches']:
        assert row['sec_per_batch_median'] > 0 and row['peak_memory_gb'] > 0
        assert row['images_per_sec'] == pytest.approx(row['batch'] / row['sec_per_batch_median'])


def test_data_wait_reports_share_per_config(tmp_path):
    from bench import data_wait
    from training_helpers import make_dataset
    data = make_dataset(str(tmp_path / 'shapes.zip'))
    path = tmp_path / 'wait.json'
    output = invoke(data_wait.main, [f'--data={data}', '--device=cpu', '--workers=1', '--kimg=0.064', '--configs=full,p=0.5',
                                     '--extra=--cbase=8 --cres=1,2 --attn=8 --batch=8', f'--json={path}'])
    rows = json.loads(path.read_text())['rows']
    assert [r['config'] for r in rows] == ['full', 'p=0.5'] and 'wait share %' in output
    for row in rows:
        assert row['steps'] > 0 and 0 <= row['share'] < 100 and 0 <= row['wait_ms'] < row['step_ms']


def test_data_wait_measure_skips_first_tick():
    from bench import data_wait
    tick = lambda wait, step, num: {'Timing/data_wait_sec': {'num': num, 'mean': wait}, 'Timing/step_sec': {'num': num, 'mean': step}}  # noqa: E731
    result = data_wait.measure([tick(5.0, 6.0, 2), tick(0.01, 0.1, 4), tick(0.03, 0.1, 4)])
    assert result['steps'] == 8 and result['share'] == pytest.approx(20.0) and result['step_ms'] == pytest.approx(100.0)


def test_latent_step_compares_pre_encoded_with_on_the_fly(tmp_path):
    pytest.importorskip('diffusers', reason='bench/latent_step.py needs the optional extra diffusers')
    from bench import latent_step
    path = tmp_path / 'latent.json'
    output = invoke(latent_step.main, ['--device=cpu', '--vae=tiny', '--resolution=64', '--cbase=8', '--batch=2',
                                       '--warmup=1', '--blocks=2', f'--json={path}'])
    result = json.loads(path.read_text())
    assert 'pre-encoded' in output and 'on-the-fly' in output
    assert (result['latent_resolution'], result['sizes']) == (16, [16, 8])
    pre, fly = result['rows']
    assert (pre['path'], fly['path']) == ('pre-encoded', 'on-the-fly') and pre['time_vs_pre_encoded'] == 1
    assert fly['time_vs_pre_encoded'] == pytest.approx(fly['sec_per_step'] / pre['sec_per_step'])
    assert all(row['sec_per_step'] > 0 and row['images_per_sec'] > 0 for row in result['rows'])


def test_vs_official_worker_that_fails_or_hangs_becomes_an_error(tmp_path):
    env, cwd = dict(os.environ), str(tmp_path)
    failed = vs_official.run_worker([sys.executable, '-c', 'import sys; sys.exit("boom")'], env, cwd, 'the x step')
    assert failed['error'].startswith('the x step failed (exit 1)') and 'boom' in failed['error']
    silent = vs_official.run_worker([sys.executable, '-c', 'print("no result")'], env, cwd, 'the y step')
    assert 'failed (exit 0)' in silent['error']
    done = vs_official.run_worker([sys.executable, '-c', 'print("RESULT {\\"a\\": 1}")'], env, cwd, 'the z step', timeout=60)
    assert done == {'a': 1}
    # A hanging worker and the process it started are killed together.
    hang = ('import os, subprocess, sys, time\n'
            'child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])\n'
            f'open({str(tmp_path / "pid.tmp")!r}, "w").write(str(child.pid))\n'
            f'os.replace({str(tmp_path / "pid.tmp")!r}, {str(tmp_path / "pid")!r})\n'
            'time.sleep(120)\n')
    hung = vs_official.run_worker([sys.executable, '-c', hang], env, cwd, 'the slow step', timeout=3)
    assert hung == {'error': 'the slow step timed out after 3 s'}
    if not (tmp_path / 'pid').exists():
        pytest.skip('the worker was killed before it started its child (a loaded machine)')
    pid = int((tmp_path / 'pid').read_text())
    for _ in range(50):
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    else:
        pytest.fail('the hanging worker\'s child is still running')


def test_vs_official_summary_keeps_the_rows_that_ran():
    sizes, schedule, mul = [32, 16, 8], PatchSchedule(32, real_p=0.5), {32: 1, 16: 2, 8: 4}
    ok = dict(sec_per_step={'32': 1.0, '16': 0.6, '8': 0.4}, warmup_sec={'32': 9.0, '16': 2.0, '8': 1.0},
              peak_gb_per_size={'32': 3.0, '16': 2.0, '8': 1.0}, peak_gb=3.5, params=5)
    fast = dict(ok, sec_per_step={'32': 0.5, '16': 0.3, '8': 0.2})
    rounds = [{'official': ok, 'fp32': fast, 'bf16': {'error': 'the bf16 step timed out after 9 s'}},
              {'official': ok, 'fp32': {'error': 'the fp32 step failed (exit 1):\nOOM'}}]
    muls = {'official': mul, 'fp32': mul, 'bf16': mul}
    rows = vs_official.summarize(rounds, ['official', 'fp32', 'bf16'], sizes, 16, schedule, muls)
    assert rows['bf16'] == {'error': 'the bf16 step timed out after 9 s', 'errors': ['the bf16 step timed out after 9 s']}
    assert rows['fp32']['speedup_at_p'] == pytest.approx(2.0) and rows['fp32']['errors'] == ['the fp32 step failed (exit 1):\nOOM']
    assert rows['fp32']['warmup_sec_per_size'] == {32: 9.0, 16: 2.0, 8: 1.0}
    assert rows['fp32']['peak_gb_per_size'] == {32: 3.0, 16: 2.0, 8: 1.0}
    rounds = [{'official': {'error': 'the official step timed out after 9 s'}, 'fp32': fast}]
    rows = vs_official.summarize(rounds, ['official', 'fp32'], sizes, 16, schedule, muls)
    assert 'error' in rows['official'] and rows['fp32']['speedup_at_p'] is None and rows['fp32']['kimg_per_sec_at_p'] > 0


@pytest.mark.parametrize('official_fails', [False, True])
def test_vs_official_reports_failed_workers_and_exits_by_the_official(tmp_path, monkeypatch, official_fails):
    (tmp_path / 'official' / 'training').mkdir(parents=True)
    (tmp_path / 'official' / 'training' / 'patch_loss.py').write_text('')
    calls = []

    def fake_worker(command, env, cwd, what, timeout=None):
        calls.append(what)
        if 'fp32' in what or (official_fails and 'official' in what):
            return dict(error=f'{what} timed out after {timeout:g} s')
        return dict(sec_per_step={'32': 0.5, '16': 0.3, '8': 0.2}, warmup_sec={'32': 1, '16': 1, '8': 1},
                    peak_gb_per_size={'32': 1, '16': 1, '8': 1}, peak_gb=1, params=5)

    monkeypatch.setattr(vs_official, 'run_worker', fake_worker)
    path = tmp_path / 'vs.json'
    result = CliRunner().invoke(vs_official.main, [f'--official={tmp_path / "official"}', *TINY, '--rounds=2',
                                                   '--ours=fp32,bf16', '--worker-timeout=7', f'--json={path}'])
    rows = json.loads(path.read_text())['rows']
    assert rows['fp32']['error'] == "this project's fp32 step timed out after 7 s" and 'FAILED' in result.output
    assert sum('fp32' in c for c in calls) == 1  # not run again after it failed
    assert rows['bf16']['sec_per_step'] == {'32': 0.5, '16': 0.3, '8': 0.2}
    if official_fails:
        assert result.exit_code == 1 and 'rows.official.error' in result.output and rows['bf16']['speedup_at_p'] is None
    else:
        assert result.exit_code == 0 and rows['bf16']['speedup_at_p'] == pytest.approx(1.0)


EDM = os.path.join(os.path.dirname(OFFICIAL), 'edm')


@pytest.mark.skipif(not os.path.isfile(os.path.join(EDM, 'generate.py')), reason=f'needs a checkout of NVlabs/edm in {EDM}')
@pytest.mark.parametrize('preset', ['demo', 'cifar10-32'])  # unconditional, and class-conditional (labels drawn per seed)
def test_sample_speed_against_edm_sampler_is_seed_exact(tmp_path, preset):
    path = tmp_path / 'sample.json'
    output = invoke(sample_speed.main, [f'--preset={preset}', '--device=cpu', '--cbase=8', '--steps=3', '--batch=2',
                                        '--repeats=1', f'--edm={EDM}', f'--json={path}'])
    result = json.loads(path.read_text())
    row = result['batches'][0]
    assert 'EDM img/s' in output and result['edm'] == EDM and result['complete']
    assert row['edm_images_per_sec'] > 0 and row['ours_vs_edm'] == pytest.approx(row['edm_sec_per_batch_median']
                                                                                  / row['sec_per_batch_median'])
    assert row['max_abs_diff'] <= 1e-5 and row['uint8_pixels_differing'] == 0
    assert set(result['precision_flags']) == {'cudnn_allow_tf32', 'matmul_allow_tf32', 'cudnn_benchmark'}


def test_sample_speed_rejects_a_folder_without_edm_sampler(tmp_path):
    (tmp_path / 'generate.py').write_text('def other_sampler():\n    pass\n')
    result = CliRunner().invoke(sample_speed.main, TINY + [f'--edm={tmp_path}'])
    assert result.exit_code == 2 and 'edm_sampler' in result.output


def test_sample_speed_batch_that_fails_becomes_an_error_row():
    def measure(batch):
        raise RuntimeError('CUDA out of memory. Tried to allocate 80 GiB')
    row = sample_speed.measure_or_error(128, measure, torch.device('cpu'))
    assert row == {'batch': 128, 'error': 'RuntimeError: CUDA out of memory. Tried to allocate 80 GiB'}


def test_sample_speed_edm_sampler_that_fails_costs_only_its_columns():
    net = sample_speed.preset_network('demo', 8, torch.device('cpu'))

    def broken_sampler(*args, **kwargs):
        raise RuntimeError('out of memory')
    row = sample_speed.measure_batch(net, 1, 2, 1, torch.device('cpu'), common.PeakMemory(torch.device('cpu')), broken_sampler)
    assert row['edm_error'] == 'RuntimeError: out of memory' and row['images_per_sec'] > 0 and 'ours_vs_edm' not in row


def test_network_cost_sizes_the_study_arm_like_the_demo_net(tmp_path):
    """bench/network_cost.py reports every network; the EDM2 arm of docs/results-edm2.md costs the demo DDPM++'s FLOPs
    within 5% (measured 7.70 against 7.47 GFLOP per step), and so do their parameters (1.203 M against 1.236 M)."""
    from bench import network_cost
    invoke(network_cost.main, ['--steps=1', f'--json={tmp_path / "cost.json"}'])
    rows = {row['network']: row for row in json.load(open(tmp_path / 'cost.json'))['rows']}
    assert set(rows) == {'ddpm++ of configs/demo.json', *network_cost.EDM2_CANDIDATES}
    ddpmpp, edm2 = rows['ddpm++ of configs/demo.json'], rows['edm2 32; 1,2,2; 1 block; attn 8 (the study arm)']
    assert abs(edm2['gflop'] / ddpmpp['gflop'] - 1) < 0.05 and abs(edm2['params_m'] / ddpmpp['params_m'] - 1) < 0.05
    assert all(row['ms_per_step'] > 0 for row in rows.values())
