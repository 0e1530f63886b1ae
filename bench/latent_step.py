"""Training step time of latent Patch Diffusion: pre-encoded latents against encoding with the VAE at every step.

Run from the repository root (the script puts the root on sys.path itself; bench/ is not a package):
  python bench/latent_step.py --device=cpu --vae=tiny --cbase=16 --batch=8
  python bench/latent_step.py --device=cuda --vae=sd-random --batch=32 --json=latent-step.json

Both paths train their own copy of the same latent network (a preset's, initialised alike) through
training_loop.optimizer_step() on the latent patch schedule (sizes R and R/2, multipliers 1 and 2, p=0.5). The
pre-encoded path draws each step's latents from stored posterior moments (what LatentFolderDataset serves after
`dataset_tool.py --encode-latents`); the on-the-fly path runs the VAE encoder on the step's uint8 images first, as the
official code does. Blocks alternate between the two after a warm-up. `--vae`: `sd-random` is the Stable Diffusion
VAE's architecture with random weights (the same cost as sd-vae-ft-ema, nothing to download), `tiny` a two-level
test VAE, anything else a local directory or hub id. Data loading is not part of a step here.
"""

import os
import statistics
import sys
import tempfile
from typing import Callable, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import click
import torch

from bench import common
from torch_utils.distributed import choose_device
from train import build_config, preset_options
from training.latents import SD_SCALE, LatentCodec, LatentError, LatentNorm, import_autoencoder
from training.loss import PatchEDMLoss
from training.networks import check_patch_size
from training.patch import PatchSchedule
from training.training_loop import optimizer_step

# Architectures for --vae that need no download (random weights: the cost is that of the trained VAE).
RANDOM_VAES = {
    'sd-random': dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                      down_block_types=('DownEncoderBlock2D',) * 4, up_block_types=('UpDecoderBlock2D',) * 4),
    'tiny': dict(block_out_channels=(8, 8, 16), layers_per_block=1, norm_num_groups=4,
                 down_block_types=('DownEncoderBlock2D',) * 3, up_block_types=('UpDecoderBlock2D',) * 3),
}


def make_codec(vae: str, device: torch.device, folder: str) -> LatentCodec:
    """A LatentCodec for --vae; the random architectures are saved to `folder` first and loaded like a download."""
    if vae in RANDOM_VAES:
        torch.manual_seed(0)
        import_autoencoder()(in_channels=3, out_channels=3, latent_channels=4, **RANDOM_VAES[vae]).save_pretrained(folder)
        vae = folder
    return LatentCodec(vae, SD_SCALE, device)


class Path:
    """One way of feeding the step: next_round(multiplier) gives batch * multiplier latents, as optimizer_step asks."""

    def __init__(self, name: str, make_latents: Callable[[int], torch.Tensor], net: torch.nn.Module, lr: float):
        self.name = name
        self.make_latents = make_latents
        self.net = net
        self.optimizer = torch.optim.Adam(net.parameters(), lr=lr, fused=True)
        self.times: List[float] = []

    def next_round(self, multiplier: int):
        return self.make_latents(multiplier), None


def measure(paths: List[Path], sizes: List[int], loss_fn, lr: float, device: torch.device, warmup: int, blocks: int) -> None:
    """Warm up each path on every size, then time alternating blocks of one step per size; appends to path.times."""
    for path in paths:
        for size in sizes * warmup:
            optimizer_step(path.net, path.optimizer, loss_fn, path.next_round, size, sizes.index(size) + 1, 1, lr)
    for _ in range(blocks):
        for path in paths:
            for size in sizes:
                step = lambda: optimizer_step(path.net, path.optimizer, loss_fn, path.next_round, size,  # noqa: E731
                                              sizes.index(size) + 1, 1, lr)
                path.times.append(common.timed(step, device))


@click.command()
@click.option('--preset', help='Latent preset whose network trains', type=click.Choice(['imagenet256-latent', 'lsun256-latent']),
              default='lsun256-latent', show_default=True)
@click.option('--vae', help='sd-random, tiny, or a local directory / hub id', metavar='NAME|DIR|HUB_ID', default='sd-random',
              show_default=True)
@click.option('--resolution', help='Image resolution in pixels', metavar='INT', type=click.IntRange(min=8), default=256,
              show_default=True)
