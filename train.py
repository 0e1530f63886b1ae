"""Train a Patch Diffusion (or plain EDM) model.

Examples:
  python train.py --preset=demo --data=datasets/shapes-16x16.zip --outdir=training-runs
  torchrun --standalone --nproc_per_node=8 train.py --preset=celeba64 --data=datasets/celeba-64x64.zip --outdir=training-runs
"""

import json
import os
import re
import shutil
from typing import Any, Dict, List, Optional

import click
import torch
import torch.distributed as dist

import dnnlib
from torch_utils import distributed
from training.dataset import DatasetError, ImageFolderDataset
from training.latents import EDM2_VAE, LATENT_NORMS, SD_VAE, LatentError, LatentNorm, latent_setting, vae_config, vae_shape
from training.networks import check_patch_size
from training.patch import PatchSchedule
from training.phema import sigma_rel_to_gamma
from training.presets import apply_defaults, preset_refusal, training_preset
from training.snapshot import SnapshotError, atomic_write, load_state, newest_state
from training.training_loop import CUBLAS_WORKSPACE_CONFIG, LOSS_NORMS, LR_DECAYS, split_batch, state_loss_norm, training_loop

def parse_int_list(value: Optional[str]) -> Optional[list]:
    """'1,2,2' -> [1, 2, 2]."""
    if value is None or isinstance(value, list):
        return value
    if not re.fullmatch(r'\d+(,\d+)*', str(value)):
        raise click.BadParameter(f'"{value}" is not a comma-separated list of integers', param_hint='--cres')
    return [int(v) for v in str(value).split(',')]


def parse_sigma_rels(value: Optional[str]) -> Optional[List[float]]:
    """'0.05,0.10' -> [0.05, 0.1] for --phema, each a valid post-hoc EMA sigma_rel; None stays None."""
    if value is None or isinstance(value, list):
        return value
    try:
        sigma_rels = [float(v) for v in str(value).split(',')]
        for sigma_rel in sigma_rels:
            sigma_rel_to_gamma(sigma_rel)
    except ValueError as err:
        raise click.BadParameter(str(err) if 'sigma_rel' in str(err) else f'"{value}" is not a comma-separated list of numbers',
                                 param_hint='--phema')
    return sigma_rels


def resolve_options(ctx: click.Context, opts: Dict[str, Any]) -> dnnlib.EasyDict:
    """Command-line flags override the preset, which overrides the defaults."""
    opts = dnnlib.EasyDict(opts)
    if opts.preset:
        apply_defaults(ctx, opts, training_preset(opts.preset), f'configs/{opts.preset}.json')
    return opts


def preset_options(name: Optional[str] = None, **overrides) -> dnnlib.EasyDict:
    """CLI option values for a preset (or the defaults) with overrides, as train.py would resolve them."""
    opts = dnnlib.EasyDict(main.make_context('train.py', [], resilient_parsing=True).params)
    if name is not None:
        opts.update(training_preset(name), preset=name)
    unknown = set(overrides) - set(opts)
    if unknown:
        raise ValueError(f'unknown train.py options: {sorted(unknown)}')
    opts.update(overrides)
    return opts


