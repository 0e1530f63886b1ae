"""Named settings in configs/NAME.json: train.py options, plus an optional "sampling" entry for generate.py and fid.py
and an optional "unsupported" entry, a message with which train.py refuses the preset."""

import json
import os
from typing import Any, Dict, List, Optional

import click

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def list_presets() -> List[str]:
    """Names of the presets in configs/."""
    return sorted(os.path.splitext(f)[0] for f in os.listdir(CONFIG_DIR) if f.endswith('.json'))


def read_preset(name: str) -> Dict[str, Any]:
    """All of configs/NAME.json; a click error naming the available presets if there is none."""
    path = os.path.join(CONFIG_DIR, f'{name}.json')
    if not os.path.isfile(path):
        raise click.BadParameter(f'unknown preset "{name}"; available: {", ".join(list_presets())}', param_hint='--preset')
    with open(path) as f:
        return json.load(f)


NOT_OPTIONS = ('notes', 'sampling', 'unsupported')  # preset entries that are not train.py options


def training_preset(name: str) -> Dict[str, Any]:
    """The train.py options of a preset (without its notes, sampling settings and refusal)."""
    return {k: v for k, v in read_preset(name).items() if k not in NOT_OPTIONS}


def preset_refusal(name: str) -> Optional[str]:
    """Why train.py refuses to train a preset (its "unsupported" entry: a recipe this code base cannot run yet), or None."""
    return read_preset(name).get('unsupported')


def sampling_preset(name: str) -> Dict[str, Any]:
    """The sampler settings of a preset, e.g. {"cfg": 1.3}; empty if it has none."""
    return dict(read_preset(name).get('sampling', {}))


def apply_defaults(ctx: click.Context, values: Dict[str, Any], defaults: Dict[str, Any], source: str) -> None:
    """Set values[key] = defaults[key] for each option not given on the command line; unknown keys are an error."""
    for key, value in defaults.items():
        if key not in values:
            raise click.ClickException(f'{source}: unknown option "{key}"')
        if ctx.get_parameter_source(key) != click.core.ParameterSource.COMMANDLINE:
            values[key] = value
