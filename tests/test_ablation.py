"""bench/ablation.py: the aggregation over seeds, the run queue and its reuse, and the study end to end on a tiny budget."""

import dataclasses
import json
import math
import os

import click
import PIL.Image
import pytest
from click.testing import CliRunner

import dataset_tool
from bench import ablation

TINY = '--extra=--cbase=4 --cres=1,1 --attn=4 --batch=32'  # a network that gets through a few kimg in 20 s on one thread


def test_band_and_mean_over_seeds():
    a = [(0.0, 1.0), (2.0, 3.0), (4.0, 5.0)]
    b = [(1.0, 2.0), (3.0, 2.0), (5.0, 0.0)]
    # Both cover 1..4; at the x values of either curve there, a is 2, 3, 4, 5 and b is 2, 2, 2, 1.
    assert ablation.band([a, b]) == [(1.0, 2.0, 2.0, 2.0), (2.0, 2.5, 2.0, 3.0), (3.0, 3.0, 2.0, 4.0), (4.0, 3.0, 1.0, 5.0)]
    assert ablation.interpolate(a, 0.5) == 1.5 and ablation.interpolate(a, 9.0) == 5.0
    assert ablation.mean_std([1.0, 2.0, 6.0]) == pytest.approx(dict(mean=3.0, std=math.sqrt((4 + 1 + 9) / 2)))
    assert ablation.mean_std([0.5]) == dict(mean=0.5, std=0.0)


def test_queue_goes_seed_by_seed_and_reuses_finished_runs(tmp_path):
    setup = ablation.Setup('data.zip', 'demo', 4.0, (), 60.0, 1, 30.0)
    runs = ablation.study_runs(['full', 'p0-pixel'], 2, str(tmp_path))
    # Budgeted runs get a duration they never reach, except progressive ones, paced to reach theirs in the budget.
    assert '--duration=1000' in setup.command(runs[0])
    assert '--duration=0.03' in setup.command(ablation.Run('progressive-pixel', 0, str(tmp_path)))
    assert [(run.arm, run.seed) for run in runs] == [('full', 0), ('p0-pixel', 0), ('full', 1), ('p0-pixel', 1)]
    for run in runs[:2]:  # both trained, but only the first one finished (wrote the marker)
        os.makedirs(run.dir)
        for name in ('stats.jsonl', 'network-snapshot-000004.pkl'):
            open(os.path.join(run.dir, name), 'w').close()
    with open(os.path.join(runs[0].dir, ablation.MARKER), 'w') as f:
        json.dump(dict(setup.marker(runs[0]), start=0.0, end=60.0), f)
    with pytest.raises(click.ClickException, match='--score-only'):
        ablation.to_train(runs, setup, score_only=True)
    with pytest.raises(click.ClickException, match='another budget'):
        ablation.to_train(runs, dataclasses.replace(setup, budget=120.0), score_only=False)
    assert ablation.to_train(runs, setup, score_only=False) == runs[1:]
    assert os.path.isdir(runs[0].dir) and not os.path.exists(runs[1].dir)


def test_report_without_end_marker_is_refused(tmp_path):
    report = tmp_path / 'results.md'
    report.write_text('# Written by hand\n')
    with pytest.raises(click.BadParameter, match=ablation.END_MARKER):
        ablation.kept_text(str(report))


def interpolated_by_hand(curve, kimg):
    """The held-out loss of a curve at kimg, on the segment between the snapshots around it."""
    for p, q in zip(curve, curve[1:]):
        if p['kimg'] <= kimg <= q['kimg']:
            return p['heldout_loss'] + (kimg - p['kimg']) / (q['kimg'] - p['kimg']) * (q['heldout_loss'] - p['heldout_loss'])
    raise AssertionError(f'{kimg} kimg is outside the curve')


