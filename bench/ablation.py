"""The p-ablation on the demo set: equal wall-clock budgets for full-image EDM and Patch Diffusion at several p.

Each configuration trains the `demo` preset with train.py for `--budget` seconds (then SIGTERM: the run
saves its state and exits), writing a snapshot every tick. Afterwards every snapshot's EMA is scored by its
held-out denoising loss on fresh demo images, and the last one by the coherence of `--samples` generated
images. Writes a plot of held-out loss against wall-clock time, one sample grid per run, results.json, and
a Markdown report (default docs/results.md, with its pictures in docs/ablation/). Runs one configuration at a time; the machine should be idle.

Run from the repository root:  python bench/ablation.py --data=datasets/shapes-32x32.zip --budget=300
"""

import json
import os
import platform
import signal
import subprocess
import sys
import time
from typing import Dict, List

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import line_plot  # noqa: E402
from training import demo_shapes  # noqa: E402
from training.evaluate import heldout_loss  # noqa: E402
from training.images import save_image_grid  # noqa: E402
from training.sampler import generate_images  # noqa: E402
from training.snapshot import load_network  # noqa: E402

CONFIGS = {'full': ['--patch=off'], 'p=1.0': ['--real_p=1.0'], 'p=0.5': ['--real_p=0.5'],
           'p=0.25': ['--real_p=0.25'], 'p=0.0': ['--real_p=0.0']}


def train_for(name: str, data: str, run_dir: str, budget: float, tick_kimg: float, extra: List[str]) -> List[Dict]:
    """Train one configuration for `budget` seconds; returns its stats.jsonl records."""
    command = [sys.executable, 'train.py', '--preset=demo', f'--data={data}', f'--outdir={run_dir}', '--nosubdir', '--seed=0',
               '--duration=1000', f'--tick={tick_kimg}', '--snap=1', '--dump=100000', '--preview=False', *CONFIGS[name], *extra]
    print(f'[{name}] training for {budget:.0f} s: {" ".join(command[1:])}', flush=True)
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    with open(os.path.join(os.path.dirname(run_dir), 'train.log'), 'w') as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        start = time.time()
        try:
            process.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            process.wait()
    if process.returncode != 0:
        raise click.ClickException(f'[{name}] train.py exited with {process.returncode}; see {log.name}')
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        records = [json.loads(line) for line in f]
    for record in records:
        record['seconds'] = record['timestamp'] - start
    return records


def evaluate(name: str, run_dir: str, records: List[Dict], heldout: torch.Tensor, samples: int, steps: int,
             grid_path: str, device: torch.device) -> Dict:
    """Held-out loss of every snapshot against its time, and coherence plus a grid for the last one."""
    curve = []
    for record in records:
        path = os.path.join(run_dir, f'network-snapshot-{int(record["progress"]["kimg"]):06d}.pkl')
        if os.path.isfile(path):
            loss = heldout_loss(load_network(path, device), heldout)['mean']
            curve.append(dict(seconds=record['seconds'], kimg=record['progress']['kimg'], heldout_loss=loss))
    net = load_network(run_dir, device)
    images = torch.cat([generate_images(net, list(range(start, min(start + 64, samples))), device, num_steps=steps).cpu()
                        for start in range(0, samples, 64)])
    save_image_grid(images[:64], grid_path)
    final = heldout_loss(net, heldout)
    print(f'[{name}] kimg {curve[-1]["kimg"]:.1f}  held-out loss {final["mean"]:.4f}  '
          f'coherence {demo_shapes.coherence_score(images):.3f}', flush=True)
    return dict(curve=curve, kimg=curve[-1]['kimg'], heldout_loss=final, coherence=demo_shapes.coherence_score(images),
                grid=grid_path)


