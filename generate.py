"""Generate images from a snapshot with the EDM sampler (50 deterministic Heun steps by default).

Examples:
  python generate.py --network=run/network-snapshot-000060.pkl --seeds=0-63 --grid=grid.png
  torchrun --standalone --nproc_per_node=8 generate.py --network=snap.pkl --outdir=fid-tmp --seeds=0-49999 --subdirs
  python generate.py --network=snap.pkl --seeds=0-7 --inpaint=photo.png --mask=hole.png --grid=inpainted.png
  python generate.py --network=snap.pkl --seeds=0-7 --outpaint=64x32 --inpaint=photo.png --grid=wide.png
  python generate.py --network=big.pkl --guide=small-early.pkl --guidance=2 --seeds=0-63 --grid=autoguided.png
"""

import os
import re
from typing import Callable, List, Optional, Tuple

import click
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from torch_utils import distributed
from training.images import load_image, save_image_grid, save_png, to_pil
from training.latents import LatentError, latent_decoder
from training.patch import outpaint_grid
from training.presets import apply_defaults, sampling_preset
from training.sampler import SAMPLERS, check_guide, generate_images
from training.snapshot import SnapshotError, load_network


def parse_int_list(value: str) -> List[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7]."""
    result = []
    for part in value.split(','):
        match = re.fullmatch(r'(\d+)(?:-(\d+))?', part.strip())
        if not match:
            raise click.BadParameter(f'"{value}" is not a list of integers and ranges like 0-63,100', param_hint='--seeds')
        lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
        if hi < lo:
            raise click.BadParameter(f'range "{part}" is empty', param_hint='--seeds')
        result.extend(range(lo, hi + 1))
    return result


def parse_size(value: str) -> Tuple[int, int]:
    """'64x32' -> (width 64, height 32)."""
    match = re.fullmatch(r'(\d+)x(\d+)', value)
    if not match:
        raise click.BadParameter(f'"{value}" is not of the form WxH', param_hint='--outpaint')
    return int(match.group(1)), int(match.group(2))


def resolve_sampling(ctx: click.Context, sampler_kwargs: dict, sampler: str, preset: Optional[str]) -> dict:
    """edm_sampler settings: flags given on the command line > the preset's "sampling" > the --sampler set > defaults."""
    resolved = dict(sampler_kwargs)
    apply_defaults(ctx, resolved, SAMPLERS[sampler], f'--sampler={sampler}')
    if preset is not None:
        apply_defaults(ctx, resolved, sampling_preset(preset), f'configs/{preset}.json "sampling"')
    return resolved


def open_decoder(net: torch.nn.Module, device: torch.device, vae: Optional[str]) -> Optional[Callable]:
    """The VAE decoder of a latent-space network (click error if it cannot be loaded); None for a pixel network."""
    try:
        return latent_decoder(net, device, vae)
    except LatentError as err:
        raise click.BadParameter(str(err), param_hint='--vae')


def open_guide(sampler_kwargs: dict, net: torch.nn.Module, device: torch.device, load: Callable = load_network) -> dict:
    """sampler_kwargs with --guide's path replaced by its network (loaded with `load`), checked against --network and --cfg."""
    path, guidance = sampler_kwargs.get('guide'), sampler_kwargs['guidance']
    if path is None:
        if guidance != 1:
            raise click.BadParameter(f'--guidance={guidance} needs --guide NETWORK (the network that guides)', param_hint='--guidance')
        return sampler_kwargs
    if guidance != 1 and sampler_kwargs['cfg'] != 1:
        raise click.UsageError(f'--cfg={sampler_kwargs["cfg"]} and --guidance={guidance}: classifier-free guidance and autoguidance '
                               'cannot be combined; give --cfg=1 (a --preset may set --cfg)')
    try:
        guide = load(path, device)
        check_guide(net, guide)
    except (SnapshotError, ValueError) as err:
        raise click.BadParameter(str(err).removeprefix('--network: '), param_hint='--guide')  # load_network's IOError names --network
    return dict(sampler_kwargs, guide=guide)


