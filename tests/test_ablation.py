"""bench/ablation.py: the aggregation over seeds, the run queue and its reuse, and the study end to end on a tiny budget."""

import dataclasses
import json
import math
import os

import click
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dataset_tool
from bench import ablation
from training import demo_shapes
from training.evaluate import heldout_loss
from training.networks_edm2 import EDM2Precond
from training.phema import RESIDUAL_WARNING, find_phema_snapshots, load_phema_snapshot
from training.snapshot import load_network, newest_file

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
        assert PIL.Image.open(arm['grid']).size == (262, 262)  # 2x2 samples of 32 pixels, enlarged 4x, 2-pixel borders
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


@pytest.mark.parametrize('arm, pos_channels', [('edm2-full', 0), ('edm2-p0.5', 2)])
def test_edm2_arms_train_edm2_and_their_snapshots_score(tmp_path, arm, pos_channels):
    command = ablation.Setup('data.zip', 'demo', 4.0, (), 60.0, 1, 30.0).command(ablation.Run(arm, 0, str(tmp_path)))
    assert {'--arch=edm2', '--precond=edm2', '--lr-decay=inv-sqrt'} <= set(command) and arm not in ablation.DEFAULT_ARMS
    assert ('--patch=off' in command) == (pos_channels == 0)
    # Scoring calls the EMA as EDMPrecond is called: the held-out loss with the coordinate grid where the net has
    # coordinate channels, sampling without; EDM2Precond takes both.
    torch.manual_seed(0)
    net = EDM2Precond(img_resolution=8, img_channels=3, pos_channels=pos_channels, use_fp16=False, model_channels=8,
                      channel_mult=[1, 2], num_blocks=1, attn_resolutions=[]).eval()
    losses = heldout_loss(net, demo_shapes.heldout_images(4, 8), batch=2)
    assert math.isfinite(losses['mean']) and losses['mean'] > 0
    images = ablation.sample(net, 3, 2)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 8, 8)


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


def phema_run(classic, kid, best_kid, losses, residual=0.0):
    """A hand-made scored run: classic EMA held-out loss and KID, and held-out loss per reconstructed sigma_rel."""
    lengths = [dict(sigma_rel=s, heldout_loss=loss, residual=residual) for s, loss in losses.items()]
    best = ablation.best_length(lengths)
    return dict(heldout_loss=classic, kid=kid, phema=dict(lengths=lengths, best_sigma_rel=best['sigma_rel'],
                                                        best_heldout_loss=best['heldout_loss'], best_kid=best_kid))


def test_best_post_hoc_ema_length_is_the_lowest_mean_over_seeds():
    # Seed 0 is best at 0.05, seed 1 at 0.2; the mean (2.5, 1.5, 2.0) is lowest at 0.1, which neither seed picked.
    runs = [phema_run(2.0, 0.5, 0.25, {0.05: 1.0, 0.1: 1.5, 0.2: 3.0}, residual=0.02),
            phema_run(0.5, 0.5, 0.25, {0.05: 4.0, 0.1: 1.5, 0.2: 1.0})]
    summary = ablation.phema_summary(runs)
    assert summary['best_sigma_rel'] == 0.1 and summary['best_heldout_loss'] == dict(mean=1.5, std=0.0)
    assert summary['per_seed_best'] == [0.05, 0.2] and summary['worst_residual'] == 0.02
    assert [(e['sigma_rel'], e['mean'], e['min'], e['max']) for e in summary['lengths']] == [
        (0.05, 2.5, 1.0, 4.0), (0.1, 1.5, 1.5, 1.5), (0.2, 2.0, 1.0, 3.0)]
    assert summary['classic_heldout_loss'] == dict(mean=1.25, std=pytest.approx(1.5 / math.sqrt(2)))
    # Seed 0: the best length beats the classic EMA by both measures; seed 1: held-out loss says worse, KID better.
    assert summary['kid_agrees'] == 1 and summary['per_seed_best_kid'] == dict(mean=0.25, std=0.0)
    # A tie, per run and in the mean over seeds, goes to the smaller sigma_rel whatever the order of the lengths.
    tied = [phema_run(1.0, 0.5, 0.5, {0.1: 1.0, 0.05: 2.0}), phema_run(1.0, 0.5, 0.5, {0.1: 2.0, 0.05: 1.0})]
    assert ablation.phema_summary(tied)['best_sigma_rel'] == 0.05
    assert ablation.best_length([dict(sigma_rel=0.1, heldout_loss=1.0), dict(sigma_rel=0.05, heldout_loss=1.0)])['sigma_rel'] == 0.05


