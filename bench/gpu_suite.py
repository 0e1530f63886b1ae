"""One command that proves the project on a CUDA GPU: correctness, speed against the authors' code, and the payoff.

`run` executes three parts, each as subprocesses with their own time caps, and rewrites `--out`/gpu_suite.json (every
number, the device, torch and CUDA versions, the date and the git commit) and `--out`/gpu_suite.md (the tables as they
go into the docs) after every step, so a part that fails or runs out of time is recorded with its error and the suite
goes on; what finished is never lost.

1. correctness: the tests marked `cuda` (tests/test_cuda.py: torchrun + NCCL bf16 resume, fp16, generate.py and the
   painting paths, --compile at every patch size; tests/test_networks_edm2.py: EDM2's float16 path), with pytest's
   JUnit XML read back per test.
2. speed: bench/vs_official.py on celeba64 (the official fp32 step from its checkout, then this project's fp32, bf16,
   fp16 and bf16+compile; compile last and capped), bench/sample_speed.py (50 Heun steps at batch 256, against EDM's own
   edm_sampler on the same network) and bench/data_wait.py (the loader's share of the step at p=0.5 and p=0).
3. payoff: bench/ablation.py on Twemoji 32x32: full-image EDM, p=0.5 with --loss-norm=pixel and with image, and
   EDM2's network and loss at p=0.5 pixel (ablation.py's edm2-p0.5: patches through the magnitude-preserving U-Net,
   its coordinate channels and learned uncertainty, in bf16), equal wall-clock each (30 s: four arms in the 120 s of
   training that three arms of 40 s had), on a network and batch sized for a GPU; held-out loss, kimg, and each arm's
   samples as uint8 .npz.

`score` runs afterwards on any machine with the offline Inception (requirements-fid.txt): FID and KID of the payoff
samples against the training set, added to the JSON and the tables, and a sample grid per arm.

`--smoke` runs every part end to end on the CPU with tiny sizes (the cuda tests with PATCHDIFF_CUDA_TESTS_ON_CPU=1);
tests/test_gpu_suite.py runs it, so CI keeps the suite working.

  python bench/gpu_suite.py run --official=.baselines/patch-diffusion --edm=.baselines/edm \\
      --data=.baselines/data/twemoji-32x32.zip --heldout=.baselines/data/twemoji-32x32-heldout.zip --out=$OUT
  python bench/gpu_suite.py run --smoke --out=bench-out/gpu-smoke
  python bench/gpu_suite.py score --suite=docs/gpu/gpu_suite.json --samples=docs/gpu --data=datasets/twemoji-32x32.zip
"""

import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from typing import Any, Callable, Dict, List, Optional

import click
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import environment  # noqa: E402
from training.snapshot import atomic_write  # noqa: E402

PARTS = ('correctness', 'speed', 'payoff')
PAYOFF_ARMS = ('full', 'p0.5-pixel', 'p0.5-image', 'edm2-p0.5')
JSON_NAME, MD_NAME, LOG_NAME, LOGS_NAME = 'gpu_suite.json', 'gpu_suite.md', 'gpu_suite.log', 'gpu_suite-logs.tgz'
DEADLINE_RESERVE_S = 10  # kept free before --deadline for writing the results
TARGETS = dict(speedup_vs_official=2.0, p_vs_full=2.4)

