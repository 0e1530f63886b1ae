"""Tests for training/augment.py: EDM's non-leaking augmentation pipeline."""

import pytest
import torch

from training.augment import AugmentPipe

GEOMETRIC = dict(xflip=1, yflip=1, rotate_int=1, translate_int=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
COLOUR = dict(brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)
EDM_CONFIG = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1) # EDM's --augment setting

def _ramp(N, R):
    """Linear images a*x + b*y (centred pixel coordinates), which resampling reproduces exactly away from the borders."""
    y, x = torch.meshgrid(torch.arange(R, dtype=torch.float32), torch.arange(R, dtype=torch.float32), indexing='ij')
    c = (R - 1) / 2
    return (0.03 * (x - c) - 0.02 * (y - c)).expand(N, 1, R, R).clone()

#----------------------------------------------------------------------------

def test_p0_is_identity_with_zero_labels():
    torch.manual_seed(0)
    images = torch.randn(6, 3, 16, 16)
    out, labels = AugmentPipe(p=0, **GEOMETRIC, **COLOUR)(images)
    assert labels.shape == (6, 13 + 6) and labels.dtype == torch.float32
    assert torch.count_nonzero(labels) == 0
    torch.testing.assert_close(out, images, atol=1e-5, rtol=0)

def test_default_pipeline_is_exact_identity():
    images = torch.randn(2, 3, 8, 8)
    out, labels = AugmentPipe()(images)
    assert torch.equal(out, images) and labels.shape == (2, 0)

@pytest.mark.parametrize('ops, dim', [(EDM_CONFIG, 9), (GEOMETRIC, 13), ({**GEOMETRIC, **COLOUR}, 19), (dict(xflip=1), 1)])
def test_label_dim(ops, dim):
    assert AugmentPipe(**ops)(torch.randn(2, 3, 8, 8))[1].shape == (2, dim)

def test_integer_ops_are_exactly_invertible():
    torch.manual_seed(1)
    images = torch.randn(64, 3, 8, 8)
    out, labels = AugmentPipe(p=1, xflip=1, yflip=1, rotate_int=1)(images)
    assert labels.shape == (64, 4)
    assert not torch.equal(out, images)
    undone = []
    for img, (xf, yf, r0, r1) in zip(out, labels.bool().tolist()):
        # rotate_int applied x-flip if r0, y-flip if r1, then a transpose for one or three quarter turns.
        if r0 != r1:
            img = img.transpose(1, 2)
        if r1:
            img = img.flip(1)
        if r0:
            img = img.flip(2)
        if yf:
            img = img.flip(1)
        if xf:
            img = img.flip(2)
        undone.append(img)
    torch.testing.assert_close(torch.stack(undone), images, atol=1e-5, rtol=0)

def test_translate_int_moves_pixels_by_label():
    torch.manual_seed(2)
    images = torch.randn(16, 2, 16, 16)
    out, labels = AugmentPipe(p=1, translate_int=1, translate_int_max=0.25)(images)
    shifts = (labels * 16 * 0.25).round().long()
    assert shifts.abs().max() > 0
    for img, res, (tx, ty) in zip(images, out, shifts.tolist()):
        # out[r, c] = in[r + ty, c - tx] wherever that source pixel is inside the image.
        rows, cols = slice(max(0, -ty), 16 - max(0, ty)), slice(max(0, tx), 16 + min(0, tx))
        src_rows, src_cols = slice(rows.start + ty, rows.stop + ty), slice(cols.start - tx, cols.stop - tx)
        assert torch.equal(res[:, rows, cols], img[:, src_rows, src_cols])

def test_translate_frac_shifts_by_label():
    torch.manual_seed(3)
    images = _ramp(8, 32)
    out, labels = AugmentPipe(p=1, translate_frac=1, translate_frac_std=0.05)(images)
    tx, ty = (labels * 32 * 0.05).unbind(1)
    expected = images - (0.03 * tx - 0.02 * ty)[:, None, None, None] # content moved by (+tx, +ty) pixels
    torch.testing.assert_close(out[..., 10:-10, 10:-10], expected[..., 10:-10, 10:-10], atol=1e-5, rtol=0)

def test_scale_matches_label():
    torch.manual_seed(4)
    images = _ramp(8, 32)
    out, labels = AugmentPipe(p=1, scale=1)(images)
    s = (labels[:, 0] * 0.2).exp2()
    torch.testing.assert_close(out[..., 12:-12, 12:-12], (images / s[:, None, None, None])[..., 12:-12, 12:-12], atol=1e-3, rtol=0)

def test_brightness_matches_label():
    torch.manual_seed(5)
    images = torch.randn(8, 3, 8, 8)
    out, labels = AugmentPipe(p=1, brightness=1)(images)
    torch.testing.assert_close(out, images + 0.2 * labels[:, :1, None, None], atol=1e-5, rtol=0)

@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('channels', [1, 3])
def test_shape_and_dtype_preserved(dtype, channels):
    images = torch.randn(4, channels, 16, 16, dtype=dtype)
    out, labels = AugmentPipe(p=1, **GEOMETRIC, **COLOUR)(images)
    assert out.shape == images.shape and out.dtype == dtype
    assert labels.dtype == torch.float32 and torch.isfinite(out).all()

def test_colour_ops_reject_other_channel_counts():
    with pytest.raises(ValueError, match='channels'):
        AugmentPipe(brightness=1)(torch.randn(2, 4, 8, 8))

#----------------------------------------------------------------------------
