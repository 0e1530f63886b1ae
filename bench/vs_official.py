"""The training step of the official Patch Diffusion code against this project's, on the same network, in one run.

The baseline is the authors' code itself, run from its checkout (kept outside version control, e.g. .baselines/; its
licence allows running it, not copying it): its Patch_EDMPrecond, its Patch_EDMLoss and torch.optim.Adam, stepped the
way its training loop steps them (fp32, the images of a step concatenated from `batch_mul` loader batches, the summed
loss scaled by 1 / (batch * batch_mul), nan_to_num on every gradient, Adam with its train.py's arguments). This
project's step is training_loop.optimizer_step() with the preset's options, in each `--ours` mode (see MODES in
bench/train_throughput.py; `fp32` is what train.py runs for the preset).

Both run in fresh processes (the two code bases have packages of the same names) that alternate round by round:
official, ours mode 1, ours mode 2, ..., official, ... Each process builds its network from the same preset
configuration, warms up every patch size, then times `--steps` steps per size on synthetic images made once on the
device. Per size the table gives the median over rounds of the mean s/step; per kimg it combines them at `--real-p`
with the schedule's probabilities and batch multipliers:
  kimg/s(p) = batch * sum_i p_i m_i / sum_i p_i t_i / 1000.

  python bench/vs_official.py --official=.baselines/patch-diffusion --preset=demo --device=cpu --batch-gpu=16
  python bench/vs_official.py --official=.baselines/patch-diffusion --preset=celeba64 --device=cuda --ours=fp32,bf16,bf16+compile --json=vs-official-celeba64.json
"""

import json
import os
import resource
import statistics
import subprocess
import sys
from typing import Any, Dict, List, Optional

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