# Sizes of a real run on one GPU and of the CPU smoke run. Caps are seconds of wall clock per step.
SIZES = {
    'full': dict(
        device='cuda',
        tests_cap=120,
        speed_preset='celeba64', speed_batch=64, speed_cbase=None, speed_modes='fp32,bf16,fp16,bf16+compile',
        speed_rounds=1, speed_warmup=2, speed_steps=5, worker_cap=100, official_cap=240,
        sample_batch=256, sample_steps=50, sample_cap=90,
        wait_preset='celeba64', wait_resolution=64, wait_images=2000, wait_kimg=4, wait_extra='--batch=64 --bf16 --workers=4',
        wait_cap=75,
        payoff_budget=30, payoff_tick=20, payoff_samples=2000, payoff_steps=18, payoff_points=4, payoff_cap=200,
        payoff_extra='--device=cuda --workers=4 --cbase=64 --blocks=2 --batch=256 --bf16 --lr-rampup=0.01 --ema=0.01',
    ),
    'smoke': dict(
        device='cpu',
        tests_cap=300,
        speed_preset='celeba64', speed_batch=2, speed_cbase=8, speed_modes='fp32,bf16',
        speed_rounds=1, speed_warmup=1, speed_steps=1, worker_cap=120, official_cap=240,
        sample_batch=2, sample_steps=2, sample_cap=120,
        wait_preset='demo', wait_resolution=32, wait_images=64, wait_kimg=0.1, wait_extra='--cbase=8 --batch=8 --workers=1',
        wait_cap=120,
        payoff_budget=10, payoff_tick=1, payoff_samples=8, payoff_steps=2, payoff_points=2, payoff_cap=300,
        payoff_extra='--device=cpu --cbase=8 --batch=8',
    ),
}


class Suite:
    """The suite's record: results per part, written as JSON and Markdown into `out` after every step."""

    def __init__(self, out: str, workdir: str, record: Dict[str, Any], deadline: Optional[float] = None):
        self.out, self.workdir, self.record, self.deadline = out, workdir, record, deadline
        os.makedirs(out, exist_ok=True)
        os.makedirs(workdir, exist_ok=True)

    def save(self) -> None:
        """Write the JSON and the Markdown tables atomically."""
        text = json.dumps(self.record, indent=2) + '\n'
        atomic_write(os.path.join(self.out, JSON_NAME), lambda f: f.write(text.encode()))
        markdown = render_markdown(self.record)
        atomic_write(os.path.join(self.out, MD_NAME), lambda f: f.write(markdown.encode()))

    def log(self, text: str) -> None:
        """Print a line and append it to the suite's log in `out`."""
        print(text, flush=True)
        with open(os.path.join(self.out, LOG_NAME), 'a') as f:
            f.write(text + '\n')

    def step(self, part: str, name: str, command: List[str], cap: float, env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
        """Run one command under a time cap (cut to what is left before the suite's deadline), its output going to a log
        file; record and return how it ended."""
        log_path = os.path.join(self.workdir, f'{part}-{name}.log')
        if self.deadline is not None:
            left = self.deadline - time.time() - DEADLINE_RESERVE_S
            if left < 1:
                result = dict(command=shlex.join(command), seconds=0, returncode=None, ok=False, error='not run: the suite\'s --deadline was reached')
                self.log(f'[{part}/{name}] {result["error"]}')
                self.record['parts'].setdefault(part, {}).setdefault('steps', {})[name] = result
                self.save()
                return result
            cap = min(cap, left)
        self.log(f'[{part}/{name}] cap {cap:g} s: {shlex.join(command)}')
        start = time.time()
        with open(log_path, 'w') as log:
            proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=dict(os.environ, PYTHONUNBUFFERED='1', **(env or {})))
            try:
                rc: Optional[int] = proc.wait(timeout=cap)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
        seconds = time.time() - start
        with open(log_path, errors='replace') as f:
            tail = f.read()[-4000:]
        result = dict(command=shlex.join(command), seconds=round(seconds, 1), returncode=rc, ok=rc == 0)
        if rc != 0:
            result['error'] = f'timed out after {cap:.0f} s' if rc is None else f'exit {rc}'
            result['output_tail'] = tail
        self.log(f'[{part}/{name}] {"ok" if rc == 0 else result["error"]} in {seconds:.0f} s')
        if rc != 0:
            self.log('\n'.join('    ' + line for line in tail.splitlines()[-25:]))
        self.record['parts'].setdefault(part, {}).setdefault('steps', {})[name] = result
        self.save()
        return result


