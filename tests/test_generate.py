"""generate.py: seed-determinism across batch and world size, snapshot formats, bad input, in- and outpainting."""

import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate
from training.networks import EDMPrecond
from training.snapshot import save_network_snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ['--steps', '4']


@pytest.fixture(scope='module')
def snapshot(tmp_path_factory):
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=16, img_channels=3, label_dim=3, model_channels=8, channel_mult=[1, 2], num_blocks=1,
                     attn_resolutions=[8]).eval()
    with torch.no_grad():  # untrained, the zero-initialised output layer would make labels and guidance invisible
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    stem = str(tmp_path_factory.mktemp('snap') / 'network-snapshot-000000')
    save_network_snapshot(stem, dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs={}))
    return stem


def run_cli(*args):
    result = CliRunner().invoke(generate.main, [str(a) for a in args])
    return result


def read_dir(folder):
    return {name: np.asarray(PIL.Image.open(os.path.join(folder, name))) for name in sorted(os.listdir(folder))}


def test_same_seed_same_image_for_any_batch_size_and_format(snapshot, tmp_path):
    for batch, ext in [(1, 'pkl'), (7, 'pkl'), (3, 'pt')]:
        network = os.path.dirname(snapshot) if batch == 7 else f'{snapshot}.{ext}'  # a run directory: its newest .pkl
        result = run_cli('--network', network, '--outdir', tmp_path / f'b{batch}{ext}', '--seeds', '0-8', '--batch', batch,
                         '--device', 'cpu', *STEPS)
        assert result.exit_code == 0, result.output
    a, b, c = (read_dir(tmp_path / d) for d in ['b1pkl', 'b7pkl', 'b3pt'])
    assert list(a) == [f'{s:06d}.png' for s in range(9)]
    for name in a:
        assert np.array_equal(a[name], b[name]) and np.array_equal(a[name], c[name]), name
    assert not np.array_equal(a['000000.png'], a['000001.png'])


def test_two_ranks_give_the_same_images_as_one(snapshot, tmp_path):
    common = ['generate.py', f'--network={snapshot}.pkl', '--seeds=0-4', '--batch=2', '--device=cpu', '--steps=4']
    subprocess.run([sys.executable, *common, f'--outdir={tmp_path / "one"}', f'--grid={tmp_path / "one.png"}'], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', *common,
                             f'--outdir={tmp_path / "two"}', f'--grid={tmp_path / "two.png"}'], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = read_dir(tmp_path / 'one'), read_dir(tmp_path / 'two')
    assert list(one) == list(two) and all(np.array_equal(one[k], two[k]) for k in one)
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / 'one.png')), np.asarray(PIL.Image.open(tmp_path / 'two.png')))


def test_grid_and_subdirs(snapshot, tmp_path):
    result = run_cli('--network', f'{snapshot}.pkl', '--outdir', tmp_path / 'out', '--subdirs', '--seeds', '998-1001', '--grid',
                     tmp_path / 'grid.png', '--class', 2, '--cfg', 1.5, '--device', 'cpu', *STEPS)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path / 'out')) == ['000000', '001000']
    assert sorted(os.listdir(tmp_path / 'out' / '001000')) == ['001000.png', '001001.png']
    assert PIL.Image.open(tmp_path / 'grid.png').size == (262, 262)  # 4 images of 16x16, 2 per row, each shown 128 px wide, 2-pixel borders


@pytest.mark.parametrize('make, message', [
    (lambda p: p, 'file not found'),
    (lambda p: p.parent, 'holds no network-snapshot-*.pkl'),
    (lambda p: p.write_bytes(b'just some text') and p, 'not a network snapshot'),
    (lambda p: p.write_bytes(open(p.parent.parent / 'snapshot.pkl', 'rb').read()[:5000]) and p, 'not a network snapshot'),
])
def test_bad_network_gives_one_line_error(snapshot, tmp_path, make, message):
    (tmp_path / 'snapshot.pkl').write_bytes(open(f'{snapshot}.pkl', 'rb').read())
    (tmp_path / 'sub').mkdir()
    network = make(tmp_path / 'sub' / 'bad.pkl')
    result = run_cli('--network', network, '--grid', tmp_path / 'g.png', '--device', 'cpu')
    assert result.exit_code == 2 and message in result.output and 'Traceback' not in result.output


