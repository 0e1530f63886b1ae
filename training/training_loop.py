"""The training loop: patch-size schedule, gradient accumulation, EMA, ticks, snapshots and exact resume."""

import copy
import json
import math
import os
import random
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import psutil
import torch
import torch.distributed as dist

import dnnlib
from torch_utils import distributed, misc, training_stats
from training import snapshot
from training.networks import check_patch_size
from training.images import save_image_grid, to_float
from training.latents import SD_SCALE, LatentCodec, LatentNorm, latent_record
from training.patch import PatchSchedule, coordinate_grid
from training.phema import PowerEMA, phema_snapshot_name, save_phema_snapshot, update_ema
from training.sampler import generate_images


AUTOCAST_DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}  # training precision -> autocast dtype
LOSS_NORMS = ('image', 'pixel')  # a step's loss: summed over pixels per image, or that times (R/s)^2 (see optimizer_step)
LR_DECAYS = ('none', 'inv-sqrt')  # after the ramp-up: constant (then --lr-cooldown), or EDM2's 1/sqrt(t / t_ref)
CUBLAS_WORKSPACE_CONFIG = ':4096:8'  # a fixed cuBLAS workspace, which deterministic cuBLAS results need (CUDA >= 10.2)


def split_batch(batch_size: int, batch_gpu: Optional[int], world_size: int) -> Tuple[int, int]:
    """(per-round batch per process, accumulation rounds) such that batch == batch_gpu * rounds * world_size."""
    if batch_size % world_size != 0:
        raise ValueError(f'--batch={batch_size} does not split over {world_size} processes')
    per_process = batch_size // world_size
    batch_gpu = batch_gpu or per_process
    if batch_gpu > per_process or per_process % batch_gpu != 0:
        raise ValueError(f'--batch={batch_size} over {world_size} processes is {per_process} per process, '
                         f'which --batch-gpu={batch_gpu} does not divide')
    return batch_gpu, per_process // batch_gpu


def _rng_state(device: torch.device) -> Dict[str, Any]:
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    if device.type == 'cuda' and 'cuda' in state:
        torch.cuda.set_rng_state(state['cuda'], device)


def _gather_objects(obj: Any) -> List[Any]:
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * distributed.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