def read_json(path: str) -> Optional[Dict[str, Any]]:
    """A JSON file's content, or None where it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def junit_results(path: str) -> List[Dict[str, Any]]:
    """Per test case of a pytest JUnit XML file: name, outcome (passed, failed, error, skipped), seconds, message."""
    if not os.path.isfile(path):
        return []
    cases = []
    for case in ET.parse(path).getroot().iter('testcase'):
        outcome, message = 'passed', None
        for kind in ('failure', 'error', 'skipped'):
            node = case.find(kind)
            if node is not None:
                outcome = {'failure': 'failed'}.get(kind, kind)
                message = (node.get('message') or node.text or '')[:2000]
        cases.append(dict(name=case.get('name'), outcome=outcome, seconds=float(case.get('time', 0)), message=message))
    return cases


# --- the parts ------------------------------------------------------------------------------------------------

def part_correctness(suite: Suite, size: Dict[str, Any], smoke: bool) -> None:
    """The tests marked cuda, run by pytest; on the CPU (smoke) with PATCHDIFF_CUDA_TESTS_ON_CPU=1."""
    xml = os.path.join(suite.workdir, 'cuda-tests.xml')
    if os.path.exists(xml):
        os.remove(xml)
    suite.step('correctness', 'pytest', [sys.executable, '-m', 'pytest', '-m', 'cuda', 'tests/test_cuda.py',
                                         'tests/test_networks_edm2.py', '-q', '-rs',
                                         '-p', 'no:cacheprovider', f'--junitxml={xml}'], size['tests_cap'],
               env=dict(PATCHDIFF_CUDA_TESTS_ON_CPU='1') if smoke else None)
    part = suite.record['parts']['correctness']
    part['tests'] = junit_results(xml)
    suite.save()


def part_speed(suite: Suite, size: Dict[str, Any], official: Optional[str], edm: Optional[str]) -> None:
    """vs_official (when the official checkout is given), sample_speed (against EDM's sampler when given), data_wait."""
    part = suite.record['parts'].setdefault('speed', {})
    cbase = [f'--cbase={size["speed_cbase"]}'] if size['speed_cbase'] else []
    if official:
        path = os.path.join(suite.workdir, 'vs_official.json')
        suite.step('speed', 'vs_official', [
            sys.executable, 'bench/vs_official.py', f'--official={official}', f'--preset={size["speed_preset"]}',
            f'--device={size["device"]}', f'--batch-gpu={size["speed_batch"]}', f'--ours={size["speed_modes"]}',
            f'--rounds={size["speed_rounds"]}', f'--warmup={size["speed_warmup"]}', f'--steps={size["speed_steps"]}',
            f'--worker-timeout={size["worker_cap"]}', '--profile', f'--json={path}', *cbase], size['official_cap'])
        part['vs_official'] = read_json(path)
    else:
        part['vs_official'] = dict(skipped='no --official checkout given')
    path = os.path.join(suite.workdir, 'sample_speed.json')
    suite.step('speed', 'sample_speed', [
        sys.executable, 'bench/sample_speed.py', f'--preset={size["speed_preset"]}', f'--device={size["device"]}',
        f'--batch={size["sample_batch"]}', f'--steps={size["sample_steps"]}', '--repeats=1', f'--json={path}', *cbase,
        *([f'--edm={edm}'] if edm else [])], size['sample_cap'])
    part['sample_speed'] = read_json(path)
    data = os.path.join(suite.workdir, f'shapes-{size["wait_resolution"]}.zip')
    if not os.path.isfile(data):
        suite.step('speed', 'wait_data', [
            sys.executable, 'dataset_tool.py', '--source=demo:shapes', f'--dest={data}',
            f'--resolution={size["wait_resolution"]}x{size["wait_resolution"]}', f'--max-images={size["wait_images"]}'], 120)
    path = os.path.join(suite.workdir, 'data_wait.json')
    suite.step('speed', 'data_wait', [
        sys.executable, 'bench/data_wait.py', f'--data={data}', f'--preset={size["wait_preset"]}', f'--device={size["device"]}',
        '--configs=p=0.5,p=0', f'--kimg={size["wait_kimg"]}', f'--extra={size["wait_extra"]}', f'--json={path}'],
        size['wait_cap'])
    part['data_wait'] = read_json(path)
    part['targets'] = speed_targets(part.get('vs_official'))
    suite.save()


def part_payoff(suite: Suite, size: Dict[str, Any], data: Optional[str], heldout: Optional[str]) -> None:
    """The PAYOFF_ARMS at equal wall clock with bench/ablation.py; their samples are copied into `out`."""
    if data is None:  # smoke: a small demo set, held-out loss on fresh demo images
        data = os.path.join(suite.workdir, 'shapes-32.zip')
        if not os.path.isfile(data):
            suite.step('payoff', 'data', [sys.executable, 'dataset_tool.py', '--source=demo:shapes', f'--dest={data}',
                                          '--resolution=32x32', '--max-images=256'], 120)
    outdir, samples_dir = os.path.join(suite.workdir, 'payoff'), os.path.join(suite.workdir, 'payoff-samples')
    suite.step('payoff', 'ablation', [
        sys.executable, 'bench/ablation.py', f'--data={data}', *([f'--heldout={heldout}'] if heldout else ['--heldout-num=64']),
        f'--arms={",".join(PAYOFF_ARMS)}', '--seeds=1', '--jobs=1', f'--budget={size["payoff_budget"]}',
        f'--tick={size["payoff_tick"]}', '--preset=demo', f'--extra={size["payoff_extra"]}', '--no-coherence', '--no-fid',
        f'--samples={size["payoff_samples"]}', f'--steps={size["payoff_steps"]}', f'--points={size["payoff_points"]}',
        f'--device={size["device"]}', f'--save-samples={samples_dir}', f'--outdir={outdir}',
        f'--report={os.path.join(outdir, "report.md")}'], size['payoff_cap'])
    study = read_json(os.path.join(outdir, 'results.json'))
    part = suite.record['parts']['payoff']
    part['setup'] = dict(data=data, heldout=heldout, budget_s=size['payoff_budget'], preset='demo', extra=size['payoff_extra'],
                         samples=size['payoff_samples'], steps=size['payoff_steps'])
    if study:
        part['arms'] = {arm: dict(label=study['arms'][arm]['label'], flags=study['arms'][arm]['flags'],
                                  **{key: study['arms'][arm]['runs'][0][key]
                                     for key in ('kimg', 'seconds', 'heldout_loss', 'heldout_loss_at_kimg', 'curve')})
                        for arm in PAYOFF_ARMS if arm in study['arms']}
        part['common_kimg'] = study['common_kimg']
        for arm in PAYOFF_ARMS:
            source = os.path.join(samples_dir, f'{arm}-seed0.npz')
            if os.path.isfile(source):
                target = os.path.join(suite.out, f'payoff-{arm}.npz')
                with open(source, 'rb') as f:
                    content = f.read()
                atomic_write(target, lambda f: f.write(content))
                part['arms'][arm]['samples'] = os.path.basename(target)
    suite.save()


def speed_targets(vs_official: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The issue's three targets, read from vs_official's rows: speedup over the official step per kimg (bf16+compile,
    else bf16), p=0.5 against full-image per kimg in the same precision, and p=0.5 peak memory against full-image's."""
    rows = (vs_official or {}).get('rows') or {}
    mode = next((m for m in ('bf16+compile', 'bf16') if 'speedup_at_p' in rows.get(m, {})), None)
    if mode is None:
        return dict(error='no bf16 row measured')
    row, resolution = rows[mode], vs_official['resolution']
    peaks = {int(s): v for s, v in (row.get('peak_gb_per_size') or {}).items()}
    smaller = [v for s, v in peaks.items() if s != resolution]
    result = dict(mode=mode, speedup_vs_official=row['speedup_at_p'], p_vs_full=row['p_vs_full'],
                  peak_full_gb=peaks.get(resolution), peak_patches_gb=max(smaller) if smaller else None)
    result['met'] = dict(speedup_vs_official=row['speedup_at_p'] >= TARGETS['speedup_vs_official'],
                         p_vs_full=row['p_vs_full'] >= TARGETS['p_vs_full'],
                         peak_memory=None if result['peak_full_gb'] is None or result['peak_patches_gb'] is None
                         else result['peak_patches_gb'] <= result['peak_full_gb'])
    return result


# --- Markdown -------------------------------------------------------------------------------------------------

def md_table(header: List[str], rows: List[List[Any]]) -> List[str]:
    """A Markdown table; floats with 4 significant digits, None as '-'."""
    def cell(value: Any) -> str:
        if value is None:
            return '-'
        if isinstance(value, float):
            return f'{value:.4g}'
        return str(value)
    return ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)] + \
           ['| ' + ' | '.join(cell(v) for v in row) + ' |' for row in rows] + ['']


