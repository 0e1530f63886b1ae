"""Process-group setup that works under torchrun (NCCL or gloo) and as a plain single process."""

import contextlib
import os
import signal
import threading
from typing import Iterator, Optional

import torch
import torch.distributed as dist

_stop_requested = threading.Event()  # set by SIGINT/SIGTERM inside stop_on_signals()


def choose_device(device: str = 'auto') -> torch.device:
    """Resolve 'auto' | 'cpu' | 'cuda' | 'cuda:N' to a device, preferring CUDA when it is present."""
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    resolved = torch.device(device)
    if resolved.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'--device={device}: CUDA is not available on this machine; use --device=cpu or auto')
    if resolved.type == 'cuda' and resolved.index is None:
        resolved = torch.device('cuda', get_local_rank())  # the node's GPU k for its k-th process, on every node
    return resolved


def init(device: str = 'auto', backend: Optional[str] = None) -> torch.device:
    """Join the torchrun process group if there is one (NCCL on CUDA, gloo on CPU) and return this rank's device."""
    resolved = choose_device(device)
    if resolved.type == 'cuda':
        torch.cuda.set_device(resolved)
    if 'WORLD_SIZE' in os.environ and not dist.is_initialized():
        backend = backend or ('nccl' if resolved.type == 'cuda' else 'gloo')
        dist.init_process_group(backend=backend, device_id=resolved if backend == 'nccl' else None)
    return resolved


def get_rank() -> int:
    """This process's rank, 0 without a process group."""
    return dist.get_rank() if dist.is_initialized() else 0


def get_local_rank() -> int:
    """This process's index on its own node (torchrun's LOCAL_RANK), 0 without torchrun.

    Only for what belongs to one machine: its GPU and node-local files. What means the whole job (one run
    directory, one writer of snapshots and logs, the data shard) goes by get_rank(), the global rank.
    """
    return int(os.environ.get('LOCAL_RANK', '0'))


def get_world_size() -> int:
    """Number of processes, 1 without a process group."""
    return dist.get_world_size() if dist.is_initialized() else 1


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only."""
    if get_rank() == 0:
        print(*args, **kwargs)


def collective_device() -> torch.device:
    """The device that collectives must use: the current CUDA device under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Inside the block, SIGINT and SIGTERM request a stop that should_stop() reports; the old handlers return after."""
    _stop_requested.clear()
    request_stop = lambda signum, frame: _stop_requested.set()
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def should_stop() -> bool:
    """True once any rank received SIGINT/SIGTERM; a collective call, so every rank must call it at the same point."""
    flag = torch.tensor([float(_stop_requested.is_set())], device=collective_device())
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def update_progress(cur: int, total: int) -> None:
    """Hook for cluster job monitors: rank 0 writes 'cur total' to $PATCHDIFF_PROGRESS_FILE when it is set."""
    path = os.environ.get('PATCHDIFF_PROGRESS_FILE')
    if path and get_rank() == 0:
        tmp = f'{path}.tmp'
        with open(tmp, 'w') as f:
            f.write(f'{cur} {total}\n')
        os.replace(tmp, path)