def build_config(opts: dnnlib.EasyDict, dataset_name: str, resolution: int, world_size: int) -> dnnlib.EasyDict:
    """Turn resolved CLI options into the keyword arguments of training_loop()."""
    c = dnnlib.EasyDict()
    c.dataset_kwargs = dnnlib.EasyDict(class_name=dataset_class(opts), path=opts.data,
                                       use_labels=opts.cond, xflip=opts.xflip, cache=opts.cache)
    if opts.cache_limit is not None:
        c.dataset_kwargs.cache_limit = int(opts.cache_limit * 2**30)
    c.latent_kwargs = None
    if opts.latents or opts.latents_on_the_fly:
        c.latent_kwargs = dnnlib.EasyDict(on_the_fly=opts.latents_on_the_fly, vae=opts.vae)
        if opts.latents_on_the_fly:
            c.latent_kwargs.update(on_the_fly_setting(opts))
    # A step at R//4 takes 4 loader batches at once, so each worker keeps two such steps' worth in flight.
    max_multiplier = 4 if opts.patch == 'on' else 1
    c.data_loader_kwargs = dnnlib.EasyDict(pin_memory=opts.device != 'cpu', num_workers=opts.workers,
                                           prefetch_factor=2 * max_multiplier if opts.workers > 0 else None,
                                           persistent_workers=opts.workers > 0)
    check_edm2_options(opts)
    c.network_kwargs = network_config(opts)
    loss = dict(edm='EDMLoss', vp='VPLoss', ve='VELoss', edm2='EDM2Loss')[opts.precond]
    c.loss_kwargs = dnnlib.EasyDict(class_name=f'training.loss.{"Patch" if opts.patch == "on" else ""}{loss}')
    for flag, name, value in (('--p-mean', 'P_mean', opts.p_mean), ('--p-std', 'P_std', opts.p_std)):
        if value is not None:
            if opts.precond not in ('edm', 'edm2'):
                raise click.BadParameter(f'sets the log-normal noise levels of --precond=edm2 and --precond=edm, not {opts.precond}',
                                         param_hint=flag)
            c.loss_kwargs[name] = value
    # EDM2 trains with Adam betas (0.9, 0.99) (its training_loop.py), EDM with (0.9, 0.999); eps 1e-8 in both.
    betas = [0.9, 0.99] if opts.precond == 'edm2' else [0.9, 0.999]
    c.optimizer_kwargs = dnnlib.EasyDict(class_name='torch.optim.Adam', lr=opts.lr, betas=betas, eps=1e-8, fused=True)
    c.augment_kwargs = None
    if opts.augment:
        c.augment_kwargs = dnnlib.EasyDict(class_name='training.augment.AugmentPipe', p=opts.augment, xflip=1e8, yflip=1,
                                           scale=1, rotate_frac=1, aniso=1, translate_frac=1)
        c.network_kwargs.augment_dim = 9
    c.patch_kwargs = dnnlib.EasyDict(real_p=opts.real_p, mode='progressive' if opts.progressive else 'stochastic') \
        if opts.patch == 'on' else None
    c.update(total_kimg=opts.duration * 1000, ema_halflife_kimg=opts.ema * 1000, ema_rampup_ratio=opts.ema_rampup,
             lr_rampup_kimg=opts.lr_rampup * 1000, lr_cooldown=opts.lr_cooldown, lr_decay=opts.lr_decay,
             lr_ref_batches=opts.lr_ref_batches, batch_size=opts.batch, batch_gpu=opts.batch_gpu,
             precision='bf16' if opts.bf16 else 'fp16' if opts.fp16 else 'fp32',
             loss_scaling=opts.ls if opts.ls is not None else 2.0 ** 16 if opts.fp16 else 1,
             compile_kwargs=dnnlib.EasyDict(dynamic=False) if opts.compile else None, channels_last=opts.channels_last,
             cudnn_benchmark=opts.bench, tf32=opts.tf32, deterministic=opts.deterministic, kimg_per_tick=opts.tick,
             snapshot_ticks=opts.snap, state_dump_ticks=opts.dump, seed=opts.seed, transfer=opts.transfer,
             loss_norm=opts.loss_norm)
    c.phema_sigma_rels = parse_sigma_rels(opts.phema)
    c.phema_snapshot_ticks = opts.phema_snap if opts.phema_snap is not None else opts.snap
    c.preview = dnnlib.EasyDict(num_images=64, num_steps=opts.preview_steps) if opts.preview else None

    patch = f'patch{opts.real_p:g}{"prog" if opts.progressive else ""}' if opts.patch == 'on' else 'full'
    patch += '-latent' if c.latent_kwargs else ''
    c.desc = (f'{dataset_name}-{"cond" if opts.cond else "uncond"}-{opts.arch}-{opts.precond}-{patch}'
              f'-gpus{world_size}-batch{opts.batch}-{c.precision}') + (f'-{opts.desc}' if opts.desc else '')
    return c


EDM2_UNET = dict(model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[16, 8])  # EDM2's UNet defaults


