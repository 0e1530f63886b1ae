"""The training step of the official Patch Diffusion code against this project's, on the same network, in one run.

The baseline is the authors' code itself, run from its checkout (kept outside version control, e.g. .baselines/; its
licence allows running it, not copying it): its Patch_EDMPrecond, its Patch_EDMLoss and torch.optim.Adam, stepped the
way its training loop steps them (fp32, the images of a step concatenated from `batch_mul` loader batches, the summed
loss scaled by 1 / (batch * batch_mul), nan_to_num on every gradient, Adam with its train.py's arguments). This
project's step is training_loop.optimizer_step() with the preset's options, in each `--ours` mode (see MODES in
bench/train_throughput.py; `fp32` is what train.py runs for the preset). Each process sets the precision flags its own
loop sets on CUDA: the official loop cuDNN benchmarking on and TF32 off for matmuls and cuDNN (and no reduced-precision
fp16 reductions); this project's loop --bench and --tf32 as build_config() resolves them for the preset (on, off).

Both run in fresh processes (the two code bases have packages of the same names) that alternate round by round:
official, ours mode 1, ours mode 2, ..., official, ... Each process builds its network from the same preset
configuration, warms up every patch size (timed on its own: for a `+compile` mode that is the compilation), then
times `--steps` steps per size on synthetic images made once on the device, recording the peak memory of each size's
timed steps. Per size the table gives the median over rounds of the mean s/step; per kimg it combines them at
`--real-p` with the schedule's probabilities and batch multipliers:
  kimg/s(p) = batch * sum_i p_i m_i / sum_i p_i t_i / 1000.

A process that fails, or outlasts `--worker-timeout`, becomes an error in its row and is not run again in later rounds;
the rest is still reported. The JSON is rewritten after every round, so an interrupted run leaves the rounds it did.
With `--profile` this project's processes of the first round also profile one step per size after timing.

  python bench/vs_official.py --official=.baselines/patch-diffusion --preset=demo --device=cpu --batch-gpu=16
  python bench/vs_official.py --official=.baselines/patch-diffusion --preset=celeba64 --device=cuda --ours=fp32,bf16,bf16+compile --json=vs-official-celeba64.json
"""

import json
import os
import resource
import signal
import statistics
import subprocess
import sys
from typing import Any, Callable, Dict, List, Optional

import click
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import common, train_throughput  # noqa: E402
from bench.check_references import git_commit  # noqa: E402
from torch_utils.distributed import choose_device  # noqa: E402
from train import build_config, preset_options  # noqa: E402
from training.patch import PatchSchedule  # noqa: E402

# The official training loop's batch multipliers: loader batches per step = table[patch] // table[resolution].
# It has no entry for 8x8, so at 32x32 its R/4 step raises KeyError; there the bench uses this project's x4.
OFFICIAL_BATCH_MUL = {512: 1, 256: 2, 128: 4, 64: 16, 32: 32, 16: 64}
OURS_ONLY_NETWORK_KEYS = ('class_name', 'pos_channels', 'use_bf16', 'attn_impl')
RESULT_MARK = 'RESULT '
ERROR_LINES = 15  # lines of a failed worker's stderr kept in its row
# CPU-side calls that launch work on the GPU, as the profiler names them.
LAUNCH_CALLS = ('cudaLaunchKernel', 'cudaLaunchKernelExC', 'cuLaunchKernel', 'cuLaunchKernelEx', 'cudaGraphLaunch',
                'cudaLaunchCooperativeKernel')

