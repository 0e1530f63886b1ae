"""EasyDict, construction of classes by dotted name, and opening of local files or URLs with a cache."""

import hashlib
import importlib
import io
import os
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, BinaryIO, Optional


class EasyDict(dict):
    """A dict whose items can also be read and written as attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]


def get_obj_by_name(name: str) -> Any:
    """Return the object a dotted name such as 'training.networks.EDMPrecond' refers to."""
    module_name, _, attr = name.rpartition('.')
    if not module_name:
        raise ValueError(f'"{name}" is not a dotted name of the form module.attribute')
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f'cannot import module "{module_name}" for "{name}": {err}') from None
    obj = module
    for part in attr.split('.'):
        if not hasattr(obj, part):
            raise ValueError(f'module "{module_name}" has no attribute "{attr}"')
        obj = getattr(obj, part)
    return obj


def construct_class_by_name(*args, class_name: str, **kwargs) -> Any:
    """Construct an instance of the class named by `class_name`, passing the other arguments on."""
    cls = get_obj_by_name(class_name)
    if not callable(cls):
        raise ValueError(f'"{class_name}" is not callable')
    return cls(*args, **kwargs)


def is_url(path: str) -> bool:
    """True for http://, https:// and file:// addresses."""
    return urllib.parse.urlparse(path).scheme in ('http', 'https', 'file')


def default_cache_dir() -> str:
    """Download cache: $DNNLIB_CACHE_DIR if set, else ~/.cache/dnnlib."""
    if 'DNNLIB_CACHE_DIR' in os.environ:
        return os.environ['DNNLIB_CACHE_DIR']
    return os.path.join(os.path.expanduser('~'), '.cache', 'dnnlib')


def _url_to_local_path(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    path = urllib.request.url2pathname(parsed.path)
    if parsed.netloc not in ('', 'localhost'):
        path = '//' + parsed.netloc + path  # UNC-style file://host/share
    return path


def cache_path(url: str, cache_dir: str) -> str:
    """Where open_url() keeps its downloaded copy of `url`."""
    name = os.path.basename(urllib.parse.urlparse(url).path) or 'download'
    digest = hashlib.md5(url.encode('utf-8')).hexdigest()
    return os.path.join(cache_dir, 'downloads', f'{digest}_{name}')


def _fetch(url: str, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, 'reason', err)
        raise IOError(f'cannot download {url} ({reason}); download it elsewhere and pass a local path instead') from None


def open_url(path_or_url: str, cache_dir: Optional[str] = None, cache: bool = True, timeout: float = 30) -> BinaryIO:
    """Open a local path, file:// URL or http(s):// URL for binary reading; downloads are cached on disk."""
    if not is_url(path_or_url) or path_or_url.startswith('file://'):
        local = _url_to_local_path(path_or_url) if is_url(path_or_url) else path_or_url
        if not os.path.isfile(local):
            raise IOError(f'file not found: {path_or_url}')
        return open(local, 'rb')
    if not cache:
        return io.BytesIO(_fetch(path_or_url, timeout))
    dest = cache_path(path_or_url, cache_dir or default_cache_dir())
    if not os.path.isfile(dest):
        data = _fetch(path_or_url, timeout)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), suffix='.tmp')
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
        os.replace(tmp, dest)
    return open(dest, 'rb')


class Logger:
    """Copies everything written to stdout and stderr into a log file as well (opened for appending)."""

    def __init__(self, file_name: str):
        self.file = open(file_name, 'a')
        self.stdout, self.stderr = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(self.stdout, self.file), _Tee(self.stderr, self.file)

    def close(self) -> None:
        """Restore stdout and stderr and close the file."""
        sys.stdout, sys.stderr = self.stdout, self.stderr
        self.file.close()


class _Tee:
    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text: str) -> int:
        self.file.write(text)
        self.file.flush()
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)