def painting_inputs(net: torch.nn.Module, inpaint: Optional[str], mask: Optional[str], outpaint: Optional[str],
                    device: torch.device) -> dict:
    """edm_sampler keyword arguments (inpaint, x_pos) for --inpaint/--mask/--outpaint."""
    if inpaint is None:
        if mask is not None or outpaint is not None:
            raise click.BadParameter('--mask and --outpaint need --inpaint IMAGE (the known image)', param_hint='--inpaint')
        return {}
    res = net.img_resolution
    try:
        known = load_image(inpaint, net.img_channels)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint='--inpaint')
    if known.shape[-2:] != (res, res):
        raise click.BadParameter(f'{inpaint} is {known.shape[-1]}x{known.shape[-2]}; the network makes {res}x{res} images', param_hint='--inpaint')
    if outpaint is None:
        if mask is None:
            raise click.BadParameter('--inpaint needs --mask MASK (white = pixels to generate)', param_hint='--mask')
        try:
            fill = (load_image(mask, 1) > 0).to(torch.float32)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint='--mask')
        if fill.shape[-2:] != known.shape[-2:]:
            raise click.BadParameter(f'{mask} is {fill.shape[-1]}x{fill.shape[-2]}, the image is {res}x{res}', param_hint='--mask')
        return dict(inpaint=(known.to(device), fill.to(device)))
    if mask is not None:
        raise click.BadParameter('--outpaint generates everything outside the image; do not also give --mask', param_hint='--mask')
    width, height = parse_size(outpaint)
    if width < res or height < res:
        raise click.BadParameter(f'canvas {outpaint} is smaller than the {res}x{res} image', param_hint='--outpaint')
    top, left = (height - res) // 2, (width - res) // 2
    canvas = torch.zeros([1, net.img_channels, height, width])
    canvas[:, :, top:top + res, left:left + res] = known
    fill = torch.ones([1, 1, height, width])
    fill[:, :, top:top + res, left:left + res] = 0
    return dict(inpaint=(canvas.to(device), fill.to(device)), x_pos=outpaint_grid(res, height, width, top, left, device=device))


SAMPLING_OPTIONS = [  # the sampler flags of generate.py, shared with fid.py calc --network
    click.option('--steps', 'num_steps', help='Number of sampling steps', metavar='INT', type=click.IntRange(min=1), default=50, show_default=True),
    click.option('--sigma_min', help='Lowest noise level', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=0.002, show_default=True),
    click.option('--sigma_max', help='Highest noise level', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=80, show_default=True),
    click.option('--rho', help='Time step exponent', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=7, show_default=True),
    click.option('--S_churn', 'S_churn', help='Stochasticity strength', metavar='FLOAT', type=click.FloatRange(min=0), default=0, show_default=True),
    click.option('--S_min', 'S_min', help='Stoch. min noise level', metavar='FLOAT', type=click.FloatRange(min=0), default=0, show_default=True),
    click.option('--S_max', 'S_max', help='Stoch. max noise level', metavar='FLOAT', type=click.FloatRange(min=0), default=float('inf'), show_default=True),
    click.option('--S_noise', 'S_noise', help='Stoch. noise inflation', metavar='FLOAT', type=float, default=1, show_default=True),
    click.option('--solver', help='ODE solver', type=click.Choice(['heun', 'euler']), default='heun', show_default=True),
    click.option('--cfg', help='Classifier-free guidance scale (conditional nets)', metavar='FLOAT', type=float, default=1.0, show_default=True),
    click.option('--guide', help='Autoguidance: guide network (e.g. a smaller or less trained version of --network)', metavar='PKL|PT|URL|DIR'),
    click.option('--guidance', help='Autoguidance strength W: D = D_guide + W (D_net - D_guide); 1 = off', metavar='FLOAT', type=float, default=1.0, show_default=True),
    click.option('--sampler', help='Named settings: edm (the flags\' defaults) or adm (256 steps, S_churn 40, S_min 0.05, S_max 50, S_noise 1.003)', type=click.Choice(sorted(SAMPLERS)), default='edm', show_default=True),
    click.option('--preset', help='Sampling defaults of configs/NAME.json, e.g. imagenet256-latent (cfg 1.3)', metavar='NAME'),
    click.option('--vae', help='Where to load a latent network\'s VAE from  [default: the one it was trained with]', metavar='DIR|HUB_ID'),
]


def sampling_options(command: Callable) -> Callable:
    """Add the SAMPLING_OPTIONS flags to a click command."""
    for option in reversed(SAMPLING_OPTIONS):
        command = option(command)
    return command


