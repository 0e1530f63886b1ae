"""Training helpers: a rank-sharded infinite sampler, parameter copying, DDP sync control and checks, module summary."""

import contextlib
import re
from typing import Iterator, Optional, Sequence, Sized

import numpy as np
import torch
import torch.distributed as dist

from . import distributed


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless stream of dataset indices for one rank, from a fixed shard of the data set.

    The data set is split once into `num_replicas` shards: rank r owns source images r, r + num_replicas, ... in
    index order, so that a rank visits, and caches, only its own shard. Items that share a source image (a data set
    with a `raw_indices` array, such as ImageFolderDataset: an image and its x-flipped copy) go to the same rank;
    other data sets have one item per source. Every epoch is a fresh permutation of the rank's shard, seeded by
    `seed`, the epoch number and, with more than one rank, the rank; so within an epoch no index goes to two ranks
    and the ranks together visit every item once. With one rank the order is a permutation of the whole data set,
    as before shards existed. `start` skips that many indices of this rank's stream, which lets a resumed run
    continue exactly where it stopped.
    """

    def __init__(self, dataset: Sized, rank: int = 0, num_replicas: int = 1, shuffle: bool = True,
                 seed: int = 0, start: int = 0):
        dataset_len = len(dataset)
        if dataset_len <= 0:
            raise ValueError('InfiniteSampler needs a non-empty data set')
        if not 0 <= rank < num_replicas:
            raise ValueError(f'rank {rank} is outside [0, {num_replicas})')
        raw = getattr(dataset, 'raw_indices', None)
        sources = np.arange(dataset_len) if raw is None else np.asarray(raw)
        if len(sources) != dataset_len:
            raise ValueError(f'raw_indices has {len(sources)} entries for {dataset_len} items')
        unique = np.unique(sources)
        if len(unique) < num_replicas:
            raise ValueError(f'data set of {len(unique)} items cannot be shared by {num_replicas} ranks')
        self.dataset_len = dataset_len
        self.rank = rank
        self.num_replicas = num_replicas
        self.shuffle = shuffle
        self.seed = seed
        self.start = start
        self.items = np.flatnonzero(np.isin(sources, unique[rank::num_replicas]))  # this rank's shard, sorted

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The indices this rank visits in `epoch`, in order."""
        if not self.shuffle:
            return self.items.copy()
        key = [self.seed, epoch] if self.num_replicas == 1 else [self.seed, epoch, self.rank]
        return self.items[np.random.default_rng(key).permutation(len(self.items))]

    def __iter__(self) -> Iterator[int]:
        epoch, pos = divmod(self.start, len(self.items))
        while True:
            order = self.epoch_order(epoch)
            for idx in order[pos:]:
                yield int(idx)
            epoch, pos = epoch + 1, 0


@torch.no_grad()
def copy_params_and_buffers(src_module: torch.nn.Module, dst_module: torch.nn.Module, require_all: bool = False,
                            extra_inputs: int = 0) -> None:
    """Copy every parameter and buffer of `src_module` into the same-named tensor of `dst_module`.

    With `extra_inputs` > 0 (a network without coordinate channels into one with them), a 4-D weight that has that
    many more input channels in the destination gets zeros for the coordinate channels and the source's weight for
    the others, so that the coordinates do not change the output. The coordinates are the last inputs unless the
    destination appends `inputs_after_coordinates` channels of its own after them (EDM2's constant channel).
    EDM's layers then compute exactly what the source did; EDM2's normalise each output channel's weights, see
    docs/compatibility.md for the difference the wider fan-in makes there.
    """
    after = getattr(dst_module, 'inputs_after_coordinates', 0)
    src = dict(src_module.named_parameters()) | dict(src_module.named_buffers())
    for name, tensor in list(dst_module.named_parameters()) + list(dst_module.named_buffers()):
        if name not in src:
            if require_all:
                raise ValueError(f'{name} is missing from the source module')
            continue
        source = src[name]
        widened = extra_inputs > 0 and source.ndim == 4 and tensor.shape[1] == source.shape[1] + extra_inputs \
            and tensor.shape[0] == source.shape[0] and tensor.shape[2:] == source.shape[2:]
        if widened:
            split = source.shape[1] - after
            tensor.zero_()[:, :split].copy_(source[:, :split])
            tensor[:, split + extra_inputs:].copy_(source[:, split:])
        elif source.shape != tensor.shape:
            raise ValueError(f'{name}: shape {tuple(source.shape)} does not match {tuple(tensor.shape)}')
        else:
            tensor.copy_(source)


