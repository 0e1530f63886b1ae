"""A multi-seed ablation of Patch Diffusion against full-image EDM at equal wall-clock budgets.

Each arm (a set of train.py flags, see ARMS) trains `--seeds` times (train.py --seed=0..N-1) for `--budget` seconds
of wall-clock time each (then SIGTERM: train.py saves its state and a snapshot and exits), with a snapshot every
`--tick` kimg. `--jobs` runs train at once as separate processes with `--threads` threads each. The queue goes seed by
seed (seed 0 of every arm, then seed 1, ...) and two runs of one arm never overlap, so every arm trains under the same
machine load; pick --jobs so that it divides the number of runs, or the last ones train on a less busy machine.
A finished run (its directory holds MARKER) is reused and an unfinished one is trained again, so rerunning the
command of an interrupted study continues it.

Scoring: the held-out loss (training.evaluate.heldout_loss, mean over its sigmas) of every snapshot on `--heldout`
images (default: fresh demo images), against wall-clock seconds and kimg. Per arm: mean and standard deviation over
seeds of the final kimg, the final held-out loss (equal time), the held-out loss at the fewest kimg any run reached
(equal kimg, linear interpolation of each run's curve), FID and KID of `--samples` samples of the last snapshot
against as many random images of --data (offline Inception-v3 by default; the reference is cached beside --data)
and, on the demo set, the coherence of the same samples; per seed: the differences of final held-out loss between the arms of PAIRS. Writes results.json
into --outdir, two plots and one sample grid per arm into --figures, and a Markdown report whose text after
END_MARKER is kept when it is written again.

Post-hoc EMA (`--phema=0.05,0.10`): every run trains with train.py --phema, and scoring also reconstructs each length
of `--ema-lengths` at the run's last phema snapshot (training.phema.reconstruct) into its last network snapshot's
network and scores its held-out loss on the same images; per run the best length is the one of lowest held-out
loss, per arm the one of lowest mean over seeds (a tie goes to the smaller sigma_rel). With FID on, the samples of
each run's best length get FID and KID too. The report gains a "Post-hoc EMA" section and a plot against sigma_rel.

Run from the repository root:  python bench/ablation.py --data=datasets/shapes-32x32.zip --budget=200 --jobs=2
  with post-hoc EMA:           python bench/ablation.py --data=datasets/shapes-32x32.zip --budget=200 --jobs=2 --phema=0.05,0.10
"""

import copy
import dataclasses
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import click
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import fid  # noqa: E402
from bench.common import environment, line_plot, write_json  # noqa: E402
from reconstruct_ema import parse_float_list  # noqa: E402
from torch_utils.distributed import choose_device  # noqa: E402
from training import demo_shapes  # noqa: E402
from training.dataset import DatasetError, ImageFolderDataset  # noqa: E402
from training.detector import OFFLINE_NAME, DetectorError, load_detector  # noqa: E402
from training.evaluate import HELDOUT_SIGMAS, heldout_loss  # noqa: E402
from training.images import save_image_grid, to_float  # noqa: E402
from training.phema import RESIDUAL_WARNING, find_phema_snapshots, reconstruct, sigma_rel_to_gamma  # noqa: E402
from training.sampler import generate_images  # noqa: E402
from training.snapshot import atomic_write, load_network  # noqa: E402


class Arm(NamedTuple):
    """A configuration of the study: its label in the report and its train.py flags."""
    label: str
    flags: List[str]


# EDM2's network and loss (learned uncertainty) sized like the demo preset's DDPM++ (docs/results-edm2.md: FLOPs per step
# within 3%, CPU time within 10%); with --preset=demo they keep its batch, EMA, ramp-up and P_mean/P_std (-0.4, 1.6).
# lr 0.03 (best of a sweep of 0.003..0.1 at batch 16) with EDM2's inv-sqrt decay from the
# end of the ramp-up (125 steps of 16 = 2 kimg), which acts in runs ended by a wall-clock budget, where --lr-cooldown
# (a share of --duration) never starts.
EDM2_FLAGS = ['--arch=edm2', '--precond=edm2', '--attn=8', '--lr=0.03', '--lr-decay=inv-sqrt', '--lr-ref-batches=125',
              '--lr-cooldown=0']
ARMS = {'full': Arm('full (EDM)', ['--patch=off']),
        'p1.0': Arm('p=1.0', ['--real_p=1.0']),
        'p0.5-image': Arm('p=0.5 image', ['--real_p=0.5', '--loss-norm=image']),
        'p0.5-pixel': Arm('p=0.5 pixel', ['--real_p=0.5', '--loss-norm=pixel']),
        'p0.25-pixel': Arm('p=0.25 pixel', ['--real_p=0.25', '--loss-norm=pixel']),
        'progressive-pixel': Arm('progressive pixel', ['--real_p=0.5', '--progressive=True', '--loss-norm=pixel']),
        'p0-pixel': Arm('p=0 pixel', ['--real_p=0', '--loss-norm=pixel']),
        'edm2-full': Arm('EDM2 full', [*EDM2_FLAGS, '--patch=off']),
        'edm2-p0.5': Arm('EDM2 p=0.5 pixel', [*EDM2_FLAGS, '--real_p=0.5', '--loss-norm=pixel'])}
DEFAULT_ARMS = [name for name in ARMS if name != 'p1.0' and not name.startswith('edm2')]
PAIRS = [('p0.5-pixel', 'full'), ('p0.5-pixel', 'p0.5-image'),  # (a, b): per-seed final held-out loss of a minus b
         ('edm2-p0.5', 'edm2-full'), ('edm2-full', 'full'), ('edm2-p0.5', 'p0.5-pixel')]
