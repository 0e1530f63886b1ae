"""Run functions in spawned processes with a deadline, alone or as a group of gloo ranks, and collect their results."""

import multiprocessing
import os
import pickle
import socket
import tempfile
import time
from typing import Any, Callable, Dict, List, Sequence

TIMEOUT = 300  # seconds for a whole group; a hung child fails its test instead of stalling the suite


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _entry(fn: Callable, args: tuple, env: Dict[str, str], result_path: str) -> None:
    os.environ.update(env)
    result = fn(*args)
    with open(result_path, 'wb') as f:
        pickle.dump(result, f)


def run_in_children(fn: Callable, arg_tuples: Sequence[tuple], envs: Sequence[Dict[str, str]] = (),
                    timeout: float = TIMEOUT) -> List[Any]:
    """fn(*args) for each args at the same time, each in a fresh spawned process; returns the results in order.

    Fails if any child fails or the group outlives `timeout`; every child is killed before returning either way.
    """
    context = multiprocessing.get_context('spawn')
    with tempfile.TemporaryDirectory() as result_dir:
        paths = [os.path.join(result_dir, f'{i}.pkl') for i in range(len(arg_tuples))]
        children = [context.Process(target=_entry, args=(fn, args, dict(envs[i]) if envs else {}, paths[i]))
                    for i, args in enumerate(arg_tuples)]
        for child in children:
            child.start()
        deadline = time.monotonic() + timeout
        try:
            for child in children:
                child.join(max(deadline - time.monotonic(), 0))
        finally:
            hung = [child.pid for child in children if child.is_alive()]
            for child in children:
                if child.is_alive():
                    child.kill()
                child.join()
        assert not hung, f'children {hung} still ran after {timeout} s and were killed'
        codes = [child.exitcode for child in children]
        assert codes == [0] * len(children), f'children exited with {codes}'
        results = []
        for path in paths:
            with open(path, 'rb') as f:
                results.append(pickle.load(f))
    return results


def run_ranks(fn: Callable, world_size: int = 2, *args) -> List[Any]:
    """Call fn(*args) in `world_size` spawned processes set up as torchrun would; returns results by rank."""
    port = free_port()
    envs = [dict(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                 WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size)) for rank in range(world_size)]
    return run_in_children(fn, [args] * world_size, envs)