def correctness_md(part: Dict[str, Any]) -> List[str]:
    """Per test: outcome and seconds."""
    lines = ['## 1. Correctness (tests marked `cuda`)', '']
    tests = part.get('tests') or []
    lines += md_table(['test', 'outcome', 's'], [[t['name'], t['outcome'] + (f': {t["message"][:120]}' if t['message'] else ''),
                                                   round(t['seconds'], 1)] for t in tests])
    return lines


def speed_md(part: Dict[str, Any]) -> List[str]:
    """The step table against the official code, sampling, the loader's share and the targets."""
    lines = ['## 2. Speed', '']
    vs = part.get('vs_official') or {}
    if vs.get('rows'):
        sizes = vs['sizes']
        lines += [f'`bench/vs_official.py`: {vs["preset"]} at {vs["resolution"]}x{vs["resolution"]}, batch {vs["batch_gpu"]} '
                  f'per step at full size, {vs["rounds_run"]} round(s) x {vs["steps"]} timed steps per size after '
                  f'{vs["warmup"]} warm-up steps; official at {str(vs.get("official_commit"))[:10]}.', '']
        rows = []
        for name, row in vs['rows'].items():
            if 'error' in row and 'sec_per_step' not in row:
                rows.append([name, 'error: ' + str(row['error'])[-120:]] + [None] * (len(sizes) + 6))
                continue
            per_size = [row['sec_per_step'].get(str(s), row['sec_per_step'].get(s)) for s in sizes]
            peaks = row.get('peak_gb_per_size') or {}
            warm = row.get('warmup_sec_per_size') or {}
            rows.append([name, ''] + [None if v is None else v * 1e3 for v in per_size] + [
                row.get('kimg_per_sec_at_p'), row.get('kimg_per_sec_full'), row.get('speedup_at_p'), row.get('p_vs_full'),
                ' / '.join(f'{peaks[k]:.2f}' for k in peaks) or None, round(sum(warm.values()), 1) if warm else None])
        lines += md_table(['code', 'note'] + [f'ms/step {s}x{s}' for s in sizes] +
                          [f'kimg/s p={vs["real_p"]:g}', 'kimg/s full', 'x official (p)', 'p vs full',
                           'peak GiB per size', 'warm-up s (compile)'], rows)
    else:
        lines += [f'vs_official: {vs.get("skipped") or "no result"}', '']
    ss = part.get('sample_speed') or {}
    if ss.get('batches'):
        lines += [f'Sampling, {ss.get("steps")} Heun steps, network {ss.get("preset") or ss.get("network")} '
                  f'(`bench/sample_speed.py`):', '']
        lines += md_table(['batch', 'ours img/s', 'EDM edm_sampler img/s', 'ours / EDM', 'max abs(ours - EDM)',
                           'uint8 values differing', 'peak GiB'],
                          [[b['batch'], b.get('images_per_sec'), b.get('edm_images_per_sec'), b.get('ours_vs_edm'),
                            b.get('max_abs_diff'), b.get('uint8_pixels_differing'), b.get('peak_memory_gb')]
                           for b in ss['batches']])
        lines += [f'TF32 flags while sampling: {ss.get("precision_flags")}', '']
    dw = part.get('data_wait') or {}
    if dw.get('rows'):
        lines += ['Loader share of the step (`bench/data_wait.py`, `Timing/data_wait_sec`):', '']
        lines += md_table(['config', 'steps', 'wait ms/step', 'step ms', 'wait share %'],
                          [[r['config'], r['steps'], r['wait_ms'], r['step_ms'], r['share']] for r in dw['rows']])
    targets = part.get('targets') or {}
    if 'met' in targets:
        lines += [f'Targets ({targets["mode"]}):', '']
        lines += md_table(['target', 'measured', 'met'], [
            [f'x official per kimg at p=0.5 >= {TARGETS["speedup_vs_official"]}', targets['speedup_vs_official'],
             targets['met']['speedup_vs_official']],
            [f'p=0.5 vs full per kimg >= {TARGETS["p_vs_full"]}', targets['p_vs_full'], targets['met']['p_vs_full']],
            ['peak GiB at patch sizes <= full size', f'{targets["peak_patches_gb"]} vs {targets["peak_full_gb"]}',
             targets['met']['peak_memory']]])
    return lines


