"""Writing and reading network snapshots (.pkl with source, weights-only .pt) and training state, atomically."""

import io
import os
import pickle
import re
import tempfile
import zipfile
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch

import dnnlib
from torch_utils import persistence
from torch_utils.safe_unpickle import NUMPY_GLOBALS, Persisted, UnsafePickleError, loads, named_tensors
from training import networks, networks_edm2


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
    name = type(ema).__name__  # its module may be one rebuilt from a pickle's source: named by where ours live
    weights = dict(class_name=OWN_NAMES.get(name, f'{type(ema).__module__}.{name}'), init_kwargs=ema.init_kwargs,
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
            cls = OWN_CLASSES.get(str(weights['class_name']))  # the file names the class: only ours are built
            if cls is None:
                raise SnapshotError(f'{path_or_url}: its class_name {weights["class_name"]!r} is not one of this project\'s networks')
            net = cls(**weights['init_kwargs'])
            net.load_state_dict(weights['state_dict'])
        except SnapshotError:
            raise
        except Exception as err:  # noqa: BLE001 - any failure here means the file is not one of our .pt snapshots
            raise SnapshotError(f'{path_or_url}: not a weights-only network snapshot ({type(err).__name__}: {err})') from None
    else:
        try:
            snapshot = loads(data)
        except UnsafePickleError as err:
            raise SnapshotError(f'{path_or_url}: not loaded: the pickle {err}') from None
        except Exception as err:  # noqa: BLE001 - truncated or foreign pickles raise many different types
            raise SnapshotError(f'{path_or_url}: not a network snapshot ({type(err).__name__}: {err})') from None
        ema = snapshot.get('ema') if isinstance(snapshot, dict) else None
        if not isinstance(ema, Persisted):
            raise SnapshotError(f'{path_or_url}: not a network snapshot (no persistent "ema" network)')
        net = network_from_persisted(ema, path_or_url, snapshot.get('encoder'))
    return net.eval().requires_grad_(False).to(device)


EDM_VERSION = 6  # the persistence format version of EDM's, EDM2's and the official Patch Diffusion code's pickles
PRECONDS = ('EDMPrecond', 'VPPrecond', 'VEPrecond', 'iDDPMPrecond')
OWN_CLASSES = {**{f'training.networks.{name}': getattr(networks, name) for name in PRECONDS},
               'training.networks_edm2.EDM2Precond': networks_edm2.EDM2Precond}  # by module and name, as .pt files give them
_OWN_BY_NAME = {cls.__name__: cls for cls in OWN_CLASSES.values()}
OWN_NAMES = {cls.__name__: full_name for full_name, cls in OWN_CLASSES.items()}


def network_from_persisted(record: Persisted, path: str, encoder: Any = None) -> torch.nn.Module:
    """This project's network for a pickled EDM, EDM2, Patch Diffusion or own preconditioner, with the pickled weights.

    EDM's and EDM2's classes take no coordinate channels (pos_channels=0); EDM2's float16 weights stay float16, and
    its snapshot's `encoder` gives the latent normalisation (edm2_latent). The official Patch_EDMPrecond counts the two
    coordinate channels in img_channels and names the image channels out_channels: here they are img_channels and
    pos_channels.
    """
    name, kwargs = record.class_name, record.init_kwargs
    if record.init_args:
        raise SnapshotError(f'{path}: {name} was built with positional arguments, which no known network uses')
    if record.version == persistence.VERSION and name in _OWN_BY_NAME:
        cls = _OWN_BY_NAME[name]
    elif record.version == EDM_VERSION and name in PRECONDS:
        cls = getattr(networks, name)
        kwargs['pos_channels'] = 0
    elif record.version == EDM_VERSION and name == 'Patch_EDMPrecond':
        cls = networks.EDMPrecond
        out_channels = kwargs.pop('out_channels', None) or kwargs['img_channels']
        kwargs.update(img_channels=out_channels, pos_channels=kwargs['img_channels'] - out_channels)
    elif record.version == EDM_VERSION and name == 'Precond':
        cls = networks_edm2.EDM2Precond
        kwargs.update(pos_channels=0, latent=edm2_latent(encoder, path))
    else:
        raise SnapshotError(f'{path}: its network is a {name} (persistence format version {record.version}); known are '
                            f'{", ".join(PRECONDS)}, Patch_EDMPrecond and EDM2\'s Precond of format {EDM_VERSION}, and ours of '
                            f'format {persistence.VERSION}')
    tensors = dict(named_tensors(record))
    try:
        net = cls(**kwargs)
        net.load_state_dict(tensors)
    except (TypeError, ValueError, RuntimeError, KeyError) as err:
        raise SnapshotError(f'{path}: its {name} does not fit this project\'s {cls.__name__} ({type(err).__name__}: {err})'.split('\n')[0]) from None
    stored = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if cls is networks_edm2.EDM2Precond and stored == {torch.float16}:
        net.half()  # EDM2 runs its float16 EMA as stored; a few scalars (gain / sqrt(fan_in)) then round in float16 too
    return net


def edm2_latent(encoder: Any, path: str) -> Optional[dict]:
    """The `latent` setting for an EDM2 snapshot's encoder: None for pixels (StandardRGBEncoder, or no encoder), for
    StabilityVAEEncoder its VAE and per-channel normalisation, final latents = raw latents * scale + bias, of pixels in
    [0, 1] (training.latents.UNIT, not imported here: training.latents imports this module through training.images)."""
    name = encoder.class_name if isinstance(encoder, Persisted) else None
    if encoder is None or name == 'StandardRGBEncoder':
        return None
    if name != 'StabilityVAEEncoder':
        raise SnapshotError(f'{path}: its encoder is a {name or type(encoder).__name__}; known are EDM2\'s StandardRGBEncoder '
                            'and StabilityVAEEncoder')
    state = encoder.state
    per_channel = lambda key: [float(v) for v in np.ravel(state[key])]  # noqa: E731
    return dict(vae=str(state['vae_name']), scale=per_channel('scale'), bias=per_channel('bias'), pixels='0..1')


# What a training state holds besides tensors and plain containers: numpy arrays and scalars of the RNG states.
_STATE_GLOBALS = [*NUMPY_GLOBALS,
                  *{type(np.dtype(t)) for t in (np.uint8, np.uint32, np.int32, np.int64, np.float32, np.float64, np.bool_)}]


def save_state(path: str, state: Dict[str, Any]) -> None:
    """Write a training-state file atomically."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_state(path: str) -> Dict[str, Any]:
    """Read a training-state file written by save_state()."""
    try:
        with torch.serialization.safe_globals(_STATE_GLOBALS):
            state = torch.load(path, map_location='cpu', weights_only=True)  # runs no code from the file
    except FileNotFoundError:
        raise SnapshotError(f'--resume: {path} does not exist') from None
    except pickle.UnpicklingError as err:
        found = re.search(r'GLOBAL (\S+)', str(err))
        raise SnapshotError(f'--resume: {path} names {found.group(1) if found else "a global"}, which no training state holds; '
                            'not loaded, nothing from the file was run') from None
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
