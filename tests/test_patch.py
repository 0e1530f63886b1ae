"""Tests for training/patch.py: coordinates, random crops and the patch-size schedule."""

import numpy as np
import pytest
import scipy.stats
import torch

from training.patch import PatchSchedule, coordinate_grid, crop_at, crop_patches, random_positions

#----------------------------------------------------------------------------
# Coordinates.

def test_coordinate_grid_corners_and_axes():
    grid = coordinate_grid(8, 8)
    assert grid.shape == (2, 8, 8) and grid.dtype == torch.float32
    assert grid[:, 0, 0].tolist() == [-1.0, -1.0]
    assert grid[:, -1, -1].tolist() == [1.0, 1.0]
    line = torch.arange(8) / 7 * 2 - 1
    assert torch.equal(grid[0], line[None, :].expand(8, 8)) # x varies along columns
    assert torch.equal(grid[1], line[:, None].expand(8, 8)) # y varies along rows

def test_coordinate_grid_window_is_slice_of_full_grid():
    full = coordinate_grid(16, 16, dtype=torch.float64)
    assert torch.equal(coordinate_grid(16, 4, top=3, left=9, dtype=torch.float64), full[:, 3:7, 9:13])
    assert full[0, 0, 5].item() == 5 / 15 * 2 - 1

@pytest.mark.parametrize('kwargs', [dict(resolution=8, size=9), dict(resolution=8, size=0), dict(resolution=8, size=4, top=5)])
def test_coordinate_grid_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        coordinate_grid(**kwargs)

#----------------------------------------------------------------------------
# Cropping.

def _positions_from_coords(coords, resolution):
    """Recover (top, left) from the coordinate channels of patches."""
    left = ((coords[:, 0, 0, 0] + 1) / 2 * (resolution - 1)).round().long()
    top = ((coords[:, 1, 0, 0] + 1) / 2 * (resolution - 1)).round().long()
    return top, left

def test_crop_patches_match_image_slices_and_grid_slices():
    N, C, R, s = 16, 3, 12, 5
    images = torch.randn(N, C, R, R)
    gen = torch.Generator().manual_seed(0)
    patches, coords = crop_patches(images, s, generator=gen)
    assert patches.shape == (N, C, s, s) and coords.shape == (N, 2, s, s)
    top, left = random_positions(N, R, s, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_positions_from_coords(coords, R)[0], top) and torch.equal(_positions_from_coords(coords, R)[1], left)
    full = coordinate_grid(R, R)
    for n in range(N):
        t, l = int(top[n]), int(left[n])
        assert torch.equal(patches[n], images[n, :, t:t + s, l:l + s])
        assert torch.equal(coords[n], full[:, t:t + s, l:l + s])

def test_crop_at_explicit_positions():
    images = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    patches, coords = crop_at(images, torch.tensor([0, 4]), torch.tensor([3, 1]), 2)
    assert torch.equal(patches[0], images[0, :, 0:2, 3:5])
    assert torch.equal(patches[1], images[1, :, 4:6, 1:3])
    assert torch.equal(coords[1], coordinate_grid(6, 2, top=4, left=1))
    with pytest.raises(ValueError, match='top and left'):
        crop_at(images, torch.tensor([0, 5]), torch.tensor([0, 0]), 2)
    with pytest.raises(ValueError, match='top and left'):
        crop_at(images, torch.tensor([-1, 0]), torch.tensor([0, 0]), 2)

def test_full_size_patch_is_whole_image_with_full_grid():
    images = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    patches, coords = crop_patches(images, 8)
    assert torch.equal(patches, images)
    assert coords.dtype == torch.float64
    assert torch.equal(coords, coordinate_grid(8, 8, dtype=torch.float64).expand(4, 2, 8, 8))

def test_crop_patches_rejects_bad_arguments():
    with pytest.raises(ValueError, match='patch size'):
        crop_patches(torch.zeros(2, 3, 8, 8), 9)
    with pytest.raises(ValueError, match='images'):
        crop_patches(torch.zeros(2, 3, 8, 6), 4)

def _uniformity_pvalue(top, left, num_positions):
    counts = np.bincount((top * num_positions + left).numpy(), minlength=num_positions ** 2)
    return scipy.stats.chisquare(counts).pvalue

def test_crop_positions_are_uniform():
    R, s, draws = 8, 4, 20000
    images = torch.zeros(draws, 1, R, R)
    _, coords = crop_patches(images, s, generator=torch.Generator().manual_seed(1))
    top, left = _positions_from_coords(coords, R)
    assert _uniformity_pvalue(top, left, R - s + 1) > 1e-3

