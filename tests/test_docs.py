"""docs/cli.md matches the scripts' current --help."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_reference_is_up_to_date():
    spec = importlib.util.spec_from_file_location('make_cli_docs', os.path.join(ROOT, 'docs', 'make_cli_docs.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with open(os.path.join(ROOT, 'docs', 'cli.md')) as f:
        assert f.read() == module.render(), 'docs/cli.md is stale: run python docs/make_cli_docs.py'


def test_quick_start_installs_the_offline_inception_and_scores_fid():
    with open(os.path.join(ROOT, 'README.md')) as f:
        commands = [line for line in f.read().splitlines() if line.startswith('python3 -m venv .venv ')][:2]
    assert len(commands) == 2 and commands[1].rstrip().endswith('pytest -q')  # .ci/run runs the second
    for command in commands:
        steps = command.split(' && ')
        install = steps.index('.venv/bin/pip install -q --no-deps -r requirements-fid.txt')
        assert install < min(i for i, step in enumerate(steps) if step.startswith('.venv/bin/python'))
    dataset = next(step for step in commands[0].split(' && ') if 'dataset_tool.py' in step).split('--dest=')[1].split()[0]
    assert f'--fid-data={dataset}' in commands[0].split(' && ')[-1] and 'fid.py demo' in commands[0].split(' && ')[-1]