def payoff_md(part: Dict[str, Any]) -> List[str]:
    """Per arm: kimg, held-out loss (final and at the common kimg), FID and KID once scored."""
    lines = ['## 3. Payoff at equal wall clock', '']
    setup = part.get('setup') or {}
    if setup:
        lines += [f'{setup["budget_s"]} s per arm, train.py --preset={setup["preset"]} {setup["extra"]}; '
                  f'{setup["samples"]} samples with {setup["steps"]} Heun steps.', '']
    arms = part.get('arms') or {}
    lines += md_table(['arm', 'kimg', 'held-out loss', f'at {part.get("common_kimg", 0):.1f} kimg', 'FID', 'KID'],
                      [[arm, a['kimg'], a['heldout_loss'], a['heldout_loss_at_kimg'], a.get('fid'), a.get('kid')]
                       for arm, a in arms.items()])
    return lines


def render_markdown(record: Dict[str, Any]) -> str:
    """The suite's tables, with where and when they were measured, and each failed step with its error."""
    env = record['environment']
    lines = [f'# GPU suite: {env["device_name"]}, torch {env["torch"]}, CUDA {env["cuda"]}, {record["date"]}, '
             f'commit {record["commit"][:10]}{" (smoke)" if record["smoke"] else ""}', '']
    renderers: Dict[str, Callable[[Dict[str, Any]], List[str]]] = dict(
        correctness=correctness_md, speed=speed_md, payoff=payoff_md)
    for name in PARTS:
        part = record['parts'].get(name)
        if part is None:
            continue
        lines += renderers[name](part)
        failed = {k: v for k, v in (part.get('steps') or {}).items() if not v['ok']}
        lines += [f'- step `{k}` failed: {v["error"]}' for k, v in failed.items()] + ([''] if failed else [])
    return '\n'.join(lines)


