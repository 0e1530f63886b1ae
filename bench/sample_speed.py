"""Sampling speed: images/sec of EDM generation (Heun, --steps steps) at a few batch sizes, and its peak memory.

Run from the repository root (the script puts the root on sys.path itself; bench/ is not a package):
  python bench/sample_speed.py --preset=demo --device=cpu --batch=1,8
  python bench/sample_speed.py --network=training-runs/00000-x/network-snapshot-000200.pkl --batch=1,8,32,128

With --preset the network is a randomly initialised one of that preset (speed does not depend on the weights); with
--network it is the snapshot's EMA network. Each batch size is warmed up with one 2-step generation, then
generated --repeats times with training.sampler.generate_images (seeds 0..batch-1) under torch.no_grad(), as
generate.py does. Reported per batch: seconds per batch (median and mean over repeats), images/sec from the median,
milliseconds per network evaluation of the batch (Heun takes 2 * steps - 1), and peak memory (see PeakMemory in
bench/common.py).
"""

import os
import re
import statistics
import sys
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import click
import torch

from bench import common
from torch_utils.distributed import choose_device
from train import build_config, preset_options
from training.sampler import generate_images
from training.snapshot import SnapshotError, load_network


def parse_batches(value: str) -> List[int]:
    """'1,8,32' -> [1, 8, 32]."""
    if not re.fullmatch(r'\s*[1-9]\d*\s*(,\s*[1-9]\d*\s*)*', value):
        raise click.BadParameter(f'"{value}" is not a comma-separated list of positive integers', param_hint='--batch')
    return [int(v) for v in value.split(',')]


def preset_network(preset: str, cbase: Optional[int], device: torch.device) -> torch.nn.Module:
    """A randomly initialised network of a preset, in eval mode."""
    opts = preset_options(preset, **({} if cbase is None else dict(cbase=cbase)))
    c = build_config(opts, 'synthetic', common.preset_resolution(preset), world_size=1)
    net = common.build_network(c.network_kwargs, common.preset_resolution(preset), common.label_dim(opts), device)
    return net.eval().requires_grad_(False)


def measure_batch(net: torch.nn.Module, batch: int, steps: int, repeats: int, device: torch.device,
                  memory: common.PeakMemory) -> Dict[str, Any]:
    """Timings and peak memory of generating one batch `repeats` times after a short warm-up."""
    seeds = list(range(batch))
    with torch.no_grad():
        generate_images(net, seeds, device, num_steps=2)
        memory.start()
        times = [common.timed(lambda: generate_images(net, seeds, device, num_steps=steps), device) for _ in range(repeats)]
        peak, increase = memory.stop()
    median = statistics.median(times)
    return dict(batch=batch, sec_per_batch=times, sec_per_batch_median=median, sec_per_batch_mean=statistics.mean(times),
                images_per_sec=batch / median, ms_per_evaluation=median / (2 * steps - 1) * 1e3,
                peak_memory_gb=peak, peak_increase_gb=increase)


@click.command()
@click.option('--preset', help='Randomly initialised network of this preset', metavar='NAME',
              type=click.Choice(list(common.PRESET_RESOLUTION)), default='demo', show_default=True)
@click.option('--network', 'network_path', help='Network snapshot to use instead of --preset', metavar='PKL|PT|URL')
@click.option('--batch', 'batch_list', help='Batch sizes', metavar='LIST', default='1,8,32', show_default=True)
@click.option('--steps', help='Sampler steps', metavar='INT', type=click.IntRange(min=1), default=50, show_default=True)
@click.option('--repeats', help='Timed generations per batch size', metavar='INT', type=click.IntRange(min=1),
              default=3, show_default=True)
@click.option('--device', help='Where to run', type=click.Choice(['auto', 'cpu', 'cuda']), default='auto', show_default=True)
@click.option('--json', 'json_path', help='Also write the results here', metavar='PATH')
@click.option('--cbase', help='Override the preset channel multiplier (small test runs)', type=click.IntRange(min=1), hidden=True)
def main(preset: str, network_path: Optional[str], batch_list: str, steps: int, repeats: int, device: str,
         json_path: Optional[str], cbase: Optional[int]) -> None:
    """Images/sec and peak memory of EDM sampling at several batch sizes."""
    batches = parse_batches(batch_list)
    try:
        torch_device = choose_device(device)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint='--device')
    try:
        net = load_network(network_path, torch_device) if network_path else preset_network(preset, cbase, torch_device)
    except SnapshotError as err:
        raise click.ClickException(str(err))
    memory = common.PeakMemory(torch_device)
    rows = [measure_batch(net, batch, steps, repeats, torch_device, memory) for batch in batches]

    environment = common.environment(torch_device)
    print(f'{network_path or preset} ({common.parameter_count(net)} parameters) at {net.img_resolution}x{net.img_resolution}, '
          f'{steps} Heun steps, {repeats} repeats on {environment["device_name"]}, torch {environment["torch"]}\n')
    print(common.format_table(rows, [
        ('batch', 'batch', 'd'), ('s/batch median', 'sec_per_batch_median', '.3f'), ('s/batch mean', 'sec_per_batch_mean', '.3f'),
        ('img/s', 'images_per_sec', '.2f'), ('ms/evaluation', 'ms_per_evaluation', '.2f'),
        ('peak GiB', 'peak_memory_gb', '.3f'), ('+GiB', 'peak_increase_gb', '.3f')]))
    print(f'memory: {memory.kind}')
    if json_path:
        common.write_json(json_path, dict(benchmark='sample_speed', environment=environment, network=network_path,
                                          preset=None if network_path else preset, cbase=cbase,
                                          resolution=net.img_resolution, params=common.parameter_count(net), steps=steps,
                                          repeats=repeats, memory_kind=memory.kind, batches=rows))
        print(f'Wrote {json_path}')


if __name__ == '__main__':
    main()