@click.command()
@click.option('--network', 'network_path', help='Network snapshot: .pkl, weights-only .pt, URL, or a run directory (newest .pkl)', metavar='PKL|PT|URL|DIR', required=True)
@click.option('--outdir', help='Where to save one PNG per seed', metavar='DIR')
@click.option('--grid', help='Also save all images as one PNG grid', metavar='PATH.png')
@click.option('--seeds', help='Random seeds (e.g. 1,2,5-10)', metavar='LIST', default='0-63', show_default=True)
@click.option('--subdirs', help='Create a subdirectory for every 1000 seeds', is_flag=True)
@click.option('--class', 'class_idx', help='Class label  [default: random]', metavar='INT', type=click.IntRange(min=0))
@click.option('--batch', 'max_batch_size', help='Maximum batch size per process', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@sampling_options
@click.option('--inpaint', help='Known image for in- or outpainting', metavar='PNG')
@click.option('--mask', help='Inpainting mask: white = generate, black = keep', metavar='PNG')
@click.option('--outpaint', help='Extend the --inpaint image onto a centred canvas of this size', metavar='WxH')
@click.option('--device', help='Where to sample', type=click.Choice(['auto', 'cpu', 'cuda']), default='auto', show_default=True)
@click.pass_context
def main(ctx: click.Context, network_path: str, outdir: Optional[str], grid: Optional[str], seeds: str, subdirs: bool,
         class_idx: Optional[int], max_batch_size: int, device: str, inpaint: Optional[str], mask: Optional[str],
         outpaint: Optional[str], sampler: str, preset: Optional[str], vae: Optional[str], **sampler_kwargs) -> None:
    """Generate images with the EDM sampler; image k depends only on seed k."""
    seed_list = parse_int_list(seeds)
    sampler_kwargs = resolve_sampling(ctx, sampler_kwargs, sampler, preset)
    if outdir is None and grid is None:
        raise click.UsageError('give --outdir, --grid, or both')
    torch_device = distributed.init(device)
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    try:
        net = load_network(network_path, torch_device)
    except SnapshotError as err:
        raise click.BadParameter(str(err), param_hint='--network')
    if class_idx is not None and not class_idx < net.label_dim:
        raise click.BadParameter(f'{class_idx}: the network has {net.label_dim} classes', param_hint='--class')
    if sampler_kwargs['cfg'] != 1 and not net.label_dim:
        raise click.BadParameter('guidance needs a class-conditional network', param_hint='--cfg')
    sampler_kwargs = open_guide(sampler_kwargs, net, torch_device)
    if getattr(net, 'latent', None) and inpaint is not None:
        raise click.BadParameter('in- and outpainting work on pixels; this network generates VAE latents', param_hint='--inpaint')
    sampler_kwargs.update(painting_inputs(net, inpaint, mask, outpaint, torch_device))
    decoder = open_decoder(net, torch_device, vae)

    num_batches = max((len(seed_list) - 1) // (max_batch_size * world_size) + 1, 1) * world_size
    rank_batches = np.array_split(np.array(seed_list), num_batches)[rank::world_size]
    distributed.print0(f'Generating {len(seed_list)} images on {world_size} process(es)...')
    kept = []
    for batch_seeds in tqdm(rank_batches, unit='batch', disable=rank != 0):
        if len(batch_seeds) == 0:
            continue
        images = generate_images(net, batch_seeds.tolist(), torch_device, class_idx=class_idx, decoder=decoder,
                                 **sampler_kwargs).cpu()
        if outdir is not None:
            for seed, image in zip(batch_seeds, images):
                folder = os.path.join(outdir, f'{seed - seed % 1000:06d}') if subdirs else outdir
                os.makedirs(folder, exist_ok=True)
                save_png(to_pil(image), os.path.join(folder, f'{seed:06d}.png'))
        if grid is not None:
            kept.extend(zip(batch_seeds.tolist(), images))

    if grid is not None:
        gathered = [kept]
        if dist.is_initialized():
            gathered = [None] * world_size
            dist.all_gather_object(gathered, kept)
        if rank == 0:
            by_seed = dict(pair for part in gathered for pair in part)
            save_image_grid(torch.stack([by_seed[s] for s in seed_list]), grid)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    distributed.print0(f'Done: {len(seed_list)} images' + (f' in {outdir}' if outdir else '') + (f', grid {grid}' if grid else ''))


if __name__ == '__main__':
    main()