def network_config(opts: dnnlib.EasyDict) -> dnnlib.EasyDict:
    """network_kwargs for --arch/--precond, with --cbase/--cres/--blocks/--attn/--dropout and the precision flags."""
    kwargs = dnnlib.EasyDict(pos_channels=2 if opts.patch == 'on' else 0)
    if opts.arch == 'edm2':
        kwargs.update(class_name='training.networks_edm2.EDM2Precond', **EDM2_UNET)
    else:
        precond = dict(edm='EDMPrecond', vp='VPPrecond', ve='VEPrecond')[opts.precond]
        kwargs.update(class_name=f'training.networks.{precond}', attn_impl=opts.attn_impl)
    if opts.arch == 'ddpmpp':
        kwargs.update(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
                      channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2])
    elif opts.arch == 'ncsnpp':
        kwargs.update(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
                      channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2])
    elif opts.arch == 'adm':
        kwargs.update(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4])
    for name, value in (('model_channels', opts.cbase), ('channel_mult', parse_int_list(opts.cres)),
                        ('num_blocks', opts.blocks), ('attn_resolutions', parse_int_list(opts.attn))):
        if value is not None:
            kwargs[name] = value
    # use_fp16/use_bf16 make the EMA in the snapshots sample in reduced precision, as in EDM; training itself runs
    # the network under torch.autocast (see `precision`), which keeps the weights float32.
    kwargs.update(dropout=opts.dropout, use_fp16=opts.fp16, use_bf16=opts.bf16)
    if opts.cond and opts.arch != 'edm2':
        kwargs.label_dropout = opts.label_dropout
    return kwargs


def check_edm2_options(opts: dnnlib.EasyDict) -> None:
    """Raise a click error when --arch=edm2 and --precond=edm2 do not come together, or edm2 meets --augment or --label-dropout."""
    if (opts.arch == 'edm2') != (opts.precond == 'edm2'):
        flag, value = ('--precond', opts.precond) if opts.arch == 'edm2' else ('--arch', opts.arch)
        raise click.BadParameter(f'EDM2\'s network and loss go together: --arch=edm2 needs --precond=edm2 and back, not {value}',
                                 param_hint=flag)
    if opts.arch == 'edm2' and opts.augment:
        raise click.BadParameter('EDM2 networks take no augmentation labels; --arch=edm2 needs --augment=0', param_hint='--augment')
    if opts.arch == 'edm2' and opts.cond and opts.label_dropout:
        raise click.BadParameter('EDM2 networks have no label dropout (EDM2 guides with a separate network, as in autoguidance)',
                                 param_hint='--label-dropout')


def dataset_class(opts: dnnlib.EasyDict) -> str:
    """The data set class for --data: pre-encoded latents with --latents, else images."""
    return f'training.dataset.{"LatentFolderDataset" if opts.latents else "ImageFolderDataset"}'


def patch_sizes(opts: dnnlib.EasyDict, dataset: ImageFolderDataset) -> List[int]:
    """The sizes the network trains on (the resolution it sees first); reads the VAE's config with --latents-on-the-fly."""
    resolution = dataset.resolution
    if opts.latents_on_the_fly:
        try:
            resolution //= vae_shape(vae_config(on_the_fly_setting(opts)['vae']))[1]
        except LatentError as err:
            raise click.BadParameter(str(err), param_hint='--vae')
    if opts.patch == 'off':
        return [resolution]
    return list(PatchSchedule(resolution, latent=bool(opts.latents or opts.latents_on_the_fly)).sizes)


def on_the_fly_setting(opts: dnnlib.EasyDict) -> dict:
    """The `latent` setting of --latents-on-the-fly: --latent-norm's (default sd) with --vae, else that normalisation's VAE."""
    return latent_setting(opts.latent_norm or 'sd', opts.vae)


def check_latent_norm(opts: dnnlib.EasyDict, dataset: ImageFolderDataset) -> None:
    """Raise a click error when --data's pre-encoded latents were normalised otherwise than --latent-norm says."""
    if opts.latents and opts.latent_norm and LatentNorm.of(dataset.latent) != LatentNorm.of(latent_setting(opts.latent_norm)):
        raise click.BadParameter(f'{opts.data}: its latents were encoded for another normalisation than {opts.latent_norm}; '
                                 f'encode them with dataset_tool.py --encode-latents --latent-norm={opts.latent_norm}',
                                 param_hint='--latent-norm')


def check_latent_options(opts: dnnlib.EasyDict) -> None:
    """Raise a click error for latent options that do not fit together."""
    if opts.latent_norm and not (opts.latents or opts.latents_on_the_fly):
        raise click.UsageError('--latent-norm needs --latents or --latents-on-the-fly')
    if opts.latents and opts.latents_on_the_fly:
        raise click.UsageError('--latents (pre-encoded data) and --latents-on-the-fly (images) exclude each other')
    if (opts.latents or opts.latents_on_the_fly) and opts.augment:
        raise click.BadParameter('augmentation works on pixels; latent training needs --augment=0', param_hint='--augment')


