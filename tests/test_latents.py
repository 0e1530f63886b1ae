"""Latent Patch Diffusion with a tiny randomly initialised AutoencoderKL (no download): encode once, store, load, train,
generate and decode; the pre-encoded and on-the-fly paths agree; guidance on a conditional latent model; and the clear
messages when diffusers is missing or a VAE cannot be found."""

import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

import training_helpers as h
from training.dataset import DatasetError, ImageFolderDataset, LatentFolderDataset
from training.latents import INSTALL_HINT, LatentCodec, LatentError, load_vae, sample_latents
from training.networks import EDMPrecond
from training.patch import coordinate_grid
from training.sampler import edm_sampler, generate_images

pytest.importorskip('diffusers', reason='the latent path needs the optional extra: ' + INSTALL_HINT)

RES = 32      # pixels
FACTOR = 4    # the tiny VAE downsamples twice: 8x8x4 latents
NUM = 24


@pytest.fixture(scope='module')
def files(tmp_path_factory) -> dict:
    """A tiny VAE saved like a hub download, a labelled noise-image zip (no symmetry, so flips matter), its latents."""
    from diffusers import AutoencoderKL
    root = tmp_path_factory.mktemp('latent')
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * 3,
                        up_block_types=('UpDecoderBlock2D',) * 3, block_out_channels=(8, 8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=RES)
    vae.save_pretrained(str(root / 'vae'))
    rng = np.random.RandomState(0)
    with zipfile.ZipFile(root / 'images.zip', 'w') as z:
        labels = []
        for i in range(NUM):
            buffer = io.BytesIO()
            PIL.Image.fromarray((rng.rand(RES, RES, 3) * 255).astype(np.uint8)).save(buffer, format='png')
            z.writestr(f'img{i:03d}.png', buffer.getvalue())
            labels.append([f'img{i:03d}.png', i % 3])
        z.writestr('dataset.json', json.dumps({'labels': labels}))
    paths = dict(vae=str(root / 'vae'), images=str(root / 'images.zip'), latents=str(root / 'latents.zip'), root=root)
    encode(paths['images'], paths['latents'], paths['vae'], '--xflip=True', '--batch=5')
    return paths


def encode(source: str, dest: str, vae: str, *args: str, env: dict = None) -> subprocess.CompletedProcess:
    """dataset_tool.py --encode-latents; asserts success unless env is given."""
    proc = subprocess.run([h.PYTHON, os.path.join(h.REPO, 'dataset_tool.py'), f'--source={source}', f'--dest={dest}',
                           '--encode-latents', f'--vae={vae}', '--device=cpu', *args], cwd=h.REPO,
                          env=env or h.subprocess_env(), capture_output=True, text=True, timeout=120)
    assert env is not None or proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """The command failed with a click 'Error:' line containing every fragment and no traceback."""
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and 'Traceback' not in output, output[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith('Error:')]
    assert errors and all(f in errors[-1] for f in fragments), proc.stderr[-3000:]


