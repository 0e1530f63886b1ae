"""Latent Patch Diffusion with a tiny randomly initialised AutoencoderKL (no download): encode once, store, load, train,
generate and decode; the pre-encoded and on-the-fly paths agree; guidance on a conditional latent model; and the clear
messages when diffusers is missing or a VAE cannot be found. Without diffusers, with a stub VAE: the latent
normalisations (Stable Diffusion's one scale, EDM2's per-channel scale and bias), EDM2 latent snapshots' decoding, and
the edm2-img512-s preset."""

import io
import json
import os
import subprocess
import sys
import zipfile

import types

import click
import numpy as np
import PIL.Image
import pytest
import torch

import training_helpers as h
from training import latents
from training.dataset import DatasetError, ImageFolderDataset, LatentFolderDataset
from training.latents import (EDM2_RAW_MEAN, EDM2_RAW_STD, INSTALL_HINT, UNIT, LatentCodec, LatentError, LatentNorm,
                              latent_decoder, latent_setting, load_vae)
from training.networks import EDMPrecond
from training.patch import coordinate_grid
from training.sampler import edm_sampler, generate_images, to_uint8

RES = 32      # pixels
FACTOR = 4    # the tiny VAE downsamples twice: 8x8x4 latents
NUM = 24


@pytest.fixture(scope='module')
def files(tmp_path_factory) -> dict:
    """A tiny VAE saved like a hub download, a labelled noise-image zip (no symmetry, so flips matter), its latents."""
    pytest.importorskip('diffusers', reason='the latent path needs the optional extra: ' + INSTALL_HINT)
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
        torch.testing.assert_close(LatentNorm(0.18215).sample(moments, generator), on_the_fly, rtol=1e-4, atol=1e-4)
    # The flip is encoded, not mirrored: the VAE does not commute with flips.
    flipped_moments = torch.from_numpy(stored[NUM + 1][0])
    assert not torch.allclose(flipped_moments, torch.from_numpy(stored[1][0]).flip(2), atol=1e-3)