def find_cxx() -> Optional[str]:
    """Path of the C++ compiler that torch.compile needs on the CPU ($CXX, else g++), or None."""
    return shutil.which(os.environ.get('CXX', 'g++'))


def check_speed_options(opts: dnnlib.EasyDict, device: torch.device) -> None:
    """Raise a click error for precision and compile options that cannot work together or on this device."""
    if opts.fp16 and opts.bf16:
        raise click.UsageError('--fp16 and --bf16 exclude each other; pick one')
    if opts.fp16 and device.type != 'cuda':
        raise click.BadParameter(f'float16 autocast with loss scaling needs CUDA, not {device.type}; use --bf16 there',
                                 param_hint='--fp16')
    if opts.compile and device.type == 'cpu' and find_cxx() is None:
        raise click.BadParameter('torch.compile on the CPU needs a C++ compiler: install g++ or set $CXX',
                                 param_hint='--compile')


RUN_ID_FILE = 'torchrun-run-id.txt'  # in a run directory: the torchrun launch that last wrote to it (see launch_run_id)


def launch_run_id() -> Optional[str]:
    """torchrun's run id, which every restart of one launch shares: --rdzv-id, or the uuid of a --standalone launch.

    None outside torchrun and for torchrun's default id "none" (static rendezvous), which names no launch.
    """
    run_id = os.environ.get('TORCHELASTIC_RUN_ID')
    return run_id if run_id and run_id != 'none' else None


