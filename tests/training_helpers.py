"""Helpers for tests/test_training.py: running train.py, a data set and a loss that record what they see,
and the function that the 2-process DDP test runs on every rank.

This module is imported as `training_helpers` (tests/ is on sys.path under pytest and, through the spawn
start method, in the processes that tests/multiproc.py starts), so its classes can be named in
dataset_kwargs / loss_kwargs.
"""

import os
import subprocess
import sys
import time
import zipfile
from typing import Any, Dict, List, Optional

import torch

from training.dataset import ImageFolderDataset
from training.loss import PatchEDMLoss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable

# Options that keep a CPU run at 16x16 to a fraction of a second per step.
TINY = ['--cbase=8', '--cres=1,2', '--blocks=1', '--attn=8', '--batch=8', '--device=cpu', '--workers=0',
        '--lr-rampup=0', '--ema=0.0005']


def subprocess_env() -> Dict[str, str]:
    """Environment for child Pythons: repo importable, no torchrun variables, one thread (2 cores are shared)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')}
    env['PYTHONPATH'] = REPO + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
    env.setdefault('OMP_NUM_THREADS', '1')
    return env


def train_cmd(*args: str) -> List[str]:
    """Command line for train.py with the given options."""
    return [PYTHON, os.path.join(REPO, 'train.py'), *args]


def run_train(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run train.py to completion; stdout and stderr are captured as text."""
    return subprocess.run(train_cmd(*args), cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)


def run_parallel(*commands: List[str], timeout: float = 240) -> List[subprocess.CompletedProcess]:
    """Run several commands at the same time (each child uses one thread) and wait for all; output captured as text."""
    import tempfile
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, command in enumerate(commands):
            out, err = open(os.path.join(tmp, f'{i}.out'), 'w+'), open(os.path.join(tmp, f'{i}.err'), 'w+')
            procs.append((subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=out, stderr=err), out, err))
        deadline = time.time() + timeout
        results = []
        for proc, out, err in procs:
            try:
                proc.wait(timeout=max(deadline - time.time(), 1))
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            out.seek(0)
            err.seek(0)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read()))
            out.close()
            err.close()
    return results


def run_train_parallel(*arg_lists: List[str], timeout: float = 240) -> List[subprocess.CompletedProcess]:
    """Run several train.py commands at the same time (each child uses one thread) and wait for all."""
    return run_parallel(*(train_cmd(*args) for args in arg_lists), timeout=timeout)


class RecordingLoss:
    """PatchEDMLoss that keeps the mean loss of every call."""

    def __init__(self):
        self.losses: List[float] = []
        self._loss = PatchEDMLoss()

    def __call__(self, net: Any, images: torch.Tensor, patch_size: int, **kwargs: Any) -> torch.Tensor:
        loss = self._loss(net, images, patch_size, **kwargs)
        self.losses.append(float(loss.detach().double().mean()))
        return loss