def test_uniformity_check_detects_bias():
    # Same statistic on a sampler that puts the last column twice as often: the test must fail.
    gen = torch.Generator().manual_seed(1)
    top = torch.randint(5, [20000], generator=gen)
    left = torch.randint(6, [20000], generator=gen).clamp(max=4)
    assert _uniformity_pvalue(top, left, 5) < 1e-6

#----------------------------------------------------------------------------
# Patch-size schedule.

def _size_pvalue(schedule, draws):
    sizes = [schedule.sample() for _ in range(draws)]
    counts = [sizes.count(size) for size in schedule.sizes]
    expected = [p * draws for p in schedule.probs]
    return scipy.stats.chisquare(counts, expected).pvalue

@pytest.mark.parametrize('real_p', [0.5, 0.2])
def test_schedule_frequencies(real_p):
    schedule = PatchSchedule(64, real_p=real_p, seed=3)
    assert schedule.sizes == (64, 32, 16)
    assert schedule.probs == pytest.approx((real_p, 0.6 * (1 - real_p), 0.4 * (1 - real_p)))
    assert _size_pvalue(schedule, 20000) > 1e-3

def test_schedule_latent_frequencies():
    schedule = PatchSchedule(32, real_p=0.3, latent=True, seed=3)
    assert schedule.sizes == (32, 16)
    assert schedule.probs == pytest.approx((0.3, 0.7))
    assert _size_pvalue(schedule, 10000) > 1e-3

def test_schedule_extreme_probabilities():
    assert {PatchSchedule(64, real_p=1).sample() for _ in range(500)} == {64}
    assert 64 not in {PatchSchedule(64, real_p=0).sample() for _ in range(500)}

@pytest.mark.parametrize('real_p', [0.5, 0.2])
def test_schedule_progressive_order_and_switch_points(real_p):
    schedule = PatchSchedule(64, real_p=real_p, mode='progressive')
    first = 2 / 5 * (1 - real_p)
    second = first + 3 / 5 * (1 - real_p)
    eps = 1e-6
    assert schedule.sample(0.0) == 16
    assert schedule.sample(first - eps) == 16
    assert schedule.sample(first + eps) == 32
    assert schedule.sample(second - eps) == 32
    assert schedule.sample(second + eps) == 64
    assert schedule.sample(1.0) == 64
    with pytest.raises(ValueError, match='progress'):
        schedule.sample()
    with pytest.raises(ValueError, match='progress'):
        schedule.sample(1.5)

def test_schedule_progressive_latent():
    schedule = PatchSchedule(32, real_p=0.25, mode='progressive', latent=True)
    assert [schedule.sample(t) for t in (0.0, 0.74, 0.76, 1.0)] == [16, 16, 32, 32]

def test_schedule_same_seed_agrees_different_seed_differs():
    a, b, c = PatchSchedule(64, seed=7), PatchSchedule(64, seed=7), PatchSchedule(64, seed=8)
    seq_a = [a.sample() for _ in range(100)]
    assert seq_a == [b.sample() for _ in range(100)]
    assert seq_a != [c.sample() for _ in range(100)]

def test_schedule_state_dict_round_trip():
    schedule = PatchSchedule(64, seed=5)
    for _ in range(10):
        schedule.sample()
    state = schedule.state_dict()
    expected = [schedule.sample() for _ in range(50)]
    resumed = PatchSchedule(64, seed=123)
    resumed.load_state_dict(state)
    assert [resumed.sample() for _ in range(50)] == expected

def test_schedule_batch_multiplier():
    schedule = PatchSchedule(64, real_p=0.5)
    assert [schedule.batch_multiplier(s) for s in (64, 32, 16)] == [1, 2, 4]
    assert schedule.mean_batch_multiplier == pytest.approx(0.5 * 1 + 0.3 * 2 + 0.2 * 4) # 1.9
    latent = PatchSchedule(32, real_p=0.5, latent=True)
    assert [latent.batch_multiplier(s) for s in (32, 16)] == [1, 2]
    assert latent.mean_batch_multiplier == pytest.approx(1.5)
    with pytest.raises(ValueError, match='size'):
        schedule.batch_multiplier(8)

@pytest.mark.parametrize('real_p', [-0.1, 1.5])
def test_schedule_rejects_bad_real_p(real_p):
    with pytest.raises(ValueError, match=r'real_p must be in \[0, 1\]'):
        PatchSchedule(64, real_p=real_p)

