"""fid.py: FID and KID formulas, a custom TorchScript detector end to end, 1 vs 2 processes, --network, clear errors."""

import copyreg
import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dataset_tool
import fid
from multiproc import free_port
from training.networks import EDMPrecond
from training.snapshot import save_network_snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ['--device', 'cpu', '--workers', '0']


class ColourStats(torch.nn.Module):
    """A stand-in for Inception-v3 with its call signature: quadrant colour means and stds through fixed random projections."""

    def __init__(self):
        super().__init__()
        self.register_buffer('proj', torch.randn([15, 16], generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = x.to(torch.float32) / 255
        pooled = torch.cat([torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1), x.flatten(2).std(dim=2)], dim=1)
        return torch.tanh(pooled @ self.proj * 2)


def pickle_like_official(module: torch.jit.ScriptModule) -> bytes:
    """A plain pickle of a ScriptModule (pickle.dumps alone refuses ScriptModules in torch 2.x: it reduces to torch.jit.load)."""
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    stream = io.BytesIO()
    pickler = pickle.Pickler(stream)
    pickler.dispatch_table = copyreg.dispatch_table.copy()
    pickler.dispatch_table[torch.jit.RecursiveScriptModule] = lambda m: (torch.jit.load, (io.BytesIO(buffer.getvalue()),))
    pickler.dump(module)
    return stream.getvalue()


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """Two demo data sets, the detector as a jit.save file and as a pickle, and a tiny network snapshot."""
    root = tmp_path_factory.mktemp('fid')
    for name, seed in [('a', 0), ('b', 1)]:
        dataset_tool.convert('demo:shapes', str(root / f'{name}.zip'), (16, 16), None, 64, seed)
    detector = torch.jit.script(ColourStats())
    torch.jit.save(detector, str(root / 'detector.pt'))
    (root / 'detector.pkl').write_bytes(pickle_like_official(detector))
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=16, img_channels=3, model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
    save_network_snapshot(str(root / 'net'), dict(ema=net.eval(), loss_fn=None, augment_pipe=None, dataset_kwargs={}))
    result = run('ref', '--data', root / 'a.zip', '--dest', root / 'ref-a.npz', '--detector', root / 'detector.pt', '--batch', 16)
    assert result.exit_code == 0, result.output
    return root


def run(*args):
    return CliRunner().invoke(fid.main, [str(a) for a in args] + FAST)


def scores(stdout):
    lines = dict(line.split(' ', 1) for line in stdout.splitlines() if line.startswith(('FID ', 'KID ')))
    return float(lines['FID']), lines['KID']


def test_fid_of_diagonal_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2, a, b = rng.normal(size=8), rng.normal(size=8), rng.uniform(0.1, 2, size=8), rng.uniform(0.1, 2, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.calculate_fid(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    assert fid.calculate_fid(mu2, np.diag(b), mu1, np.diag(a)) == pytest.approx(expected, rel=1e-9)
    x = rng.normal(size=[200, 8])
    sigma = np.cov(x, rowvar=False)
    assert abs(fid.calculate_fid(x.mean(0), sigma, x.mean(0), sigma)) < 1e-6
    assert np.isfinite(fid.calculate_fid(mu1, np.zeros([8, 8]), mu2, np.diag(b)))  # singular covariance


def test_kid_is_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(0)
    x, y, z = rng.normal(size=[400, 16]), rng.normal(size=[400, 16]), rng.normal(0.3, 1.2, size=[400, 16])
    same = fid.kid_subset_estimates(x, y, num_subsets=50, max_subset_size=100)
    different = fid.kid_subset_estimates(x, z, num_subsets=50, max_subset_size=100)
    assert abs(same.mean()) < 3 * same.std() / np.sqrt(len(same))
    assert different.mean() > 10 * abs(same.mean()) and different.mean() > 3 * different.std() / np.sqrt(len(different))
    assert fid.calculate_kid(x, z, num_subsets=50, max_subset_size=100) == pytest.approx(different.mean())
    assert fid.calculate_kid(x, z, num_subsets=5, seed=1) == fid.calculate_kid(x, z, num_subsets=5, seed=1)


def kid_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the kernel k(a, b) = (a.b / d + 1)^3, written out pair by pair (Binkowski et al. 2018)."""
    k = lambda a, b: (a @ b / len(a) + 1) ** 3  # noqa: E731
    m = len(x)
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    return within - 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel():
    """With subsets as large as the sets the subsets are permutations, and the estimate does not depend on order."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=[5, 3]), rng.normal(0.5, 2, size=[5, 3])
    expected = kid_by_hand(x, y)
    assert fid.kid_subset_estimates(x, y, num_subsets=3) == pytest.approx([expected] * 3, rel=1e-12)
    assert fid.calculate_kid(x, y, num_subsets=2, seed=5) == pytest.approx(expected, rel=1e-12)
    # Sets of different sizes: subsets take the smaller size, m = 4.
    longer = np.concatenate([x, rng.normal(size=[2, 3])])
    estimates = fid.kid_subset_estimates(longer, y[:4], num_subsets=20, seed=3)
    rng_replay = np.random.RandomState(3)
    first = longer[rng_replay.choice(7, 4, replace=False)], y[:4][rng_replay.choice(4, 4, replace=False)]
    assert estimates[0] == pytest.approx(kid_by_hand(*first), rel=1e-12)


def test_kid_seed_and_defaults_are_edms():
    """100 subsets of at most 1000 images, as EDM's and StyleGAN's KID; the seed picks the subsets."""
    import inspect
    for function in (fid.kid_subset_estimates, fid.calculate_kid):
        parameters = inspect.signature(function).parameters
        assert (parameters['num_subsets'].default, parameters['max_subset_size'].default, parameters['seed'].default) == (100, 1000, 0)
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=[30, 4]), rng.normal(size=[30, 4])
    for seed in (0, 1):
        assert fid.calculate_kid(x, y, num_subsets=4, max_subset_size=10, seed=seed) == \
            pytest.approx(fid.kid_subset_estimates(x, y, 4, 10, seed).mean(), rel=1e-12)
    assert fid.calculate_kid(x, y, 4, 10, seed=1) != fid.calculate_kid(x, y, 4, 10, seed=0)


@pytest.mark.parametrize('eigenvalues, valid', [
    ([1e4, 1.0, -5e-3], True),     # rounding error of 1e-2 relative to the largest eigenvalue is tolerated ...
    ([1e4, 1.0, -2e-2], False),    # ... twice that is not
    ([0.5, 0.1, -0.9e-6], True),   # below 1, the tolerance is 1e-6 absolute
    ([0.5, 0.1, -1.5e-6], False),
    ([1.0, 0.2, -0.5], False)])
def test_psd_sqrt_tolerates_only_rounding_sized_negative_eigenvalues(eigenvalues, valid):
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=[3, 3]))
    sigma = (q * eigenvalues) @ q.T
    if valid:
        root = fid.psd_sqrt(sigma)
        np.testing.assert_allclose(root @ root, (q * np.clip(eigenvalues, 0, None)) @ q.T, atol=1e-9 * max(eigenvalues))
    else:
        with pytest.raises(ValueError, match='negative eigenvalue'):
            fid.psd_sqrt(sigma)


