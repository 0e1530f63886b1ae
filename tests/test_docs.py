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