def check_same_on_all_ranks(values: Sequence[int], what: str) -> None:
    """Raise on every rank, at once, if `values` differ between ranks (a no-op in a single process)."""
    if not dist.is_initialized():
        return
    device = distributed.collective_device()
    low = torch.tensor(list(values), dtype=torch.int64, device=device)
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(f'{what} differ between ranks (rank {distributed.get_rank()} starts {list(values)[:8]}); every rank must '
                           'draw the same, from the same seed')


def ddp_sync(module: torch.nn.Module, sync: bool):
    """Context for one gradient-accumulation round: skips DDP's all-reduce unless `sync` is True."""
    if isinstance(module, torch.nn.parallel.DistributedDataParallel) and not sync:
        return module.no_sync()
    return contextlib.nullcontext()


@torch.no_grad()
def check_ddp_consistency(module: torch.nn.Module, ignore_regex: Optional[str] = None) -> None:
    """Raise if any parameter or buffer differs between this rank and rank 0."""
    if not dist.is_initialized():
        return
    device = distributed.collective_device()
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if ignore_regex is not None and re.fullmatch(ignore_regex, name):
            continue
        mine = tensor.detach().to(device)
        if mine.is_floating_point():
            mine = torch.nan_to_num(mine)
        other = mine.clone()
        dist.broadcast(other, src=0)
        if not torch.equal(mine, other):
            raise RuntimeError(f'{name} differs between rank {distributed.get_rank()} and rank 0')


def print_module_summary(module: torch.nn.Module, inputs: Sequence, max_nesting: int = 3,
                         skip_redundant: bool = True) -> object:
    """Run `module(*inputs)` once and print a table of its submodules: parameters, buffers and output shapes."""
    entries = []

    def hook(mod, _inputs, outputs):
        outs = outputs if isinstance(outputs, (tuple, list)) else [outputs]
        entries.append((mod, [t for t in outs if isinstance(t, torch.Tensor)]))

    names = {mod: name for name, mod in module.named_modules()}
    handles = [mod.register_forward_hook(hook) for name, mod in module.named_modules()
               if name.count('.') < max_nesting]
    try:
        with torch.no_grad():
            outputs = module(*inputs)
    finally:
        for handle in handles:
            handle.remove()

    seen_tensors = set()
    rows = [['Layer', 'Parameters', 'Buffers', 'Output shape', 'Datatype'], ['---'] * 5]
    total_params = total_buffers = 0
    for mod, outs in entries:
        params = [t for t in mod.parameters() if id(t) not in seen_tensors]
        buffers = [t for t in mod.buffers() if id(t) not in seen_tensors]
        seen_tensors.update(id(t) for t in params + buffers)
        if skip_redundant and mod is not module and not params and not buffers and len(mod._modules) > 0:
            continue
        n_params = sum(t.numel() for t in params)
        n_buffers = sum(t.numel() for t in buffers)
        total_params += n_params
        total_buffers += n_buffers
        shapes = [str(list(t.shape)) for t in outs] or ['-']
        dtypes = [str(t.dtype).split('.')[-1] for t in outs] or ['-']
        name = '<top-level>' if mod is module else names[mod]
        rows.append([name, str(n_params) if n_params else '-', str(n_buffers) if n_buffers else '-', shapes[0], dtypes[0]])
        rows.extend(['', '', '', shape, dtype] for shape, dtype in zip(shapes[1:], dtypes[1:]))
    rows += [['---'] * 5, ['Total', str(total_params), str(total_buffers), '', '']]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    print()
    for row in rows:
        print('  '.join(cell + ' ' * (width - len(cell)) for cell, width in zip(row, widths)).rstrip())
    print()
    return outputs