@click.option('--batch', help='Images per full-size step', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--cbase', help='Override the preset channel multiplier (CPU runs)', metavar='INT', type=click.IntRange(min=1))
@click.option('--warmup', help='Warm-up steps per size and path', metavar='INT', type=click.IntRange(min=1), default=2,
              show_default=True)
@click.option('--blocks', help='Timed blocks per path (one step per size each)', metavar='INT', type=click.IntRange(min=1),
              default=5, show_default=True)
@click.option('--device', help='Where to run', type=click.Choice(['auto', 'cpu', 'cuda']), default='auto', show_default=True)
@click.option('--json', 'json_path', help='Also write the results here', metavar='PATH')
def main(preset: str, vae: str, resolution: int, batch: int, cbase: Optional[int], warmup: int, blocks: int, device: str,
         json_path: Optional[str]) -> None:
    """Seconds per step with pre-encoded latents and with the VAE encoder in every step."""
    try:
        torch_device = choose_device(device)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint='--device')
    with tempfile.TemporaryDirectory() as folder:
        try:
            codec = make_codec(vae, torch_device, folder)
        except LatentError as err:
            raise click.BadParameter(str(err), param_hint='--vae')
    latent_res = resolution // codec.factor
    sizes = list(PatchSchedule(latent_res, latent=True).sizes)
    opts = preset_options(preset, cond=False, **({} if cbase is None else dict(cbase=cbase)))
    c = build_config(opts, 'synthetic', latent_res, world_size=1)
    try:
        for size in sizes:
            check_patch_size(c.network_kwargs.channel_mult, size)
    except ValueError as err:
        raise click.BadParameter(f'{resolution}x{resolution} images give {latent_res}x{latent_res} latents: {err}',
                                 param_hint='--resolution')

    generator = torch.Generator(torch_device).manual_seed(0)
    images = torch.randint(0, 256, [2 * batch, 3, resolution, resolution], dtype=torch.uint8, generator=generator,
                           device=torch_device)
    moments = torch.cat([codec.encode_moments(part) for part in images.split(batch)])  # what the data set would serve
    loss_fn = PatchEDMLoss()
    paths = []
    for name, make_latents in [('pre-encoded', lambda m: LatentNorm(SD_SCALE).sample(moments[:batch * m])),
                               ('on-the-fly', lambda m: codec.encode(images[:batch * m]))]:
        net = common.build_network(c.network_kwargs, latent_res, 0, torch_device, channels=codec.channels).train()
        paths.append(Path(name, make_latents, net, opts.lr))
    measure(paths, sizes, loss_fn, opts.lr, torch_device, warmup, blocks)

    rows = []
    for path in paths:
        step = statistics.mean(path.times) * len(sizes)
        rows.append(dict(path=path.name, sec_per_step=statistics.mean(path.times),
                         sec_per_step_median=statistics.median(path.times),
                         images_per_sec=batch * sum(range(1, len(sizes) + 1)) / step))
    for row in rows:
        row['time_vs_pre_encoded'] = row['sec_per_step'] / rows[0]['sec_per_step']
    environment = common.environment(torch_device)
    print(f'{preset} network ({common.parameter_count(paths[0].net)} parameters) on {latent_res}x{latent_res}x{codec.channels} '
          f'latents of {resolution}x{resolution} images, VAE {vae} (factor {codec.factor}), batch {batch} at R and '
          f'{2 * batch} at R/2, {blocks} blocks on {environment["device_name"]}, torch {environment["torch"]}\n')
    print(common.format_table(rows, [('path', 'path', 's'), ('s/step mean', 'sec_per_step', '.4f'),
                                     ('s/step median', 'sec_per_step_median', '.4f'), ('img/s', 'images_per_sec', '.1f'),
                                     ('time vs pre-encoded', 'time_vs_pre_encoded', '.2f')]))
    if json_path:
        common.write_json(json_path, dict(benchmark='latent_step', environment=environment, preset=preset, vae=vae,
                                          cbase=cbase, resolution=resolution, latent_resolution=latent_res, batch=batch,
                                          sizes=sizes, blocks=blocks, params=common.parameter_count(paths[0].net), rows=rows))
        print(f'Wrote {json_path}')


if __name__ == '__main__':
    main()