# Runs with the official checkout first on sys.path; its only input is the JSON spec in argv[1].
OFFICIAL_WORKER = r'''
import json, resource, sys, time
import torch
from training.networks import Patch_EDMPrecond
from training.patch_loss import Patch_EDMLoss
import dnnlib
spec = json.loads(sys.argv[1])
device = torch.device(spec['device'])
# As the official training loop sets them.
torch.backends.cudnn.benchmark = True
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
def sync():
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
def peak():
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30
torch.manual_seed(spec['seed'])
net = Patch_EDMPrecond(img_resolution=spec['resolution'], img_channels=5, out_channels=3, label_dim=spec['label_dim'],
                       **spec['network_kwargs']).train().requires_grad_(True).to(device)
loss_fn = Patch_EDMLoss()
augment_pipe = dnnlib.util.construct_class_by_name(**spec['augment_kwargs']) if spec['augment_kwargs'] else None
optimizer = torch.optim.Adam(net.parameters(), lr=spec['lr'], betas=[0.9, 0.999], eps=1e-8)
g = torch.Generator(device).manual_seed(spec['seed'])
batch, R = spec['batch'], spec['resolution']
num = batch * max(spec['multipliers'].values())
images = torch.rand([num, 3, R, R], generator=g, device=device) * 2 - 1
labels = torch.nn.functional.one_hot(torch.randint(max(spec['label_dim'], 1), [num], generator=g, device=device),
                                     max(spec['label_dim'], 1)).float()[:, :spec['label_dim']]
def step(size):
    mul = spec['multipliers'][str(size)]
    optimizer.zero_grad(set_to_none=True)
    x = torch.cat([images[i * batch:(i + 1) * batch] for i in range(mul)])
    y = torch.cat([labels[i * batch:(i + 1) * batch] for i in range(mul)])
    loss = loss_fn(net=net, images=x, patch_size=size, resolution=R, labels=y, augment_pipe=augment_pipe)
    loss.sum().mul(1 / batch / mul).backward()
    for group in optimizer.param_groups:
        group['lr'] = spec['lr']
    for param in net.parameters():
        if param.grad is not None:
            torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
    optimizer.step()
warmup = {}
for size in spec['sizes']:
    sync(); start = time.perf_counter()
    for _ in range(spec['warmup']):
        step(size)
    sync(); warmup[str(size)] = time.perf_counter() - start
total_peak = peak()
times, peaks = {}, {}
for size in spec['sizes']:
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    sync(); start = time.perf_counter()
    for _ in range(spec['steps']):
        step(size)
    sync(); times[str(size)] = (time.perf_counter() - start) / spec['steps']
    peaks[str(size)] = peak()
flags = dict(cudnn_benchmark=torch.backends.cudnn.benchmark, cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
             matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
print('RESULT ' + json.dumps(dict(sec_per_step=times, warmup_sec=warmup, peak_gb_per_size=peaks,
                                  peak_gb=max(total_peak, *peaks.values()), precision_flags=flags,
                                  params=sum(p.numel() for p in net.parameters()))))
'''


def official_multiplier(resolution: int, size: int, ours: int) -> int:
    """Loader batches per step in the official loop, or `ours` where its table has no entry."""
    if size in OFFICIAL_BATCH_MUL and resolution in OFFICIAL_BATCH_MUL:
        return OFFICIAL_BATCH_MUL[size] // OFFICIAL_BATCH_MUL[resolution]
    return ours


def official_spec(preset: str, resolution: int, batch: int, device: torch.device, seed: int, warmup: int, steps: int,
                  sizes: List[int], multipliers: Dict[int, int], cbase: Optional[int]) -> Dict[str, Any]:
    """The official worker's input: the preset's network, augmentation and lr in the official classes' terms."""
    opts = preset_options(preset, patch='on', real_p=0.5, progressive=False, **({} if cbase is None else dict(cbase=cbase)))
    c = build_config(opts, 'synthetic', resolution, world_size=1)
    network_kwargs = {k: v for k, v in c.network_kwargs.items() if k not in OURS_ONLY_NETWORK_KEYS}
    return dict(device=str(device), seed=seed, resolution=resolution, batch=batch, label_dim=common.label_dim(opts),
                network_kwargs=network_kwargs, augment_kwargs=dict(c.augment_kwargs) if c.augment_kwargs else None,
                lr=c.optimizer_kwargs.lr, warmup=warmup, steps=steps, sizes=sizes,
                multipliers={str(s): official_multiplier(resolution, s, multipliers[s]) for s in sizes})


