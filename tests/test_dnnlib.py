"""EasyDict, construct_class_by_name and open_url (local path, file://, http with cache, offline failure)."""

import http.server
import os
import threading

import pytest

import dnnlib
from dnnlib import util
from multiproc import free_port


def test_easydict_attribute_access():
    d = dnnlib.EasyDict(a=1)
    d.b = 2
    assert d == {'a': 1, 'b': 2} and d.a == 1
    del d.a
    with pytest.raises(AttributeError):
        d.a


def test_construct_class_by_name():
    obj = dnnlib.construct_class_by_name(class_name='dnnlib.util.EasyDict', x=3)
    assert isinstance(obj, dnnlib.EasyDict) and obj.x == 3
    with pytest.raises(ValueError, match='no attribute'):
        dnnlib.construct_class_by_name(class_name='dnnlib.util.NoSuchThing')
    with pytest.raises(ValueError, match='cannot import'):
        dnnlib.construct_class_by_name(class_name='no_such_module.Thing')


def test_open_local_path_and_file_url(tmp_path):
    path = tmp_path / 'data.bin'
    path.write_bytes(b'hello')
    with dnnlib.open_url(str(path)) as f:
        assert f.read() == b'hello'
    with dnnlib.open_url(path.as_uri()) as f:
        assert f.read() == b'hello'
    with pytest.raises(IOError, match='file not found'):
        dnnlib.open_url(str(tmp_path / 'missing.bin'))


@pytest.fixture
def http_dir(tmp_path):
    served = tmp_path / 'served'
    served.mkdir()
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()


def test_http_download_is_cached(http_dir, tmp_path, monkeypatch):
    served, base = http_dir
    (served / 'weights.pkl').write_bytes(b'v1')
    cache = tmp_path / 'cache'
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(cache))
    with dnnlib.open_url(f'{base}/weights.pkl') as f:
        assert f.read() == b'v1'
    assert len(os.listdir(cache / 'downloads')) == 1
    (served / 'weights.pkl').write_bytes(b'v2')
    with dnnlib.open_url(f'{base}/weights.pkl') as f:
        assert f.read() == b'v1'  # served from the cache
    with dnnlib.open_url(f'{base}/weights.pkl', cache=False) as f:
        assert f.read() == b'v2'


def test_unreachable_url_gives_one_clear_line(tmp_path):
    url = f'http://127.0.0.1:{free_port()}/inception.pkl'
    with pytest.raises(IOError) as info:
        dnnlib.open_url(url, cache_dir=str(tmp_path))
    message = str(info.value)
    assert url in message and 'pass a local path instead' in message and '\n' not in message
    assert not os.path.exists(tmp_path / 'downloads') or not os.listdir(tmp_path / 'downloads')


def test_default_cache_dir(monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', '/somewhere')
    assert util.default_cache_dir() == '/somewhere'
    monkeypatch.delenv('DNNLIB_CACHE_DIR')
    assert util.default_cache_dir().endswith(os.path.join('.cache', 'dnnlib'))
