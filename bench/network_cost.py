"""FLOPs, parameters and CPU time of one training step of the demo DDPM++ and tiny EDM2 networks, to size them alike.

One step = batch 16 of full 16x16 images with coordinate channels, forward and backward (EDM2 with its uncertainty
head). FLOPs come from torch.utils.flop_counter (convolutions and matrix products only; EDM2's per-call weight
normalisation and scaled SiLUs are elementwise and show in the time only); the time is the mean of `--steps` steps
after 3 warm-up steps, with `--threads` threads. docs/results-edm2.md chose its EDM2 arm with it.

  python bench/network_cost.py --threads=1 --json=bench-out/network-cost.json
"""

import os
import sys
import time
from typing import Any, Dict, List, Optional

import click
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from training.networks import EDMPrecond  # noqa: E402
from training.networks_edm2 import EDM2Precond  # noqa: E402

RES, BATCH = 16, 16
DEMO_DDPMPP = dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
                   channel_mult_noise=1, resample_filter=[1, 1], model_channels=32, channel_mult=[1, 2, 2], num_blocks=1,
                   attn_resolutions=[16])  # configs/demo.json
EDM2_CANDIDATES = {  # name: (width, level multipliers, blocks per level, attention resolutions)
    'edm2 32; 1,2,2; 1 block; attn 8 (the study arm)': (32, [1, 2, 2], 1, [8]),
    'edm2 32; 1,2,2; 1 block; no attention': (32, [1, 2, 2], 1, []),
    'edm2 24; 1,2,2; 1 block; attn 8': (24, [1, 2, 2], 1, [8]),
    'edm2 32; 1,2,3; 1 block; attn 8': (32, [1, 2, 3], 1, [8]),
}


def networks() -> Dict[str, torch.nn.Module]:
    """The demo DDPM++ and the EDM2 candidates, built for patch training (2 coordinate channels)."""
    nets = {'ddpm++ of configs/demo.json': EDMPrecond(RES, 3, pos_channels=2, dropout=0, **DEMO_DDPMPP)}
    for name, (width, mult, blocks, attn) in EDM2_CANDIDATES.items():
        nets[name] = EDM2Precond(RES, 3, pos_channels=2, use_fp16=False, model_channels=width, channel_mult=mult,
                                 num_blocks=blocks, attn_resolutions=attn, dropout=0)
    return nets


def training_step(net: torch.nn.Module) -> None:
    """Forward and backward of one batch, with the log-variance head for EDM2 networks."""
    x, pos, sigma = torch.randn(BATCH, 3, RES, RES), torch.rand(BATCH, 2, RES, RES) * 2 - 1, torch.rand(BATCH) + 0.1
    if isinstance(net, EDM2Precond):
        D, logvar = net(x, sigma, x_pos=pos, return_logvar=True)
        (D.sum() + logvar.sum()).backward()
    else:
        net(x, sigma, x_pos=pos).sum().backward()


def measure(name: str, net: torch.nn.Module, steps: int) -> Dict[str, Any]:
    """Parameters, GFLOP per step, ms per step and s per kimg of full images."""
    net.train()
    with FlopCounterMode(display=False) as counter:
        training_step(net)
    for _ in range(3):
        training_step(net)
    start = time.perf_counter()
    for _ in range(steps):
        training_step(net)
    seconds = (time.perf_counter() - start) / steps
    return dict(network=name, params_m=common.parameter_count(net) / 1e6, gflop=counter.get_total_flops() / 1e9,
                ms_per_step=seconds * 1e3, s_per_kimg=seconds * 1000 / BATCH)


COLUMNS = [('network', 'network', 's'), ('params (M)', 'params_m', '.3f'), ('GFLOP/step', 'gflop', '.2f'),
           ('ms/step', 'ms_per_step', '.0f'), ('s/kimg', 's_per_kimg', '.1f')]


@click.command()
@click.option('--threads', help='torch threads', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--steps', help='Timed steps per network', metavar='INT', type=click.IntRange(min=1), default=15, show_default=True)
@click.option('--json', 'json_path', help='Also write the results here', metavar='PATH')
def main(threads: int, steps: int, json_path: Optional[str]) -> None:
    """Print the cost of one training step of each network."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rows: List[Dict[str, Any]] = [measure(name, net, steps) for name, net in networks().items()]
    result = dict(environment=common.environment(torch.device('cpu')), batch=BATCH, resolution=RES, rows=rows)
    common.print_and_save(result, lambda r: print(common.format_table(r['rows'], COLUMNS)), json_path)


if __name__ == '__main__':
    main()
