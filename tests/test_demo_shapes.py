"""The demo data set: deterministic, symmetric, one colour per image; coherence_score separates real from shuffled."""

import subprocess
import sys

import numpy as np
import pytest

from training import demo_shapes
from training.dataset import ImageFolderDataset

ROOT = __import__('os').path.dirname(__import__('os').path.dirname(__import__('os').path.abspath(__file__)))


def real_batch(n=256, resolution=32, seed=0):
    return np.stack([demo_shapes.make_image(i, resolution, seed)[0] for i in range(n)]).transpose(0, 3, 1, 2)


def shuffle_blocks(images, block, rng):
    n, c, h, w = images.shape
    blocks = images.reshape(n, c, h // block, block, w // block, block).transpose(0, 2, 4, 1, 3, 5).reshape(n, -1, c, block, block)
    blocks = np.stack([b[rng.permutation(len(b))] for b in blocks])
    return blocks.reshape(n, h // block, w // block, c, block, block).transpose(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


def test_deterministic_for_a_seed():
    a, b, c = real_batch(16, seed=5), real_batch(16, seed=5), real_batch(16, seed=6)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert [demo_shapes.make_image(i, seed=5)[1] for i in range(16)] == [demo_shapes.make_image(i, seed=5)[1] for i in range(16)]


def test_images_are_symmetric_and_single_coloured():
    for image in real_batch(64).transpose(0, 2, 3, 1):
        np.testing.assert_array_equal(image, image[:, ::-1])
        colours = {tuple(p) for p in image.reshape(-1, 3)}
        assert len(colours) == 2 and (0, 0, 0) in colours


def test_labels_are_hue_sectors_and_balanced():
    labels = [demo_shapes.make_image(i)[1] for i in range(1200)]
    counts = np.bincount(labels, minlength=demo_shapes.NUM_CLASSES)
    assert len(counts) == demo_shapes.NUM_CLASSES and counts.min() > 150


def test_coherence_separates_real_from_block_shuffled():
    real = real_batch(256)
    rng = np.random.default_rng(0)
    shuffled = shuffle_blocks(real, 8, rng)
    assert demo_shapes.coherence_score(real) == pytest.approx(1.0)
    assert demo_shapes.coherence_score(shuffled) < 0.3
    # Shuffling across images also mixes colours: even lower.
    n = len(real)
    mixed = shuffle_blocks(real.transpose(1, 0, 2, 3).reshape(1, 3, n * 32, 32), 8, rng).reshape(3, n, 32, 32).transpose(1, 0, 2, 3)
    assert demo_shapes.coherence_score(mixed) < demo_shapes.coherence_score(shuffled)


def test_coherence_penalises_colour_disagreement_alone():
    image = real_batch(1)[0].copy()
    left = image[:, :, :16]
    left[:, left.max(axis=0) > 0] = np.array([[255], [255], [255]], dtype=np.uint8)  # left half white, right half coloured
    assert demo_shapes.coherence_scores(image[None])[0] < 0.75
    assert demo_shapes.coherence_scores(np.zeros((1, 3, 32, 32), np.uint8))[0] == 0.0


def test_coherence_rejects_wrong_layout():
    with pytest.raises(ValueError, match=r'uint8 RGB images of shape \[N, 3, H, W\]'):
        demo_shapes.coherence_score(np.zeros((2, 32, 32, 3), np.uint8))


def test_dataset_tool_cli_builds_demo_set(tmp_path):
    dest = tmp_path / 'shapes.zip'
    subprocess.run([sys.executable, 'dataset_tool.py', '--source=demo:shapes', f'--dest={dest}', '--resolution=16x16',
                    '--max-images=50', '--seed=2'], cwd=ROOT, check=True, capture_output=True, timeout=120)
    ds = ImageFolderDataset(str(dest), use_labels=True)
    assert len(ds) == 50 and ds.resolution == 16 and ds.label_dim <= demo_shapes.NUM_CLASSES
    image, label = demo_shapes.make_image(7, 16, seed=2)
    np.testing.assert_array_equal(ds[7][0], image.transpose(2, 0, 1))
    assert ds[7][1].argmax() == label


def test_colours_name_each_images_label():
    # The generator's labels are the independent truth: red, green and blue shapes, and blank images as 'none'.
    pairs = [demo_shapes.make_image(i) for i in range(300)]
    images = np.stack([image for image, _ in pairs]).transpose(0, 3, 1, 2)
    labels = np.array([label for _, label in pairs])
    np.testing.assert_array_equal(demo_shapes.colours(images), labels)
    blank = np.zeros([2, 3, 32, 32], np.uint8)
    dim = np.full([1, 3, 32, 32], demo_shapes.FOREGROUND_THRESHOLD, np.uint8)  # grey at the threshold is still background
    shares = demo_shapes.colour_shares(np.concatenate([images[:6], blank, dim]))
    expected = {name: float((labels[:6] == k).sum() / 9) for k, name in enumerate(demo_shapes.COLOUR_NAMES)}
    assert shares == pytest.approx(dict(expected, none=3 / 9))
    darker = images[:6] // 2 + images[:6] // 4  # 191 of 255: still above the threshold, still its colour
    np.testing.assert_array_equal(demo_shapes.colours(darker), labels[:6])


@pytest.mark.slow
def test_brief_demo_training_samples_every_colour_in_about_equal_shares(tmp_path):
    """Issue 27: the quick start's samples came out 80% blue: the network's colour mix, settled at high noise
    levels that EDM's noise distribution rarely trains, swung from snapshot to snapshot, and the short EMA followed
    it. Two seeds of the demo preset, cut to 20 kimg (its lr decays over the last 60% of whatever --duration is),
    must each sample all three colours close to their 1/3 share in the data. One standard error of a share of 256
    samples is 0.03, so 0.2-0.47 allows about four. Where this was written, the new settings gave 0.31/0.36/0.33
    and 0.25/0.38/0.36; EDM's noise levels without the decay (--p-mean=-1.2 --p-std=1.2 --lr-cooldown=0) gave
    0.29/0.35/0.36 and 0.19/0.49/0.32, so the test catches that regression on one seed of two there."""
    import torch
    import training_helpers as h
    from training.sampler import generate_images
    from training.snapshot import load_network
    data = h.make_dataset(str(tmp_path / 'shapes-16x16.zip'), resolution=16, num=5000)
    runs = [tmp_path / f'seed{seed}' for seed in (0, 1)]
    for proc in h.run_train_parallel(*[['--preset=demo', f'--data={data}', f'--outdir={run}', '--nosubdir', f'--seed={seed}',
                                        '--duration=0.02', '--preview=False', '--snap=1000'] for seed, run in enumerate(runs)],
                                     timeout=600):
        assert proc.returncode == 0, proc.stderr[-3000:]
    for run in runs:
        net = load_network(str(sorted(run.glob('network-snapshot-*.pkl'))[-1]))
        with torch.no_grad():
            images = generate_images(net, list(range(256)), torch.device('cpu'), num_steps=18)
        shares = demo_shapes.colour_shares(images)
        assert all(0.2 <= shares[name] <= 0.47 for name in ('red', 'green', 'blue')), (run.name, shares)