def pack_logs(workdir: str, path: str, most_bytes: int = 2 ** 21) -> None:
    """The logs, JSON and stats of every step under `workdir` (files up to `most_bytes`) as one .tgz, for a post-mortem."""
    with tarfile.open(path + '.tmp', 'w:gz') as tar:
        for folder, _, names in os.walk(workdir):
            for name in sorted(names):
                full = os.path.join(folder, name)
                if name.endswith(('.log', '.json', '.jsonl', '.xml', '.md')) and os.path.getsize(full) <= most_bytes:
                    tar.add(full, arcname=os.path.relpath(full, workdir))
    os.replace(path + '.tmp', path)


def git_commit() -> str:
    """The checkout's HEAD commit, or 'unknown' outside a git checkout (the device machine gets a copy without .git)."""
    proc = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else 'unknown'


# --- CLI ------------------------------------------------------------------------------------------------------

@click.group()
def cli() -> None:
    """The GPU suite: `run` measures, `score` adds FID and KID of the payoff samples."""


@cli.command()
@click.option('--out', help='Where gpu_suite.json/.md and the samples go  [default: $OUT, else bench-out/gpu-suite]', metavar='DIR')
@click.option('--workdir', help='Scratch space for runs and logs  [default: OUT/../gpu-suite-work]', metavar='DIR')
@click.option('--parts', 'part_list', help='Parts to run', metavar='LIST', default=','.join(PARTS), show_default=True)
@click.option('--smoke', help='Run every part on the CPU with tiny sizes', is_flag=True)
@click.option('--official', help='Checkout of the official Patch Diffusion code (speed part)', metavar='DIR',
              type=click.Path(exists=True, file_okay=False))