def read_run_id(run_dir: str) -> Optional[str]:
    """The run id recorded in `run_dir` by write_run_id(), or None."""
    try:
        with open(os.path.join(run_dir, RUN_ID_FILE)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def write_run_id(run_dir: str, run_id: Optional[str]) -> None:
    """Record the torchrun launch that writes to `run_dir`, so that its restarts with --resume=auto come back to it."""
    if run_id is not None:
        atomic_write(os.path.join(run_dir, RUN_ID_FILE), lambda f: f.write(f'{run_id}\n'.encode()))


def _desc_but_gpus(desc: str) -> str:
    return re.sub(r'-gpus\d+-', '-', desc)


def choose_run_dir(outdir: str, desc: str, nosubdir: bool, resume: Optional[str], run_id: Optional[str] = None) -> tuple:
    """(run directory, state file to resume from or None) as rank 0 decides them.

    --resume=auto without --nosubdir takes, in this order: the run directory that this torchrun launch (`run_id`,
    see launch_run_id) wrote to before a restart, with or without a state file, if its description matches up
    to the process count; else the newest one of the same description that holds a state file; else a new one.
    """
    if resume is not None and resume != 'auto':
        path = os.path.join(resume, os.path.basename(newest_state(resume) or '')) if os.path.isdir(resume) else resume
        if not os.path.isfile(path):
            raise click.BadParameter(f'{resume}: no training-state-*.pt file there', param_hint='--resume')
        return os.path.dirname(os.path.abspath(path)), path
    if nosubdir:
        return outdir, newest_state(outdir) if resume == 'auto' else None
    existing = sorted((int(m.group(1)), name) for name in (os.listdir(outdir) if os.path.isdir(outdir) else [])
                      if (m := re.match(r'(\d+)-', name)) and os.path.isdir(os.path.join(outdir, name)))
    if resume == 'auto' and run_id is not None:
        for _, name in reversed(existing):
            run_dir = os.path.join(outdir, name)
            if read_run_id(run_dir) == run_id and _desc_but_gpus(name.split('-', 1)[1]) == _desc_but_gpus(desc):
                return run_dir, newest_state(run_dir)
    if resume == 'auto':
        for _, name in reversed(existing):
            state = newest_state(os.path.join(outdir, name))
            if name.split('-', 1)[1] == desc and state:
                return os.path.join(outdir, name), state
    next_id = existing[-1][0] + 1 if existing else 0
    return os.path.join(outdir, f'{next_id:05d}-{desc}'), None


@click.command()
@click.option('--preset', help='Named settings from configs/NAME.json; flags given here override them', metavar='NAME')
@click.option('--outdir', help='Where to save the results', metavar='DIR', required=True)
@click.option('--data', help='Path to the data set (folder or zip)', metavar='ZIP|DIR', required=True)
@click.option('--cond', help='Train class-conditional model', type=bool, default=False, show_default=True)
@click.option('--arch', help='Network architecture', type=click.Choice(['ddpmpp', 'ncsnpp', 'adm', 'edm2']), default='ddpmpp', show_default=True)
@click.option('--precond', help='Preconditioning & loss function', type=click.Choice(['edm', 'vp', 've', 'edm2']), default='edm', show_default=True)
@click.option('--patch', help='Patch Diffusion (on) or the plain EDM baseline (off)', type=click.Choice(['on', 'off']), default='on', show_default=True)
@click.option('--p-mean', help='Mean of ln(sigma) in training (--precond=edm, edm2)  [default: -1.2 as in EDM, -0.4 as in EDM2]', metavar='FLOAT', type=float)
@click.option('--p-std', help='Standard deviation of ln(sigma) in training (--precond=edm, edm2)  [default: 1.2 as in EDM, 1.0 as in EDM2]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--real_p', help='Share of full-size images per step', type=click.FloatRange(0, 1), default=0.5, show_default=True)
@click.option('--loss-norm', help='Weight of a patch step: per image (EDM, official code) or per pixel (every step equal)', type=click.Choice(LOSS_NORMS), default='pixel', show_default=True)
@click.option('--progressive', help='Progressive patch schedule (small first)', type=bool, default=False, show_default=True)
@click.option('--latents', help='--data holds VAE latents (dataset_tool.py --encode-latents)', metavar='[BOOL]', type=bool, default=False, show_default=True, is_flag=False, flag_value=True)
@click.option('--latents-on-the-fly', help='Encode --data\'s images with --vae at every step (the official code\'s way)', metavar='[BOOL]', type=bool, default=False, show_default=True, is_flag=False, flag_value=True)
@click.option('--vae', help=f'AutoencoderKL for --latents-on-the-fly and previews  [default: the one that encoded --data, else {SD_VAE}, or {EDM2_VAE} for edm2]', metavar='DIR|HUB_ID')
@click.option('--latent-norm', help='Latent normalisation: sd (pixels in [-1, 1], scale 0.18215) or edm2 (EDM2\'s: pixels in [0, 1], each channel to mean 0, std 0.5)  [default: the one --data was encoded for with --latents, else sd]', type=click.Choice(LATENT_NORMS))
@click.option('--duration', help='Training duration', metavar='MIMG', type=click.FloatRange(min=0, min_open=True), default=200, show_default=True)
@click.option('--batch', help='Total batch size', metavar='INT', type=click.IntRange(min=1), default=512, show_default=True)
@click.option('--batch-gpu', help='Limit batch size per GPU', metavar='INT', type=click.IntRange(min=1))
@click.option('--cbase', help='Channel multiplier  [default: varies]', metavar='INT', type=click.IntRange(min=1))
@click.option('--cres', help='Channels per resolution  [default: varies]', metavar='LIST')
@click.option('--blocks', help='Residual blocks per resolution  [default: 4 (SongUNet), 3 (ADM)]', metavar='INT', type=click.IntRange(min=1))
@click.option('--attn', help='Resolutions with self-attention  [default: 16 (SongUNet), 32,16,8 (ADM)]', metavar='LIST')
@click.option('--lr', help='Learning rate', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=10e-4, show_default=True)
@click.option('--lr-rampup', help='Learning-rate ramp-up', metavar='MIMG', type=click.FloatRange(min=0), default=10, show_default=True)
@click.option('--lr-cooldown', help='Share of --duration at the end over which the learning rate decays linearly to 0', metavar='FLOAT', type=click.FloatRange(0, 1), default=0, show_default=True)
@click.option('--lr-decay', help='After the ramp-up: constant, or EDM2\'s lr / sqrt(max(t / t_ref, 1))', type=click.Choice(LR_DECAYS), default='none', show_default=True)
@click.option('--lr-ref-batches', help='t_ref of --lr-decay=inv-sqrt, in steps of --batch full images (EDM2: 70000 at 512, 35000 at 64)', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=70000, show_default=True)
@click.option('--ema', help='EMA half-life (0: the snapshots hold the trained weights, as EDM2\'s without an EMA)', metavar='MIMG', type=click.FloatRange(min=0), default=0.5, show_default=True)
@click.option('--ema-rampup', help='EMA ramp-up ratio', metavar='FLOAT', type=click.FloatRange(min=0), default=0.05, show_default=True)
@click.option('--dropout', help='Dropout probability', metavar='FLOAT', type=click.FloatRange(0, 1), default=0.13, show_default=True)
@click.option('--label-dropout', help='Label dropout, for classifier-free guidance (with --cond; EDM and the official code use none)', metavar='FLOAT', type=click.FloatRange(0, 1), default=0, show_default=True)
@click.option('--augment', help='Augment probability', metavar='FLOAT', type=click.FloatRange(0, 1), default=0.12, show_default=True)
@click.option('--xflip', help='Enable dataset x-flips', type=bool, default=False, show_default=True)
@click.option('--fp16', help='float16 autocast with dynamic loss scaling (CUDA only)', metavar='[BOOL]', type=bool, default=False, show_default=True, is_flag=False, flag_value=True)
@click.option('--bf16', help='bfloat16 autocast (CUDA or CPU)', metavar='[BOOL]', type=bool, default=False, show_default=True, is_flag=False, flag_value=True)
@click.option('--tf32', help='Allow TF32 matmuls and convolutions (CUDA)', metavar='[BOOL]', type=bool, default=False, show_default=True, is_flag=False, flag_value=True)
@click.option('--ls', help='Loss scaling; with --fp16 the dynamic scaler\'s start  [default: 65536 with --fp16, else 1]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--compile', help='torch.compile the training network, once per patch size (minutes each on a CPU, which needs a C++ compiler)', metavar='[BOOL]', type=bool, default=False, show_default=True, is_flag=False, flag_value=True)
@click.option('--channels-last', help='Channels-last memory format for the training network', metavar='[BOOL]', type=bool, default=False, show_default=True, is_flag=False, flag_value=True)
@click.option('--attn-impl', help='Self-attention: torch\'s fused SDPA or EDM\'s explicit einsum', type=click.Choice(['sdpa', 'explicit']), default='sdpa', show_default=True)
@click.option('--bench', help='Enable cuDNN benchmarking', type=bool, default=True, show_default=True)
@click.option('--deterministic', help='Deterministic kernels (no cuDNN benchmarking or atomics): identical runs and resumes give identical bits on CUDA too, somewhat slower', metavar='[BOOL]', type=bool, default=False, show_default=True, is_flag=False, flag_value=True)
@click.option('--cache', help='Cache dataset in CPU memory', type=bool, default=True, show_default=True)
@click.option('--cache-limit', help='Most memory the caches of the ranks on one machine may take; above it, read uncached  [default: half the available memory]',
              metavar='GIB', type=click.FloatRange(min=0, min_open=True))
@click.option('--workers', help='DataLoader worker processes', metavar='INT', type=click.IntRange(min=0), default=1, show_default=True)
@click.option('--device', help='Where to train', type=click.Choice(['auto', 'cpu', 'cuda']), default='auto', show_default=True)
@click.option('--desc', help='String to include in result dir name', metavar='STR')
@click.option('--nosubdir', help='Do not create a subdirectory for results', is_flag=True)
@click.option('--tick', help='How often to print progress', metavar='KIMG', type=click.FloatRange(min=0, min_open=True), default=50, show_default=True)
@click.option('--snap', help='How often to save snapshots', metavar='TICKS', type=click.IntRange(min=1), default=50, show_default=True)
@click.option('--dump', help='How often to dump state', metavar='TICKS', type=click.IntRange(min=1), default=500, show_default=True)
@click.option('--phema', help='Post-hoc EMA: keep power-function EMA profiles of these sigma_rels (reconstruct_ema.py)  [default: off]', metavar='LIST')
@click.option('--phema-snap', help='How often to save post-hoc EMA snapshots  [default: --snap]', metavar='TICKS', type=click.IntRange(min=1))
@click.option('--preview', help='Save a PNG grid of EMA samples at every snapshot', type=bool, default=False, show_default=True)
@click.option('--preview-steps', help='Sampler steps for the preview grid', metavar='INT', type=click.IntRange(min=1), default=50, show_default=True)
@click.option('--seed', help='Random seed  [default: random]', metavar='INT', type=int)
@click.option('--transfer', help='Transfer learning from network pickle', metavar='PKL|URL')
@click.option('--resume', help='Resume from training state: a file, a run directory, or auto', metavar='PT|DIR|auto')
@click.option('-n', '--dry-run', help='Print training options and exit', is_flag=True)
@click.pass_context
def main(ctx: click.Context, **kwargs) -> None:
    """Train a diffusion model on random patches (Patch Diffusion) or on whole images (EDM)."""
    opts = resolve_options(ctx, kwargs)
    if opts.preset and preset_refusal(opts.preset):
        raise click.BadParameter(preset_refusal(opts.preset), param_hint='--preset')
    device = distributed.init(opts.device)
    if opts.deterministic and device.type == 'cuda':
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', CUBLAS_WORKSPACE_CONFIG)  # cuBLAS reads it once, at its first call
    world_size = distributed.get_world_size()
    check_speed_options(opts, device)
    check_latent_options(opts)

    try:
        dataset = dnnlib.construct_class_by_name(class_name=dataset_class(opts), path=opts.data, use_labels=opts.cond)
    except DatasetError as err:
        raise click.BadParameter(str(err), param_hint='--data')
    check_latent_norm(opts, dataset)
    if opts.cond and not dataset.has_labels:
        raise click.BadParameter(f'{opts.data}: --cond=True needs labels in dataset.json', param_hint='--cond')
    seed_given = opts.seed is not None
    if opts.seed is None:
        seed = torch.randint(1 << 31, size=[], device=distributed.collective_device())
        if dist.is_initialized():
            dist.broadcast(seed, src=0)
        opts.seed = int(seed)
    c = build_config(opts, dataset.name, dataset.resolution, world_size)
    try:
        split_batch(opts.batch, opts.batch_gpu, world_size)
        for size in patch_sizes(opts, dataset):
            check_patch_size(c.network_kwargs.channel_mult, size)
    except ValueError as err:
        raise click.ClickException(f'{opts.data}: {err}' if 'patch size' in str(err) else str(err))

    # Global rank 0 decides for the whole job (every node); the others take its answer.
    run_id = launch_run_id()
    decision = [choose_run_dir(opts.outdir, c.desc, opts.nosubdir, opts.resume, run_id)
                if distributed.get_rank() == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(decision, src=0)
    run_dir, resume_state = decision[0]
    if int(os.environ.get('TORCHELASTIC_MAX_RESTARTS', '0')) > 0 and opts.resume != 'auto':
        distributed.print0('Warning: torchrun may restart this job (--max-restarts), but without --resume=auto a restart '
                           'starts again from the beginning' + ('.' if opts.resume else ' in a new run directory.'))
    if resume_state is not None:
        try:
            state = load_state(resume_state)  # fail on a bad file before anything is written into its run directory
        except SnapshotError as err:
            raise click.ClickException(str(err))
        trained_with, state_seed = state_loss_norm(state), int(state['seed'])
        del state
        if trained_with != opts.loss_norm:
            distributed.print0(f'Note: {resume_state} was trained with --loss-norm={trained_with}; '
                               f'the run keeps it (not {opts.loss_norm}).')
            c.loss_norm = opts.loss_norm = trained_with
        if seed_given and state_seed != opts.seed:
            distributed.print0(f'Note: {resume_state} was trained with --seed={state_seed}; the run keeps it (not {opts.seed}).')
        c.seed = opts.seed = state_seed  # training_loop takes the state's seed; the options written here say so too
    c.training_options = dict(opts)

    distributed.print0(json.dumps(dict(c, run_dir=run_dir, resume_state=resume_state), indent=2))
    if opts.dry_run:
        distributed.print0('Dry run; exiting.')
        return

    logger = None
    if distributed.get_rank() == 0:
        os.makedirs(run_dir, exist_ok=True)
        write_run_id(run_dir, run_id)
        with open(os.path.join(run_dir, 'training_options.json'), 'wt') as f:
            json.dump(c, f, indent=2)
        logger = dnnlib.util.Logger(os.path.join(run_dir, 'log.txt'))
    try:
        training_loop(run_dir=run_dir, resume_state=resume_state, device=device, **{k: v for k, v in c.items() if k != 'desc'})
    except (SnapshotError, LatentError, DatasetError) as err:
        raise click.ClickException(str(err))
    finally:
        if logger is not None:
            logger.close()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