METRICS = ('kimg', 'heldout_loss', 'heldout_loss_at_kimg', 'coherence', 'fid', 'kid')  # per-run values summarised over seeds
MARKER = 'ablation-finished.json'  # written into a run directory when its training ended well
SCORES = 'ablation-scores.json'    # a run's scores and what they were computed with
LOG = 'train.log'
END_MARKER = '<!-- end of generated part -->'
DEFAULT_EMA_LENGTHS = '0.02,0.04,0.06,0.08,0.10,0.15,0.20'  # sigma_rels reconstructed with --phema (EDM2 finds 0.05..0.2)
GRID_IMAGES = 64
GRID_MIN_WIDTH = 128  # pixels per sample in the grids, enlarged by nearest neighbour
POLL_S = 0.2


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the study: an arm with a seed, in its own directory."""
    arm: str
    seed: int
    dir: str

    def __str__(self) -> str:
        return f'[{self.arm} seed {self.seed}]'


@dataclasses.dataclass(frozen=True)
class Setup:
    """How every run trains: data, preset, extra train.py flags, snapshot interval, budget, threads and phema profiles."""
    data: str
    preset: str
    tick: float
    extra: Tuple[str, ...]
    budget: float
    threads: int
    progressive_kimg: Optional[float]
    phema: Tuple[float, ...] = ()  # train.py --phema sigma_rels; () trains without post-hoc EMA profiles

    def command(self, run: Run) -> List[str]:
        """train.py's command line for a run."""
        # The budget, not the duration, ends a run; but a progressive schedule is paced by the duration, so that arm
        # gets the kimg it can reach in the budget, or it would spend all of it on the smallest patches.
        progressive = '--progressive=True' in ARMS[run.arm].flags
        duration = self.progressive_kimg / 1000 if progressive else 1000
        return [sys.executable, os.path.join(ROOT, 'train.py'), f'--preset={self.preset}', f'--data={self.data}',
                f'--outdir={run.dir}', '--nosubdir', f'--seed={run.seed}', f'--duration={duration:g}', f'--tick={self.tick}',
                '--snap=1', '--dump=100000', '--preview=False', *ARMS[run.arm].flags, *self.extra,
                *([f'--phema={join_lengths(self.phema)}'] if self.phema else [])]

    def marker(self, run: Run) -> Dict:
        """What a run's MARKER records and must match to be reused: train.py's arguments, budget and threads."""
        return dict(command=self.command(run)[2:], budget=self.budget, threads=self.threads)


def join_lengths(sigma_rels: Sequence[float]) -> str:
    """[0.05, 0.1] -> '0.05,0.1'."""
    return ','.join(f'{s:g}' for s in sigma_rels)


# --- training -----------------------------------------------------------------------------------------------

def study_runs(arms: Sequence[str], seeds: int, outdir: str) -> List[Run]:
    """Every run in queue order: seed 0 of every arm, then seed 1, ..."""
    return [Run(arm, seed, os.path.join(outdir, arm, f'seed{seed}')) for seed in range(seeds) for arm in arms]


def read_marker(run: Run) -> Optional[Dict]:
    """The MARKER of a finished run (one with stats.jsonl and a snapshot too), else None."""
    files = [os.path.join(run.dir, name) for name in (MARKER, 'stats.jsonl')]
    snapshots = os.path.isdir(run.dir) and any(name.endswith('.pkl') for name in os.listdir(run.dir))
    return read_json(files[0]) if snapshots and os.path.isfile(files[1]) else None


def to_train(runs: List[Run], setup: Setup, score_only: bool) -> List[Run]:
    """The runs that need training: finished ones with the same settings are reused, unfinished ones removed."""
    queue = []
    for run in runs:
        marker = read_marker(run)
        if marker is not None:
            changed = [key for key, value in setup.marker(run).items() if marker.get(key) != value]
            if changed:
                raise click.ClickException(f'{run.dir} was trained with another {" and ".join(changed)}; '
                                           f'repeat its options or pick another --outdir')
            print(f'{run} reusing the finished run in {run.dir}', flush=True)
        elif score_only:
            raise click.ClickException(f'--score-only: {run.dir} holds no finished run; run without --score-only first')
        else:
            if os.path.exists(run.dir):
                print(f'{run} removing the unfinished run in {run.dir}', flush=True)
                shutil.rmtree(run.dir)
            queue.append(run)
    return queue


@dataclasses.dataclass
class Training:
    """A run's train.py process, started at `start` (time.time()); `stopped` once it was sent SIGTERM."""
    run: Run
    process: subprocess.Popen
    start: float
    stopped: bool = False


def start(run: Run, setup: Setup) -> Training:
    """Start train.py for a run with `setup.threads` OpenMP/MKL threads, its output going to LOG in its directory."""
    command = setup.command(run)
    print(f'{run} training for {setup.budget:g} s: {shlex.join(command[2:])}', flush=True)
    os.makedirs(run.dir)
    env = dict(os.environ, OMP_NUM_THREADS=str(setup.threads), MKL_NUM_THREADS=str(setup.threads))
    with open(os.path.join(run.dir, LOG), 'w') as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    return Training(run, process, time.time())


def finish(training: Training, setup: Setup) -> None:
    """Check that a run's train.py exited well and write its MARKER."""
    run, end = training.run, time.time()
    if training.process.returncode != 0:
        raise click.ClickException(f'{run} train.py exited with {training.process.returncode}; see {os.path.join(run.dir, LOG)}')
    marker = dict(setup.marker(run), start=training.start, end=end)
    atomic_write(os.path.join(run.dir, MARKER), lambda f: f.write(json.dumps(marker, indent=2).encode()))
    print(f'{run} finished: {read_stats(run.dir)[-1]["progress"]["kimg"]:.2f} kimg in {end - training.start:.0f} s', flush=True)


