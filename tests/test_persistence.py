"""Persistent pickles carry their module's source and load after the code is changed or gone."""

import pickle
import subprocess
import sys
import textwrap

import torch

from torch_utils import persistence

ROOT = __import__('os').path.dirname(__import__('os').path.dirname(__import__('os').path.abspath(__file__)))

MODULE_V1 = textwrap.dedent('''
    import torch
    from torch_utils import persistence

    @persistence.persistent_class
    class Inner(torch.nn.Module):
        def __init__(self, width):
            super().__init__()
            self.linear = torch.nn.Linear(width, width)

        def forward(self, x):
            return self.linear(x) * 2

    @persistence.persistent_class
    class Outer(torch.nn.Module):
        def __init__(self, width, scale=1.0):
            super().__init__()
            self.inner = Inner(width)
            self.scale = scale

        def forward(self, x):
            return self.inner(x) + self.scale
''')


def test_snapshot_loads_after_source_changes_in_fresh_process(tmp_path):
    pkg = tmp_path / 'code'
    pkg.mkdir()
    (pkg / 'toynet.py').write_text(MODULE_V1)
    sys.path.insert(0, str(pkg))
    try:
        import toynet
        net = toynet.Outer(3, scale=0.5)
        assert net.init_args == (3,) and net.init_kwargs == {'scale': 0.5}
        assert persistence.is_persistent(net) and persistence.is_persistent(net.inner)
        x = torch.randn(2, 3)
        expected = net(x)
        (tmp_path / 'net.pkl').write_bytes(pickle.dumps(net))
        torch.save(dict(x=x, expected=expected), tmp_path / 'io.pt')
    finally:
        sys.path.remove(str(pkg))
        sys.modules.pop('toynet', None)
    (pkg / 'toynet.py').write_text('raise ImportError("the old code is gone")\n')

    script = textwrap.dedent(f'''
        import pickle, torch
        net = pickle.load(open({str(tmp_path / 'net.pkl')!r}, 'rb'))
        io = torch.load({str(tmp_path / 'io.pt')!r})
        assert torch.equal(net(io['x']), io['expected'])
        assert type(net).__name__ == 'Outer' and net.init_kwargs == {{'scale': 0.5}}
        again = pickle.loads(pickle.dumps(net))  # re-pickling a loaded object keeps working
        assert torch.equal(again(io['x']), io['expected'])
        assert type(again) is type(net)  # the same stored source is executed once
        print('ok')
    ''')
    env = dict(__import__('os').environ, PYTHONPATH=f'{ROOT}')
    result = subprocess.run([sys.executable, '-c', script], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'ok'


def test_plain_objects_are_not_persistent():
    assert not persistence.is_persistent(torch.nn.Linear(1, 1))
