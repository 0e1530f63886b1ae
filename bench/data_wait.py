"""Share of training-step time spent waiting for data, with the real loader, for full images and patch schedules.

Each config runs train.py (a subprocess, so the loader, its workers and the device are the real ones) for `--kimg`
and reads `Timing/data_wait_sec` (time a round waits for the loader's next batches; a step at R//2 or R//4 pulls 2 or 4)
and `Timing/step_sec` (the whole optimizer step, waits included) from its stats.jsonl. The first tick is left out: it
holds the loader's start-up and cache filling. Reports per config the mean wait per step, the mean step time and the
wait share = total wait / total step time; near 0% the device never starves.

Run from the repository root:
  python bench/data_wait.py --data=datasets/shapes-32x32.zip --preset=demo --workers=2
  python bench/data_wait.py --data=datasets/celeba-64x64.zip --preset=celeba64 --device=cuda --batch=64 --workers=4 --kimg=20
"""

import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, List

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {'full': ['--patch=off'], 'p=0.5': ['--real_p=0.5'], 'p=0.25': ['--real_p=0.25'], 'p=0': ['--real_p=0']}


def measure(records: List[Dict]) -> Dict[str, float]:
    """Wait and step totals over ticks 1.. of a run's stats.jsonl records (tick 0 holds start-up)."""
    steady = records[1:] or records
    wait = sum(r['Timing/data_wait_sec']['num'] * r['Timing/data_wait_sec']['mean'] for r in steady)
    step = sum(r['Timing/step_sec']['num'] * r['Timing/step_sec']['mean'] for r in steady)
    steps = sum(r['Timing/step_sec']['num'] for r in steady)
    return dict(steps=steps, wait_ms=wait / steps * 1e3, step_ms=step / steps * 1e3, share=wait / step * 100)


def run_config(name: str, args: List[str], workdir: str) -> Dict[str, float]:
    """Train one config with train.py and measure its stats.jsonl."""
    run_dir = os.path.join(workdir, name)
    command = [sys.executable, os.path.join(ROOT, 'train.py'), f'--outdir={run_dir}', '--nosubdir', '--snap=1000000', '--dump=1000000',
               '--preview=False', *CONFIGS[name], *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise click.ClickException(f'[{name}] train.py failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}')
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        return measure([json.loads(line) for line in f])


@click.command()
@click.option('--data', help='Data set to train on', metavar='ZIP|DIR', required=True)
@click.option('--preset', help='train.py preset', metavar='NAME', default='demo', show_default=True)
@click.option('--device', help='Where to train', type=click.Choice(['auto', 'cpu', 'cuda']), default='auto', show_default=True)
@click.option('--workers', help='DataLoader worker processes', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True)
@click.option('--kimg', help='Training length per config (ticks of a tenth of it)', metavar='KIMG',
              type=click.FloatRange(min=0, min_open=True), default=4, show_default=True)
@click.option('--configs', help='Configs to run', metavar='LIST', default=','.join(CONFIGS), show_default=True)
@click.option('--extra', help='More train.py options for every config, e.g. "--batch=64"', metavar='STR', default='')
@click.option('--json', 'json_path', help='Also write the results here', metavar='PATH')
def main(data: str, preset: str, device: str, workers: int, kimg: float, configs: str, extra: str, json_path: str) -> None:
    """Measure the loader wait share of each config and print a table."""
    names = configs.split(',')
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise click.BadParameter(f'unknown config(s) {unknown}; choose from {", ".join(CONFIGS)}', param_hint='--configs')
    if not os.path.exists(data):
        raise click.BadParameter(f'{data} does not exist', param_hint='--data')
    args = [f'--preset={preset}', f'--data={data}', f'--device={device}', f'--workers={workers}',
            f'--duration={kimg / 1000}', f'--tick={kimg / 10}', *extra.split()]
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in names:
            rows.append(dict(config=name, **run_config(name, args, workdir)))
            print(f'[{name}] done', flush=True)
    print(common.format_table(rows, [('config', 'config', 's'), ('steps', 'steps', 'd'), ('wait ms/step', 'wait_ms', '.2f'),
                                     ('step ms', 'step_ms', '.1f'), ('wait share %', 'share', '.2f')]))
    if json_path:
        resolved = torch.device('cuda' if device != 'cpu' and torch.cuda.is_available() else 'cpu')
        common.write_json(json_path, dict(environment=common.environment(resolved), args=args, rows=rows))


if __name__ == '__main__':
    main()