def test_feature_stats_are_numpys_mean_and_covariance():
    class Flatten(torch.nn.Module):
        def forward(self, x, return_features=False):
            return x.flatten(1).to(torch.float32)
    images = torch.randint(0, 256, [10, 3, 2, 2], generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    stats = fid.compute_feature_stats([images[:4], images[4:]], Flatten(), torch.device('cpu'), keep_features=True)
    features = images.flatten(1).double().numpy()
    assert stats['num'] == 10
    np.testing.assert_allclose(stats['mu'], features.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats['sigma'], np.cov(features, rowvar=False), rtol=1e-10, atol=1e-9)
    np.testing.assert_array_equal(stats['features'], features.astype(np.float32))


@pytest.mark.parametrize('detector', ['detector.pt', 'detector.pkl'])
def test_ref_and_calc_with_a_custom_detector(files, tmp_path, detector):
    result = run('ref', '--data', files / 'a.zip', '--dest', tmp_path / 'sub' / 'ref.npz', '--detector', files / detector, '--batch', 10)
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / 'sub' / 'ref.npz') as ref:
        assert ref['mu'].dtype == np.float64 and ref['mu'].shape == (16,) and ref['sigma'].shape == (16, 16)
        assert ref['features'].dtype == np.float32 and ref['features'].shape == (64, 16)
        assert np.allclose(ref['mu'], ref['features'].mean(0), atol=1e-6)
        assert np.allclose(ref['sigma'], np.cov(ref['features'].astype(np.float64), rowvar=False), atol=1e-6)

    json_path = tmp_path / 'scores.jsonl'
    common = ['--ref', tmp_path / 'sub' / 'ref.npz', '--detector', files / detector, '--num', 64, '--json', json_path]
    same, shifted = run('calc', '--images', files / 'a.zip', *common), run('calc', '--images', files / 'b.zip', *common)
    assert same.exit_code == 0 and shifted.exit_code == 0, same.output + shifted.output
    (fid_same, kid_same), (fid_shifted, kid_shifted) = scores(same.stdout), scores(shifted.stdout)
    assert abs(fid_same) < 1e-6 and fid_shifted > 1e-3
    assert float(kid_shifted) > float(kid_same)  # the unbiased estimate of a set against itself is slightly negative
    records = [json.loads(line) for line in json_path.read_text().splitlines()]
    assert [r['source'] for r in records] == [str(files / 'a.zip'), str(files / 'b.zip')]
    assert records[1]['fid'] == pytest.approx(fid_shifted, rel=1e-5) and records[1]['kid'] == pytest.approx(float(kid_shifted), rel=1e-5)
    assert records[1]['num'] == 64 and records[1]['ref'] == str(tmp_path / 'sub' / 'ref.npz')
    assert records[1]['detector'] == str(files / detector)


