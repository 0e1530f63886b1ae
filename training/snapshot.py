"""Writing and reading network snapshots (.pkl with source, weights-only .pt) and training state, atomically."""

import io
import os
import pickle
import re
import tempfile
import zipfile
from typing import Any, Callable, Dict, Optional

import torch

import dnnlib


class SnapshotError(ValueError):
    """A snapshot or state file that cannot be used; the message names the file."""


def atomic_write(path: str, write: Callable[[io.BufferedWriter], None]) -> None:
    """Call write(file) on a temporary file next to `path`, then rename it over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path), suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_network_snapshot(path_stem: str, data: Dict[str, Any]) -> None:
    """Write `<stem>.pkl` (EDM layout, classes with their source) and `<stem>.pt` (weights-only) for `data['ema']`."""
    atomic_write(path_stem + '.pkl', lambda f: pickle.dump(data, f))
    ema = data['ema']
    weights = dict(class_name=f'training.networks.{type(ema).__name__}', init_kwargs=ema.init_kwargs,
                   state_dict={k: v.detach().cpu() for k, v in ema.state_dict().items()})
    atomic_write(path_stem + '.pt', lambda f: torch.save(weights, f))


def load_network(path_or_url: str, device: torch.device = torch.device('cpu')) -> torch.nn.Module:
    """The EMA network of a .pkl snapshot (ours, EDM's or Patch Diffusion's), a weights-only .pt file, or the newest .pkl in a run directory."""
    if os.path.isdir(path_or_url):
        newest = newest_file(path_or_url, 'network-snapshot', '.pkl')
        if newest is None:
            raise SnapshotError(f'{path_or_url}: directory holds no network-snapshot-*.pkl')
        path_or_url = newest
    try:
        with dnnlib.open_url(path_or_url) as f:
            data = f.read()
    except IOError as err:
        raise SnapshotError(f'--network: {err}') from None
    if zipfile.is_zipfile(io.BytesIO(data)):
        try:
            weights = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
            net = dnnlib.construct_class_by_name(class_name=weights['class_name'], **weights['init_kwargs'])
            net.load_state_dict(weights['state_dict'])
        except Exception as err:  # noqa: BLE001 - any failure here means the file is not one of our .pt snapshots
            raise SnapshotError(f'{path_or_url}: not a weights-only network snapshot ({type(err).__name__}: {err})') from None
    else:
        try:
            snapshot = pickle.loads(data)
            net = snapshot['ema']
        except Exception as err:  # noqa: BLE001 - truncated or foreign pickles raise many different types
            raise SnapshotError(f'{path_or_url}: not a network snapshot ({type(err).__name__}: {err})') from None
        if not isinstance(net, torch.nn.Module):
            raise SnapshotError(f'{path_or_url}: its "ema" entry is a {type(net).__name__}, not a network')
    return net.eval().requires_grad_(False).to(device)


def save_state(path: str, state: Dict[str, Any]) -> None:
    """Write a training-state file atomically."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_state(path: str) -> Dict[str, Any]:
    """Read a training-state file written by save_state()."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=False)
    except FileNotFoundError:
        raise SnapshotError(f'--resume: {path} does not exist') from None
    except Exception as err:  # noqa: BLE001 - truncation shows up as several different error types
        raise SnapshotError(f'--resume: {path} is corrupt or truncated ({type(err).__name__}: {err})') from None
    required = ('net', 'ema', 'optimizer', 'cur_nimg', 'cur_tick', 'consumed', 'rng', 'seed', 'schedule')
    missing = [key for key in required if key not in state] if isinstance(state, dict) else list(required)
    if missing:
        raise SnapshotError(f'--resume: {path} is not a training-state file (no "{missing[0]}" entry)')
    return state


def newest_file(run_dir: str, prefix: str, suffix: str) -> Optional[str]:
    """Path of `<prefix>-<kimg><suffix>` with the highest kimg in `run_dir`, or None."""
    if not os.path.isdir(run_dir):
        return None
    pattern = re.escape(prefix) + r'-(\d+)' + re.escape(suffix)
    found = [(int(m.group(1)), name) for name in os.listdir(run_dir) if (m := re.fullmatch(pattern, name))]
    return os.path.join(run_dir, max(found)[1]) if found else None


def newest_state(run_dir: str) -> Optional[str]:
    """Path of the training-state file with the highest kimg in `run_dir`, or None."""
    return newest_file(run_dir, 'training-state', '.pt')