def precision_flags() -> Dict[str, Any]:
    """The backend flags a step ran under (None where this torch cannot report one)."""
    flags = {}
    for name, read in (('cudnn_benchmark', lambda: torch.backends.cudnn.benchmark),
                       ('cudnn_allow_tf32', lambda: torch.backends.cudnn.allow_tf32),
                       ('matmul_allow_tf32', lambda: torch.backends.cuda.matmul.allow_tf32)):
        try:
            flags[name] = bool(read())
        except (AttributeError, RuntimeError):
            flags[name] = None
    return flags


def set_loop_flags(spec: Dict[str, Any], device: torch.device) -> None:
    """Set cuDNN benchmarking and TF32 as training_loop() does for this mode's build_config()."""
    options = train_throughput.MODES[spec['mode']][0]
    opts = preset_options(spec['preset'], **train_throughput.CONFIGS['p=0.5'], **options,
                          **({} if spec['cbase'] is None else dict(cbase=spec['cbase'])))
    c = build_config(opts, 'synthetic', spec['resolution'], world_size=1)
    if device.type == 'cuda':  # training_loop() sets them on CUDA only
        torch.backends.cudnn.benchmark = c.cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = c.tf32
        torch.backends.cudnn.allow_tf32 = c.tf32


def reset_peak(device: torch.device) -> None:
    """Start a new CUDA peak; on the CPU the peak RSS cannot be reset and stays the process's."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


def profile_step(step: Callable[[], None], device: torch.device) -> Dict[str, Any]:
    """torch.profiler's top-15 table of one step and, on CUDA, its kernel launches and kernels."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == 'cuda'
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        common.synchronize(device)
    averages = prof.key_averages()
    table = averages.table(sort_by='self_cuda_time_total' if cuda else 'self_cpu_time_total', row_limit=15)
    if not cuda:
        return dict(table=table, cuda_kernel_launches=None, cuda_kernels=None)
    # Two counts, as a check on each other: launch calls on the host, and kernels that ran on the device.
    launches = sum(a.count for a in averages if a.key in LAUNCH_CALLS)
    kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                  and not e.name.startswith(('Memcpy', 'Memset')))
    return dict(table=table, cuda_kernel_launches=launches, cuda_kernels=kernels)


def measure_ours(spec: Dict[str, Any]) -> Dict[str, Any]:
    """This project's step in one mode at every patch size; the same protocol as OFFICIAL_WORKER."""
    device = torch.device(spec['device'])
    set_loop_flags(spec, device)
    trainer = train_throughput.make_trainer('p=0.5', spec['mode'], spec['preset'], spec['cbase'], spec['resolution'],
                                            device, spec['seed'])
    data = train_throughput.SyntheticData(spec['batch'], max(map(trainer.multiplier, spec['sizes'])), spec['resolution'],
                                          common.label_dim(preset_options(spec['preset'])), device, spec['seed'])
    warmup = {str(size): common.timed(lambda: trainer.run([size] * spec['warmup'], data), device) for size in spec['sizes']}
    total_peak = process_peak_bytes(device)
    times, peaks = {}, {}
    for size in spec['sizes']:
        reset_peak(device)
        times[str(size)] = common.timed(lambda: trainer.run([size] * spec['steps'], data), device) / spec['steps']
        peaks[str(size)] = process_peak_bytes(device) / common.GIB
    result = dict(sec_per_step=times, warmup_sec=warmup, peak_gb_per_size=peaks,
                  peak_gb=max(total_peak / common.GIB, *peaks.values()), precision_flags=precision_flags(),
                  params=common.parameter_count(trainer.net))
    if spec.get('profile'):
        result['profile'] = {}
        for size in spec['sizes']:
            try:
                result['profile'][str(size)] = profile_step(lambda: trainer.run([size], data), device)
            except Exception as err:  # a profiler failure costs the profile, not the timings
                result['profile'][str(size)] = dict(error=f'{type(err).__name__}: {err}')
    return result