def tend(training: Training, setup: Setup) -> bool:
    """Send SIGTERM once the budget is spent; finish the run and return True when its process has exited."""
    if training.process.poll() is not None:
        finish(training, setup)
        return True
    if not training.stopped and time.time() - training.start >= setup.budget:
        training.process.send_signal(signal.SIGTERM)
        training.stopped = True
    return False


def train_all(queue: List[Run], setup: Setup, jobs: int) -> None:
    """Train the queued runs in order, `jobs` at a time but never two of one arm at once."""
    queue, live = list(queue), []
    try:
        while queue or live:
            ready = [run for run in queue if run.arm not in {t.run.arm for t in live}]
            if ready and len(live) < jobs:
                queue.remove(ready[0])
                live.append(start(ready[0], setup))
                continue
            time.sleep(POLL_S)
            live = [training for training in live if not tend(training, setup)]
    finally:
        for training in live:  # after an error or Ctrl-C: stop the others (their runs stay unfinished)
            training.process.terminate()
            training.process.wait()


# --- scoring ------------------------------------------------------------------------------------------------

def read_stats(run_dir: str) -> List[Dict]:
    """The stats.jsonl records of a run, one per tick."""
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        return [json.loads(line) for line in f]


def snapshot_points(run: Run) -> List[Dict]:
    """Seconds since its process started, kimg and file of each snapshot of a run. train.py names snapshots by whole
    kimg, so the final tick (at SIGTERM) overwrites the snapshot of an earlier tick that ended in the same kimg."""
    start = read_marker(run)['start']
    last = {int(record['progress']['kimg']): record for record in read_stats(run.dir)}
    return [dict(seconds=record['timestamp'] - start, kimg=record['progress']['kimg'],
                 path=os.path.join(run.dir, f'network-snapshot-{stem:06d}.pkl')) for stem, record in last.items()]


def sample(net: torch.nn.Module, count: int, steps: int) -> torch.Tensor:
    """uint8 samples for seeds 0..count-1, 64 at a time."""
    device = next(net.parameters()).device
    return torch.cat([generate_images(net, list(range(first, min(first + 64, count))), device, num_steps=steps).cpu()
                      for first in range(0, count, 64)])