def test_grayscale_images_are_repeated_to_rgb(files):
    detector, _name = fid.load_detector(str(files / 'detector.pt'))
    gray = torch.randint(0, 256, [6, 1, 16, 16], dtype=torch.uint8)
    one = fid.compute_feature_stats([gray], detector, torch.device('cpu'), keep_features=True)
    three = fid.compute_feature_stats([gray.repeat(1, 3, 1, 1)], detector, torch.device('cpu'), keep_features=True)
    assert np.array_equal(one['features'], three['features']) and one['num'] == 6


def test_ref_without_features_still_gives_fid(files, tmp_path):
    with np.load(files / 'ref-a.npz') as ref:
        np.savez(tmp_path / 'edm.npz', mu=ref['mu'], sigma=ref['sigma'])
    result = run('calc', '--images', files / 'b.zip', '--ref', tmp_path / 'edm.npz', '--detector', files / 'detector.pt', '--num', 64)
    assert result.exit_code == 0, result.output
    fid_value, kid = scores(result.stdout)
    assert fid_value > 1e-3 and kid.startswith('unavailable') and 'fid.py ref' in kid


def test_two_processes_give_the_same_statistics_as_one(files, tmp_path):
    args = ['ref', f'--data={files / "a.zip"}', f'--detector={files / "detector.pt"}', '--batch=16', *FAST]
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             'fid.py', *args, f'--dest={tmp_path / "two.npz"}'], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(files / 'ref-a.npz') as one, np.load(tmp_path / 'two.npz') as two:
        assert np.allclose(one['mu'], two['mu'], rtol=1e-10, atol=0)
        assert np.allclose(one['sigma'], two['sigma'], rtol=1e-10, atol=1e-14)
        assert np.array_equal(one['features'], two['features'])  # gathered back in data set order


def test_calc_network_scores_samples_in_memory(files, tmp_path):
    args = ['calc', '--network', files / 'net.pkl', '--ref', files / 'ref-a.npz', '--detector', files / 'detector.pt', '--num', 8,
            '--steps', 2, '--batch', 8]
    first, second = run(*args), run(*args, '--seeds', '0-9')  # --num takes the first 8 of the seeds
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    assert np.isfinite(scores(first.stdout)[0]) and scores(first.stdout) == scores(second.stdout)
    assert not list(tmp_path.iterdir())