def test_bad_options(snapshot, tmp_path):
    assert 'give --outdir, --grid' in run_cli('--network', f'{snapshot}.pkl').output
    assert 'not a list of integers' in run_cli('--network', f'{snapshot}.pkl', '--grid', tmp_path / 'g.png', '--seeds', 'a-b').output
    assert 'the network has 3 classes' in run_cli('--network', f'{snapshot}.pkl', '--grid', tmp_path / 'g.png', '--class', 5).output
    missing = run_cli('--network', f'{snapshot}.pkl', '--grid', tmp_path / 'g.png', '--inpaint', tmp_path / 'x.png', '--mask', 'm.png')
    assert f'{tmp_path / "x.png"}: cannot read' in missing.output
    PIL.Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / 'x.png')
    assert '--inpaint needs --mask' in run_cli('--network', f'{snapshot}.pkl', '--grid', tmp_path / 'g.png',
                                               '--inpaint', tmp_path / 'x.png').output


@pytest.fixture
def known_image(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    PIL.Image.fromarray(array).save(tmp_path / 'known.png')
    return array


def test_inpainting_keeps_known_pixels(snapshot, tmp_path, known_image):
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    PIL.Image.fromarray(mask).save(tmp_path / 'mask.png')
    result = run_cli('--network', f'{snapshot}.pkl', '--outdir', tmp_path / 'out', '--seeds', '0-1', '--inpaint', tmp_path / 'known.png',
                     '--mask', tmp_path / 'mask.png', '--device', 'cpu', *STEPS)
    assert result.exit_code == 0, result.output
    for image in read_dir(tmp_path / 'out').values():
        keep = mask == 0
        assert np.abs(image[keep].astype(int) - known_image[keep].astype(int)).max() <= 1  # uint8 round trip
        assert np.abs(image[~keep].astype(int) - known_image[~keep].astype(int)).mean() > 5

    PIL.Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / 'none.png')
    result = run_cli('--network', f'{snapshot}.pkl', '--outdir', tmp_path / 'same', '--seeds', '3', '--inpaint', tmp_path / 'known.png',
                     '--mask', tmp_path / 'none.png', '--device', 'cpu', *STEPS)
    assert result.exit_code == 0, result.output
    assert np.abs(read_dir(tmp_path / 'same')['000003.png'].astype(int) - known_image.astype(int)).max() <= 1


def test_outpainting_extends_the_canvas(snapshot, tmp_path, known_image):
    result = run_cli('--network', f'{snapshot}.pkl', '--outdir', tmp_path / 'out', '--seeds', '0', '--inpaint', tmp_path / 'known.png',
                     '--outpaint', '32x16', '--device', 'cpu', *STEPS)
    assert result.exit_code == 0, result.output
    image = read_dir(tmp_path / 'out')['000000.png']
    assert image.shape == (16, 32, 3)
    assert np.abs(image[:, 8:24].astype(int) - known_image.astype(int)).max() <= 1
    assert 'smaller than the 16x16 image' in run_cli('--network', f'{snapshot}.pkl', '--grid', tmp_path / 'g.png', '--inpaint',
                                                     tmp_path / 'known.png', '--outpaint', '8x8').output