def process_peak_bytes(device: torch.device) -> int:
    """Peak memory as OFFICIAL_WORKER measures it: CUDA max_memory_allocated since the last reset, else peak RSS."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_worker(command: List[str], env: Dict[str, str], cwd: str, what: str, timeout: Optional[float] = None) -> Dict[str, Any]:
    """Run one measuring process and return the JSON it printed after RESULT_MARK, or dict(error=...) where it
    failed, printed none, or ran past `timeout` seconds (then its whole process group is killed)."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        return dict(error=f'{what} timed out after {timeout:g} s')
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        tail = '\n'.join(stderr.strip().splitlines()[-ERROR_LINES:])
        return dict(error=f'{what} failed (exit {proc.returncode}):\n{tail}')
    return json.loads(lines[-1][len(RESULT_MARK):])


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with start_new_session and everything in its group, and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:  # a grandchild that left the group still holds the pipes
        pass


def per_kimg(sec_per_step: Dict[int, float], schedule: PatchSchedule, batch: int, multipliers: Dict[int, int]) -> float:
    """kimg/s of a step mix drawn with the schedule's probabilities, from per-size s/step."""
    pairs = [(p, s) for p, s in zip(schedule.probs, schedule.sizes) if p > 0]
    images = batch * sum(p * multipliers[s] for p, s in pairs)
    return images / sum(p * sec_per_step[s] for p, s in pairs) / 1e3


def _per_size(done: List[Dict[str, Any]], key: str, sizes: List[int], combine: Callable) -> Optional[Dict[int, float]]:
    """combine() over rounds of a per-size field, or None where a round lacks it."""
    if not all(key in r for r in done):
        return None
    return {s: combine(r[key][str(s)] for r in done) for s in sizes}


def summarize(rounds: List[Dict[str, Dict[str, Any]]], names: List[str], sizes: List[int], batch: int,
              schedule: PatchSchedule, multipliers: Dict[str, Dict[int, int]]) -> Dict[str, Dict[str, Any]]:
    """Per implementation: median s/step per size over its successful rounds, kimg/s at p and full, and speedups over
    the official (None without an official result); an implementation with no successful round gets only `error`."""
    rows = {}
    for name in names:
        done = [r[name] for r in rounds if 'sec_per_step' in r.get(name, {})]
        errors = [r[name]['error'] for r in rounds if 'error' in r.get(name, {})]
        if not done:
            rows[name] = dict(error=errors[-1] if errors else 'not run', errors=errors)
            continue
        median = {s: statistics.median(r['sec_per_step'][str(s)] for r in done) for s in sizes}
        rows[name] = dict(sec_per_step=median, rounds=[r['sec_per_step'] for r in done],
                          warmup_sec_per_size=_per_size(done, 'warmup_sec', sizes, statistics.median),
                          warmup_sec_rounds=[r.get('warmup_sec') for r in done],
                          peak_gb=max(r['peak_gb'] for r in done),
                          peak_gb_per_size=_per_size(done, 'peak_gb_per_size', sizes, max),
                          params=done[0]['params'], precision_flags=done[0].get('precision_flags'),
                          kimg_per_sec_at_p=per_kimg(median, schedule, batch, multipliers[name]),
                          kimg_per_sec_full=batch / median[schedule.resolution] / 1e3, errors=errors)
        profile = next((r['profile'] for r in done if 'profile' in r), None)
        if profile is not None:
            rows[name]['profile'] = profile
    official = rows.get('official', {})
    for row in rows.values():
        if 'error' in row:
            continue
        row['p_vs_full'] = row['kimg_per_sec_at_p'] / row['kimg_per_sec_full']
        if 'error' in official or not official:
            row['speedup_per_size'], row['speedup_at_p'] = None, None
            continue
        row['speedup_per_size'] = {s: official['sec_per_step'][s] / row['sec_per_step'][s] for s in sizes}
        row['speedup_at_p'] = row['kimg_per_sec_at_p'] / official['kimg_per_sec_at_p']
    return rows