@click.option('--edm', help='Checkout of NVlabs/edm (its edm_sampler, speed part)', metavar='DIR',
              type=click.Path(exists=True, file_okay=False))
@click.option('--data', help='Twemoji 32x32 training set (payoff part)  [default: a small demo set with --smoke]', metavar='ZIP',
              type=click.Path(exists=True))
@click.option('--heldout', help='Its held-out images (dataset_tool.py --heldout-dest)', metavar='ZIP', type=click.Path(exists=True))
@click.option('--commit', help='Git commit to record  [default: git rev-parse HEAD]', metavar='SHA')
@click.option('--deadline', help='Seconds the whole run may take: later steps get what is left, or are not run', metavar='SEC',
              type=click.FloatRange(min=0, min_open=True))
def run(out: Optional[str], workdir: Optional[str], part_list: str, smoke: bool, official: Optional[str], edm: Optional[str],
        data: Optional[str], heldout: Optional[str], commit: Optional[str], deadline: Optional[float]) -> None:
    """Run the parts, each step capped, writing the JSON and the tables after every step."""
    parts = [p.strip() for p in part_list.split(',') if p.strip()]
    if not parts or any(p not in PARTS for p in parts):
        raise click.BadParameter(f'"{part_list}": choose from {", ".join(PARTS)}', param_hint='--parts')
    size = SIZES['smoke' if smoke else 'full']
    if size['device'] == 'cuda' and not torch.cuda.is_available():
        raise click.ClickException('no CUDA device here: run on a GPU, or use --smoke for the CPU')
    if 'payoff' in parts and not smoke and data is None:
        raise click.BadParameter('the payoff part needs the Twemoji 32x32 set (README: Preparing a data set)', param_hint='--data')
    out = os.path.abspath(out or os.environ.get('OUT') or os.path.join(ROOT, 'bench-out', 'gpu-suite'))
    workdir = os.path.abspath(workdir or os.path.join(os.path.dirname(out), 'gpu-suite-work'))
    previous = read_json(os.path.join(out, JSON_NAME)) or {}
    device = torch.device(size['device'])
    record = dict(previous, suite='gpu_suite', smoke=smoke, commit=commit or git_commit(),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                  environment=environment(device), sizes=size, parts=previous.get('parts', {}))
    start = time.time()
    suite = Suite(out, workdir, record, None if deadline is None else start + deadline)
    for name in parts:  # a rerun of some parts replaces only those
        record['parts'][name] = dict(started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'))
    suite.log(f'GPU suite on {record["environment"]["device_name"]}, torch {torch.__version__}, parts {parts}')
    for name in parts:
        part_start = time.time()
        try:
            if name == 'correctness':
                part_correctness(suite, size, smoke)
            elif name == 'speed':
                part_speed(suite, size, official, edm)
            else:
                part_payoff(suite, size, data, heldout)
        except Exception as err:  # a part's own bug is recorded like a failed step; the suite goes on
            record['parts'][name]['error'] = f'{type(err).__name__}: {err}'
            suite.log(f'[{name}] error: {err}')
        record['parts'][name]['seconds'] = round(time.time() - part_start, 1)
        suite.save()
    record['seconds'] = round(time.time() - start, 1)
    suite.save()
    pack_logs(workdir, os.path.join(out, LOGS_NAME))
    suite.log(f'Done in {record["seconds"]:.0f} s: {os.path.join(out, JSON_NAME)}, {os.path.join(out, MD_NAME)}')


@cli.command()
@click.option('--suite', 'suite_path', help='gpu_suite.json to add the scores to', metavar='JSON', required=True,
              type=click.Path(exists=True, dir_okay=False))
@click.option('--samples', 'samples_dir', help='Folder with payoff-ARM.npz  [default: beside --suite]', metavar='DIR')
@click.option('--data', help='The training set the samples are scored against', metavar='ZIP', required=True,
              type=click.Path(exists=True))
@click.option('--detector', help='fid.py --detector', metavar='NAME|PKL|PT|URL', default='inception-offline', show_default=True)
@click.option('--grids', help='Also write a sample grid per arm here as payoff-ARM.png  [default: beside --suite]', metavar='DIR')
def score(suite_path: str, samples_dir: Optional[str], data: str, detector: str, grids: Optional[str]) -> None:
    """FID and KID of each payoff arm's samples against as many random training images, and a grid per arm."""
    from bench.ablation import inception_reference
    import fid
    from training.images import save_image_grid
    record = read_json(suite_path)
    arms = ((record or {}).get('parts', {}).get('payoff') or {}).get('arms')
    if not arms:
        raise click.ClickException(f'{suite_path} holds no payoff results to score')
    folder = os.path.dirname(os.path.abspath(suite_path))
    samples_dir, grids = samples_dir or folder, grids or folder
    samples = {}
    for arm, result in arms.items():
        path = os.path.join(samples_dir, result.get('samples') or f'payoff-{arm}.npz')
        if not os.path.isfile(path):
            raise click.ClickException(f'{path} is missing: copy the payoff samples from the run\'s --out')
        with np.load(path) as npz:
            samples[arm] = torch.from_numpy(npz['samples']).permute(0, 3, 1, 2).contiguous()
    counts = {len(images) for images in samples.values()}
    if len(counts) != 1:
        raise click.ClickException(f'the arms hold different numbers of samples ({sorted(counts)}); FID is only comparable at equal counts')
    inception, detector_name = inception_reference(data, counts.pop(), detector)
    for arm, images in samples.items():
        result = arms[arm]
        result.update(fid.fid_kid(images, inception.ref_stats, inception.detector, torch.device('cpu')),
                      scored_against=f'{len(images)} random images of {os.path.basename(data)}', detector=detector_name)
        save_image_grid(images[:64], os.path.join(grids, f'payoff-{arm}.png'), min_tile=128)
        print(f'{arm}: FID {result["fid"]:.2f}, KID {result["kid"]:.4f} ({len(images)} samples)', flush=True)
    text = json.dumps(record, indent=2) + '\n'
    atomic_write(suite_path, lambda f: f.write(text.encode()))
    markdown = render_markdown(record)
    atomic_write(os.path.join(folder, MD_NAME), lambda f: f.write(markdown.encode()))
    print(f'Wrote {suite_path} and {os.path.join(folder, MD_NAME)}')


if __name__ == '__main__':
    cli()
