"""bench/gpu_suite.py: the CPU smoke run of every part end to end, scoring, failed and slow steps, targets, reruns."""

import json
import os
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bench import gpu_suite
from test_fid import ColourStats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFICIAL, EDM = os.path.join(ROOT, '.baselines', 'patch-diffusion'), os.path.join(ROOT, '.baselines', 'edm')


def read(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.slow
def test_smoke_runs_every_part_end_to_end_and_score_adds_fid(tmp_path):
    # The reference checkouts are used where this machine has them (.baselines/ is never committed, so CI has none).
    references = [f'--official={OFFICIAL}'] * os.path.isdir(OFFICIAL) + [f'--edm={EDM}'] * os.path.isdir(EDM)
    out, work = tmp_path / 'out', tmp_path / 'work'
    proc = subprocess.run([sys.executable, 'bench/gpu_suite.py', 'run', '--smoke', f'--out={out}', f'--workdir={work}',
                           '--commit=0123456789abcdef', *references], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = read(out / 'gpu_suite.json')
    assert record['smoke'] and record['commit'] == '0123456789abcdef' and record['environment']['device'] == 'cpu'
    for name in gpu_suite.PARTS:
        part = record['parts'][name]
        assert 'error' not in part, part.get('error')
        assert part['steps'] and all(step['ok'] for step in part['steps'].values()), part['steps']

    tests = {t['name']: t for t in record['parts']['correctness']['tests']}
    assert len(tests) >= 4 and not [t for t in tests.values() if t['outcome'] in ('failed', 'error')]
    # On the CPU the fp16 and compile tests skip (CUDA-only, minutes to compile); the other two must really run.
    assert tests['test_torchrun_bf16_deterministic_resume_is_bit_identical']['outcome'] == 'passed'
    assert tests['test_generate_on_device_matches_cpu_and_paints']['outcome'] == 'passed'
    assert tests['test_float16_on_cuda_matches_float32']['outcome'] == 'skipped'  # EDM2's float16 path: CUDA only

    speed = record['parts']['speed']
    assert speed['sample_speed']['batches'][0]['images_per_sec'] > 0
    assert [r['config'] for r in speed['data_wait']['rows']] == ['p=0.5', 'p=0']
    assert all(0 <= r['share'] <= 100 for r in speed['data_wait']['rows'])
    if os.path.isdir(OFFICIAL):
        assert set(speed['vs_official']['rows']) == {'official', 'fp32', 'bf16'}
        assert speed['targets']['mode'] == 'bf16' and speed['targets']['speedup_vs_official'] > 0
    else:
        assert 'skipped' in speed['vs_official']

    arms = record['parts']['payoff']['arms']
    assert list(arms) == list(gpu_suite.PAYOFF_ARMS)
    for arm, result in arms.items():
        assert result['kimg'] > 0 and np.isfinite(result['heldout_loss'])
        with np.load(out / result['samples']) as npz:
            samples = npz['samples']
        assert samples.dtype == np.uint8 and samples.shape == (8, 32, 32, 3)
    with tarfile.open(out / 'gpu_suite-logs.tgz') as tar:
        assert {'correctness-pytest.log', 'speed-data_wait.log', 'payoff-ablation.log'} <= set(tar.getnames())
    markdown = (out / 'gpu_suite.md').read_text()
    for heading in ('## 1. Correctness', '## 2. Speed', '## 3. Payoff'):
        assert heading in markdown

    # score: FID and KID of each arm's samples with a stand-in detector, a grid per arm, the tables rewritten.
    detector = tmp_path / 'detector.pt'
    torch.jit.save(torch.jit.script(ColourStats()), str(detector))
    result = CliRunner().invoke(gpu_suite.cli, ['score', f'--suite={out / "gpu_suite.json"}', f'--detector={detector}',
                                                f'--data={work / "shapes-32.zip"}'])
    assert result.exit_code == 0, result.output
    scored = read(out / 'gpu_suite.json')['parts']['payoff']['arms']
    for arm in gpu_suite.PAYOFF_ARMS:
        assert np.isfinite(scored[arm]['fid']) and scored[arm]['fid'] >= 0 and np.isfinite(scored[arm]['kid'])
        assert (out / f'payoff-{arm}.png').is_file()
    assert f'{scored["full"]["fid"]:.4g}' in (out / 'gpu_suite.md').read_text()


def test_a_failed_or_slow_step_is_recorded_and_the_suite_goes_on(tmp_path):
    suite = gpu_suite.Suite(str(tmp_path / 'out'), str(tmp_path / 'work'), dict(
        smoke=True, commit='abc', date='today', environment=dict(device_name='cpu', torch='x', cuda=None), parts={}))
    failed = suite.step('speed', 'fails', [sys.executable, '-c', 'import sys; print("boom"); sys.exit(3)'], cap=60)
    start = time.time()
    slow = suite.step('speed', 'hangs', [sys.executable, '-c', 'import time; print("started", flush=True); time.sleep(120)'], cap=2)
    assert time.time() - start < 30
    assert not failed['ok'] and failed['error'] == 'exit 3' and 'boom' in failed['output_tail']
    assert not slow['ok'] and slow['error'] == 'timed out after 2 s' and 'started' in slow['output_tail']
    ok = suite.step('speed', 'works', [sys.executable, '-c', 'pass'], cap=60)
    assert ok['ok'] and 'error' not in ok
    on_disk = read(tmp_path / 'out' / 'gpu_suite.json')['parts']['speed']['steps']
    assert [on_disk[k]['ok'] for k in ('fails', 'hangs', 'works')] == [False, False, True]
    markdown = (tmp_path / 'out' / 'gpu_suite.md').read_text()
    assert '`fails` failed: exit 3' in markdown and '`hangs` failed: timed out after 2 s' in markdown


def test_speed_targets_are_read_from_the_bf16_rows():
    rows = {'official': dict(speedup_at_p=1.0, p_vs_full=2.0),
            'bf16': dict(speedup_at_p=1.5, p_vs_full=2.5, peak_gb_per_size={'64': 10.0, '32': 6.0, '16': 4.0}),
            'bf16+compile': dict(speedup_at_p=2.1, p_vs_full=2.3, peak_gb_per_size={'64': 9.0, '32': 9.5, '16': 3.0})}
    targets = gpu_suite.speed_targets(dict(resolution=64, rows=rows))
    assert targets['mode'] == 'bf16+compile'
    assert targets['met'] == dict(speedup_vs_official=True, p_vs_full=False, peak_memory=False)
    assert (targets['peak_full_gb'], targets['peak_patches_gb']) == (9.0, 9.5)
    del rows['bf16+compile']  # a compile that ran out of time leaves the eager bf16 row
    targets = gpu_suite.speed_targets(dict(resolution=64, rows=rows))
    assert targets['mode'] == 'bf16'
    assert targets['met'] == dict(speedup_vs_official=False, p_vs_full=True, peak_memory=True)
    assert 'error' in gpu_suite.speed_targets(None)


def test_junit_outcomes_are_read_per_test(tmp_path):
    xml = tmp_path / 'r.xml'
    xml.write_text('<testsuites><testsuite><testcase name="a" time="1.5"/>'
                   '<testcase name="b" time="2"><failure message="assert 1 == 2">trace</failure></testcase>'
                   '<testcase name="c" time="0"><skipped message="fp16 is CUDA-only"/></testcase>'
                   '<testcase name="d" time="0.1"><error message="fixture broke"/></testcase></testsuite></testsuites>')
    cases = gpu_suite.junit_results(str(xml))
    assert [(c['name'], c['outcome'], c['seconds']) for c in cases] == [
        ('a', 'passed', 1.5), ('b', 'failed', 2.0), ('c', 'skipped', 0.0), ('d', 'error', 0.1)]
    assert cases[1]['message'] == 'assert 1 == 2' and cases[2]['message'] == 'fp16 is CUDA-only'
    assert gpu_suite.junit_results(str(tmp_path / 'missing.xml')) == []


def test_rerunning_some_parts_keeps_the_others(tmp_path, monkeypatch):
    out = tmp_path / 'out'
    out.mkdir()
    kept = dict(tests=[dict(name='test_kept', outcome='passed', seconds=1.0, message=None)])
    (out / 'gpu_suite.json').write_text(json.dumps(dict(parts=dict(correctness=kept, speed=dict(old=True)))))

    def fake_speed(suite, size, official, edm):
        suite.record['parts']['speed']['new'] = size['speed_modes']
    monkeypatch.setattr(gpu_suite, 'part_speed', fake_speed)
    result = CliRunner().invoke(gpu_suite.cli, ['run', '--smoke', '--parts=speed', f'--out={out}', f'--workdir={tmp_path / "w"}'])
    assert result.exit_code == 0, result.output
    parts = read(out / 'gpu_suite.json')['parts']
    assert parts['correctness'] == kept
    assert parts['speed']['new'] == gpu_suite.SIZES['smoke']['speed_modes'] and 'old' not in parts['speed']


def test_bad_parts_and_missing_payoff_data_are_one_line_errors(tmp_path):
    result = CliRunner().invoke(gpu_suite.cli, ['run', '--smoke', '--parts=speed,nope', f'--out={tmp_path}'])
    assert result.exit_code == 2 and '--parts' in result.output and 'correctness, speed, payoff' in result.output
    if not torch.cuda.is_available():
        result = CliRunner().invoke(gpu_suite.cli, ['run', f'--out={tmp_path}'])
        assert result.exit_code == 1 and 'no CUDA device' in result.output


def test_steps_past_the_deadline_are_cut_or_not_run(tmp_path):
    suite = gpu_suite.Suite(str(tmp_path / 'out'), str(tmp_path / 'work'), dict(
        smoke=True, commit='abc', date='today', environment=dict(device_name='cpu', torch='x', cuda=None), parts={}),
        deadline=time.time() + gpu_suite.DEADLINE_RESERVE_S + 3)
    start = time.time()
    cut = suite.step('speed', 'long', [sys.executable, '-c', 'import time; time.sleep(120)'], cap=100)
    assert cut['error'].startswith('timed out after') and time.time() - start < 20
    skipped = suite.step('speed', 'next', [sys.executable, '-c', 'pass'], cap=100)
    assert not skipped['ok'] and 'deadline' in skipped['error']
