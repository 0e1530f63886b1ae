"""Run a function in a spawned group of gloo processes and collect each rank's return value."""

import os
import pickle
import socket
import tempfile
from typing import Any, Callable, List

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, result_dir: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    result = fn(*args)
    with open(os.path.join(result_dir, f'{rank}.pkl'), 'wb') as f:
        pickle.dump(result, f)


def run_ranks(fn: Callable, world_size: int = 2, *args) -> List[Any]:
    """Call fn(*args) in `world_size` spawned processes set up as torchrun would; returns results by rank."""
    with tempfile.TemporaryDirectory() as result_dir:
        mp.spawn(_entry, args=(fn, world_size, free_port(), result_dir, args), nprocs=world_size, join=True)
        results = []
        for rank in range(world_size):
            with open(os.path.join(result_dir, f'{rank}.pkl'), 'rb') as f:
                results.append(pickle.load(f))
    return results