class _Batches:
    """Pulls whole steps of data from a loader: `multiplier` loader batches concatenated per accumulation round."""

    def __init__(self, loader: torch.utils.data.DataLoader, device: torch.device,
                 to_training: Callable[[torch.Tensor], torch.Tensor] = to_float):
        self._iterator: Iterator = iter(loader)
        self._device = device
        self._to_training = to_training  # on the device: uint8 -> [-1, 1], or latent moments/images -> latent samples

    def next_round(self, multiplier: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Training inputs (images in [-1, 1] or latents) and labels for one round, on the device."""
        start = time.perf_counter()
        parts = [next(self._iterator) for _ in range(multiplier)]
        training_stats.report('Timing/data_wait_sec', time.perf_counter() - start)  # time the step waits for the loader
        items = torch.cat([p[0] for p in parts]).to(self._device, non_blocking=True)
        labels = torch.cat([p[1] for p in parts]).to(self._device, non_blocking=True)
        return self._to_training(items), labels


def make_loader(dataset: torch.utils.data.Dataset, rank: int, world_size: int, seed: int, start: int, batch_gpu: int,
                data_loader_kwargs: dict) -> Tuple[misc.InfiniteSampler, torch.utils.data.DataLoader]:
    """One rank's data: an InfiniteSampler over the rank's shard, resuming after `start` items, and its DataLoader.

    A data set with a cache (ImageFolderDataset(cache=True)) gets it allocated here for this rank's shard only, in
    the rank's main process before the loader forks its workers, so that the workers share it (SharedImageCache).
    The ranks on this machine (LOCAL_WORLD_SIZE, as torchrun sets it; else all ranks) count against its limit.
    """
    sampler = misc.InfiniteSampler(dataset, rank=rank, num_replicas=world_size, seed=seed, start=start)
    if hasattr(dataset, 'prepare_cache'):
        dataset.prepare_cache(sampler.items, ranks_on_node=int(os.environ.get('LOCAL_WORLD_SIZE', world_size)))
    loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=batch_gpu, **data_loader_kwargs)
    return sampler, loader


def latent_setup(dataset: torch.utils.data.Dataset, latent_kwargs: Optional[dict], need_decoder: bool,
                 device: torch.device) -> Tuple[Callable, Optional[LatentCodec], Optional[dict], int, int]:
    """(to_training, codec or None, the network's `latent` setting, resolution, channels) for pixels or latents.

    latent_kwargs None trains on pixels. Otherwise, with on_the_fly the data set holds images that the VAE (latent_kwargs
    vae, scale, and bias and pixels if given: training.latents.latent_setting) encodes at every step, as the official
    code does; without it the data set holds moments that dataset_tool.py --encode-latents wrote once, with their
    normalisation, and `vae` only overrides where the VAE is loaded from.
    """
    if latent_kwargs is None:
        return to_float, None, None, dataset.resolution, dataset.num_channels
    on_the_fly = latent_kwargs.get('on_the_fly', False)
    if on_the_fly:
        latent = latent_record({'scale': SD_SCALE, **latent_kwargs})
    elif dataset.latent is None:
        raise ValueError(f'{dataset.path}: training on pre-encoded latents needs a latent data set '
                         '(dataset_tool.py --encode-latents); to encode images at every step, use --latents-on-the-fly')
    else:
        latent = dict(dataset.latent, vae=latent_kwargs.get('vae') or dataset.latent['vae'])
    codec = LatentCodec.of(latent, device) if on_the_fly or need_decoder else None
    if on_the_fly:
        return codec.encode, codec, latent, dataset.resolution // codec.factor, codec.channels
    return LatentNorm.of(latent).sample, codec, latent, dataset.resolution, dataset.num_channels


def state_loss_norm(state: Dict[str, Any]) -> str:
    """The loss normalisation a training state was trained with; states written before the option existed used 'image'."""
    return state.get('loss_norm', 'image')


def trim_stats(path: str, next_tick: int) -> int:
    """Drop the records of ticks >= next_tick from a stats.jsonl file (and a line cut short); returns how many went.

    A run that starts at tick next_tick (0, or a state's cur_tick) writes those ticks again: after a crash or a
    killed worker, the ticks between the last state file and the kill would otherwise be counted twice.
    """
    if not os.path.isfile(path):
        return 0
    with open(path, 'rb') as f:
        lines = f.read().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if line.endswith(b'\n') and json.loads(line)['progress']['tick'] < next_tick:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    if len(kept) < len(lines):
        snapshot.atomic_write(path, lambda f: f.writelines(kept))
    return len(lines) - len(kept)


def _format_time(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f'{hours}h {minutes:02d}m {secs:02d}s' if hours else f'{minutes}m {secs:02d}s'


def _summary_inputs(net: torch.nn.Module, batch: int, resolution: int, device: torch.device) -> list:
    x = torch.zeros([batch, net.img_channels, resolution, resolution], device=device)
    x_pos = coordinate_grid(resolution, resolution, device=device).expand(batch, -1, -1, -1) if net.pos_channels else None
    return [x, torch.ones([batch], device=device), x_pos, torch.zeros([batch, net.label_dim], device=device)]


def _memory_gb(device: torch.device) -> Tuple[float, float]:
    cpu = psutil.Process(os.getpid()).memory_info().rss / 2**30
    gpu = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else 0.0
    return cpu, gpu


class _Autocast:
    """Calls a network under torch.autocast; the augmentation, noise and loss target around it stay float32."""
    # Autocast around the whole loss would run the augmentation's convolutions in bfloat16, and the rounded clean
    # image and noise would swamp the loss at small noise levels.

    def __init__(self, net: torch.nn.Module, device_type: str, dtype: torch.dtype):
        self.net = net
        self.device_type = device_type
        self.dtype = dtype

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.net(*args, **kwargs)


def grad_scaler(precision: str, device: torch.device, loss_scaling: float) -> Optional[torch.amp.GradScaler]:
    """The dynamic loss scaler of fp16 training, starting at loss_scaling; None for fp32 and bf16."""
    return torch.amp.GradScaler(device.type, init_scale=loss_scaling) if precision == 'fp16' else None


def _match_param_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give every optimizer state tensor its parameter's memory layout."""
    # Fused Adam reads parameters and moments as flat memory: moments from a state file written with the other
    # layout (--channels-last on or off) would silently pair the wrong elements.
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def compile_network(net: torch.nn.Module, compile_kwargs: dict) -> None:
    """torch.compile `net` in place, before any DDP wrapping, so that its state dict keeps its parameter names."""
    # DDP then splits the compiled graphs at its gradient buckets, so the all-reduce still overlaps the backward pass.
    # With dynamic=False each patch size (with its batch multiplier) compiles once: 3 graphs, under the limit.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 8)
    net.compile(**compile_kwargs)


def optimizer_step(ddp: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, next_round: Callable,
                   size: int, multiplier: int, num_rounds: int, lr: float, augment_pipe: Optional[Callable] = None,
                   loss_scaling: float = 1, scaler: Optional[torch.amp.GradScaler] = None,
                   autocast_dtype: Optional[torch.dtype] = None, channels_last: bool = False, loss_norm: str = 'image') -> None:
    """One training step: accumulate gradients over `num_rounds` rounds of `next_round(multiplier)` data, then update."""
    # With a GradScaler the scaler scales the loss (loss_scaling is unused) and skips steps with inf/NaN gradients;
    # without one the loss is multiplied by the constant loss_scaling, as in EDM.
    # loss_norm 'image' sums the loss over each image's pixels and averages over images, as EDM and the official code
    # do, so an s x s patch step weighs (s/R)^2 of a full step; 'pixel' multiplies by (R/s)^2, which gives every step
    # the same weight (the mean over the step's pixels, times R^2). On full-size steps the two are the same numbers.
    if loss_norm not in LOSS_NORMS:
        raise ValueError(f'loss_norm must be one of {LOSS_NORMS}, got {loss_norm!r}')
    optimizer.zero_grad(set_to_none=True)
    net = ddp if autocast_dtype is None else _Autocast(ddp, next(ddp.parameters()).device.type, autocast_dtype)
    for round_idx in range(num_rounds):
        with misc.ddp_sync(ddp, sync=(round_idx == num_rounds - 1)):
            images, labels = next_round(multiplier)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            loss = loss_fn(net, images, size, labels=labels, augment_pipe=augment_pipe)
            training_stats.report('Loss/loss', loss)
            scale = (loss_scaling if scaler is None else 1) / (len(images) * num_rounds)
            if loss_norm == 'pixel':
                scale *= (images.shape[-1] / loss.shape[-1]) ** 2
            loss = loss.sum().mul(scale)
            (loss if scaler is None else scaler.scale(loss)).backward()
    for group in optimizer.param_groups:
        group['lr'] = lr
    if scaler is not None:
        scaler.unscale_(optimizer)  # it records inf/NaN before nan_to_num hides them, so scaler.step() still skips
    for param in ddp.parameters():
        if param.grad is not None:
            torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()


def use_deterministic_algorithms(device: torch.device) -> None:
    """Make this process pick deterministic kernels from now on: no cuDNN benchmarking and no atomics-based algorithms."""
    # cuBLAS reads CUBLAS_WORKSPACE_CONFIG once, at its first call: train.py sets it before anything runs on the GPU;
    # here it only covers callers of training_loop() that have not used cuBLAS yet. warn_only: ops without a
    # deterministic version warn rather than stop the run. Under warn_only, flash and memory-efficient attention keep
    # their non-deterministic backward passes (they only warn), so attention on CUDA takes the math kernel.
    if device.type == 'cuda':
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', CUBLAS_WORKSPACE_CONFIG)
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def ramped_lr(base_lr: float, cur_nimg: int, rampup_kimg: float, total_kimg: float = 0, cooldown: float = 0) -> float:
    """The learning rate after `cur_nimg` training images: linear ramp-up over `rampup_kimg`, as in EDM, then,
    with `cooldown` > 0, a linear decay to zero over the last `cooldown` share of `total_kimg`."""
    lr = base_lr * min(cur_nimg / max(rampup_kimg * 1000, 1e-8), 1)
    if cooldown > 0:
        lr *= min(max(total_kimg * 1000 - cur_nimg, 0) / (cooldown * total_kimg * 1000), 1)
    return lr


def lr_decay_factor(decay: str, full_nimg: float, ref_nimg: float) -> float:
    """The decay after the ramp-up: 1 for 'none'; for 'inv-sqrt' EDM2's 1 / sqrt(max(t / t_ref, 1)) with t = full_nimg.

    full_nimg counts full-image equivalents (images x (s/R)^2, see step_full_nimg), and ref_nimg = ref_batches x batch.
    """
    if decay not in LR_DECAYS:
        raise ValueError(f'lr decay must be one of {LR_DECAYS}, got {decay!r}')
    if decay == 'none' or ref_nimg <= 0:
        return 1.0
    return 1 / math.sqrt(max(full_nimg / ref_nimg, 1))


def step_full_nimg(batch_size: int, multiplier: int, size: int, resolution: int) -> float:
    """A step's full-image equivalents for the lr decay: batch x multiplier x (s/R)^2, its pixels over R^2.

    A full-image step counts its batch, as in EDM2; a step of s x s patches counts in proportion to its compute, so that
    a patch run and a full-image run have the same lr after the same compute (docs/how_it_works.md).
    """
    return batch_size * multiplier * (size / resolution) ** 2


def ema_beta(cur_nimg: int, step_nimg: int, halflife_kimg: float, rampup_ratio: Optional[float]) -> float:
    """EDM's EMA decay for a step of `step_nimg` images taken at `cur_nimg`: a half-life in images, capped by the ramp-up."""
    halflife_nimg = halflife_kimg * 1000
    if rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, cur_nimg * rampup_ratio)
    return 0.5 ** (step_nimg / max(halflife_nimg, 1e-8))


def training_loop(
    run_dir: str,
    dataset_kwargs: dict,
    data_loader_kwargs: dict,
    network_kwargs: dict,
    loss_kwargs: dict,
    optimizer_kwargs: dict,
    augment_kwargs: Optional[dict] = None,
    patch_kwargs: Optional[dict] = None,     # PatchSchedule options (real_p, mode); None trains on whole images
    latent_kwargs: Optional[dict] = None,    # train on VAE latents: dict(on_the_fly, vae, scale[, bias, pixels]); None trains on pixels
    seed: int = 0,
    batch_size: int = 512,
    batch_gpu: Optional[int] = None,
    total_kimg: float = 200000,
    ema_halflife_kimg: float = 500,
    ema_rampup_ratio: Optional[float] = 0.05,
    lr_rampup_kimg: float = 10000,
    lr_cooldown: float = 0,                   # share of total_kimg at the end over which the lr decays linearly to 0
    lr_decay: str = 'none',                   # 'inv-sqrt': EDM2's lr / sqrt(max(t / t_ref, 1)); see lr_decay_factor
    lr_ref_batches: float = 0,                # t_ref = lr_ref_batches x batch_size full-image equivalents
    precision: str = 'fp32',                  # 'fp32', 'bf16' (autocast) or 'fp16' (autocast and a GradScaler)
    loss_scaling: float = 1,                  # the GradScaler's initial scale with fp16, else a constant loss factor
    compile_kwargs: Optional[dict] = None,    # torch.compile options for the training network; None runs it eagerly
    channels_last: bool = False,              # train the network (not the EMA) in channels-last memory format
    loss_norm: str = 'image',                 # 'image' (EDM's, the official code's) or 'pixel'; see optimizer_step
    kimg_per_tick: float = 50,
    snapshot_ticks: Optional[int] = 50,
    state_dump_ticks: Optional[int] = 500,
    resume_state: Optional[str] = None,
    transfer: Optional[str] = None,
    cudnn_benchmark: bool = True,
    tf32: bool = False,
    deterministic: bool = False,              # use_deterministic_algorithms(); overrides cudnn_benchmark
    device: torch.device = torch.device('cpu'),
    preview: Optional[dict] = None,           # sampler options for a PNG grid at every snapshot; None for none
    phema_sigma_rels: Optional[Sequence[float]] = None,  # post-hoc EMA profiles to keep (training/phema.py); None for none
    phema_snapshot_ticks: Optional[int] = None,          # ticks between phema snapshots; None: as snapshot_ticks
    training_options: Optional[dict] = None,  # stored in snapshots for reference
) -> None:
    """Train a (patch) diffusion model until `total_kimg` or a stop signal; writes snapshots and state to run_dir."""
    start_time = time.time()
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f'precision must be one of {sorted(AUTOCAST_DTYPES)}, got "{precision}"')
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    batch_gpu, num_rounds = split_batch(batch_size, batch_gpu, world_size)
    rank_seed = (seed * world_size + rank) % (1 << 31)
    random.seed(rank_seed)
    np.random.seed(rank_seed)
    torch.manual_seed(rank_seed)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    if deterministic:
        use_deterministic_algorithms(device)

    state = snapshot.load_state(resume_state) if resume_state else None
    if state is not None:
        seed = state['seed']  # the data order and patch schedule continue from the original run's seed
        loss_norm = state_loss_norm(state)

    # Data.
    distributed.print0('Loading dataset...')
    dataset = dnnlib.construct_class_by_name(**dataset_kwargs)
    need_decoder = preview is not None and rank == 0
    to_training, codec, latent, resolution, channels = latent_setup(dataset, latent_kwargs, need_decoder, device)
    schedule = PatchSchedule(resolution, seed=seed, latent=latent is not None, **patch_kwargs) \
        if patch_kwargs is not None else None
    consumed = state['consumed'] if state else 0  # loader items each rank has taken so far
    _sampler, loader = make_loader(dataset, rank, world_size, seed, consumed, batch_gpu, data_loader_kwargs)
    batches = _Batches(loader, device, to_training)

    # Network, loss, optimizer.
    distributed.print0('Constructing network...')
    net = dnnlib.construct_class_by_name(**network_kwargs, img_resolution=resolution, img_channels=channels,
                                         label_dim=dataset.label_dim, **(dict(latent=latent) if latent else {}))
    channel_mult = net.model.channel_mult
    for size in (schedule.sizes if schedule else [resolution]):
        check_patch_size(channel_mult, size)
    net.train().requires_grad_(True).to(device)
    loss_fn = dnnlib.construct_class_by_name(**loss_kwargs)
    augment_pipe = dnnlib.construct_class_by_name(**augment_kwargs) if augment_kwargs else None
    optimizer = dnnlib.construct_class_by_name(params=net.parameters(), **optimizer_kwargs)
    scaler = grad_scaler(precision, device, loss_scaling)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    phema = PowerEMA(net, phema_sigma_rels) if phema_sigma_rels else None
    if phema_snapshot_ticks is None:
        phema_snapshot_ticks = snapshot_ticks
    if rank == 0 and state is None:
        misc.print_module_summary(net, _summary_inputs(net, batch_gpu, resolution, device))

    cur_nimg = cur_tick = 0
    full_nimg = 0.0  # full-image equivalents trained on, the lr decay's t
    if transfer and state is None:
        distributed.print0(f'Transferring weights from "{transfer}"...')
        source = snapshot.load_network(transfer)
        extra_inputs = net.pos_channels - source.pos_channels  # EDM's networks into a Patch Diffusion one: 2
        try:
            for module in (net, ema):
                misc.copy_params_and_buffers(source, module, require_all=False, extra_inputs=extra_inputs)
        except ValueError as err:
            raise snapshot.SnapshotError(f'--transfer: {transfer} does not fit the network being trained ({err})') from None
    if state is not None:
        distributed.print0(f'Resuming from "{resume_state}"...')
        net.load_state_dict(state['net'])
        ema.load_state_dict(state['ema'])
        if phema is not None:
            if not state.get('phema'):  # profiles started now would not be power functions of the whole run
                raise snapshot.SnapshotError(f'--phema: {resume_state} was trained without --phema; post-hoc EMA needs '
                                             'profiles from the start (resume without --phema, or start a new run)')
            try:
                phema.load_state_dict(state['phema'])
            except ValueError as err:
                raise snapshot.SnapshotError(f'--phema: {resume_state}: {err}; resume with the same --phema') from None
        elif state.get('phema'):
            distributed.print0(f'Note: {resume_state} has post-hoc EMA profiles; without --phema they are dropped.')
        optimizer.load_state_dict(state['optimizer'])
        if scaler is not None and state.get('scaler'):
            scaler.load_state_dict(state['scaler'])
        cur_nimg, cur_tick = state['cur_nimg'], state['cur_tick']
        full_nimg = state.get('full_nimg', float(cur_nimg))  # states from before the lr decay: exact for full-image runs
        if schedule is not None:
            schedule.load_state_dict(state['schedule'])
        if len(state['rng']) == world_size:
            _set_rng_state(state['rng'][rank], device)
        else:
            distributed.print0(f'Warning: state was saved by {len(state["rng"])} processes, not {world_size}; '
                               'random streams restart, so the run continues but not bit-exactly.')
    if schedule is not None:  # a schedule seeded per rank would give DDP different shapes and hang it
        misc.check_same_on_all_ranks(schedule.upcoming(64, progress=min(cur_nimg / max(total_kimg * 1000, 1), 1)),
                                     'the patch sizes of the next 64 steps')
    if channels_last:
        net.to(memory_format=torch.channels_last)  # the same Parameter objects, so the optimizer keeps them
    _match_param_layouts(optimizer)
    if compile_kwargs is not None:
        compile_network(net, compile_kwargs)
    ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == 'cuda' else None) \
        if world_size > 1 else net
    if state is None:
        misc.copy_params_and_buffers(net, ema, require_all=True)  # DDP gave every rank rank 0's weights; so must the EMA
        if phema is not None:
            phema.reset(net)

    # Training.
    total_nimg = int(total_kimg * 1000)
    if cur_nimg >= total_nimg:
        distributed.print0(f'Already trained for {cur_nimg / 1e3:g} kimg of {total_kimg} kimg; nothing to do.')
        return
    collector = training_stats.Collector(regex='.*')
    stats_jsonl = None
    if rank == 0:
        stats_path = os.path.join(run_dir, 'stats.jsonl')
        dropped = trim_stats(stats_path, cur_tick)
        if dropped:
            print(f'Dropped {dropped} line(s) of stats.jsonl from tick {cur_tick} on: this run writes those ticks again.')
        stats_jsonl = open(stats_path, 'at')
    with distributed.stop_on_signals():
        distributed.print0(f'Training for {total_kimg} kimg...\n')
        tick_start_nimg, tick_start_time = cur_nimg, time.time()
        maintenance_time = tick_start_time - start_time
        while True:
            size = schedule.sample(progress=min(cur_nimg / max(total_nimg, 1), 1)) if schedule else resolution
            multiplier = schedule.batch_multiplier(size) if schedule else 1
            lr = ramped_lr(optimizer_kwargs['lr'], cur_nimg, lr_rampup_kimg, total_kimg, lr_cooldown) \
                * lr_decay_factor(lr_decay, full_nimg, lr_ref_batches * batch_size)
            step_start = time.perf_counter()
            optimizer_step(ddp, optimizer, loss_fn, batches.next_round, size, multiplier, num_rounds, lr,
                           augment_pipe=augment_pipe, loss_scaling=loss_scaling, scaler=scaler,
                           autocast_dtype=AUTOCAST_DTYPES[precision], channels_last=channels_last, loss_norm=loss_norm)
            training_stats.report('Timing/step_sec', time.perf_counter() - step_start)
            training_stats.report('Progress/lr', lr)
            consumed += num_rounds * multiplier * batch_gpu

            step_nimg = batch_size * multiplier
            update_ema(ema, net, ema_beta(cur_nimg, step_nimg, ema_halflife_kimg, ema_rampup_ratio))
            if phema is not None:
                phema.update(net, cur_nimg, step_nimg)  # t counts images, as cur_nimg does
            cur_nimg += step_nimg
            full_nimg += step_full_nimg(batch_size, multiplier, size, resolution)
            training_stats.report('Patch/size', float(size))

            done = cur_nimg >= total_nimg
            stop = distributed.should_stop()
            if not done and not stop and cur_nimg < tick_start_nimg + kimg_per_tick * 1000:
                continue

            # Tick: log, then snapshots and state as scheduled.
            tick_end_time = time.time()
            cpu_gb, gpu_gb = _memory_gb(device)
            collector.update()
            fields = [f'tick {cur_tick:<5d}', f'kimg {cur_nimg / 1e3:<9.1f}', f'loss {collector["Loss/loss"]:<8.4f}',
                      f'time {_format_time(tick_end_time - start_time):<12s}',
                      f'sec/tick {tick_end_time - tick_start_time:<7.1f}',
                      f'sec/kimg {(tick_end_time - tick_start_time) / max(cur_nimg - tick_start_nimg, 1) * 1e3:<7.2f}',
                      f'maintenance {maintenance_time:<6.1f}', f'cpumem {cpu_gb:<6.2f}', f'gpumem {gpu_gb:<6.2f}']
            if scaler is not None:
                fields.append(f'lossscale {scaler.get_scale():<8g}')
            distributed.print0(' '.join(fields))
            if stats_jsonl is not None:
                record = dict(collector.as_dict(), timestamp=time.time(),
                              progress=dict(tick=cur_tick, kimg=cur_nimg / 1e3, sec_per_tick=tick_end_time - tick_start_time,
                                            maintenance=maintenance_time, cpumem_gb=cpu_gb, gpumem_gb=gpu_gb))
                stats_jsonl.write(json.dumps(record) + '\n')
                stats_jsonl.flush()
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(device)

            stem = f'{cur_nimg // 1000:06d}'
            if snapshot_ticks is not None and (done or stop or cur_tick % snapshot_ticks == 0):
                misc.check_ddp_consistency(ema)
                if rank == 0:
                    snapshot.save_network_snapshot(os.path.join(run_dir, f'network-snapshot-{stem}'),
                                                   dict(ema=ema, loss_fn=loss_fn, augment_pipe=augment_pipe,
                                                        dataset_kwargs=dict(dataset_kwargs), training_options=training_options))
                    if preview is not None:
                        grid = generate_images(ema, seeds=range(preview['num_images']), device=device,
                                               num_steps=preview['num_steps'], decoder=codec.decode if codec else None)
                        save_image_grid(grid, os.path.join(run_dir, f'preview-{stem}.png'))
            if phema is not None and phema_snapshot_ticks is not None and (done or stop or cur_tick % phema_snapshot_ticks == 0):
                for profile in phema.profiles:
                    misc.check_ddp_consistency(profile)
                if rank == 0:
                    save_phema_snapshot(os.path.join(run_dir, phema_snapshot_name(cur_nimg)), phema, cur_nimg)
            if state_dump_ticks is not None and (done or stop or cur_tick % state_dump_ticks == 0):
                rng = _gather_objects(_rng_state(device))
                if rank == 0:
                    snapshot.save_state(os.path.join(run_dir, f'training-state-{stem}.pt'), dict(
                        net=net.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                        scaler=scaler.state_dict() if scaler is not None else None,
                        cur_nimg=cur_nimg, full_nimg=full_nimg, cur_tick=cur_tick + 1, consumed=consumed, rng=rng, seed=seed,
                        loss_norm=loss_norm,
                        schedule=schedule.state_dict() if schedule else None,
                        **(dict(phema=phema.state_dict()) if phema is not None else {})))
            distributed.update_progress(cur_nimg // 1000, total_kimg)
            if done or stop:
                break
            cur_tick += 1
            tick_start_nimg, tick_start_time = cur_nimg, time.time()
            maintenance_time = tick_start_time - tick_end_time

        if stats_jsonl is not None:
            stats_jsonl.close()
    distributed.print0('\nStopped on a signal; state saved.' if stop and not done else '\nExiting...')