def thin(points: List[Dict], most: int) -> List[Dict]:
    """At most `most` of a run's snapshot points: every k-th, counted back from the last, which is always kept."""
    step = -(-len(points) // most)
    return points[::-1][::step][::-1]


class Inception(NamedTuple):
    """What FID and KID are computed with: the detector and the reference statistics (with features) of the data."""
    detector: torch.nn.Module
    ref_stats: Dict[str, np.ndarray]


def best_length(lengths: Sequence[Dict]) -> Dict:
    """The entry of lowest held-out loss among a run's reconstructed lengths; a tie goes to the smaller sigma_rel."""
    return min(lengths, key=lambda entry: (entry['heldout_loss'], entry['sigma_rel']))


def score_phema(run: Run, net: torch.nn.Module, heldout: torch.Tensor, ema_lengths: Sequence[float], samples: int,
                steps: int, inception: Optional[Inception]) -> Dict:
    """Held-out loss of every EMA length reconstructed at a run's last phema snapshot, in (a copy of) the network of its
    last snapshot; FID and KID of the best length's samples when asked."""
    paths = find_phema_snapshots(run.dir)
    if not paths:
        raise click.ClickException(f'{run} {run.dir} holds no phema-snapshot-*.pt; it was trained without --phema')
    try:
        targets = reconstruct(paths, ema_lengths)
    except ValueError as err:
        raise click.ClickException(f'{run} {err}') from None
    net, lengths = copy.deepcopy(net), []
    for target in targets:
        load_weights(net, target['weights'], run)
        lengths.append(dict(sigma_rel=target['sigma_rel'], gamma=target['gamma'], residual=target['residual'],
                            heldout_loss=heldout_loss(net, heldout)['mean']))
    best = best_length(lengths)
    result = dict(kimg=targets[0]['nimg'] / 1000, snapshots=targets[0]['used'], lengths=lengths,
                  best_sigma_rel=best['sigma_rel'], best_heldout_loss=best['heldout_loss'])
    poor = [entry for entry in lengths if entry['residual'] > RESIDUAL_WARNING]
    if poor:
        names = ', '.join(f'{entry["sigma_rel"]:g}' for entry in poor)
        print(f'Warning: {run} sigma_rel {names}: relative residual up to {max(e["residual"] for e in poor):.2e} > '
              f'{RESIDUAL_WARNING:g}; the stored profiles do not represent {"it" if len(poor) == 1 else "them"} well', flush=True)
    if inception:
        load_weights(net, targets[lengths.index(best)]['weights'], run)
        scores = fid.fid_kid(sample(net, samples, steps), inception.ref_stats, inception.detector, torch.device('cpu'))
        result.update(best_fid=scores['fid'], best_kid=scores['kid'])
    return result


def load_weights(net: torch.nn.Module, weights: Dict[str, torch.Tensor], run: Run) -> None:
    """Put reconstructed weights into a network; a click error when they do not fit it."""
    try:
        net.load_state_dict(weights)
    except RuntimeError as err:
        raise click.ClickException(f'{run} the phema snapshots do not fit the network snapshot ({str(err).splitlines()[0]})') from None


def score_run(run: Run, heldout: torch.Tensor, samples: int, steps: int, coherence: bool, inception: Optional[Inception],
              grid: Optional[str], points: int, key: Dict, ema_lengths: Optional[Sequence[float]] = None,
              device: torch.device = torch.device('cpu'), samples_file: Optional[str] = None) -> Dict:
    """Held-out loss of (at most `points`) snapshots of a run, with the networks on `device`; coherence, FID and KID of
    the last one's samples and their grid when asked; the samples as uint8 NHWC in `samples_file` (.npz, key 'samples')
    when given; with `ema_lengths`, the post-hoc EMA lengths' held-out loss (score_phema).

    The result is kept in the run's SCORES file under `key` (what the scores depend on), so scoring the same run the
    same way again, for example in a second process scoring other arms, costs nothing.
    """
    cached = read_json(os.path.join(run.dir, SCORES))
    if cached is not None and cached['key'] == key and all(path is None or os.path.isfile(path) for path in (grid, samples_file)):
        print(f'{run} scores reused', flush=True)
        return cached['result']
    curve = []
    for point in thin(snapshot_points(run), points):
        net = load_network(point.pop('path'), device)
        losses = heldout_loss(net, heldout)
        curve.append(dict(point, heldout_loss=losses['mean']))
    result = dict(seed=run.seed, dir=run.dir, curve=curve, kimg=curve[-1]['kimg'], seconds=curve[-1]['seconds'],
                  heldout_loss=losses['mean'], heldout_loss_by_sigma=losses)
    if coherence or inception or grid or samples_file:
        images = sample(net, samples if coherence or inception or samples_file else min(samples, GRID_IMAGES), steps)
        if samples_file:
            save_samples(samples_file, images)
        if coherence:
            result['coherence'] = demo_shapes.coherence_score(images)
        if inception:
            result.update(fid.fid_kid(images, inception.ref_stats, inception.detector, torch.device('cpu')))
        if grid:
            save_image_grid(images[:GRID_IMAGES], grid, min_tile=GRID_MIN_WIDTH)
    if ema_lengths:
        result['phema'] = score_phema(run, net, heldout, ema_lengths, samples, steps, inception)
    print(f'{run} scored {len(curve)} snapshots: {result["kimg"]:.2f} kimg, final held-out loss {result["heldout_loss"]:.4f}'
          + (f', coherence {result["coherence"]:.3f}' if coherence else '')
          + (f', FID {result["fid"]:.2f}, KID {result["kid"]:.4f}' if inception else '')
          + (f'; post-hoc EMA best sigma_rel {result["phema"]["best_sigma_rel"]:g}: held-out loss '
             f'{result["phema"]["best_heldout_loss"]:.4f}' if ema_lengths else ''), flush=True)
    atomic_write(os.path.join(run.dir, SCORES), lambda f: f.write(json.dumps(dict(key=key, result=result)).encode('utf-8')))
    return result


def save_samples(path: str, images: torch.Tensor) -> None:
    """uint8 [N, 3, H, W] samples written atomically as an .npz of uint8 [N, H, W, 3] under the key 'samples'."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, samples=images.permute(0, 2, 3, 1).numpy()))


def read_json(path: str) -> Optional[Dict]:
    """The JSON object in a file, or None where there is no such file."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def interpolate(curve: Sequence[Tuple[float, float]], x: float) -> float:
    """y of a piecewise-linear curve of (x, y) points with increasing x at x (its end values beyond its ends)."""
    xs, ys = zip(*curve)
    return float(np.interp(x, xs, ys))


def band(curves: Sequence[Sequence[Tuple[float, float]]]) -> List[Tuple[float, float, float, float]]:
    """(x, mean, min, max) of the curves' y, interpolated at every x of any curve inside the range that all cover."""
    low, high = max(curve[0][0] for curve in curves), min(curve[-1][0] for curve in curves)
    xs = sorted({x for curve in curves for x, _ in curve if low <= x <= high})
    rows = [(x, [interpolate(curve, x) for curve in curves]) for x in xs]
    return [(x, statistics.mean(ys), min(ys), max(ys)) for x, ys in rows]


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    return dict(mean=statistics.mean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0)


def curve_of(result: Dict, x_key: str) -> List[Tuple[float, float]]:
    """A run's (seconds or kimg, held-out loss) points."""
    return [(point[x_key], point['heldout_loss']) for point in result['curve']]


def summarise(arm: str, runs: List[Dict], common_kimg: float, grid: str) -> Dict:
    """An arm's runs with their loss at `common_kimg`, the mean and std of METRICS over seeds, and the bands."""
    for result in runs:
        result['heldout_loss_at_kimg'] = interpolate(curve_of(result, 'kimg'), common_kimg)
    summary = dict(label=ARMS[arm].label, flags=ARMS[arm].flags, runs=runs, grid=grid,
                   summary={key: mean_std([result[key] for result in runs]) for key in METRICS if key in runs[0]},
                   bands={x_key: band([curve_of(result, x_key) for result in runs]) for x_key in ('seconds', 'kimg')})
    return dict(summary, phema=phema_summary(runs)) if 'phema' in runs[0] else summary


def phema_summary(runs: List[Dict]) -> Dict:
    """An arm's post-hoc EMA over seeds: per length the held-out loss (mean, std, min, max) and worst residual, the
    length of lowest mean (a tie goes to the smaller sigma_rel), each seed's best length, and the classic EMA's loss."""
    lengths = []
    for i, entry in enumerate(runs[0]['phema']['lengths']):
        losses = [result['phema']['lengths'][i]['heldout_loss'] for result in runs]
        lengths.append(dict(sigma_rel=entry['sigma_rel'], **mean_std(losses), min=min(losses), max=max(losses),
                            worst_residual=max(result['phema']['lengths'][i]['residual'] for result in runs)))
    best = min(lengths, key=lambda entry: (entry['mean'], entry['sigma_rel']))
    summary = dict(lengths=lengths, best_sigma_rel=best['sigma_rel'], best_heldout_loss=dict(mean=best['mean'], std=best['std']),
                   classic_heldout_loss=mean_std([result['heldout_loss'] for result in runs]),
                   per_seed_best=[result['phema']['best_sigma_rel'] for result in runs],
                   worst_residual=max(entry['worst_residual'] for entry in lengths))
    if 'best_kid' in runs[0]['phema']:
        summary.update(classic_kid=mean_std([result['kid'] for result in runs]),
                       per_seed_best_kid=mean_std([result['phema']['best_kid'] for result in runs]),
                       kid_agrees=sum(kid_agrees(result) for result in runs))
    return summary


def kid_agrees(result: Dict) -> bool:
    """Whether KID ranks a run's best post-hoc EMA length and its classic EMA as the held-out loss does (ties equal)."""
    sign = lambda d: (d > 0) - (d < 0)  # noqa: E731
    phema = result['phema']
    return sign(phema['best_kid'] - result['kid']) == sign(phema['best_heldout_loss'] - result['heldout_loss'])


def paired(arms: Dict[str, Dict]) -> List[Dict]:
    """Per-seed differences of final held-out loss for each pair of PAIRS whose arms both ran (negative favours a)."""
    pairs = []
    for a, b in PAIRS:
        if a in arms and b in arms:
            differences = [ra['heldout_loss'] - rb['heldout_loss'] for ra, rb in zip(arms[a]['runs'], arms[b]['runs'])]
            pairs.append(dict(a=a, b=b, differences=differences, **mean_std(differences),
                              a_better=sum(d < 0 for d in differences), b_better=sum(d > 0 for d in differences)))
    return pairs


def score_study(runs: List[Run], heldout: torch.Tensor, samples: int, steps: int, coherence: bool, inception: Optional[Inception],
                figures: str, points: int, key: Dict, ema_lengths: Optional[Sequence[float]] = None,
                device: torch.device = torch.device('cpu'), samples_dir: Optional[str] = None) -> Tuple[Dict[str, Dict], float]:
    """Every run scored (networks on `device`; samples saved into `samples_dir` as ARM-seedN.npz when given), summarised
    per arm, and the common kimg of the equal-kimg comparison."""
    grids = {arm: os.path.join(figures, f'grid-{arm}.png') for arm in dict.fromkeys(run.arm for run in runs)}
    scored = {run: score_run(run, heldout, samples, steps, coherence, inception, grids[run.arm] if run.seed == 0 else None,
                             points, key, ema_lengths, device,
                             os.path.join(samples_dir, f'{run.arm}-seed{run.seed}.npz') if samples_dir else None)
              for run in runs}
    common_kimg = min(result['kimg'] for result in scored.values())
    arms = {arm: [scored[run] for run in sorted(runs, key=lambda r: r.seed) if run.arm == arm] for arm in grids}
    return {arm: summarise(arm, results, common_kimg, grids[arm]) for arm, results in arms.items()}, common_kimg


# --- plots and report ---------------------------------------------------------------------------------------

def plot(arms: Dict[str, Dict], x_key: str, xlabel: str, path: str, seeds: int) -> None:
    """Held-out loss against seconds or kimg: the mean over seeds per arm, shaded from the min to the max."""
    bands = {arm['label']: arm['bands'][x_key] for arm in arms.values()}
    line_plot({label: [(x, mean) for x, mean, _, _ in rows] for label, rows in bands.items()}, path, xlabel,
              f'held-out loss (line: mean of {seeds} seeds; band: min..max)',
              bands={label: [(x, low, high) for x, _, low, high in rows] for label, rows in bands.items()})


def plot_phema(arms: Dict[str, Dict], path: str, seeds: int) -> None:
    """Held-out loss of the reconstructed EMA lengths against sigma_rel: the mean over seeds per arm, shaded min..max."""
    lengths = {arm['label']: arm['phema']['lengths'] for arm in arms.values()}
    line_plot({label: [(e['sigma_rel'], e['mean']) for e in rows] for label, rows in lengths.items()}, path,
              'sigma_rel (post-hoc EMA length)', f'held-out loss (line: mean of {seeds} seeds; band: min..max)',
              bands={label: [(e['sigma_rel'], e['min'], e['max']) for e in rows] for label, rows in lengths.items()})


def kept_text(path: str) -> str:
    """What follows END_MARKER in an existing report (from the marker's line end on), '\\n' for a new one."""
    if not os.path.exists(path):
        return '\n'
    with open(path) as f:
        _, marker, tail = f.read().partition(END_MARKER)
    if not marker:
        raise click.BadParameter(f'{path} has no line "{END_MARKER}" to keep the text after; add it or remove the file',
                                 param_hint='--report')
    return tail


def pm(value: Optional[Dict[str, float]], digits: int) -> str:
    """'mean ± std' of a mean_std() value, '-' for None."""
    return '-' if value is None else f'{value["mean"]:.{digits}f} ± {value["std"]:.{digits}f}'


def setup_text(study: Dict) -> List[str]:
    """The report's title and setup paragraph."""
    env, extra = study['environment'], f' plus `{study["extra"]}`' if study['extra'] else ''
    coherence = (f' Coherence = `demo_shapes.coherence_score` of {study["samples"]} samples of the last snapshot '
                 f'({study["steps"]} Heun steps; 1.0 = every sample mirror-symmetric and one-coloured).') if study['coherence'] else ''
    if study['detector']:
        coherence += (f' FID and KID = Inception-v3 (`fid.py --detector={study["detector"]}`) features of {study["samples"]} '
                      f'samples of the last snapshot ({study["steps"]} Heun steps) against {study["samples"]} random images of '
                      f'`{study["data"]}`; at so few images FID is biased upward, so it compares arms only with each other, '
                      'while KID is unbiased.')
    late = sum(run['curve'][0]['kimg'] > study['common_kimg'] for arm in study['arms'].values() for run in arm['runs'])
    late_text = f' {late} run(s) have their first snapshot after it and take that snapshot\'s loss.' if late else ''
    return [f'# Patch Diffusion ablation on `{study["data"]}`', '',
            f'Made by `{study["command"]}` on {env["cpu"]} ({env["cpu_count"]} CPUs), torch {env["torch"]}. Every arm trains '
            f'the `{study["preset"]}` preset (configs/{study["preset"]}.json){extra} with its flags below, once per seed '
            f'0..{study["seeds"] - 1}, for {study["budget"]:g} s of wall-clock time from the start of its process, with a '
            f'snapshot every {study["tick"]:g} kimg (at most {study["points"]} per run are scored: every k-th, back from the '
            f'last). {study["jobs"]} run(s) train at once with {study["threads"]} thread(s) '
            f'each, seed by seed, never two of one arm together. Held-out loss = EDM-weighted denoising loss of the EMA on '
            f'{study["heldout"]} at sigma in {{{", ".join(f"{s:g}" for s in HELDOUT_SIGMAS)}}} (mean).{coherence} '
            f'Values are mean ± sample standard deviation over the seeds. Equal time = the last snapshot (after the '
            f'budget); equal kimg = each run\'s held-out loss curve interpolated linearly at {study["common_kimg"]:.2f} kimg, '
            f'the fewest kimg any run reached.{late_text}', '']


def arm_table(study: Dict) -> List[str]:
    """One row per arm: flags, kimg, held-out loss at equal time and equal kimg, coherence, FID and KID (equal time)."""
    lines = [f'| arm | flags | kimg | held-out loss, equal time | held-out loss at {study["common_kimg"]:.2f} kimg | coherence | '
             'FID | KID |', '| --- | --- | --- | --- | --- | --- | --- | --- |']
    for arm in study['arms'].values():
        s = arm['summary']
        lines.append(f'| {arm["label"]} | `{" ".join(arm["flags"])}` | {pm(s["kimg"], 1)} | {pm(s["heldout_loss"], 4)} | '
                     f'{pm(s["heldout_loss_at_kimg"], 4)} | {pm(s.get("coherence"), 3)} | {pm(s.get("fid"), 1)} | '
                     f'{pm(s.get("kid"), 4)} |')
    return lines + ['']


def paired_text(study: Dict) -> List[str]:
    """The per-seed comparisons of PAIRS, when any ran."""
    if not study['paired']:
        return []
    label = lambda name: study['arms'][name]['label']  # noqa: E731
    lines = ['## Paired by seed', '', 'Final held-out loss (equal time) of A minus that of B with the same seed; '
             'negative favours A.', '', '| A − B | mean ± std | per seed | seeds favouring A | seeds favouring B |',
             '| --- | --- | --- | --- | --- |']
    lines += [f'| {label(p["a"])} − {label(p["b"])} | {pm(p, 4)} | {", ".join(f"{d:+.4f}" for d in p["differences"])} | '
              f'{p["a_better"]} | {p["b_better"]} |' for p in study['paired']]
    return lines + ['']


def phema_text(study: Dict, rel) -> List[str]:
    """The post-hoc EMA section, when the runs trained with --phema: the best length per arm and the plot."""
    if not study.get('phema'):
        return []
    kid = study['detector'] is not None
    lines = ['## Post-hoc EMA', '', f'Every run trained with `--phema={join_lengths(study["phema"])}`. The EMA lengths '
             f'sigma_rel {", ".join(f"{s:g}" for s in study["ema_lengths"])} are reconstructed at each run\'s last phema '
             'snapshot from the power-function EMA profiles it stored (`training.phema.reconstruct`), put into its last '
             'snapshot\'s network and scored on the same held-out images and sigmas as the classic EMA (`--ema`). Residual = '
             'relative L2 error of the reconstructed averaging profile, ||p_r - sum x_i p_i||² / ||p_r||² (0: exact; above '
             f'{RESIDUAL_WARNING:g} the stored profiles do not represent that length well). Best sigma_rel = the length of '
             'lowest mean held-out loss over seeds (a tie goes to the smaller one); per seed = each run\'s own best.'
             + (' KID of each run\'s best length uses the same sample count and steps as the classic EMA\'s; "KID agrees" '
                'counts the runs where KID ranks that length and the classic EMA as the held-out loss does.' if kid else ''),
             '', '| arm | classic EMA held-out loss | best sigma_rel (by mean held-out) | its held-out loss | per-seed best | '
             'worst residual among the lengths |' + (' classic EMA KID | per-seed best\'s KID | KID agrees |' if kid else ''),
             '| --- | --- | --- | --- | --- | --- |' + (' --- | --- | --- |' if kid else '')]
    for arm in study['arms'].values():
        s = arm['phema']
        row = (f'| {arm["label"]} | {pm(s["classic_heldout_loss"], 4)} | {s["best_sigma_rel"]:g} | {pm(s["best_heldout_loss"], 4)} | '
               f'{", ".join(f"{b:g}" for b in s["per_seed_best"])} | {s["worst_residual"]:.1e} |')
        if kid:
            row += f' {pm(s["classic_kid"], 4)} | {pm(s["per_seed_best_kid"], 4)} | {s["kid_agrees"]} of {len(s["per_seed_best"])} |'
        lines.append(row)
    return lines + ['', f'![held-out loss against post-hoc EMA length]({rel(study["plots"]["sigma_rel"])})', '']


def write_report(path: str, study: Dict) -> None:
    """The Markdown report: setup, table, paired comparison, plots and grids, then the kept text."""
    tail = kept_text(path)
    rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(path)))  # noqa: E731
    arms = study['arms'].values()
    lines = setup_text(study) + arm_table(study) + paired_text(study) + phema_text(study, rel) + [
        '## Held-out loss', '', 'Lines: mean over seeds, where every seed has a snapshot (interpolated linearly); '
        'shaded: min..max over seeds.', '', f'![held-out loss against wall-clock time]({rel(study["plots"]["seconds"])})', '',
        f'![held-out loss against kimg]({rel(study["plots"]["kimg"])})', '', '## Samples (seed 0, last snapshot)', '',
        '| ' + ' | '.join(arm['label'] for arm in arms) + ' |', '| ' + ' | '.join('---' for _ in arms) + ' |',
        '| ' + ' | '.join(f'![{arm["label"]}]({rel(arm["grid"])})' for arm in arms) + ' |', '', END_MARKER]
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + tail)