def test_encode_store_load_train_generate_decode(files, tmp_path):
    dataset = LatentFolderDataset(files['latents'], xflip=True, use_labels=True)
    assert len(dataset) == 2 * NUM and dataset.image_shape == [4, RES // FACTOR, RES // FACTOR] and dataset.label_dim == 3
    assert dataset.latent == dict(vae=files['vae'], scale=0.18215)
    moments, label = dataset[0]
    assert moments.shape == (8, 8, 8) and moments.dtype == np.float32 and (moments[4:] > 0).all()  # std > 0

    proc = h.run_train(f'--outdir={tmp_path}/runs', f'--data={files["latents"]}', '--latents', '--cond=True', '--xflip=True',
                       '--augment=0', '--cbase=8', '--cres=1,1', '--blocks=1', '--attn=4', '--batch=8', '--device=cpu',
                       '--workers=0', '--duration=0.0001', '--tick=0.00005', '--snap=1', '--preview=True',
                       '--preview-steps=2', '--seed=1')
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = h.only_run_dir(str(tmp_path / 'runs'))
    assert 'patch0.5-latent' in run_dir
    with PIL.Image.open(os.path.join(run_dir, 'preview-000000.png')) as preview:
        assert preview.size == (8 * 128 + 9 * 2, 8 * 128 + 9 * 2)  # 64 decoded 32x32 images, each shown 128 px wide, 2-pixel borders

    grid = tmp_path / 'grid.png'
    proc = subprocess.run([h.PYTHON, os.path.join(h.REPO, 'generate.py'), f'--network={run_dir}', '--seeds=0-5',
                           '--steps=3', '--cfg=1.3', '--device=cpu', f'--grid={grid}', f'--outdir={tmp_path / "png"}'],
                          cwd=h.REPO, env=h.subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with PIL.Image.open(tmp_path / 'png' / '000005.png') as image:
        assert image.size == (RES, RES) and image.mode == 'RGB'
    with PIL.Image.open(grid) as image:
        assert image.size == (3 * 128 + 4 * 2, 2 * 128 + 3 * 2)  # 6 decoded 32x32 images, 3 per row, each shown 128 px wide, 2-pixel borders

    # fid.py scores the decoded samples, with the ImageNet preset's guidance; a VAE that is not there is a clear error.
    import fid
    from click.testing import CliRunner
    from test_fid import ColourStats
    detector = str(tmp_path / 'detector.pt')
    torch.jit.save(torch.jit.script(ColourStats()), detector)
    common = ['--detector', detector, '--device', 'cpu', '--workers', '0']
    result = CliRunner().invoke(fid.main, ['ref', '--data', files['images'], '--dest', str(tmp_path / 'ref.npz'), *common])
    assert result.exit_code == 0, result.output
    calc = ['calc', '--network', run_dir, '--ref', str(tmp_path / 'ref.npz'), '--num', '6', '--steps', '2',
            '--preset', 'imagenet256-latent', '--json', str(tmp_path / 'fid.jsonl'), *common]
    result = CliRunner().invoke(fid.main, calc)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / 'fid.jsonl').read_text())['num'] == 6
    result = CliRunner().invoke(fid.main, calc + ['--vae', str(tmp_path / 'no-vae')])
    assert result.exit_code == 2 and '--vae' in result.output and 'no-vae' in result.output


def test_pre_encoded_and_on_the_fly_give_the_same_latents(files):
    codec = LatentCodec(files['vae'], 0.18215)
    images = ImageFolderDataset(files['images'], xflip=True)
    stored = LatentFolderDataset(files['latents'], xflip=True)
    for idx in (1, NUM + 1):  # an image and the x-flipped copy of it
        image = torch.from_numpy(images[idx][0])[None]
        moments = torch.from_numpy(stored[idx][0])[None]
        torch.testing.assert_close(moments, codec.encode_moments(image), rtol=1e-4, atol=1e-4)
        generator = torch.Generator().manual_seed(idx)
        on_the_fly = codec.encode(image, generator=torch.Generator().manual_seed(idx))
        torch.testing.assert_close(sample_latents(moments, 0.18215, generator), on_the_fly, rtol=1e-4, atol=1e-4)
    # The flip is encoded, not mirrored: the VAE does not commute with flips.
    flipped_moments = torch.from_numpy(stored[NUM + 1][0])
    assert not torch.allclose(flipped_moments, torch.from_numpy(stored[1][0]).flip(2), atol=1e-3)