@pytest.mark.parametrize('args, expected', [
    ([], dict(num_steps=50, S_churn=0, cfg=1.0)),
    (['--sampler=adm'], dict(num_steps=256, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003, cfg=1.0)),
    (['--sampler=adm', '--preset=imagenet256-latent'], dict(num_steps=256, S_churn=40, cfg=1.3)),
    (['--sampler=adm', '--preset=imagenet256-latent', '--steps=7', '--cfg=2'], dict(num_steps=7, S_churn=40, cfg=2.0)),
], ids=['defaults', 'adm', 'adm+preset', 'flags-win'])
def test_sampling_settings_precedence(args, expected):
    # Flags given on the command line > the preset's "sampling" > the --sampler set > the flags' defaults.
    ctx = generate.main.make_context('generate.py', ['--network=x.pkl', '--grid=g.png', *args])
    params = dict(ctx.params)
    named = {k: params.pop(k) for k in ('sampler', 'preset')}
    sampler_kwargs = {k: v for k, v in params.items() if k in ('num_steps', 'sigma_min', 'sigma_max', 'rho', 'S_churn',
                                                                'S_min', 'S_max', 'S_noise', 'solver', 'cfg')}
    resolved = generate.resolve_sampling(ctx, sampler_kwargs, named['sampler'], named['preset'])
    assert {k: resolved[k] for k in expected} == expected


def test_unknown_sampling_preset_is_a_click_error(snapshot, tmp_path):
    result = run_cli(f'--network={snapshot}.pkl', f'--grid={tmp_path / "g.png"}', '--preset=nope')
    assert result.exit_code == 2 and 'unknown preset "nope"' in result.output and 'imagenet256-latent' in result.output


def test_grid_enlarges_small_samples_by_whole_nearest_factors(tmp_path):
    from training.images import save_image_grid
    images = torch.randint(0, 256, [3, 3, 24, 24], dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    save_image_grid(images, str(tmp_path / 'grid.png'), cols=2)  # 128 / 24 rounds up to a factor of 6
    grid = np.asarray(PIL.Image.open(tmp_path / 'grid.png'))
    assert grid.shape == (2 * 144 + 3 * 2, 2 * 144 + 3 * 2, 3)  # two 144-pixel cells and three 2-pixel borders a side
    starts = [2, 2 + 144 + 2]
    for i, image in enumerate(images):
        r, c = divmod(i, 2)
        tile = grid[starts[r]:starts[r] + 144, starts[c]:starts[c] + 144]
        expected = image.permute(1, 2, 0).numpy().repeat(6, axis=0).repeat(6, axis=1)  # every pixel a 6x6 block
        np.testing.assert_array_equal(tile, expected)
    cells = np.zeros(grid.shape[:2], bool)
    for top in starts:
        for left in starts:
            cells[top:top + 144, left:left + 144] = True
    assert (grid[~cells] == 128).all()  # everything outside the cells is the grey border
    assert (grid[starts[1]:starts[1] + 144, starts[1]:starts[1] + 144] == 0).all()  # the empty fourth cell stays black
    save_image_grid(images, str(tmp_path / 'large.png'), cols=3, min_tile=16)  # already wide enough: 1:1
    assert PIL.Image.open(tmp_path / 'large.png').size == (3 * 24 + 4 * 2, 24 + 2 * 2)


def test_class_and_guidance_reach_the_sampler(snapshot, tmp_path):
    """generate.py --class/--cfg give the images of generate_images() with those settings, and each setting shows."""
    from training.sampler import generate_images
    from training.snapshot import load_network
    net = load_network(snapshot + '.pkl')
    images = {}
    for class_idx, cfg in [(2, 1.5), (2, 1.0), (1, 1.5)]:
        outdir = tmp_path / f'{class_idx}-{cfg}'
        result = run_cli('--network', snapshot + '.pkl', '--seeds', '0-2', '--outdir', outdir, '--class', class_idx, '--cfg', cfg,
                         '--device', 'cpu', *STEPS)
        assert result.exit_code == 0, result.output
        images[class_idx, cfg] = np.stack(list(read_dir(outdir).values()))
        expected = generate_images(net, [0, 1, 2], torch.device('cpu'), class_idx=class_idx, cfg=cfg, num_steps=4)
        assert np.array_equal(images[class_idx, cfg], expected.permute(0, 2, 3, 1).numpy())
    assert not np.array_equal(images[2, 1.5], images[2, 1.0]) and not np.array_equal(images[2, 1.5], images[1, 1.5])