# --- command line -------------------------------------------------------------------------------------------

def parse_arms(value: str) -> List[str]:
    """Arm names from a comma-separated list; a click error names unknown ones."""
    names = value.split(',')
    unknown = [name for name in names if name not in ARMS]
    if unknown:
        raise click.BadParameter(f'unknown arm(s) {", ".join(unknown)}; choose from {", ".join(ARMS)}', param_hint='--arms')
    return names


def parse_lengths(value: Optional[str], flag: str) -> List[float]:
    """Distinct valid post-hoc EMA sigma_rels, sorted, from a comma-separated list; a click error names a bad one."""
    lengths = parse_float_list(value, flag)
    for sigma_rel in lengths:
        try:
            sigma_rel_to_gamma(sigma_rel)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint=flag) from None
    return sorted(set(lengths))


def open_dataset(path: str, flag: str) -> ImageFolderDataset:
    """An image data set; a click error naming `flag` when it cannot be read."""
    try:
        return ImageFolderDataset(path)
    except DatasetError as err:
        raise click.BadParameter(str(err), param_hint=flag) from None


def heldout_set(path: Optional[str], num: int, data: ImageFolderDataset) -> Tuple[torch.Tensor, str]:
    """Held-out images in [-1, 1] and their description: the first `num` of `path`, else `num` fresh demo images."""
    if path is None:
        return demo_shapes.heldout_images(num, data.resolution), f'{num} fresh demo images (`demo_shapes.heldout_images`)'
    dataset = open_dataset(path, '--heldout')
    if dataset.image_shape != data.image_shape:
        raise click.BadParameter(f'{path}: images are {dataset.image_shape} (CHW), --data\'s are {data.image_shape}',
                                 param_hint='--heldout')
    count = min(num, len(dataset))
    return to_float(torch.from_numpy(np.stack([dataset[i][0] for i in range(count)]))), f'the first {count} images of `{path}`'


