"""Training throughput of plain EDM and of Patch Diffusion, measured side by side in one process.

Run from the repository root (the script puts the root on sys.path itself; bench/ is not a package):
  python bench/train_throughput.py --preset=demo --device=cpu
  python bench/train_throughput.py --preset=cifar10-32 --batch-gpu=64 --json=train-cifar10-32.json
  python bench/train_throughput.py --preset=celeba64 --configs=full,p=1.0,p=0.5 --modes=fp32,bf16,bf16+compile,fp16

Every config trains its own copy of the preset's network (same initialisation) at the same per-GPU batch, on synthetic
images in [-1, 1] made once on the device, through training_loop.optimizer_step(), the loop's own step. The configs:
`full` (--patch off: EDMLoss on whole images, no coordinate channels), `p=1.0`, `p=0.5`, `p=0.25` (Patch Diffusion with
the stochastic schedule, the patch size of every step drawn from a seeded PatchSchedule) and `progressive` (p=0.5,
progress swept from 0 to 1 across each block so that every size gets its share). After warm-up steps at every size of
every config, blocks alternate between the configs (A, B, C, ..., A, B, C, ...) so that drift hits all of them alike.

Every config runs in every `--modes` entry (see MODES): `fp32` is train.py's step for the preset (SDPA attention, fused
Adam, and --channels-last where the preset sets it); `+cl` adds --channels-last, `bf16`/`fp16` add autocast (fp16 with
a GradScaler, CUDA only), `+compile` adds --compile. Rows are keyed "<config> <mode>"; ratios to `full` are taken in
the same mode, and the speedup of each mode over `fp32` at the same config, plus kimg/s relative to full-image `fp32`
EDM, where those were measured. This script compares this project with itself; the comparison with the authors' code,
run from its own checkout, is bench/vs_official.py.

Per config: sec/step (mean over all steps, median over blocks), images/sec counted as the loop counts them
(batch * batch multiplier per step), megapixels/sec actually processed (batch * multiplier * size^2 per step), peak
memory (see PeakMemory in bench/common.py; every config's network and optimizer stay resident, and on the CPU the
peak is process-wide, so the increase over the memory in use at the start of a block is given too), and the ratios
to `full`. Next to them the cost model of each schedule: the relative pixel cost of a step,
sum_i p_i * m_i * (s_i / R)^2 (the sec/step ratio if time were proportional to pixels), the images per step,
sum_i p_i * m_i (mean_batch_multiplier), and efficiency = measured images/sec ratio / (images per step / pixel cost);
the Mpix/s ratio is the same efficiency for the mix of sizes the blocks actually drew. The real loop's EMA update,
data loading and logging are not part of a step here.
"""

import os
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import click
import torch

import dnnlib
from bench import common
from torch_utils.distributed import choose_device
from train import build_config, preset_options
from training.networks import check_patch_size
from training.patch import PatchSchedule
from training.training_loop import AUTOCAST_DTYPES, compile_network, grad_scaler, optimizer_step

# Config name -> the train.py options that set its patch schedule.
CONFIGS = {
    'full': dict(patch='off'),
    'p=1.0': dict(patch='on', real_p=1.0, progressive=False),
    'p=0.5': dict(patch='on', real_p=0.5, progressive=False),
    'p=0.25': dict(patch='on', real_p=0.25, progressive=False),
    'progressive': dict(patch='on', real_p=0.5, progressive=True),
}

# Mode name -> (train.py option overrides, optimizer overrides): what train.py offers on top of the preset.
MODES = {
    'fp32': ({}, {}),
    'fp32+cl': (dict(channels_last=True), {}),
    'bf16': (dict(bf16=True), {}),
    'bf16+cl': (dict(bf16=True, channels_last=True), {}),
    'bf16+compile': (dict(bf16=True, compile=True), {}),
    'fp16': (dict(fp16=True), {}),
}


def cost_model(schedule: Optional[PatchSchedule]) -> Tuple[float, float]:
    """(pixel cost, images) of an average step relative to a full-size step; (1, 1) without patches."""
    if schedule is None:
        return 1.0, 1.0
    pixel_cost = sum(p * m * (s / schedule.resolution) ** 2
                     for p, m, s in zip(schedule.probs, schedule.multipliers, schedule.sizes))
    return pixel_cost, schedule.mean_batch_multiplier