# Runs with the official checkout first on sys.path; its only input is the JSON spec in argv[1].
OFFICIAL_WORKER = r'''
import json, resource, sys, time
import torch
from training.networks import Patch_EDMPrecond
from training.patch_loss import Patch_EDMLoss
import dnnlib
spec = json.loads(sys.argv[1])
device = torch.device(spec['device'])
def sync():
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
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
for size in spec['sizes']:
    for _ in range(spec['warmup']):
        step(size)
times = {}
for size in spec['sizes']:
    sync(); start = time.perf_counter()
    for _ in range(spec['steps']):
        step(size)
    sync(); times[str(size)] = (time.perf_counter() - start) / spec['steps']
peak = torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print('RESULT ' + json.dumps(dict(sec_per_step=times, peak_gb=peak / 2 ** 30, params=sum(p.numel() for p in net.parameters()))))
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


def measure_ours(spec: Dict[str, Any]) -> Dict[str, Any]:
    """This project's step in one mode at every patch size; the same protocol as OFFICIAL_WORKER."""
    device = torch.device(spec['device'])
    trainer = train_throughput.make_trainer('p=0.5', spec['mode'], spec['preset'], spec['cbase'], spec['resolution'],
                                            device, spec['seed'])
    data = train_throughput.SyntheticData(spec['batch'], max(map(trainer.multiplier, spec['sizes'])), spec['resolution'],
                                          common.label_dim(preset_options(spec['preset'])), device, spec['seed'])
    for size in spec['sizes']:
        trainer.run([size] * spec['warmup'], data)
    times = {str(size): common.timed(lambda: trainer.run([size] * spec['steps'], data), device) / spec['steps']
             for size in spec['sizes']}
    return dict(sec_per_step=times, peak_gb=process_peak_bytes(device) / common.GIB, params=common.parameter_count(trainer.net))


def process_peak_bytes(device: torch.device) -> int:
    """Peak memory of this whole process, as OFFICIAL_WORKER measures it: CUDA max_memory_allocated, else peak RSS."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_worker(command: List[str], env: Dict[str, str], cwd: str, what: str) -> Dict[str, Any]:
    """Run one measuring process and return the JSON it printed after RESULT_MARK."""
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        raise click.ClickException(f'{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}')
    return json.loads(lines[-1][len(RESULT_MARK):])


def per_kimg(sec_per_step: Dict[int, float], schedule: PatchSchedule, batch: int, multipliers: Dict[int, int]) -> float:
    """kimg/s of a step mix drawn with the schedule's probabilities, from per-size s/step."""
    pairs = [(p, s) for p, s in zip(schedule.probs, schedule.sizes) if p > 0]
    images = batch * sum(p * multipliers[s] for p, s in pairs)
    return images / sum(p * sec_per_step[s] for p, s in pairs) / 1e3


def summarize(rounds: List[Dict[str, Dict[str, Any]]], names: List[str], sizes: List[int], batch: int,
              schedule: PatchSchedule, multipliers: Dict[str, Dict[int, int]]) -> Dict[str, Dict[str, Any]]:
    """Per implementation: median s/step per size over rounds, kimg/s at p and full, and speedups over the official."""
    rows = {}
    for name in names:
        median = {s: statistics.median(r[name]['sec_per_step'][str(s)] for r in rounds) for s in sizes}
        rows[name] = dict(sec_per_step=median, rounds=[r[name]['sec_per_step'] for r in rounds],
                          peak_gb=max(r[name]['peak_gb'] for r in rounds), params=rounds[0][name]['params'],
                          kimg_per_sec_at_p=per_kimg(median, schedule, batch, multipliers[name]),
                          kimg_per_sec_full=batch / median[schedule.resolution] / 1e3)
    official = rows['official']
    for row in rows.values():
        row['speedup_per_size'] = {s: official['sec_per_step'][s] / row['sec_per_step'][s] for s in sizes}
        row['speedup_at_p'] = row['kimg_per_sec_at_p'] / official['kimg_per_sec_at_p']
        row['p_vs_full'] = row['kimg_per_sec_at_p'] / row['kimg_per_sec_full']
    return rows


def print_report(result: Dict[str, Any]) -> None:
    """One table per size and one per kimg."""
    env, sizes = result['environment'], result['sizes']
    print(f'\n{result["preset"]} at {result["resolution"]}x{result["resolution"]}, batch {result["batch_gpu"]}, '
          f'{result["rounds_run"]} rounds x {result["steps"]} steps per size, on {env["device_name"]}, torch {env["torch"]}; '
          f'official at {result["official_commit"][:10]}\n')
    table = []
    for name, row in result['rows'].items():
        for s in sizes:
            m = result['multipliers'][name][s]
            table.append(dict(impl=name, step=f'{s}x{s} x{m}', sec=row['sec_per_step'][s], speedup=row['speedup_per_size'][s]))
    print(common.format_table(table, [('code', 'impl', ''), ('step', 'step', ''), ('s/step (median)', 'sec', '.4f'),
                                      ('speedup vs official', 'speedup', '.2f')]))
    print()
    print(common.format_table(list(dict(row, impl=name) for name, row in result['rows'].items()), [
        ('code', 'impl', ''), (f'kimg/s at p={result["real_p"]:g}', 'kimg_per_sec_at_p', '.4f'),
        ('kimg/s full', 'kimg_per_sec_full', '.4f'), ('speedup vs official at p', 'speedup_at_p', '.2f'),
        ('p vs full', 'p_vs_full', '.2f'), ('peak GiB', 'peak_gb', '.3f')]))
    print(f'peak memory: {result["memory_kind"]}')
    if result['official_fallback_sizes']:
        print(f'The official loop has no batch multiplier for {result["official_fallback_sizes"]} at this resolution '
              '(its training would stop with KeyError); those rows use this project\'s multiplier.')


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
@click.option('--json', 'json_path', help='Also write the results here', metavar='PATH')
@click.option('--cbase', help='Override the preset channel multiplier (small test runs)', type=click.IntRange(min=1), hidden=True)
@click.option('--worker', help='Internal: measure this project\'s step for a JSON spec and print it', hidden=True)
def main(official_dir: str, preset: str, device: str, batch_gpu: Optional[int], modes: str, real_p: float, rounds: int,
         warmup: int, steps: int, seed: int, json_path: Optional[str], cbase: Optional[int], worker: Optional[str]) -> None:
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
    results: List[Dict[str, Dict[str, Any]]] = []
    for r in range(rounds):
        result = {'official': run_worker([sys.executable, '-c', OFFICIAL_WORKER, json.dumps(spec)], official_env,
                                         os.path.abspath(official_dir), 'the official step')}
        for mode in names:
            ours = dict(spec, mode=mode, preset=preset, cbase=cbase)
            result[mode] = run_worker([sys.executable, os.path.abspath(__file__), f'--official={official_dir}',
                                       f'--worker={json.dumps(ours)}'], dict(os.environ), ROOT, f'this project\'s {mode} step')
        print(f'round {r + 1}/{rounds}: ' + ', '.join(f'{name} {json.dumps(v["sec_per_step"])}' for name, v in result.items()),
              flush=True)
        results.append(result)
    rows = summarize(results, ['official', *names], sizes, batch, schedule, multipliers)
    report = dict(benchmark='vs_official', environment=common.environment(torch_device), preset=preset, resolution=resolution,
                  batch_gpu=batch, real_p=real_p, rounds_run=rounds, warmup=warmup, steps=steps, seed=seed, cbase=cbase,
                  sizes=sizes, multipliers=multipliers, official_fallback_sizes=fallback,
                  official_commit=git_commit(official_dir), official_network_kwargs=spec['network_kwargs'],
                  memory_kind='CUDA max_memory_allocated' if torch_device.type == 'cuda' else 'peak RSS of each process',
                  rows=rows)
    common.print_and_save(report, print_report, json_path)


if __name__ == '__main__':
    main()