def make_dataset(dest: str, resolution: int = 16, num: int = 64) -> str:
    """A demo:shapes zip made by dataset_tool.py."""
    if not os.path.isfile(dest):
        proc = subprocess.run([PYTHON, os.path.join(REPO, 'dataset_tool.py'), '--source=demo:shapes', f'--dest={dest}',
                               f'--resolution={resolution}x{resolution}', f'--max-images={num}'],
                              cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        with zipfile.ZipFile(dest) as z:
            assert sum(n.endswith('.png') for n in z.namelist()) == num
    return dest


def only_run_dir(outdir: str) -> str:
    """The single run directory train.py made under outdir."""
    names = [n for n in os.listdir(outdir) if os.path.isdir(os.path.join(outdir, n))]
    assert len(names) == 1, names
    return os.path.join(outdir, names[0])


def flatten_state(obj: Any, prefix: str = '') -> Dict[str, Any]:
    """Nested dicts/lists/tuples of a state file as {'a.b.0': leaf}."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(flatten_state(v, f'{prefix}{k}.'))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(flatten_state(v, f'{prefix}{i}.'))
        return out
    return {prefix.rstrip('.'): obj}


def assert_states_equal(a: Dict[str, Any], b: Dict[str, Any], keys: List[str]) -> int:
    """Every tensor / number / array under `keys` is bit-identical in a and b; returns how many leaves were compared."""
    import numpy as np
    count = 0
    for key in keys:
        fa, fb = flatten_state(a[key]), flatten_state(b[key])
        assert fa.keys() == fb.keys(), f'{key}: entries differ: {sorted(set(fa) ^ set(fb))[:5]}'
        for name in fa:
            va, vb = fa[name], fb[name]
            if isinstance(va, torch.Tensor):
                assert isinstance(vb, torch.Tensor) and va.dtype == vb.dtype and torch.equal(va, vb), f'{key}.{name} differs'
            elif isinstance(va, np.ndarray):
                assert np.array_equal(va, vb), f'{key}.{name} differs'
            else:
                assert va == vb, f'{key}.{name}: {va!r} != {vb!r}'
            count += 1
    return count

#----------------------------------------------------------------------------
# Recording data set and loss for the DDP test (module-level records, one process = one rank).

SERVED: List[int] = []           # dataset indices this process's loader asked for, in order
LOSS_CALLS: List[Dict[str, Any]] = []  # per loss call: patch size, float64 sum and number of loss elements
LAST_NET: List[torch.nn.Module] = []   # the (DDP-wrapped) network of the last loss call


class RecordingDataset(ImageFolderDataset):
    """ImageFolderDataset that appends every index it serves to SERVED."""

    def __getitem__(self, idx):
        SERVED.append(int(idx))
        return super().__getitem__(idx)


class RecordingPatchEDMLoss(PatchEDMLoss):
    """PatchEDMLoss that records the patch size and the loss of every call in LOSS_CALLS (pickles as PatchEDMLoss)."""

    def __call__(self, net, images, patch_size=None, **kwargs):
        loss = super().__call__(net, images, patch_size, **kwargs)
        LOSS_CALLS.append(dict(size=patch_size, sum=float(loss.detach().double().sum()), count=loss.numel(),
                               images=images.shape[0]))
        LAST_NET[:] = [net]
        return loss


def tiny_songunet_kwargs(pos_channels: int = 2) -> Dict[str, Any]:
    """network_kwargs of train.py's ddpmpp with --cbase=8 --cres=1,2 --blocks=1 --attn=8 --dropout=0."""
    return dict(class_name='training.networks.EDMPrecond', pos_channels=pos_channels, model_type='SongUNet',
                embedding_type='positional', encoder_type='standard', decoder_type='standard', channel_mult_noise=1,
                resample_filter=[1, 1], model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
                dropout=0.0, use_fp16=False, use_bf16=False)


def ddp_train(run_dir: str, data: str, seed: int, total_kimg: float, kimg_per_tick: float,
              ema_rampup_ratio: Optional[float], batch_gpu: Optional[int] = None) -> Dict[str, Any]:
    """Runs on every rank (under tests/multiproc.run_ranks): train with gloo on the CPU and report what this rank saw."""
    torch.set_num_threads(1)
    from torch_utils import distributed
    from training.training_loop import training_loop
    import torch.distributed as dist

    device = distributed.init('cpu')
    rank = distributed.get_rank()
    training_loop(
        run_dir=run_dir,
        dataset_kwargs=dict(class_name='training_helpers.RecordingDataset', path=data),
        data_loader_kwargs=dict(num_workers=0),
        network_kwargs=tiny_songunet_kwargs(),
        loss_kwargs=dict(class_name='training_helpers.RecordingPatchEDMLoss'),
        optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=2e-3, betas=[0.9, 0.999], eps=1e-8),
        patch_kwargs=dict(real_p=0.5),
        seed=seed, batch_size=8, batch_gpu=batch_gpu, total_kimg=total_kimg, ema_halflife_kimg=0.5, ema_rampup_ratio=ema_rampup_ratio,
        lr_rampup_kimg=0, kimg_per_tick=kimg_per_tick, snapshot_ticks=1000, state_dump_ticks=1000, device=device)
    net = LAST_NET[0]
    net = net.module if isinstance(net, torch.nn.parallel.DistributedDataParallel) else net
    params = {k: v.detach().clone() for k, v in net.state_dict().items()}
    dist.destroy_process_group()
    return dict(rank=rank, params=params, served=list(SERVED), calls=list(LOSS_CALLS))