def print_report(result: Dict[str, Any]) -> None:
    """One table per size, one per kimg, then the errors."""
    env, sizes = result['environment'], result['sizes']
    print(f'\n{result["preset"]} at {result["resolution"]}x{result["resolution"]}, batch {result["batch_gpu"]}, '
          f'{result["rounds_run"]} rounds x {result["steps"]} steps per size, on {env["device_name"]}, torch {env["torch"]}; '
          f'official at {result["official_commit"][:10]}\n')
    measured = {name: row for name, row in result['rows'].items() if 'error' not in row}
    table = []
    for name, row in measured.items():
        for s in sizes:
            m = result['multipliers'][name][s]
            table.append(dict(impl=name, step=f'{s}x{s} x{m}', sec=row['sec_per_step'][s],
                              speedup=(row['speedup_per_size'] or {}).get(s),
                              peak=(row['peak_gb_per_size'] or {}).get(s), warmup=(row['warmup_sec_per_size'] or {}).get(s)))
    print(common.format_table(table, [('code', 'impl', ''), ('step', 'step', ''), ('s/step (median)', 'sec', '.4f'),
                                      ('speedup vs official', 'speedup', '.2f'), ('peak GiB', 'peak', '.3f'),
                                      ('warm-up s (compile)', 'warmup', '.2f')]))
    print(f'warm-up: {result["warmup"]} steps per size, before and outside the timed steps (median over rounds)')
    print()
    print(common.format_table(list(dict(row, impl=name) for name, row in measured.items()), [
        ('code', 'impl', ''), (f'kimg/s at p={result["real_p"]:g}', 'kimg_per_sec_at_p', '.4f'),
        ('kimg/s full', 'kimg_per_sec_full', '.4f'), ('speedup vs official at p', 'speedup_at_p', '.2f'),
        ('p vs full', 'p_vs_full', '.2f'), ('peak GiB', 'peak_gb', '.3f')]))
    print(f'peak memory: {result["memory_kind"]}')
    if result['official_fallback_sizes']:
        print(f'The official loop has no batch multiplier for {result["official_fallback_sizes"]} at this resolution '
              '(its training would stop with KeyError); those rows use this project\'s multiplier.')
    for name, row in result['rows'].items():
        for error in row.get('errors') or ([row['error']] if 'error' in row else []):
            print(f'\n{name}: {error}')


@click.command()
@click.option('--official', 'official_dir', help='Checkout of the official Patch Diffusion code', metavar='DIR', required=True,
              type=click.Path(exists=True, file_okay=False))
@click.option('--preset', help='Preset whose network, batch and options to use', type=click.Choice(list(common.PRESET_RESOLUTION)),
              default='demo', show_default=True)
@click.option('--device', help='Where to run', type=click.Choice(['auto', 'cpu', 'cuda']), default='auto', show_default=True)
@click.option('--batch-gpu', help="Batch at full size  [default: the preset's --batch]", metavar='INT', type=click.IntRange(min=1))
@click.option('--ours', 'modes', help='Comma-separated modes of this project\'s step: ' + ', '.join(train_throughput.MODES),
              metavar='LIST', default='fp32', show_default=True)
@click.option('--real-p', help='Share of full-size steps for the per-kimg row', metavar='FLOAT', type=click.FloatRange(0, 1),
              default=0.5, show_default=True)