def test_training_on_the_fly_and_its_snapshot(files, tmp_path):
    proc = h.run_train(f'--outdir={tmp_path}/runs', f'--data={files["images"]}', '--latents-on-the-fly',
                       f'--vae={files["vae"]}', '--augment=0', '--cbase=8', '--cres=1,1', '--blocks=1', '--attn=4',
                       '--batch=8', '--device=cpu', '--workers=0', '--duration=0.00005', '--tick=0.00005', '--seed=1')
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(h.only_run_dir(str(tmp_path / 'runs')), 'training_options.json')) as f:
        options = json.load(f)
    assert options['latent_kwargs'] == dict(on_the_fly=True, vae=files['vae'], scale=0.18215)
    from training.snapshot import load_network
    net = load_network(h.only_run_dir(str(tmp_path / 'runs')))
    assert (net.img_resolution, net.img_channels, net.latent) == (RES // FACTOR, 4, dict(vae=files['vae'], scale=0.18215))


def test_guidance_with_a_conditional_latent_model(files):
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=4, label_dim=3, model_type='SongUNet', model_channels=8,
                     channel_mult=[1, 1], num_blocks=1, attn_resolutions=[4], latent=dict(vae=files['vae'], scale=0.18215)).eval()
    with torch.no_grad():
        for param in net.parameters():  # a trained-looking net: the zero-initialised output layers would hide the labels
            param.normal_(0, 0.3)
    latents = torch.randn([2, 4, 8, 8], dtype=torch.float64)
    labels = torch.nn.functional.one_hot(torch.tensor([0, 2]), 3).float()
    # One Euler step from sigma_max lands on the guided denoiser output at sigma_max.
    guided = edm_sampler(net, latents, class_labels=labels, num_steps=1, cfg=1.3)
    x_pos = coordinate_grid(8, 8).expand(2, -1, -1, -1)
    with torch.no_grad():
        x = (latents * 80).float()
        cond = net(x, 80.0, x_pos=x_pos, class_labels=labels).double()
        uncond = net(x, 80.0, x_pos=x_pos, class_labels=torch.zeros_like(labels)).double()
    torch.testing.assert_close(guided, uncond + 1.3 * (cond - uncond), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(guided, cond, atol=1e-3)

    codec = LatentCodec(files['vae'], 0.18215)
    images = generate_images(net, [0, 1, 2], torch.device('cpu'), num_steps=2, cfg=1.3, decoder=codec.decode)
    assert images.shape == (3, 3, RES, RES) and images.dtype == torch.uint8


def test_missing_diffusers_message(files, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'diffusers', None)  # import diffusers now raises ImportError
    with pytest.raises(LatentError, match='requirements-latent.txt'):
        load_vae(files['vae'])
    monkeypatch.undo()

    # The CLIs in a Python where importing diffusers fails.
    (tmp_path / 'hide' / 'diffusers').mkdir(parents=True)
    (tmp_path / 'hide' / 'diffusers' / '__init__.py').write_text('raise ImportError("No module named diffusers")\n')
    env = h.subprocess_env()
    env['PYTHONPATH'] = str(tmp_path / 'hide') + os.pathsep + env['PYTHONPATH']
    proc = encode(files['images'], str(tmp_path / 'x.zip'), files['vae'], env=env)
    assert_one_line_error(proc, '--vae', INSTALL_HINT)
    assert not os.path.exists(tmp_path / 'x.zip')
    proc = subprocess.run(h.train_cmd(f'--outdir={tmp_path}/runs', f'--data={files["images"]}', '--latents-on-the-fly',
                                      f'--vae={files["vae"]}', '--augment=0', '--device=cpu'),
                          cwd=h.REPO, env=env, capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc, INSTALL_HINT)


def test_unreachable_vae_and_bad_latent_options(files, tmp_path):
    env = dict(h.subprocess_env(), HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'))
    proc = encode(files['images'], str(tmp_path / 'x.zip'), 'no-such-user/no-such-vae', env=env)
    assert_one_line_error(proc, '--vae', 'no-such-user/no-such-vae', 'local path')

    common = [f'--outdir={tmp_path}/runs', '--device=cpu', '--dry-run']
    proc = h.run_train(*common, f'--data={files["images"]}', '--latents', '--augment=0')
    assert_one_line_error(proc, '--data', 'no latents', '--encode-latents')
    proc = h.run_train(*common, f'--data={files["latents"]}', '--latents')  # the default augment is 0.12
    assert_one_line_error(proc, '--augment', 'latent')
    proc = h.run_train(*common, f'--data={files["latents"]}', '--latents', '--latents-on-the-fly', '--augment=0')
    assert_one_line_error(proc, 'exclude each other')

    unflipped = str(tmp_path / 'unflipped.zip')
    encode(files['images'], unflipped, files['vae'], '--max-images=4')
    with pytest.raises(DatasetError, match='--xflip=True'):
        LatentFolderDataset(unflipped, xflip=True)
    assert len(LatentFolderDataset(unflipped)) == 4


def test_latent_presets():
    from train import build_config, main, preset_options, resolve_options
    from training.networks import check_patch_size
    from training.patch import PatchSchedule
    from training.presets import list_presets, sampling_preset
    for name in list_presets():  # every preset's keys are train.py options
        ctx = main.make_context('train.py', [f'--preset={name}', '--outdir=o', '--data=d'])
        resolve_options(ctx, ctx.params)
    for name, cond in [('imagenet256-latent', True), ('lsun256-latent', False)]:
        c = build_config(preset_options(name), 'd', 32, world_size=1)
        assert c.dataset_kwargs.class_name == 'training.dataset.LatentFolderDataset' and c.dataset_kwargs.xflip
        assert c.latent_kwargs == dict(on_the_fly=False, vae=None) and c.augment_kwargs is None
        assert c.network_kwargs.model_type == 'DhariwalUNet' and c.network_kwargs.get('label_dropout') == (0.1 if cond else None)
        for size in PatchSchedule(32, latent=True).sizes:  # 32x32 latents of 256x256 images
            check_patch_size(c.network_kwargs.channel_mult, size)
    assert sampling_preset('imagenet256-latent') == {'cfg': 1.3} and sampling_preset('lsun256-latent') == {}


def dry_run_loss_norm(preset: str, data: str, tmp_path, *args: str) -> str:
    """The loss normalisation train.py --dry-run resolves for a preset, read from the options it prints."""
    proc = h.run_train(f'--preset={preset}', f'--data={data}', f'--outdir={tmp_path}/runs', '--device=cpu', '--dry-run', *args,
                       timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    options = json.loads(proc.stdout[:proc.stdout.rindex('}') + 1])
    assert options['training_options']['loss_norm'] == options['loss_norm']
    return options['loss_norm']


@pytest.mark.slow
def test_paper_presets_pin_the_papers_loss_normalisation(files, tmp_path):
    # The paper's FIDs were obtained with the official code's per-image sum ('image'); the CLI default is 'pixel'.
    images64 = h.make_dataset(str(tmp_path / 'shapes-64x64.zip'), resolution=64, num=4)
    images128, latents32 = h.make_dataset(str(tmp_path / 'shapes-128x128.zip'), resolution=128, num=2), str(tmp_path / 'l.zip')
    encode(images128, latents32, files['vae'], '--xflip=True')  # 32x32 latents (the tiny VAE downsamples 4x), as the presets need
    paper = {'celeba64': images64, 'ffhq64': images64, 'afhqv2-64': images64,
             'lsun256-latent': latents32, 'imagenet256-latent': latents32}
    for preset, data in paper.items():
        assert dry_run_loss_norm(preset, data, tmp_path) == 'image', preset
    assert dry_run_loss_norm('celeba64', images64, tmp_path, '--loss-norm=pixel') == 'pixel'  # the command line wins
    assert dry_run_loss_norm('cifar10-32', h.make_dataset(str(tmp_path / 'shapes-32x32.zip'), resolution=32, num=4),
                             tmp_path) == 'pixel'  # EDM's settings, not the paper's: the project's default
