"""Pickles that carry their own source code, so that old snapshots keep loading after the code changes.

Decorate a class with `@persistent_class`. Pickling an instance stores the full source of the module that
defines the class, the class name and the instance state. Unpickling executes that stored source as a fresh
module (once per distinct source) and rebuilds the instance from it, so the current version of the module is
never consulted. The stored module may import other modules of this repository by absolute name
(`from torch_utils import persistence`), which must then be importable when loading.
"""

import copy
import hashlib
import inspect
import sys
import types
from typing import Any, Dict

VERSION = 1  # format version of this project's pickles (EDM's are 6)
_src_by_module_name: Dict[str, str] = {}    # source of modules that were created from stored source
_module_by_src_hash: Dict[str, types.ModuleType] = {}


def _module_source(module: types.ModuleType) -> str:
    if module.__name__ in _src_by_module_name:
        return _src_by_module_name[module.__name__]
    return inspect.getsource(module)


def _module_from_source(src: str) -> types.ModuleType:
    digest = hashlib.sha256(src.encode('utf-8')).hexdigest()
    module = _module_by_src_hash.get(digest)
    if module is None:
        name = f'_persisted_module_{digest[:16]}'
        module = types.ModuleType(name)
        sys.modules[name] = module  # so that classes defined in it can be found by pickle and inspect
        _src_by_module_name[name] = src
        _module_by_src_hash[digest] = module
        exec(compile(src, f'<persisted {name}>', 'exec'), module.__dict__)  # noqa: S102
    return module


def _reconstruct_persistent_obj(meta: Dict[str, Any]) -> Any:
    if meta.get('version') != VERSION:
        raise ValueError(f'persisted object has format version {meta.get("version")}, expected {VERSION}')
    module = _module_from_source(meta['module_src'])
    cls = getattr(module, meta['class_name'])
    obj = cls.__new__(cls)
    state = meta['state']
    if hasattr(obj, '__setstate__'):
        obj.__setstate__(state)
    else:
        obj.__dict__.update(state)
    return obj


def persistent_class(orig_class: type) -> type:
    """Class decorator: instances pickle together with the source of the class's module."""
    module = sys.modules[orig_class.__module__]
    module_src = _module_source(module)

    class Persistent(orig_class):
        _orig_module_src = module_src
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)

        @property
        def init_args(self) -> tuple:
            """Positional arguments the instance was constructed with."""
            return copy.deepcopy(self._init_args)

        @property
        def init_kwargs(self) -> dict:
            """Keyword arguments the instance was constructed with."""
            return copy.deepcopy(self._init_kwargs)

        def __reduce__(self):
            # Attributes are looked up on the most derived class, so subclasses of persistent classes work too.
            meta = dict(version=VERSION, module_src=self._orig_module_src, class_name=self._orig_class_name,
                        state=self.__getstate__())
            return _reconstruct_persistent_obj, (meta,)

    Persistent.__name__ = orig_class.__name__
    Persistent.__qualname__ = orig_class.__qualname__
    Persistent.__module__ = orig_class.__module__
    Persistent.__doc__ = orig_class.__doc__
    return Persistent


def is_persistent(obj: Any) -> bool:
    """True for instances and classes made by @persistent_class."""
    cls = obj if isinstance(obj, type) else type(obj)
    return hasattr(cls, '_orig_module_src')