def write_report(path: str, results: Dict[str, Dict], plot: str, budget: float, samples: int, steps: int) -> None:
    """The Markdown report: setup, table, plot and grids."""
    folder = os.path.dirname(os.path.abspath(path))
    rel = lambda p: os.path.relpath(p, folder)  # noqa: E731
    lines = ['# p-ablation on the demo set', '',
             f'Made by `python bench/ablation.py` on {platform.processor() or platform.machine()} ({os.cpu_count()} CPUs), '
             f'torch {torch.__version__}. Each run trains the `demo` preset (tiny DDPM++, 32x32, see configs/demo.json) for the same '
             f'wall-clock budget of {budget:.0f} s on CPU (plus any --extra options), then is scored: held-out loss = EDM-weighted denoising loss of the EMA '
             f'on 512 fresh demo images at sigma in {{0.05, 0.2, 0.5, 1, 2, 5}} (mean); coherence = `coherence_score` of '
             f'{samples} samples ({steps} Heun steps; 1.0 = every sample mirror-symmetric and one-coloured).', '',
             '| run | kimg trained | held-out loss | coherence |', '| --- | --- | --- | --- |']
    lines += [f'| {name} | {r["kimg"]:.1f} | {r["heldout_loss"]["mean"]:.4f} | {r["coherence"]:.3f} |' for name, r in results.items()]
    lines += ['', f'![held-out loss against wall-clock time]({rel(plot)})', '', '| ' + ' | '.join(results) + ' |',
              '| ' + ' | '.join('---' for _ in results) + ' |',
              '| ' + ' | '.join(f'![{name}]({rel(r["grid"])})' for name, r in results.items()) + ' |', '']
    with open(path, 'w') as f:
        f.write('\n'.join(lines))


@click.command()
@click.option('--data', help='The demo data set (dataset_tool.py --source=demo:shapes --resolution=32x32)', metavar='ZIP', required=True)
@click.option('--outdir', help='Where the runs go', metavar='DIR', default='bench-out/ablation', show_default=True)
@click.option('--report', help='Markdown report to write', metavar='MD', default='docs/results.md', show_default=True)
@click.option('--budget', help='Wall-clock seconds of training per run', metavar='SEC', type=click.FloatRange(min=10), default=300,
              show_default=True)
@click.option('--tick', 'tick_kimg', help='Snapshot interval', metavar='KIMG', type=click.FloatRange(min=0, min_open=True), default=4,
              show_default=True)
@click.option('--configs', help='Runs to do', metavar='LIST', default=','.join(CONFIGS), show_default=True)
@click.option('--samples', help='Generated images for coherence', metavar='INT', type=click.IntRange(min=1), default=256, show_default=True)
@click.option('--steps', help='Sampling steps', metavar='INT', type=click.IntRange(min=1), default=50, show_default=True)
@click.option('--extra', help='More train.py options for every run, e.g. "--batch=16"', metavar='STR', default='')
def main(data: str, outdir: str, report: str, budget: float, tick_kimg: float, configs: str, samples: int, steps: int, extra: str) -> None:
    """Train each configuration for the same wall-clock time, then score and plot them."""
    names = configs.split(',')
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise click.BadParameter(f'unknown run(s) {unknown}; choose from {", ".join(CONFIGS)}', param_hint='--configs')
    if not os.path.exists(data):
        raise click.BadParameter(f'{data} does not exist; make it with dataset_tool.py --source=demo:shapes', param_hint='--data')
    device = torch.device('cpu')
    figures = os.path.join(os.path.dirname(os.path.abspath(report)), 'ablation')
    heldout = demo_shapes.heldout_images(512, 32)
    results = {}
    for name in names:
        run_dir = os.path.join(outdir, name, 'run')
        if os.path.isdir(run_dir):
            raise click.ClickException(f'{run_dir} exists; remove {outdir} or pick another --outdir')
        records = train_for(name, data, run_dir, budget, tick_kimg, extra.split())
        results[name] = evaluate(name, run_dir, records, heldout, samples, steps, os.path.join(figures, f'grid-{name}.png'), device)
    plot = os.path.join(figures, 'heldout-loss.png')
    line_plot({n: [(p['seconds'], p['heldout_loss']) for p in r['curve']] for n, r in results.items()}, plot,
              'wall-clock seconds', 'held-out loss')
    with open(os.path.join(outdir, 'results.json'), 'w') as f:
        json.dump(dict(budget=budget, samples=samples, steps=steps, torch=torch.__version__, results=results), f, indent=2)
    write_report(report, results, plot, budget, samples, steps)
    print(f'Wrote {report}, {plot} and {os.path.join(outdir, "results.json")}')


if __name__ == '__main__':
    main()
