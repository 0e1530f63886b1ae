"""Reading EDM-style pickles without running code from them.

A `.pkl` snapshot of EDM, of the official Patch Diffusion code or of this project holds each network as a
"persistent object": the source of its module, its class name and its state (`_init_kwargs`, `_parameters`,
`_buffers`, `_modules`). `pickle.load` would execute that source. `loads()` here unpickles with a restricted
unpickler instead: it resolves only the globals in ALLOWED (tensor and numpy rebuilding, OrderedDict, EasyDict,
torch's plain containers) and turns every persistent object into a `Persisted` record of class name, format
version and state, so nothing from the file runs. The caller builds its own network from such a record.
"""

import collections
import io
import pickle
from typing import Any, Dict, Iterator, Tuple

import numpy as np
import torch

import dnnlib


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that names a global outside ALLOWED; the message names it."""


class Persisted:
    """A persistent object of an EDM-style pickle: its class name, format version and state, its code not run."""

    def __init__(self, meta: Dict[str, Any]):
        if not isinstance(meta, dict) or not {'class_name', 'state'} <= meta.keys():
            raise UnsafePickleError('a persistent object without "class_name" and "state"')
        self.class_name: str = meta['class_name']
        self.version = meta.get('version')
        self.state: Dict[str, Any] = dict(meta['state'] or {})

    @property
    def init_kwargs(self) -> Dict[str, Any]:
        """The keyword arguments the object was constructed with."""
        return dict(self.state.get('_init_kwargs') or {})

    @property
    def init_args(self) -> tuple:
        """The positional arguments the object was constructed with."""
        return tuple(self.state.get('_init_args') or ())

    def __repr__(self) -> str:
        return f'Persisted({self.class_name}, version {self.version})'


class Container:
    """A plain torch container module (ModuleDict, ModuleList, ...) of a pickle: its class name and state."""

    def __init__(self, class_name: str):
        self.class_name = class_name
        self.state: Dict[str, Any] = {}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.state = dict(state)


def _container(name: str) -> type:
    """A stand-in class for a torch container: unpickling creates it with NEWOBJ, then sets its state."""
    return type(name, (Container,), dict(__new__=lambda cls, *args: Container.__new__(cls),
                                         __init__=lambda self, *args: Container.__init__(self, name)))


def _load_storage(data: bytes) -> Any:
    """A tensor storage pickled by torch (torch.save bytes), read with weights_only=True."""
    return torch.load(io.BytesIO(data), weights_only=True)


_CONTAINERS = {'torch.nn.modules.container': ('ModuleDict', 'ModuleList', 'Sequential', 'ParameterDict', 'ParameterList'),
               'torch.nn.modules.linear': ('Identity',), 'torch.nn.modules.activation': ('SiLU',),
               'torch.nn.modules.dropout': ('Dropout',)}
_MULTIARRAY = np._core.multiarray if hasattr(np, '_core') else np.core.multiarray  # numpy 2 renamed numpy.core
NUMPY_GLOBALS = [_MULTIARRAY._reconstruct, _MULTIARRAY.scalar, np.ndarray, np.dtype]  # numpy arrays and scalars
ALLOWED: Dict[Tuple[str, str], Any] = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): Persisted,
    ('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): torch._utils._rebuild_parameter,
    ('torch.storage', '_load_from_bytes'): _load_storage,
    ('torch', 'Size'): torch.Size,
    ('torch', 'device'): torch.device,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('dnnlib.util', 'EasyDict'): dnnlib.EasyDict,
    ('dnnlib', 'EasyDict'): dnnlib.EasyDict,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('builtins', 'slice'): slice,
    ('numpy', 'dtype'): np.dtype,
    ('numpy', 'ndarray'): np.ndarray,
    **{(module, name): getattr(_MULTIARRAY, name)
       for module in ('numpy.core.multiarray', 'numpy._core.multiarray') for name in ('scalar', '_reconstruct')},
    **{(module, name): _container(name) for module, names in _CONTAINERS.items() for name in names},
}
_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves the globals in ALLOWED and torch's dtypes, and refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return ALLOWED[module, name]
        if module == 'torch' and name in _DTYPES:
            return getattr(torch, name)
        raise UnsafePickleError(f'names the global {module}.{name}, which no network snapshot needs; nothing from the file '
                                'was run')

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f'holds a persistent id ({pid!r}), which no network snapshot has; nothing from the file was run')


def loads(data: bytes) -> Any:
    """The object in an EDM-style pickle, with persistent objects as `Persisted` records; no code from `data` runs."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


def named_tensors(obj: Any, prefix: str = '') -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter and persistent buffer of a `Persisted`/`Container` module tree, as in state_dict()."""
    state = obj.state
    non_persistent = state.get('_non_persistent_buffers_set') or set()
    for group in ('_parameters', '_buffers'):
        for name, tensor in (state.get(group) or {}).items():
            if tensor is not None and not (group == '_buffers' and name in non_persistent):
                yield prefix + name, tensor.detach() if isinstance(tensor, torch.Tensor) else tensor
    for name, child in (state.get('_modules') or {}).items():
        if child is not None:
            yield from named_tensors(child, f'{prefix}{name}.')