def test_unreachable_detector_url_says_where_to_get_it(files, tmp_path, monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    url = f'http://127.0.0.1:{free_port()}/inception-2015-12-05.pkl'
    result = run('ref', '--data', files / 'a.zip', '--dest', tmp_path / 'r.npz', '--detector', url)
    assert result.exit_code == 1 and 'Traceback' not in result.output
    message = result.output.strip()
    assert message.count('\n') == 0 and url in message and '--detector=PATH' in message
    assert str(tmp_path / 'cache') in message and 'DNNLIB_CACHE_DIR' in message
    assert not (tmp_path / 'r.npz').exists()


@pytest.mark.parametrize('make, message', [
    (lambda p: None, 'file not found'),
    (lambda p: p.write_bytes(b'not an npz at all'), 'not an .npz of reference statistics'),
    (lambda p: p.write_bytes((p.parent / 'good.npz').read_bytes()[:300]), 'not an .npz of reference statistics'),
    (lambda p: np.savez(str(p), mean=np.zeros(3)), 'has no "mu" and "sigma"'),
])
def test_bad_ref_gives_one_line_error(files, tmp_path, make, message):
    (tmp_path / 'good.npz').write_bytes((files / 'ref-a.npz').read_bytes())
    make(tmp_path / 'ref.npz')
    result = run('calc', '--images', files / 'a.zip', '--ref', tmp_path / 'ref.npz', '--detector', files / 'detector.pt', '--num', 64)
    assert result.exit_code == 1 and 'Traceback' not in result.output, result.output
    assert message in result.output and str(tmp_path / 'ref.npz') in result.output and result.output.strip().count('\n') == 0


@pytest.mark.parametrize('args, code, message', [
    (['--images', '{a}', '--num', 65], 1, 'has 64 images, fewer than --num=65'),
    (['--network', '{net}', '--num', 8, '--seeds', '0-6'], 2, '7 seeds, fewer than --num=8'),
    (['--images', '{nowhere}', '--num', 8], 2, 'no such directory or zip file'),
    (['--images', '{a}', '--network', '{net}', '--num', 8], 2, 'exactly one of --images and --network'),
    (['--num', 8], 2, 'exactly one of --images and --network'),
    (['--network', '{net}', '--num', 8, '--cfg', 2], 2, 'guidance needs a class-conditional network'),
])
def test_bad_calc_arguments_give_clear_errors(files, args, code, message):
    paths = dict(a=files / 'a.zip', net=files / 'net.pkl', nowhere=files / 'nowhere')
    args = [str(a).format(**paths) for a in args]
    result = run('calc', '--ref', files / 'ref-a.npz', '--detector', files / 'detector.pt', *args)
    assert result.exit_code == code and 'Traceback' not in result.output, result.output
    assert message in result.output


def test_demo_scores_a_snapshot_without_a_detector(files, tmp_path):
    result = CliRunner().invoke(fid.main, ['demo', '--network', str(files / 'net.pkl'), '--num', '4', '--steps', '2', '--heldout', '8',
                                           '--device', 'cpu', '--grid', str(tmp_path / 'grid.png'), '--json', str(tmp_path / 'r.jsonl')])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(' ', 2)[:2] for line in result.stdout.splitlines() if line.startswith(('coherence_score', 'heldout_loss')))
    assert 0 <= float(lines['coherence_score']) <= 1 and float(lines['heldout_loss']) > 0
    record = json.loads((tmp_path / 'r.jsonl').read_text())
    assert record['coherence'] == pytest.approx(float(lines['coherence_score']), abs=1e-4) and record['num'] == 4
    assert set(record['heldout_loss']) == {'sigma=0.05', 'sigma=0.2', 'sigma=0.5', 'sigma=1', 'sigma=2', 'sigma=5', 'mean'}
    shares = record['colour_shares']
    assert set(shares) == {'red', 'green', 'blue', 'none'} and sum(shares.values()) == pytest.approx(1)
    assert all(share * 4 == round(share * 4) for share in shares.values())  # shares of 4 samples
    assert next(line for line in result.stdout.splitlines() if line.startswith('colour_shares')).count('0.') >= 1
    assert PIL.Image.open(tmp_path / "grid.png").size == (262, 262)  # 2x2 samples of 16x16, each shown 128 px wide, 2-pixel borders


def test_demo_fid_num_scores_fid_on_the_first_samples_only(files, tmp_path):
    # FID and KID of samples 0-3 against 4 data set images, once as all of --num=4 and once as --fid-num=4 of --num=6:
    # the same images on both sides, so the same scores; coherence and colours count all 6.
    def demo(*args):
        result = CliRunner().invoke(fid.main, ['demo', '--network', str(files / 'net.pkl'), '--steps', '2', '--heldout', '8',
                                               '--device', 'cpu', '--fid-data', str(files / 'a.zip'), '--detector',
                                               str(files / 'detector.pt'), '--json', str(tmp_path / 'r.jsonl'), *args])
        assert result.exit_code == 0, result.output
        return json.loads((tmp_path / 'r.jsonl').read_text().splitlines()[-1]), result.output
    (whole, _), (first, output) = demo('--num', '4'), demo('--num', '6', '--fid-num', '4')
    assert (whole['fid_num'], first['fid_num'], first['num']) == (4, 4, 6)
    assert first['fid'] == pytest.approx(whole['fid'], rel=1e-6) and first['kid'] == pytest.approx(whole['kid'], rel=1e-6, abs=1e-9)
    assert 'Inception features of 4 samples and 4 images' in output
    assert all(share * 6 == round(share * 6) for share in first['colour_shares'].values())  # shares of 6 samples
    result = CliRunner().invoke(fid.main, ['demo', '--network', str(files / 'net.pkl'), '--num', '4', '--fid-num', '5',
                                           '--fid-data', str(files / 'a.zip'), '--device', 'cpu'])
    assert result.exit_code == 2 and '--fid-num' in result.output and 'more than the 4 samples' in result.output