@click.option('--rounds', help='Rounds, each running every implementation once in a fresh process', metavar='INT',
              type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--warmup', help='Warm-up steps per patch size', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True)
@click.option('--steps', help='Timed steps per patch size and process', metavar='INT', type=click.IntRange(min=1), default=5,
              show_default=True)
@click.option('--seed', help='Seed of the weights and data', metavar='INT', type=int, default=0, show_default=True)
@click.option('--worker-timeout', help='Seconds a measuring process may run before it is killed and becomes an error row',
              metavar='SEC', type=click.FloatRange(min=0, min_open=True))
@click.option('--profile', help='Also profile one step per size of this project\'s modes (first round)', is_flag=True)
@click.option('--json', 'json_path', help='Also write the results here', metavar='PATH')
@click.option('--cbase', help='Override the preset channel multiplier (small test runs)', type=click.IntRange(min=1), hidden=True)
@click.option('--worker', help='Internal: measure this project\'s step for a JSON spec and print it', hidden=True)
def main(official_dir: str, preset: str, device: str, batch_gpu: Optional[int], modes: str, real_p: float, rounds: int,
         warmup: int, steps: int, seed: int, worker_timeout: Optional[float], profile: bool, json_path: Optional[str],
         cbase: Optional[int], worker: Optional[str]) -> None:
    """Training s/step per patch size and kimg/s of the official Patch Diffusion step and of this project's."""
    if worker:
        print(RESULT_MARK + json.dumps(measure_ours(json.loads(worker))), flush=True)
        return
    names = [m.strip() for m in modes.split(',') if m.strip()]
    if not names or any(m not in train_throughput.MODES for m in names):
        raise click.BadParameter(f'"{modes}": choose from {", ".join(train_throughput.MODES)}', param_hint='--ours')
    if not os.path.isfile(os.path.join(official_dir, 'training', 'patch_loss.py')):
        raise click.BadParameter(f'{official_dir} has no training/patch_loss.py; expected a checkout of '
                                 'github.com/Zhendong-Wang/Patch-Diffusion', param_hint='--official')
    try:
        torch_device = choose_device(device)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint='--device')
    resolution, opts = common.preset_resolution(preset), preset_options(preset)
    batch = batch_gpu or opts.batch
    schedule = PatchSchedule(resolution, real_p=real_p, seed=seed)
    sizes = sorted(schedule.sizes, reverse=True)
    ours_mul = {s: schedule.batch_multiplier(s) for s in sizes}
    spec = official_spec(preset, resolution, batch, torch_device, seed, warmup, steps, sizes, ours_mul, cbase)
    multipliers = {'official': {s: spec['multipliers'][str(s)] for s in sizes}, **{m: ours_mul for m in names}}
    fallback = [s for s in sizes if s not in OFFICIAL_BATCH_MUL]
    official_env = dict(os.environ, PYTHONPATH=os.path.abspath(official_dir))
    report = dict(benchmark='vs_official', environment=common.environment(torch_device), preset=preset, resolution=resolution,
                  batch_gpu=batch, real_p=real_p, rounds_run=0, warmup=warmup, steps=steps, seed=seed, cbase=cbase,
                  worker_timeout=worker_timeout, sizes=sizes, multipliers=multipliers, official_fallback_sizes=fallback,
                  official_commit=git_commit(official_dir), official_network_kwargs=spec['network_kwargs'],
                  memory_kind='CUDA max_memory_allocated (peak per size: reset before that size\'s timed steps)'
                  if torch_device.type == 'cuda' else
                  'peak RSS of each process (peak per size: the process\'s peak RSS up to the end of that size\'s '
                  'timed steps; sizes run largest first)', complete=False, rows={})
    results: List[Dict[str, Dict[str, Any]]] = []
    failed = set()
    for r in range(rounds):
        result = {}
        if 'official' not in failed:
            result['official'] = run_worker([sys.executable, '-c', OFFICIAL_WORKER, json.dumps(spec)], official_env,
                                            os.path.abspath(official_dir), 'the official step', worker_timeout)
        for mode in names:
            if mode in failed:
                continue
            ours = dict(spec, mode=mode, preset=preset, cbase=cbase, profile=profile and r == 0)
            result[mode] = run_worker([sys.executable, os.path.abspath(__file__), f'--official={official_dir}',
                                       f'--worker={json.dumps(ours)}'], dict(os.environ), ROOT,
                                      f'this project\'s {mode} step', worker_timeout)
        failed |= {name for name, v in result.items() if 'error' in v}
        print(f'round {r + 1}/{rounds}: ' + ', '.join(
            f'{name} {json.dumps(v["sec_per_step"]) if "sec_per_step" in v else "FAILED"}' for name, v in result.items()),
            flush=True)
        results.append(result)
        report.update(rounds_run=r + 1, rows=summarize(results, ['official', *names], sizes, batch, schedule, multipliers))
        if json_path and r + 1 < rounds:
            common.write_json(json_path, report)
    report['complete'] = True
    common.print_and_save(report, print_report, json_path)
    if 'error' in report['rows']['official']:
        raise click.ClickException('the official step produced no result, so there are no speedups; '
                                   'see rows.official.error')


if __name__ == '__main__':
    main()