@pytest.mark.parametrize('norm', [None, 'edm2'])
def test_training_on_the_fly_and_its_snapshot(files, tmp_path, norm):
    proc = h.run_train(f'--outdir={tmp_path}/runs', f'--data={files["images"]}', '--latents-on-the-fly',
                       f'--vae={files["vae"]}', '--augment=0', '--cbase=8', '--cres=1,1', '--blocks=1', '--attn=4',
                       '--batch=8', '--device=cpu', '--workers=0', '--duration=0.00005', '--tick=0.00005', '--seed=1',
                       *([f'--latent-norm={norm}'] if norm else []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(h.only_run_dir(str(tmp_path / 'runs')), 'training_options.json')) as f:
        options = json.load(f)
    setting = latent_setting(norm or 'sd', files['vae'])  # sd: dict(vae, scale=0.18215), as before normalisations had names
    assert options['latent_kwargs'] == dict(on_the_fly=True, **setting)
    from training.snapshot import load_network
    net = load_network(h.only_run_dir(str(tmp_path / 'runs')))
    assert (net.img_resolution, net.img_channels, net.latent) == (RES // FACTOR, 4, setting)
    images = generate_images(net, [0, 1], torch.device('cpu'), num_steps=2, decoder=latent_decoder(net, torch.device('cpu')))
    assert images.shape == (2, 3, RES, RES) and images.dtype == torch.uint8


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


#----------------------------------------------------------------------------
# Latent normalisations with a stub VAE (no diffusers needed).

class IdentityVAE:
    """Stub AutoencoderKL with factor 1: encodes RGB as 4 channels (the 4th their mean) with std 0; decodes the first 3."""

    config = dict(latent_channels=4, block_out_channels=(8,))

    def encode(self, pixels: torch.Tensor) -> types.SimpleNamespace:
        mean = torch.cat([pixels, pixels.mean(1, keepdim=True)], dim=1)
        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(mean=mean, std=torch.zeros_like(mean)))

    def decode(self, latents: torch.Tensor) -> types.SimpleNamespace:
        return types.SimpleNamespace(sample=latents[:, :3])


@pytest.fixture
def stub_vae(monkeypatch) -> None:
    """Every LatentCodec loads an IdentityVAE, whatever VAE it names."""
    monkeypatch.setattr(latents, 'load_vae', lambda name, device=None: IdentityVAE())


def per_channel(values) -> torch.Tensor:
    """Per-channel values as a float32 [1, C, 1, 1] tensor."""
    return torch.tensor(values, dtype=torch.float32).reshape(1, -1, 1, 1)


def test_edm2_normalisation_against_a_hand_computation():
    setting = latent_setting('edm2')
    assert setting['vae'] == 'stabilityai/sd-vae-ft-mse' and setting['pixels'] == UNIT
    assert setting['scale'] == [float(np.float32(0.5) / np.float32(s)) for s in EDM2_RAW_STD]  # float32, as EDM2 computes it
    raw = torch.tensor([5.81, 3.25 + 4.62, 0.12 - 2 * 3.71, -2.15 + 0.5 * 3.28]).reshape(1, 4, 1, 1).expand(2, 4, 3, 3)
    hand = torch.tensor([0.0, 0.5, -1.0, 0.25]).reshape(1, 4, 1, 1)  # (raw - raw_mean) / raw_std * 0.5 + 0
    torch.testing.assert_close(LatentNorm.of(setting).normalise(raw), hand.expand(2, 4, 3, 3), rtol=0, atol=1e-6)
    moments, generator = torch.cat([raw, torch.full_like(raw, 0.3)], dim=1), torch.Generator().manual_seed(0)
    noise = torch.randn([2, 4, 3, 3], generator=torch.Generator().manual_seed(0))
    raw_mean, raw_std = per_channel(EDM2_RAW_MEAN).double(), per_channel(EDM2_RAW_STD).double()
    expected = ((raw.double() + 0.3 * noise.double()) - raw_mean) / raw_std * 0.5
    sampled = LatentNorm(setting['scale'], setting['bias']).sample(moments, generator)
    torch.testing.assert_close(sampled.double(), expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match='4 per-channel latent values for 3 latent channels'):
        LatentNorm.of(setting).normalise(raw[:, :3])


@pytest.mark.parametrize('norm', ['sd', 'edm2'])
def test_encode_then_decode_returns_the_input(stub_vae, norm):
    codec = LatentCodec.of(latent_setting(norm, 'stub'))
    images = torch.randint(0, 256, [2, 3, 8, 8], dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    final = codec.encode(images)
    pixels = codec.norm.to_vae(images)
    torch.testing.assert_close(codec.norm.raw(final)[:, :3], pixels, rtol=0, atol=1e-6)
    decoded = codec.decode(final)
    if norm == 'sd':  # EDM's rounding: exact
        assert torch.equal(decoded, images)
    else:  # EDM2's truncation of pixels * 255: where the float32 round trip lands just below an integer, one less
        assert set((images.int() - decoded.int()).unique().tolist()) <= {0, 1} and torch.equal(pixels, images.float() / 255)


def test_an_edm2_latent_snapshot_decodes_with_its_per_channel_values(stub_vae, tmp_path):
    from bench import edm2_cases
    from test_networks_edm2 import SMALL, StabilityVAEEncoder, edm2_snapshot
    from training.networks_edm2 import EDM2Precond
    from training.snapshot import load_network
    net = EDM2Precond(**dict(SMALL, img_channels=4))
    encoder = StabilityVAEEncoder('stub', **edm2_cases.VAE_ENCODER)  # final_mean 0.125: a bias in every channel
    (tmp_path / 'edm2.pkl').write_bytes(edm2_snapshot(net, encoder, str(tmp_path / 'executed')))
    loaded = load_network(str(tmp_path / 'edm2.pkl'))
    assert loaded.latent == dict(vae='stub', scale=[float(v) for v in encoder.scale], bias=[float(v) for v in encoder.bias],
                                 pixels=UNIT)
    final = torch.randn([2, 4, 16, 16], generator=torch.Generator().manual_seed(2))
    raw = (final - per_channel(encoder.bias)) / per_channel(encoder.scale)
    expected = raw[:, :3].clamp(0, 1).mul(255).to(torch.uint8)  # EDM2's StabilityVAEEncoder.decode after the VAE
    assert torch.equal(latent_decoder(loaded, torch.device('cpu'))(final), expected)
    assert 0 < (expected == 0).float().mean() < 0.9  # the clamp and the values in between both show


def test_scalar_scale_latents_are_unchanged(stub_vae):
    from training.training_loop import latent_setup
    old = dict(vae='stub', scale=0.18215)  # old snapshots' and data sets' `latent`, and latent_setting('sd')
    assert latent_setting('sd', 'stub') == old and LatentNorm.of(old) == LatentNorm(0.18215, 0.0, '-1..1')
    moments = torch.rand([2, 8, 4, 4])
    mean, std = moments.chunk(2, dim=1)
    noise = torch.randn([2, 4, 4, 4], generator=torch.Generator().manual_seed(3))
    assert torch.equal(LatentNorm(0.18215).sample(moments, torch.Generator().manual_seed(3)), (mean + std * noise) * 0.18215)
    net = types.SimpleNamespace(latent=old)
    final = torch.randn([2, 4, 8, 8])
    assert torch.equal(latent_decoder(net, torch.device('cpu'))(final), to_uint8(final[:, :3] / 0.18215))
    dataset = types.SimpleNamespace(resolution=8, num_channels=3, latent=None)
    _, codec, latent, _, channels = latent_setup(dataset, dict(on_the_fly=True, vae='stub'), False, torch.device('cpu'))
    assert latent == old and channels == 4 and codec.norm == LatentNorm(0.18215)


def latent_zip(path: str, setting: dict, res: int = 64, num: int = 2) -> str:
    """A labelled latent data set of random moments, with `setting` in dataset.json as dataset_tool.py writes it."""
    rng = np.random.RandomState(0)
    with zipfile.ZipFile(path, 'w') as z:
        for i in range(num):
            buffer = io.BytesIO()
            np.save(buffer, rng.rand(1, 8, res, res).astype(np.float32) + 0.1)
            z.writestr(f'{i:03d}.npy', buffer.getvalue())
        meta = dict(latents=dict(setting, channels=4, factor=8, flips=False), labels=[[f'{i:03d}.npy', i] for i in range(num)])
        z.writestr('dataset.json', json.dumps(meta))
    return path


def test_edm2_img512_preset_trains_on_edm2_latents(tmp_path):
    from train import build_config, check_latent_norm, preset_options
    data = latent_zip(str(tmp_path / 'edm2.zip'), latent_setting('edm2'))
    assert LatentFolderDataset(data).latent == latent_setting('edm2')
    proc = h.run_train('--preset=edm2-img512-s', f'--data={data}', f'--outdir={tmp_path}/runs', '--device=cpu', '--dry-run',
                       timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    printed = json.loads(proc.stdout[proc.stdout.index('{'):proc.stdout.rindex('}') + 1])
    assert printed['training_options']['latent_norm'] == 'edm2' and printed['latent_kwargs'] == dict(on_the_fly=False, vae=None)
    assert printed['network_kwargs']['class_name'] == 'training.networks_edm2.EDM2Precond'
    sd_data = LatentFolderDataset(latent_zip(str(tmp_path / 'sd.zip'), latent_setting('sd')))
    with pytest.raises(click.BadParameter, match='--latent-norm=edm2') as err:
        check_latent_norm(preset_options('edm2-img512-s', data='sd.zip'), sd_data)
    assert err.value.param_hint == '--latent-norm'
    on_the_fly = build_config(preset_options('edm2-img512-s', latents=False, latents_on_the_fly=True), 'd', 512, 1)
    assert on_the_fly.latent_kwargs == dict(on_the_fly=True, **latent_setting('edm2'))