def test_phema_options_go_into_the_train_command_and_are_checked(tmp_path):
    setup = ablation.Setup('data.zip', 'demo', 4.0, (), 60.0, 1, 30.0)
    run = ablation.Run('full', 0, str(tmp_path))
    assert not any(arg.startswith('--phema') for arg in setup.command(run))
    phema = dataclasses.replace(setup, phema=(0.05, 0.1))
    assert setup.command(run) + ['--phema=0.05,0.1'] == phema.command(run) and setup.marker(run) != phema.marker(run)
    result = CliRunner().invoke(ablation.main, [f'--data={tmp_path}', '--ema-lengths=0.05'])
    assert result.exit_code == 2 and 'give it too' in result.output
    result = CliRunner().invoke(ablation.main, [f'--data={tmp_path}', '--phema=0.05,0.5'])
    assert result.exit_code == 2 and 'sigma_rel=0.5 is out of range' in result.output
    assert ablation.parse_lengths('0.1,0.05,0.1', '--phema') == [0.05, 0.1]


@pytest.mark.slow
def test_ablation_with_post_hoc_ema(tmp_path):
    data = tmp_path / 'shapes.zip'
    dataset_tool.convert('demo:shapes', str(data), (32, 32), None, 64, 0)
    report = tmp_path / 'docs' / 'results.md'
    args = [f'--data={data}', f'--outdir={tmp_path / "runs"}', f'--report={report}', '--budget=10', '--tick=1',
            '--arms=full,p0.5-pixel', '--seeds=1', '--jobs=2', '--threads=1', '--samples=4', '--steps=2', '--heldout-num=64', TINY,
            '--phema=0.05,0.10', '--ema-lengths=0.02,0.05,0.08,0.2']
    result = CliRunner().invoke(ablation.main, args)
    assert result.exit_code == 0, result.output
    study = json.loads((tmp_path / 'runs' / 'results.json').read_text())
    assert study['phema'] == [0.05, 0.1] and study['ema_lengths'] == [0.02, 0.05, 0.08, 0.2]
    heldout = demo_shapes.heldout_images(64, 32)
    for arm in study['arms'].values():
        [run] = arm['runs']
        with open(os.path.join(run['dir'], ablation.MARKER)) as f:
            assert '--phema=0.05,0.1' in json.load(f)['command']
        lengths = run['phema']['lengths']
        assert [entry['sigma_rel'] for entry in lengths] == study['ema_lengths']
        assert all(entry['heldout_loss'] > 0 and entry['residual'] >= 0 for entry in lengths)
        best = min(lengths, key=lambda entry: entry['heldout_loss'])
        assert run['phema']['best_sigma_rel'] == best['sigma_rel'] == arm['phema']['best_sigma_rel']
        assert run['phema']['best_heldout_loss'] == best['heldout_loss'] and run['phema']['best_kid'] is not None
        assert arm['phema']['classic_heldout_loss']['mean'] == run['heldout_loss']
        # A stored profile's own sigma_rel is reconstructed exactly: it scores as that profile loaded directly.
        [stored] = [entry for entry in lengths if entry['sigma_rel'] == 0.05]
        assert stored['residual'] < 1e-9
        net = load_network(newest_file(run['dir'], 'network-snapshot', '.pkl'))
        net.load_state_dict(load_phema_snapshot(find_phema_snapshots(run['dir'])[-1])['profiles'][0])
        assert stored['heldout_loss'] == pytest.approx(heldout_loss(net, heldout)['mean'], rel=1e-5)
    assert any(entry['residual'] > RESIDUAL_WARNING for arm in study['arms'].values() for entry in arm['runs'][0]['phema']['lengths'])
    assert 'Warning: [full seed 0] sigma_rel' in result.output
    assert PIL.Image.open(study['plots']['sigma_rel']).size == (720, 440)
    text = report.read_text()
    assert '## Post-hoc EMA' in text and 'ablation/heldout-loss-sigma-rel.png' in text and '| full (EDM) | ' in text