def test_schedule_rejects_bad_mode_and_resolution():
    with pytest.raises(ValueError, match='mode'):
        PatchSchedule(64, mode='cyclic')
    with pytest.raises(ValueError, match='resolution'):
        PatchSchedule(3)

#----------------------------------------------------------------------------


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device'))])
def test_device_crop_after_uint8_transfer_equals_host_crop(device):
    # The loop moves uint8 images to the device, converts them there and crops there; cropping on the host first must agree.
    generator = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, [8, 3, 32, 32], dtype=torch.uint8, generator=generator)
    top, left = random_positions(8, 32, 8, generator=generator)
    on_device = images.to(device).to(torch.float32) / 127.5 - 1
    patches, coords = crop_at(on_device, top.to(device), left.to(device), 8)
    host = np.stack([images[i, :, t:t + 8, l:l + 8].numpy() for i, (t, l) in enumerate(zip(top.tolist(), left.tolist()))])
    assert torch.equal(patches.cpu(), torch.from_numpy(host).to(torch.float32) / 127.5 - 1)
    assert torch.equal(coords.cpu(), torch.stack([coordinate_grid(32, 8, top=t, left=l) for t, l in zip(top.tolist(), left.tolist())]))


def test_windows_at_the_far_edges_are_allowed_and_one_pixel_further_is_not():
    """The valid corners are 0..R-s on each axis, inclusive (both ends checked on both axes)."""
    from training.patch import coordinate_grid, crop_at
    R, s = 16, 4
    images = torch.arange(2 * 3 * R * R, dtype=torch.float32).reshape(2, 3, R, R)
    for top, left in [(R - s, 0), (0, R - s), (R - s, R - s)]:
        grid = coordinate_grid(R, s, top=top, left=left)
        assert grid[0, 0, -1] == 1 if left == R - s else grid[0, 0, 0] == -1  # x of the last column is +1 at the edge
        patches, _ = crop_at(images, torch.tensor([top, top]), torch.tensor([left, left]), s)
        assert torch.equal(patches, images[:, :, top:top + s, left:left + s])
    for top, left in [(R - s + 1, 0), (0, R - s + 1), (-1, 0), (0, -1)]:
        with pytest.raises(ValueError):
            coordinate_grid(R, s, top=top, left=left)
        with pytest.raises(ValueError):
            crop_at(images, torch.tensor([top, 0]), torch.tensor([left, 0]), s)


def test_schedule_sizes_are_whole_pixels_down_to_one():
    from training.patch import PatchSchedule
    for latent, resolution in [(False, 4), (False, 64), (True, 2), (True, 32)]:
        schedule = PatchSchedule(resolution, latent=latent)
        assert all(type(size) is int for size in schedule.sizes) and schedule.sizes[-1] >= 1
        assert all(type(schedule.sample()) is int for _ in range(20))
    with pytest.raises(ValueError, match='resolution must be at least 4 '):
        PatchSchedule(2)  # the R//4 patch would be 0 pixels
    with pytest.raises(ValueError, match='resolution must be at least 2 '):
        PatchSchedule(1, latent=True)


def test_crop_at_checks_top_and_left_shapes_separately():
    from training.patch import crop_at
    images = torch.zeros([2, 3, 8, 8])
    for top, left in [(torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.long)),
                      (torch.zeros(2, dtype=torch.long), torch.zeros(1, dtype=torch.long))]:
        with pytest.raises(ValueError, match=r'top and left must have shape \[2\]'):
            crop_at(images, top, left, 4)


def test_smallest_valid_resolution_and_patch_and_the_requested_dtype():
    """A 2x2 image and 1-pixel patches are valid (its corners are -1 and 1); resolution 1 and size 0 are not.
    The coordinates come in the dtype asked for."""
    assert coordinate_grid(2, 1, top=1, left=0).tolist() == [[[-1.0]], [[1.0]]]
    assert coordinate_grid(2, 2).tolist() == [[[-1.0, 1.0], [-1.0, 1.0]], [[-1.0, -1.0], [1.0, 1.0]]]
    for resolution, size in [(1, 1), (4, 0)]:
        with pytest.raises(ValueError):
            coordinate_grid(resolution, size)
    assert coordinate_grid(8, 4, dtype=torch.float32).dtype == torch.float32
    assert coordinate_grid(8, 4, dtype=torch.float64).dtype == torch.float64