def inception_reference(data: str, samples: int, detector: str) -> Tuple[Inception, str]:
    """The detector and the statistics of `samples` random images of --data (cached beside it), and the detector's name."""
    try:
        network, name = load_detector(detector)
    except DetectorError as err:
        raise click.ClickException(str(err)) from None
    print(f'Inception features of {samples} images of {data} (cached beside it)...', flush=True)
    return Inception(network, fid.cached_reference(data, samples, network, name, torch.device('cpu'))), name


@click.command()
@click.option('--data', help='Training data set, e.g. the demo set (dataset_tool.py --source=demo:shapes --resolution=32x32)', metavar='ZIP|DIR', required=True)
@click.option('--heldout', help='Images to score the held-out loss on  [default: fresh demo images]', metavar='ZIP|DIR')
@click.option('--heldout-num', help='Held-out images at most', metavar='INT', type=click.IntRange(min=1), default=512, show_default=True)
@click.option('--arms', 'arm_list', help=f'Arms to run, from {", ".join(ARMS)}', metavar='LIST', default=','.join(DEFAULT_ARMS), show_default=True)
@click.option('--seeds', help='Runs per arm, with train.py --seed=0..N-1', metavar='N', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--jobs', help='Runs that train at once', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--threads', help='OpenMP/MKL threads per run  [default: CPUs // --jobs]', metavar='INT', type=click.IntRange(min=1))
@click.option('--budget', help='Wall-clock seconds of training per run', metavar='SEC', type=click.FloatRange(min=10), default=300, show_default=True)
@click.option('--tick', 'tick_kimg', help='Snapshot interval (train.py names snapshots by whole kimg)', metavar='KIMG', type=click.FloatRange(min=1), default=4, show_default=True)
@click.option('--progressive-kimg', help='Duration of progressive arms: about the kimg p=0.5 reaches in --budget', metavar='KIMG', type=click.FloatRange(min=0, min_open=True))
@click.option('--preset', help='train.py --preset of every run', metavar='NAME', default='demo', show_default=True)
@click.option('--extra', help='More train.py options for every run, e.g. "--batch=16"', metavar='STR', default='')
@click.option('--coherence/--no-coherence', help='Score samples by demo_shapes.coherence_score  [default: without --heldout]', default=None)
@click.option('--fid/--no-fid', 'with_fid', help='Score FID and KID of the samples against as many random images of --data', default=True, show_default=True)
@click.option('--detector', help='fid.py --detector for FID and KID', metavar='NAME|PKL|PT|URL', default=OFFLINE_NAME, show_default=True)
@click.option('--samples', help='Generated images per run for coherence, FID and KID (the grids show up to 64)', metavar='INT', type=click.IntRange(min=1), default=256, show_default=True)
@click.option('--steps', help='Sampling steps', metavar='INT', type=click.IntRange(min=1), default=50, show_default=True)
@click.option('--outdir', help='Where the runs and results.json go', metavar='DIR', default='bench-out/ablation', show_default=True)
@click.option('--report', help='Markdown report to write', metavar='MD', default='docs/results.md', show_default=True)
@click.option('--figures', help='Folder for the plots and grids  [default: ablation/ next to --report]', metavar='DIR')
@click.option('--points', help='Snapshots scored per run at most (every k-th, back from the last)', metavar='INT', type=click.IntRange(min=2), default=8, show_default=True)
@click.option('--device', help='Where to score: held-out loss and sampling (training takes --extra\'s --device)', type=click.Choice(['auto', 'cpu', 'cuda']), default='cpu', show_default=True)
@click.option('--save-samples', 'samples_dir', help='Also save each run\'s --samples samples here as ARM-seedN.npz (uint8 NHWC, key "samples")', metavar='DIR')
@click.option('--score-only', help='Score the finished runs in --outdir again, training nothing', is_flag=True)
@click.option('--phema', help='Post-hoc EMA: train every run with train.py --phema=LIST and score --ema-lengths  [default: off]', metavar='LIST')
@click.option('--ema-lengths', help=f'sigma_rels reconstructed and scored with --phema  [default: {DEFAULT_EMA_LENGTHS}]', metavar='LIST')
@click.pass_context
def main(ctx: click.Context, data: str, heldout: Optional[str], heldout_num: int, arm_list: str, seeds: int, jobs: int,
         threads: Optional[int], budget: float, tick_kimg: float, progressive_kimg: Optional[float], preset: str, extra: str,
         coherence: Optional[bool], with_fid: bool, detector: str, samples: int, steps: int, points: int, outdir: str, report: str, figures: Optional[str], device: str, samples_dir: Optional[str],
         score_only: bool, phema: Optional[str], ema_lengths: Optional[str]) -> None:
    """Train every arm with every seed for the same wall-clock time, then score, plot and report them."""
    arms = parse_arms(arm_list)
    if ema_lengths is not None and phema is None:
        raise click.BadParameter('post-hoc EMA lengths are reconstructed from the profiles of --phema; give it too', param_hint='--ema-lengths')
    phema_lengths = parse_lengths(phema, '--phema')
    lengths = parse_lengths(ema_lengths or DEFAULT_EMA_LENGTHS, '--ema-lengths') if phema else None
    if jobs > len(arms):
        raise click.BadParameter(f'{jobs} runs at once need as many arms, and {len(arms)} are selected', param_hint='--jobs')
    if progressive_kimg is None and any('--progressive=True' in ARMS[arm].flags for arm in arms):
        raise click.BadParameter('a progressive arm is paced by its duration: give about the kimg that p=0.5 reaches in '
                                 '--budget (the p0.5-pixel arm alone shows it)', param_hint='--progressive-kimg')
    try:
        scoring_device = choose_device(device)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint='--device')
    dataset = open_dataset(data, '--data')
    heldout_images, heldout_text = heldout_set(heldout, heldout_num, dataset)
    coherence = heldout is None if coherence is None else coherence
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    figures = figures or os.path.join(os.path.dirname(os.path.abspath(report)), 'ablation')
    kept_text(report)  # a report without END_MARKER fails now, not after the training
    inception, detector_name = inception_reference(data, samples, detector) if with_fid else (None, None)
    setup = Setup(data, preset, tick_kimg, tuple(shlex.split(extra)), budget, threads, progressive_kimg, tuple(phema_lengths))
    runs = study_runs(arms, seeds, outdir)
    train_all(to_train(runs, setup, score_only), setup, jobs)

    torch.set_num_threads(jobs * threads)
    key = dict(heldout=heldout_text, samples=samples, steps=steps, coherence=coherence, points=points, detector=detector_name,
               **(dict(ema_lengths=lengths) if lengths else {}))
    arm_results, common_kimg = score_study(runs, heldout_images, samples, steps, coherence, inception, figures, points, key, lengths,
                                           scoring_device, samples_dir)
    plots = {x_key: os.path.join(figures, f'heldout-loss-{x_key}.png') for x_key in ('seconds', 'kimg')}
    for x_key, xlabel in (('seconds', 'wall-clock seconds'), ('kimg', 'kimg')):
        plot(arm_results, x_key, xlabel, plots[x_key], seeds)
    if lengths:
        plots['sigma_rel'] = os.path.join(figures, 'heldout-loss-sigma-rel.png')
        plot_phema(arm_results, plots['sigma_rel'], seeds)
    options = {name: value for name, value in ctx.params.items() if name not in ('phema', 'ema_lengths') or value is not None}
    study = dict(command='python ' + shlex.join(sys.argv), options=options, environment=environment(scoring_device),
                 data=data, heldout=heldout_text, preset=preset, extra=extra, seeds=seeds, jobs=jobs, threads=threads,
                 budget=budget, tick=tick_kimg, coherence=coherence, detector=detector_name, samples=samples, steps=steps, points=points, common_kimg=common_kimg,
                 plots=plots, arms=arm_results, paired=paired(arm_results),
                 **(dict(phema=phema_lengths, ema_lengths=lengths) if lengths else {}))
    write_json(os.path.join(outdir, 'results.json'), study)
    write_report(report, study)
    print(f'Wrote {report}, {figures} and {os.path.join(outdir, "results.json")}', flush=True)


if __name__ == '__main__':
    main()