class SyntheticData:
    """Random images in [-1, 1] and one-hot labels, made once on the device; a round takes the first ones it needs."""

    def __init__(self, batch: int, max_multiplier: int, resolution: int, labels: int, device: torch.device, seed: int):
        generator = torch.Generator(device).manual_seed(seed)
        num = batch * max_multiplier
        self.batch = batch
        self.images = torch.rand([num, 3, resolution, resolution], generator=generator, device=device) * 2 - 1
        classes = torch.randint(max(labels, 1), [num], generator=generator, device=device)
        self.labels = torch.nn.functional.one_hot(classes, labels).float() if labels else torch.zeros([num, 0], device=device)

    def next_round(self, multiplier: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """batch * multiplier images and labels, as optimizer_step() asks for them."""
        num = self.batch * multiplier
        return self.images[:num], self.labels[:num]


@dataclass
class Trainer:
    """One config's network, loss, optimizer and patch schedule, and what its measured blocks did."""

    config: str
    mode: str
    net: torch.nn.Module
    loss_fn: Callable
    optimizer: torch.optim.Optimizer
    augment_pipe: Optional[Callable]
    schedule: Optional[PatchSchedule]
    resolution: int
    lr: float
    loss_scaling: float
    scaler: Optional[torch.amp.GradScaler] = None
    autocast_dtype: Optional[torch.dtype] = None
    channels_last: bool = False
    block_times: List[float] = field(default_factory=list)
    block_sizes: List[List[int]] = field(default_factory=list)
    block_memory: List[Tuple[float, float]] = field(default_factory=list)

    def multiplier(self, size: int) -> int:
        """Batch multiplier of a step at this patch size."""
        return self.schedule.batch_multiplier(size) if self.schedule else 1

    def warmup_sizes(self) -> List[int]:
        """Every patch size the schedule can give."""
        if self.schedule is None:
            return [self.resolution]
        return [s for s, p in zip(self.schedule.sizes, self.schedule.probs) if p > 0]

    def draw_sizes(self, steps: int) -> List[int]:
        """Patch sizes of one block: drawn from the schedule, or swept through progress 0..1 when progressive."""
        if self.schedule is None:
            return [self.resolution] * steps
        if self.schedule.mode == 'progressive':
            return [self.schedule.sample(progress=(i + 0.5) / steps) for i in range(steps)]
        return [self.schedule.sample() for _ in range(steps)]

    def run(self, sizes: List[int], data: SyntheticData) -> None:
        """One optimizer step per patch size."""
        for size in sizes:
            optimizer_step(self.net, self.optimizer, self.loss_fn, data.next_round, size, self.multiplier(size), 1, self.lr,
                           augment_pipe=self.augment_pipe, loss_scaling=self.loss_scaling, scaler=self.scaler,
                           autocast_dtype=self.autocast_dtype, channels_last=self.channels_last)


def make_trainer(config: str, mode: str, preset: str, cbase: Optional[int], resolution: int, device: torch.device,
                 seed: int) -> Trainer:
    """The trainer of a config in a mode, built from the preset through train.py's build_config()."""
    options, optimizer_options = MODES[mode]
    opts = preset_options(preset, **CONFIGS[config], **options, **({} if cbase is None else dict(cbase=cbase)))
    c = build_config(opts, 'synthetic', resolution, world_size=1)
    c.optimizer_kwargs.update(optimizer_options)
    schedule = PatchSchedule(resolution, seed=seed, **c.patch_kwargs) if c.patch_kwargs else None
    for size in (schedule.sizes if schedule else [resolution]):
        check_patch_size(c.network_kwargs.channel_mult, size)
    net = common.build_network(c.network_kwargs, resolution, common.label_dim(opts), device, seed=seed)
    net.train().requires_grad_(True)
    if c.channels_last:
        net.to(memory_format=torch.channels_last)
    optimizer = dnnlib.construct_class_by_name(params=net.parameters(), **c.optimizer_kwargs)
    if c.compile_kwargs is not None:
        compile_network(net, c.compile_kwargs)
    return Trainer(config=config, mode=mode, net=net, loss_fn=dnnlib.construct_class_by_name(**c.loss_kwargs),
                   optimizer=optimizer, schedule=schedule, resolution=resolution, lr=c.optimizer_kwargs.lr,
                   augment_pipe=dnnlib.construct_class_by_name(**c.augment_kwargs) if c.augment_kwargs else None,
                   loss_scaling=c.loss_scaling, scaler=grad_scaler(c.precision, device, c.loss_scaling),
                   autocast_dtype=AUTOCAST_DTYPES[c.precision], channels_last=c.channels_last)


def measure(trainers: List[Trainer], data: SyntheticData, warmup: int, blocks: int, steps_per_block: int,
            memory: common.PeakMemory) -> None:
    """Warm up every size of every trainer, then time alternating blocks, recording them in the trainers."""
    for trainer in trainers:
        trainer.run([size for size in trainer.warmup_sizes() for _ in range(warmup)], data)
    for _ in range(blocks):
        for trainer in trainers:
            sizes = trainer.draw_sizes(steps_per_block)
            memory.start()
            trainer.block_times.append(common.timed(lambda: trainer.run(sizes, data), data.images.device))
            trainer.block_memory.append(memory.stop())
            trainer.block_sizes.append(sizes)


def summarize(trainer: Trainer, batch: int) -> Dict[str, Any]:
    """Timings, throughput, memory and cost model of one trainer's measured blocks."""
    sizes = [size for block in trainer.block_sizes for size in block]
    seconds = sum(trainer.block_times)
    images = sum(batch * trainer.multiplier(size) for size in sizes)
    pixels = sum(batch * trainer.multiplier(size) * size ** 2 for size in sizes)
    pixel_cost, images_per_step = cost_model(trainer.schedule)
    return dict(
        config=trainer.config,
        mode=trainer.mode,
        real_p=trainer.schedule.real_p if trainer.schedule else None,
        schedule=trainer.schedule.mode if trainer.schedule else 'full',
        params=common.parameter_count(trainer.net),
        steps=len(sizes),
        size_counts={str(size): sizes.count(size) for size in sorted(set(sizes), reverse=True)},
        block_sec_per_step=[t / len(block) for t, block in zip(trainer.block_times, trainer.block_sizes)],
        sec_per_step_mean=seconds / len(sizes),
        sec_per_step_median=statistics.median(t / len(block) for t, block in zip(trainer.block_times, trainer.block_sizes)),
        images_per_sec=images / seconds,
        kimg_per_sec=images / seconds / 1e3,
        mpix_per_sec=pixels / seconds / 1e6,
        peak_memory_gb=max(peak for peak, _ in trainer.block_memory),
        peak_increase_gb=max(increase for _, increase in trainer.block_memory),
        expected_pixel_cost=pixel_cost,
        expected_images_per_step=images_per_step,
        ideal_images_per_sec_ratio=images_per_step / pixel_cost,
        measured_pixel_cost=pixels / (len(sizes) * batch * trainer.resolution ** 2),
        measured_images_per_step=images / (len(sizes) * batch),
    )


def add_ratios(rows: Dict[str, Dict[str, Any]]) -> None:
    """Ratios to `full` in the same mode and, per config, speedups over `fp32` (None where the baseline is missing)."""
    full_ref = rows.get('full fp32')
    for row in rows.values():
        full = rows.get(f'full {row["mode"]}')
        ref = rows.get(f'{row["config"]} fp32')
        row['sec_per_step_ratio'] = row['sec_per_step_mean'] / full['sec_per_step_mean'] if full else None
        row['images_per_sec_ratio'] = row['images_per_sec'] / full['images_per_sec'] if full else None
        row['mpix_per_sec_ratio'] = row['mpix_per_sec'] / full['mpix_per_sec'] if full else None
        row['efficiency'] = row['images_per_sec_ratio'] / row['ideal_images_per_sec_ratio'] if full else None
        row['speedup_vs_fp32'] = ref['sec_per_step_mean'] / row['sec_per_step_mean'] if ref else None
        row['kimg_ratio_vs_full_fp32'] = row['images_per_sec'] / full_ref['images_per_sec'] if full_ref else None


def print_report(result: Dict[str, Any]) -> None:
    """Measurement table and cost-model table."""
    rows = [dict(row, mix=' '.join(f'{s}:{n}' for s, n in row['size_counts'].items())) for row in result['rows'].values()]
    print(f'{result["preset"]} at {result["resolution"]}x{result["resolution"]}, batch {result["batch_gpu"]} per GPU, '
          f'{result["blocks"]} blocks x {result["steps_per_block"]} steps per config on {result["environment"]["device_name"]}, '
          f'torch {result["environment"]["torch"]}\n')
    print(common.format_table(rows, [
        ('config', 'config', ''), ('mode', 'mode', ''), ('sizes (size:steps)', 'mix', ''), ('s/step mean', 'sec_per_step_mean', '.4f'),
        ('s/step median', 'sec_per_step_median', '.4f'), ('img/s', 'images_per_sec', '.1f'), ('Mpix/s', 'mpix_per_sec', '.2f'),
        ('peak GiB', 'peak_memory_gb', '.3f'), ('+GiB in block', 'peak_increase_gb', '.3f')]))
    print(f'memory: {result["memory_kind"]}\n')
    print(common.format_table(rows, [
        ('config', 'config', ''), ('mode', 'mode', ''), ('pixel cost (model)', 'expected_pixel_cost', '.3f'),
        ('s/step ratio', 'sec_per_step_ratio', '.3f'), ('img/step (model)', 'expected_images_per_step', '.3f'),
        ('img/s ratio (model)', 'ideal_images_per_sec_ratio', '.3f'), ('img/s ratio', 'images_per_sec_ratio', '.3f'),
        ('Mpix/s ratio', 'mpix_per_sec_ratio', '.3f'), ('efficiency', 'efficiency', '.3f')]))
    print('ratios are to `full` in the same mode; model img/s ratio = img/step / pixel cost; '
          'efficiency = img/s ratio / model img/s ratio')
    if len({row['mode'] for row in rows}) > 1:
        print()
        print(common.format_table(rows, [
            ('config', 'config', ''), ('mode', 'mode', ''), ('s/step', 'sec_per_step_mean', '.4f'), ('kimg/s', 'kimg_per_sec', '.4f'),
            ('peak GiB', 'peak_memory_gb', '.3f'), ('speedup vs fp32', 'speedup_vs_fp32', '.2f'),
            ('kimg/s vs full fp32', 'kimg_ratio_vs_full_fp32', '.2f')]))
        print('speedup = fp32 s/step / s/step at the same config')


@click.command()
@click.option('--preset', help='Preset whose network, batch and options to use', metavar='NAME',
              type=click.Choice(list(common.PRESET_RESOLUTION)), default='demo', show_default=True)
@click.option('--device', help='Where to run', type=click.Choice(['auto', 'cpu', 'cuda']), default='auto', show_default=True)
@click.option('--batch-gpu', help="Per-process batch at full size  [default: the preset's --batch]", metavar='INT',
              type=click.IntRange(min=1))
@click.option('--warmup', help='Warm-up steps per config and patch size', metavar='INT', type=click.IntRange(min=0),
              default=2, show_default=True)
@click.option('--blocks', help='Measured blocks per config, alternating between configs', metavar='INT',
              type=click.IntRange(min=1), default=5, show_default=True)
@click.option('--steps-per-block', help='Optimizer steps per block', metavar='INT', type=click.IntRange(min=1),
              default=10, show_default=True)
@click.option('--configs', 'config_names', help='Comma-separated subset of: ' + ', '.join(CONFIGS), metavar='LIST',
              default=','.join(CONFIGS), show_default=True)
@click.option('--modes', 'mode_names', help='Comma-separated subset of: ' + ', '.join(MODES) + ' (every config runs in every mode)',
              metavar='LIST', default='fp32', show_default=True)
@click.option('--seed', help='Seed of the weights, the data and the patch schedules', metavar='INT', type=int,
              default=0, show_default=True)
@click.option('--json', 'json_path', help='Also write the results here', metavar='PATH')
@click.option('--cbase', help='Override the preset channel multiplier (small test runs)', type=click.IntRange(min=1), hidden=True)
def main(preset: str, device: str, batch_gpu: Optional[int], warmup: int, blocks: int, steps_per_block: int,
         config_names: str, mode_names: str, seed: int, json_path: Optional[str], cbase: Optional[int]) -> None:
    """Training sec/step, images/sec, megapixels/sec and memory of plain EDM and Patch Diffusion, side by side."""
    names = [name.strip() for name in config_names.split(',') if name.strip()]
    if not names or any(name not in CONFIGS for name in names):
        raise click.BadParameter(f'"{config_names}": choose from {", ".join(CONFIGS)}', param_hint='--configs')
    modes = [mode.strip() for mode in mode_names.split(',') if mode.strip()]
    if not modes or any(mode not in MODES for mode in modes):
        raise click.BadParameter(f'"{mode_names}": choose from {", ".join(MODES)}', param_hint='--modes')
    try:
        torch_device = choose_device(device)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint='--device')
    if torch_device.type != 'cuda' and 'fp16' in modes:
        raise click.BadParameter('fp16 (autocast with a GradScaler) needs CUDA', param_hint='--modes')
    opts = preset_options(preset)
    if torch_device.type == 'cuda':
        torch.backends.cudnn.benchmark = opts.bench
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = opts.tf32
    resolution = common.preset_resolution(preset)
    batch = batch_gpu or opts.batch
    try:
        trainers = [make_trainer(name, mode, preset, cbase, resolution, torch_device, seed) for mode in modes for name in names]
    except ValueError as err:
        raise click.ClickException(str(err))
    data = SyntheticData(batch, max(max(t.multiplier(s) for s in t.warmup_sizes()) for t in trainers), resolution,
                         common.label_dim(opts), torch_device, seed)
    memory = common.PeakMemory(torch_device)
    measure(trainers, data, warmup, blocks, steps_per_block, memory)

    rows = {f'{trainer.config} {trainer.mode}': summarize(trainer, batch) for trainer in trainers}
    add_ratios(rows)
    result = dict(benchmark='train_throughput', environment=common.environment(torch_device), preset=preset,
                  resolution=resolution, label_dim=common.label_dim(opts), batch_gpu=batch, warmup=warmup, blocks=blocks,
                  steps_per_block=steps_per_block, seed=seed, cbase=cbase, memory_kind=memory.kind, rows=rows)
    common.print_and_save(result, print_report, json_path)


if __name__ == '__main__':
    main()