@pytest.mark.slow
def test_ablation_trains_scores_and_reports(tmp_path):
    data = tmp_path / 'shapes.zip'
    dataset_tool.convert('demo:shapes', str(data), (32, 32), None, 64, 0)
    report, figures = tmp_path / 'docs' / 'results.md', tmp_path / 'docs' / 'ablation'
    args = [f'--data={data}', f'--outdir={tmp_path / "runs"}', f'--report={report}', '--budget=20', '--tick=1',
            '--arms=full,p0.5-pixel', '--seeds=2', '--jobs=2', '--threads=1', '--samples=4', '--steps=2', '--heldout-num=64', TINY]
    result = CliRunner().invoke(ablation.main, args)
    assert result.exit_code == 0, result.output
    study = json.loads((tmp_path / 'runs' / 'results.json').read_text())
    arms = study['arms']
    assert list(arms) == ['full', 'p0.5-pixel']
    for arm in arms.values():
        assert [run['seed'] for run in arm['runs']] == [0, 1]
        for key in ablation.METRICS:
            first, second = (run[key] for run in arm['runs'])
            assert arm['summary'][key]['mean'] == pytest.approx((first + second) / 2)
            assert arm['summary'][key]['std'] == pytest.approx(abs(first - second) / math.sqrt(2))
        for run in arm['runs']:
            assert run['curve'][-1]['seconds'] <= 20 + 30  # budget plus start-up and the final state
            assert all(point['heldout_loss'] > 0 for point in run['curve']) and 0 <= run['coherence'] <= 1
            assert os.path.isfile(os.path.join(run['dir'], ablation.MARKER))
        assert PIL.Image.open(arm['grid']).size == (256, 256)  # 2x2 samples of 32 pixels, enlarged 4x
    runs = [run for arm in arms.values() for run in arm['runs']]
    assert study['common_kimg'] == min(run['kimg'] for run in runs)
    inside = [run for run in runs if run['curve'][0]['kimg'] < study['common_kimg'] < run['curve'][-1]['kimg']]
    assert inside, 'no run has snapshots on both sides of the common kimg'
    assert inside[0]['heldout_loss_at_kimg'] == pytest.approx(interpolated_by_hand(inside[0]['curve'], study['common_kimg']))
    [pair] = study['paired']
    differences = [a['heldout_loss'] - b['heldout_loss'] for a, b in zip(arms['p0.5-pixel']['runs'], arms['full']['runs'])]
    assert (pair['a'], pair['b']) == ('p0.5-pixel', 'full') and pair['differences'] == pytest.approx(differences)
    assert pair['a_better'] == sum(d < 0 for d in differences)
    for x_key in ('seconds', 'kimg'):
        assert PIL.Image.open(figures / f'heldout-loss-{x_key}.png').size == (720, 440)
    text = report.read_text()
    assert '| full (EDM) |' in text and '| p=0.5 pixel − full (EDM) |' in text and 'ablation/heldout-loss-kimg.png' in text

    report.write_text(text + 'Read by hand.\n')
    result = CliRunner().invoke(ablation.main, args + ['--score-only'])
    assert result.exit_code == 0, result.output
    assert 'reusing' in result.output and 'training for' not in result.output
    text = report.read_text()
    assert text.count(ablation.END_MARKER) == 1 and text.endswith(ablation.END_MARKER + '\nRead by hand.\n')


def test_unknown_arm_is_rejected(tmp_path):
    result = CliRunner().invoke(ablation.main, [f'--data={tmp_path}', '--arms=full,p0.7'])
    assert result.exit_code == 2 and 'unknown arm(s) p0.7' in result.output and 'p0.5-pixel' in result.output


def test_progressive_arm_needs_its_duration(tmp_path):
    result = CliRunner().invoke(ablation.main, [f'--data={tmp_path}', '--arms=full,progressive-pixel'])
    assert result.exit_code == 2 and '--progressive-kimg' in result.output


def test_thinning_keeps_the_last_snapshot_and_every_kth_before_it():
    points = [dict(kimg=k) for k in range(10)]
    kept = lambda most: [p['kimg'] for p in ablation.thin(points, most)]  # noqa: E731
    assert kept(4) == [0, 3, 6, 9] and kept(5) == [1, 3, 5, 7, 9] and kept(10) == kept(99) == list(range(10))
    assert kept(2) == [4, 9]
