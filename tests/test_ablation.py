"""bench/ablation.py end to end on a tiny budget: two runs, scored, plotted and reported."""

import json

import PIL.Image
import pytest
from click.testing import CliRunner

import dataset_tool
from bench import ablation


@pytest.mark.slow
def test_ablation_trains_scores_and_reports(tmp_path):
    data = tmp_path / 'shapes.zip'
    dataset_tool.convert('demo:shapes', str(data), (32, 32), None, 64, 0)
    report = tmp_path / 'docs' / 'results.md'
    result = CliRunner().invoke(ablation.main, [
        f'--data={data}', f'--outdir={tmp_path / "runs"}', f'--report={report}', '--budget=12', '--tick=0.064',
        '--configs=full,p=0.5', '--samples=4', '--steps=2', '--extra=--cbase=8 --batch=8 --attn=8'])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / 'runs' / 'results.json').read_text())['results']
    assert list(results) == ['full', 'p=0.5']
    for name, r in results.items():
        assert len(r['curve']) >= 2 and r['curve'][-1]['seconds'] <= 12 + 30  # budget plus start-up and the final state
        assert all(point['heldout_loss'] > 0 for point in r['curve']) and 0 <= r['coherence'] <= 1
        assert PIL.Image.open(tmp_path / 'docs' / 'ablation' / f'grid-{name}.png').size == (64, 64)
    assert PIL.Image.open(tmp_path / 'docs' / 'ablation' / 'heldout-loss.png').size == (720, 440)
    text = report.read_text()
    assert '| full |' in text and '| p=0.5 |' in text and 'ablation/heldout-loss.png' in text


def test_unknown_config_is_rejected(tmp_path):
    result = CliRunner().invoke(ablation.main, [f'--data={tmp_path}', '--configs=full,p=0.7'])
    assert result.exit_code == 2 and 'unknown run(s)' in result.output
