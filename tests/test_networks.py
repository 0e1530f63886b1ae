"""Tests for training/networks.py: EDM checkpoint layout, patch sizes, coordinates, labels, precision."""

import numpy as np
import pytest
import torch

from training import networks
from training.networks import DhariwalUNet, EDMPrecond, SongUNet, VEPrecond, VPPrecond, check_patch_size, min_input_size

RES = 16
IMG_CHANNELS = 3
LABEL_DIM = 10
SMALL = dict(channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
ARCHS = {
    'ddpmpp': dict(model_type='SongUNet', model_channels=16, embedding_type='positional', encoder_type='standard',
                   decoder_type='standard', resample_filter=[1, 1], **SMALL),
    'ncsnpp': dict(model_type='SongUNet', model_channels=16, embedding_type='fourier', channel_mult_noise=2,
                   encoder_type='residual', decoder_type='standard', resample_filter=[1, 3, 3, 1], **SMALL),
    # 64 channels at 8x8 so that ADM (64 channels per head) actually gets attention layers.
    'adm': dict(model_type='DhariwalUNet', model_channels=32, **SMALL),
}

# State-dict layouts EDM's own SongUNet / DhariwalUNet produce inside EDM's precond wrapper for the configs
# above with in_channels = 3 image + 2 coordinate channels, label_dim=10, augment_dim=9.
DDPMPP_KEYS = [
    ('model.map_label.weight', (16, 10)),
    ('model.map_label.bias', (16,)),
    ('model.map_augment.weight', (16, 9)),
    ('model.map_layer0.weight', (64, 16)),
    ('model.map_layer0.bias', (64,)),
    ('model.map_layer1.weight', (64, 64)),
    ('model.map_layer1.bias', (64,)),
    ('model.enc.16x16_conv.weight', (16, 5, 3, 3)),
    ('model.enc.16x16_conv.bias', (16,)),
    ('model.enc.16x16_block0.norm0.weight', (16,)),
    ('model.enc.16x16_block0.norm0.bias', (16,)),
    ('model.enc.16x16_block0.conv0.weight', (16, 16, 3, 3)),
    ('model.enc.16x16_block0.conv0.bias', (16,)),
    ('model.enc.16x16_block0.affine.weight', (16, 64)),
    ('model.enc.16x16_block0.affine.bias', (16,)),
    ('model.enc.16x16_block0.norm1.weight', (16,)),
    ('model.enc.16x16_block0.norm1.bias', (16,)),
    ('model.enc.16x16_block0.conv1.weight', (16, 16, 3, 3)),
    ('model.enc.16x16_block0.conv1.bias', (16,)),
    ('model.enc.8x8_down.norm0.weight', (16,)),
    ('model.enc.8x8_down.norm0.bias', (16,)),
    ('model.enc.8x8_down.conv0.weight', (16, 16, 3, 3)),
    ('model.enc.8x8_down.conv0.bias', (16,)),
    ('model.enc.8x8_down.conv0.resample_filter', (1, 1, 2, 2)),
    ('model.enc.8x8_down.affine.weight', (16, 64)),
    ('model.enc.8x8_down.affine.bias', (16,)),
    ('model.enc.8x8_down.norm1.weight', (16,)),
    ('model.enc.8x8_down.norm1.bias', (16,)),
    ('model.enc.8x8_down.conv1.weight', (16, 16, 3, 3)),
    ('model.enc.8x8_down.conv1.bias', (16,)),
    ('model.enc.8x8_down.skip.weight', (16, 16, 1, 1)),
    ('model.enc.8x8_down.skip.bias', (16,)),
    ('model.enc.8x8_down.skip.resample_filter', (1, 1, 2, 2)),
    ('model.enc.8x8_block0.norm0.weight', (16,)),
    ('model.enc.8x8_block0.norm0.bias', (16,)),
    ('model.enc.8x8_block0.conv0.weight', (32, 16, 3, 3)),
    ('model.enc.8x8_block0.conv0.bias', (32,)),
    ('model.enc.8x8_block0.affine.weight', (32, 64)),
    ('model.enc.8x8_block0.affine.bias', (32,)),
    ('model.enc.8x8_block0.norm1.weight', (32,)),
    ('model.enc.8x8_block0.norm1.bias', (32,)),
    ('model.enc.8x8_block0.conv1.weight', (32, 32, 3, 3)),
    ('model.enc.8x8_block0.conv1.bias', (32,)),
    ('model.enc.8x8_block0.skip.weight', (32, 16, 1, 1)),
    ('model.enc.8x8_block0.skip.bias', (32,)),
    ('model.enc.8x8_block0.norm2.weight', (32,)),
    ('model.enc.8x8_block0.norm2.bias', (32,)),
    ('model.enc.8x8_block0.qkv.weight', (96, 32, 1, 1)),
    ('model.enc.8x8_block0.qkv.bias', (96,)),
    ('model.enc.8x8_block0.proj.weight', (32, 32, 1, 1)),
    ('model.enc.8x8_block0.proj.bias', (32,)),
    ('model.dec.8x8_in0.norm0.weight', (32,)),
    ('model.dec.8x8_in0.norm0.bias', (32,)),
    ('model.dec.8x8_in0.conv0.weight', (32, 32, 3, 3)),
    ('model.dec.8x8_in0.conv0.bias', (32,)),
    ('model.dec.8x8_in0.affine.weight', (32, 64)),
    ('model.dec.8x8_in0.affine.bias', (32,)),
    ('model.dec.8x8_in0.norm1.weight', (32,)),
    ('model.dec.8x8_in0.norm1.bias', (32,)),
    ('model.dec.8x8_in0.conv1.weight', (32, 32, 3, 3)),
    ('model.dec.8x8_in0.conv1.bias', (32,)),
    ('model.dec.8x8_in0.norm2.weight', (32,)),
    ('model.dec.8x8_in0.norm2.bias', (32,)),
    ('model.dec.8x8_in0.qkv.weight', (96, 32, 1, 1)),
    ('model.dec.8x8_in0.qkv.bias', (96,)),
    ('model.dec.8x8_in0.proj.weight', (32, 32, 1, 1)),
    ('model.dec.8x8_in0.proj.bias', (32,)),
    ('model.dec.8x8_in1.norm0.weight', (32,)),
    ('model.dec.8x8_in1.norm0.bias', (32,)),
    ('model.dec.8x8_in1.conv0.weight', (32, 32, 3, 3)),
    ('model.dec.8x8_in1.conv0.bias', (32,)),
    ('model.dec.8x8_in1.affine.weight', (32, 64)),
    ('model.dec.8x8_in1.affine.bias', (32,)),
    ('model.dec.8x8_in1.norm1.weight', (32,)),
    ('model.dec.8x8_in1.norm1.bias', (32,)),
    ('model.dec.8x8_in1.conv1.weight', (32, 32, 3, 3)),
    ('model.dec.8x8_in1.conv1.bias', (32,)),
    ('model.dec.8x8_block0.norm0.weight', (64,)),
    ('model.dec.8x8_block0.norm0.bias', (64,)),
    ('model.dec.8x8_block0.conv0.weight', (32, 64, 3, 3)),
    ('model.dec.8x8_block0.conv0.bias', (32,)),
    ('model.dec.8x8_block0.affine.weight', (32, 64)),
    ('model.dec.8x8_block0.affine.bias', (32,)),
    ('model.dec.8x8_block0.norm1.weight', (32,)),
    ('model.dec.8x8_block0.norm1.bias', (32,)),
    ('model.dec.8x8_block0.conv1.weight', (32, 32, 3, 3)),
    ('model.dec.8x8_block0.conv1.bias', (32,)),
    ('model.dec.8x8_block0.skip.weight', (32, 64, 1, 1)),
    ('model.dec.8x8_block0.skip.bias', (32,)),
    ('model.dec.8x8_block1.norm0.weight', (48,)),
    ('model.dec.8x8_block1.norm0.bias', (48,)),
    ('model.dec.8x8_block1.conv0.weight', (32, 48, 3, 3)),
    ('model.dec.8x8_block1.conv0.bias', (32,)),
    ('model.dec.8x8_block1.affine.weight', (32, 64)),
    ('model.dec.8x8_block1.affine.bias', (32,)),
    ('model.dec.8x8_block1.norm1.weight', (32,)),
    ('model.dec.8x8_block1.norm1.bias', (32,)),
    ('model.dec.8x8_block1.conv1.weight', (32, 32, 3, 3)),
    ('model.dec.8x8_block1.conv1.bias', (32,)),
    ('model.dec.8x8_block1.skip.weight', (32, 48, 1, 1)),
    ('model.dec.8x8_block1.skip.bias', (32,)),
    ('model.dec.8x8_block1.norm2.weight', (32,)),
    ('model.dec.8x8_block1.norm2.bias', (32,)),
    ('model.dec.8x8_block1.qkv.weight', (96, 32, 1, 1)),
    ('model.dec.8x8_block1.qkv.bias', (96,)),
    ('model.dec.8x8_block1.proj.weight', (32, 32, 1, 1)),
    ('model.dec.8x8_block1.proj.bias', (32,)),
    ('model.dec.16x16_up.norm0.weight', (32,)),
    ('model.dec.16x16_up.norm0.bias', (32,)),
    ('model.dec.16x16_up.conv0.weight', (32, 32, 3, 3)),
    ('model.dec.16x16_up.conv0.bias', (32,)),
    ('model.dec.16x16_up.conv0.resample_filter', (1, 1, 2, 2)),
    ('model.dec.16x16_up.affine.weight', (32, 64)),
    ('model.dec.16x16_up.affine.bias', (32,)),
    ('model.dec.16x16_up.norm1.weight', (32,)),
    ('model.dec.16x16_up.norm1.bias', (32,)),
    ('model.dec.16x16_up.conv1.weight', (32, 32, 3, 3)),
    ('model.dec.16x16_up.conv1.bias', (32,)),
    ('model.dec.16x16_up.skip.weight', (32, 32, 1, 1)),
    ('model.dec.16x16_up.skip.bias', (32,)),
    ('model.dec.16x16_up.skip.resample_filter', (1, 1, 2, 2)),
    ('model.dec.16x16_block0.norm0.weight', (48,)),
    ('model.dec.16x16_block0.norm0.bias', (48,)),
    ('model.dec.16x16_block0.conv0.weight', (16, 48, 3, 3)),
    ('model.dec.16x16_block0.conv0.bias', (16,)),
    ('model.dec.16x16_block0.affine.weight', (16, 64)),
    ('model.dec.16x16_block0.affine.bias', (16,)),
    ('model.dec.16x16_block0.norm1.weight', (16,)),
    ('model.dec.16x16_block0.norm1.bias', (16,)),
    ('model.dec.16x16_block0.conv1.weight', (16, 16, 3, 3)),
    ('model.dec.16x16_block0.conv1.bias', (16,)),
    ('model.dec.16x16_block0.skip.weight', (16, 48, 1, 1)),
    ('model.dec.16x16_block0.skip.bias', (16,)),
    ('model.dec.16x16_block1.norm0.weight', (32,)),
    ('model.dec.16x16_block1.norm0.bias', (32,)),
    ('model.dec.16x16_block1.conv0.weight', (16, 32, 3, 3)),
    ('model.dec.16x16_block1.conv0.bias', (16,)),
    ('model.dec.16x16_block1.affine.weight', (16, 64)),
    ('model.dec.16x16_block1.affine.bias', (16,)),
    ('model.dec.16x16_block1.norm1.weight', (16,)),
    ('model.dec.16x16_block1.norm1.bias', (16,)),
    ('model.dec.16x16_block1.conv1.weight', (16, 16, 3, 3)),
    ('model.dec.16x16_block1.conv1.bias', (16,)),
    ('model.dec.16x16_block1.skip.weight', (16, 32, 1, 1)),
    ('model.dec.16x16_block1.skip.bias', (16,)),
    ('model.dec.16x16_aux_norm.weight', (16,)),
    ('model.dec.16x16_aux_norm.bias', (16,)),
    ('model.dec.16x16_aux_conv.weight', (3, 16, 3, 3)),
    ('model.dec.16x16_aux_conv.bias', (3,)),
]

NCSNPP_KEYS = [
    ('model.map_noise.freqs', (16,)),
    ('model.map_label.weight', (32, 10)),
    ('model.map_label.bias', (32,)),
    ('model.map_augment.weight', (32, 9)),
    ('model.map_layer0.weight', (64, 32)),
    ('model.map_layer0.bias', (64,)),
    ('model.map_layer1.weight', (64, 64)),
    ('model.map_layer1.bias', (64,)),
    ('model.enc.16x16_conv.weight', (16, 5, 3, 3)),
    ('model.enc.16x16_conv.bias', (16,)),
    ('model.enc.16x16_block0.norm0.weight', (16,)),
    ('model.enc.16x16_block0.norm0.bias', (16,)),
    ('model.enc.16x16_block0.conv0.weight', (16, 16, 3, 3)),
    ('model.enc.16x16_block0.conv0.bias', (16,)),
    ('model.enc.16x16_block0.affine.weight', (16, 64)),
    ('model.enc.16x16_block0.affine.bias', (16,)),
    ('model.enc.16x16_block0.norm1.weight', (16,)),
    ('model.enc.16x16_block0.norm1.bias', (16,)),
    ('model.enc.16x16_block0.conv1.weight', (16, 16, 3, 3)),
    ('model.enc.16x16_block0.conv1.bias', (16,)),
    ('model.enc.8x8_down.norm0.weight', (16,)),
    ('model.enc.8x8_down.norm0.bias', (16,)),
    ('model.enc.8x8_down.conv0.weight', (16, 16, 3, 3)),
    ('model.enc.8x8_down.conv0.bias', (16,)),
    ('model.enc.8x8_down.conv0.resample_filter', (1, 1, 4, 4)),
    ('model.enc.8x8_down.affine.weight', (16, 64)),
    ('model.enc.8x8_down.affine.bias', (16,)),
    ('model.enc.8x8_down.norm1.weight', (16,)),
    ('model.enc.8x8_down.norm1.bias', (16,)),
    ('model.enc.8x8_down.conv1.weight', (16, 16, 3, 3)),
    ('model.enc.8x8_down.conv1.bias', (16,)),
    ('model.enc.8x8_down.skip.weight', (16, 16, 1, 1)),
    ('model.enc.8x8_down.skip.bias', (16,)),
    ('model.enc.8x8_down.skip.resample_filter', (1, 1, 4, 4)),
    ('model.enc.8x8_aux_residual.weight', (16, 5, 3, 3)),
    ('model.enc.8x8_aux_residual.bias', (16,)),
    ('model.enc.8x8_aux_residual.resample_filter', (1, 1, 4, 4)),
    ('model.enc.8x8_block0.norm0.weight', (16,)),
    ('model.enc.8x8_block0.norm0.bias', (16,)),
    ('model.enc.8x8_block0.conv0.weight', (32, 16, 3, 3)),
    ('model.enc.8x8_block0.conv0.bias', (32,)),
    ('model.enc.8x8_block0.affine.weight', (32, 64)),
    ('model.enc.8x8_block0.affine.bias', (32,)),
    ('model.enc.8x8_block0.norm1.weight', (32,)),
    ('model.enc.8x8_block0.norm1.bias', (32,)),
    ('model.enc.8x8_block0.conv1.weight', (32, 32, 3, 3)),
    ('model.enc.8x8_block0.conv1.bias', (32,)),
    ('model.enc.8x8_block0.skip.weight', (32, 16, 1, 1)),
    ('model.enc.8x8_block0.skip.bias', (32,)),
    ('model.enc.8x8_block0.norm2.weight', (32,)),
    ('model.enc.8x8_block0.norm2.bias', (32,)),
    ('model.enc.8x8_block0.qkv.weight', (96, 32, 1, 1)),
    ('model.enc.8x8_block0.qkv.bias', (96,)),
    ('model.enc.8x8_block0.proj.weight', (32, 32, 1, 1)),
    ('model.enc.8x8_block0.proj.bias', (32,)),
    ('model.dec.8x8_in0.norm0.weight', (32,)),
    ('model.dec.8x8_in0.norm0.bias', (32,)),
    ('model.dec.8x8_in0.conv0.weight', (32, 32, 3, 3)),
    ('model.dec.8x8_in0.conv0.bias', (32,)),
    ('model.dec.8x8_in0.affine.weight', (32, 64)),
    ('model.dec.8x8_in0.affine.bias', (32,)),
    ('model.dec.8x8_in0.norm1.weight', (32,)),
    ('model.dec.8x8_in0.norm1.bias', (32,)),
    ('model.dec.8x8_in0.conv1.weight', (32, 32, 3, 3)),
    ('model.dec.8x8_in0.conv1.bias', (32,)),
    ('model.dec.8x8_in0.norm2.weight', (32,)),
    ('model.dec.8x8_in0.norm2.bias', (32,)),
    ('model.dec.8x8_in0.qkv.weight', (96, 32, 1, 1)),
    ('model.dec.8x8_in0.qkv.bias', (96,)),
    ('model.dec.8x8_in0.proj.weight', (32, 32, 1, 1)),
    ('model.dec.8x8_in0.proj.bias', (32,)),
    ('model.dec.8x8_in1.norm0.weight', (32,)),
    ('model.dec.8x8_in1.norm0.bias', (32,)),
    ('model.dec.8x8_in1.conv0.weight', (32, 32, 3, 3)),
    ('model.dec.8x8_in1.conv0.bias', (32,)),
    ('model.dec.8x8_in1.affine.weight', (32, 64)),
    ('model.dec.8x8_in1.affine.bias', (32,)),
    ('model.dec.8x8_in1.norm1.weight', (32,)),
    ('model.dec.8x8_in1.norm1.bias', (32,)),
    ('model.dec.8x8_in1.conv1.weight', (32, 32, 3, 3)),
    ('model.dec.8x8_in1.conv1.bias', (32,)),
    ('model.dec.8x8_block0.norm0.weight', (64,)),
    ('model.dec.8x8_block0.norm0.bias', (64,)),
    ('model.dec.8x8_block0.conv0.weight', (32, 64, 3, 3)),
    ('model.dec.8x8_block0.conv0.bias', (32,)),
    ('model.dec.8x8_block0.affine.weight', (32, 64)),
    ('model.dec.8x8_block0.affine.bias', (32,)),
    ('model.dec.8x8_block0.norm1.weight', (32,)),
    ('model.dec.8x8_block0.norm1.bias', (32,)),
    ('model.dec.8x8_block0.conv1.weight', (32, 32, 3, 3)),
    ('model.dec.8x8_block0.conv1.bias', (32,)),
    ('model.dec.8x8_block0.skip.weight', (32, 64, 1, 1)),
    ('model.dec.8x8_block0.skip.bias', (32,)),
    ('model.dec.8x8_block1.norm0.weight', (48,)),
    ('model.dec.8x8_block1.norm0.bias', (48,)),
    ('model.dec.8x8_block1.conv0.weight', (32, 48, 3, 3)),
    ('model.dec.8x8_block1.conv0.bias', (32,)),
    ('model.dec.8x8_block1.affine.weight', (32, 64)),
    ('model.dec.8x8_block1.affine.bias', (32,)),
    ('model.dec.8x8_block1.norm1.weight', (32,)),
    ('model.dec.8x8_block1.norm1.bias', (32,)),
    ('model.dec.8x8_block1.conv1.weight', (32, 32, 3, 3)),
    ('model.dec.8x8_block1.conv1.bias', (32,)),
    ('model.dec.8x8_block1.skip.weight', (32, 48, 1, 1)),
    ('model.dec.8x8_block1.skip.bias', (32,)),
    ('model.dec.8x8_block1.norm2.weight', (32,)),
    ('model.dec.8x8_block1.norm2.bias', (32,)),
    ('model.dec.8x8_block1.qkv.weight', (96, 32, 1, 1)),
    ('model.dec.8x8_block1.qkv.bias', (96,)),
    ('model.dec.8x8_block1.proj.weight', (32, 32, 1, 1)),
    ('model.dec.8x8_block1.proj.bias', (32,)),
    ('model.dec.16x16_up.norm0.weight', (32,)),
    ('model.dec.16x16_up.norm0.bias', (32,)),
    ('model.dec.16x16_up.conv0.weight', (32, 32, 3, 3)),
    ('model.dec.16x16_up.conv0.bias', (32,)),
    ('model.dec.16x16_up.conv0.resample_filter', (1, 1, 4, 4)),
    ('model.dec.16x16_up.affine.weight', (32, 64)),
    ('model.dec.16x16_up.affine.bias', (32,)),
    ('model.dec.16x16_up.norm1.weight', (32,)),
    ('model.dec.16x16_up.norm1.bias', (32,)),
    ('model.dec.16x16_up.conv1.weight', (32, 32, 3, 3)),
    ('model.dec.16x16_up.conv1.bias', (32,)),
    ('model.dec.16x16_up.skip.weight', (32, 32, 1, 1)),
    ('model.dec.16x16_up.skip.bias', (32,)),
    ('model.dec.16x16_up.skip.resample_filter', (1, 1, 4, 4)),
    ('model.dec.16x16_block0.norm0.weight', (48,)),
    ('model.dec.16x16_block0.norm0.bias', (48,)),
    ('model.dec.16x16_block0.conv0.weight', (16, 48, 3, 3)),
    ('model.dec.16x16_block0.conv0.bias', (16,)),
    ('model.dec.16x16_block0.affine.weight', (16, 64)),
    ('model.dec.16x16_block0.affine.bias', (16,)),
    ('model.dec.16x16_block0.norm1.weight', (16,)),
    ('model.dec.16x16_block0.norm1.bias', (16,)),
    ('model.dec.16x16_block0.conv1.weight', (16, 16, 3, 3)),
    ('model.dec.16x16_block0.conv1.bias', (16,)),
    ('model.dec.16x16_block0.skip.weight', (16, 48, 1, 1)),
    ('model.dec.16x16_block0.skip.bias', (16,)),
    ('model.dec.16x16_block1.norm0.weight', (32,)),
    ('model.dec.16x16_block1.norm0.bias', (32,)),
    ('model.dec.16x16_block1.conv0.weight', (16, 32, 3, 3)),
    ('model.dec.16x16_block1.conv0.bias', (16,)),
    ('model.dec.16x16_block1.affine.weight', (16, 64)),
    ('model.dec.16x16_block1.affine.bias', (16,)),
    ('model.dec.16x16_block1.norm1.weight', (16,)),
    ('model.dec.16x16_block1.norm1.bias', (16,)),
    ('model.dec.16x16_block1.conv1.weight', (16, 16, 3, 3)),
    ('model.dec.16x16_block1.conv1.bias', (16,)),
    ('model.dec.16x16_block1.skip.weight', (16, 32, 1, 1)),
    ('model.dec.16x16_block1.skip.bias', (16,)),
    ('model.dec.16x16_aux_norm.weight', (16,)),
    ('model.dec.16x16_aux_norm.bias', (16,)),
    ('model.dec.16x16_aux_conv.weight', (3, 16, 3, 3)),
    ('model.dec.16x16_aux_conv.bias', (3,)),
]

ADM_KEYS = [
    ('model.map_augment.weight', (32, 9)),
    ('model.map_layer0.weight', (128, 32)),
    ('model.map_layer0.bias', (128,)),
    ('model.map_layer1.weight', (128, 128)),
    ('model.map_layer1.bias', (128,)),
    ('model.map_label.weight', (128, 10)),
    ('model.enc.16x16_conv.weight', (32, 5, 3, 3)),
    ('model.enc.16x16_conv.bias', (32,)),
    ('model.enc.16x16_block0.norm0.weight', (32,)),
    ('model.enc.16x16_block0.norm0.bias', (32,)),
    ('model.enc.16x16_block0.conv0.weight', (32, 32, 3, 3)),
    ('model.enc.16x16_block0.conv0.bias', (32,)),
    ('model.enc.16x16_block0.affine.weight', (64, 128)),
    ('model.enc.16x16_block0.affine.bias', (64,)),
    ('model.enc.16x16_block0.norm1.weight', (32,)),
    ('model.enc.16x16_block0.norm1.bias', (32,)),
    ('model.enc.16x16_block0.conv1.weight', (32, 32, 3, 3)),
    ('model.enc.16x16_block0.conv1.bias', (32,)),
    ('model.enc.8x8_down.norm0.weight', (32,)),
    ('model.enc.8x8_down.norm0.bias', (32,)),
    ('model.enc.8x8_down.conv0.weight', (32, 32, 3, 3)),
    ('model.enc.8x8_down.conv0.bias', (32,)),
    ('model.enc.8x8_down.conv0.resample_filter', (1, 1, 2, 2)),
    ('model.enc.8x8_down.affine.weight', (64, 128)),
    ('model.enc.8x8_down.affine.bias', (64,)),
    ('model.enc.8x8_down.norm1.weight', (32,)),
    ('model.enc.8x8_down.norm1.bias', (32,)),
    ('model.enc.8x8_down.conv1.weight', (32, 32, 3, 3)),
    ('model.enc.8x8_down.conv1.bias', (32,)),
    ('model.enc.8x8_down.skip.resample_filter', (1, 1, 2, 2)),
    ('model.enc.8x8_block0.norm0.weight', (32,)),
    ('model.enc.8x8_block0.norm0.bias', (32,)),
    ('model.enc.8x8_block0.conv0.weight', (64, 32, 3, 3)),
    ('model.enc.8x8_block0.conv0.bias', (64,)),
    ('model.enc.8x8_block0.affine.weight', (128, 128)),
    ('model.enc.8x8_block0.affine.bias', (128,)),
    ('model.enc.8x8_block0.norm1.weight', (64,)),
    ('model.enc.8x8_block0.norm1.bias', (64,)),
    ('model.enc.8x8_block0.conv1.weight', (64, 64, 3, 3)),
    ('model.enc.8x8_block0.conv1.bias', (64,)),
    ('model.enc.8x8_block0.skip.weight', (64, 32, 1, 1)),
    ('model.enc.8x8_block0.skip.bias', (64,)),
    ('model.enc.8x8_block0.norm2.weight', (64,)),
    ('model.enc.8x8_block0.norm2.bias', (64,)),
    ('model.enc.8x8_block0.qkv.weight', (192, 64, 1, 1)),
    ('model.enc.8x8_block0.qkv.bias', (192,)),
    ('model.enc.8x8_block0.proj.weight', (64, 64, 1, 1)),
    ('model.enc.8x8_block0.proj.bias', (64,)),
    ('model.dec.8x8_in0.norm0.weight', (64,)),
    ('model.dec.8x8_in0.norm0.bias', (64,)),
    ('model.dec.8x8_in0.conv0.weight', (64, 64, 3, 3)),
    ('model.dec.8x8_in0.conv0.bias', (64,)),
    ('model.dec.8x8_in0.affine.weight', (128, 128)),
    ('model.dec.8x8_in0.affine.bias', (128,)),
    ('model.dec.8x8_in0.norm1.weight', (64,)),
    ('model.dec.8x8_in0.norm1.bias', (64,)),
    ('model.dec.8x8_in0.conv1.weight', (64, 64, 3, 3)),
    ('model.dec.8x8_in0.conv1.bias', (64,)),
    ('model.dec.8x8_in0.norm2.weight', (64,)),
    ('model.dec.8x8_in0.norm2.bias', (64,)),
    ('model.dec.8x8_in0.qkv.weight', (192, 64, 1, 1)),
    ('model.dec.8x8_in0.qkv.bias', (192,)),
    ('model.dec.8x8_in0.proj.weight', (64, 64, 1, 1)),
    ('model.dec.8x8_in0.proj.bias', (64,)),
    ('model.dec.8x8_in1.norm0.weight', (64,)),
    ('model.dec.8x8_in1.norm0.bias', (64,)),
    ('model.dec.8x8_in1.conv0.weight', (64, 64, 3, 3)),
    ('model.dec.8x8_in1.conv0.bias', (64,)),
    ('model.dec.8x8_in1.affine.weight', (128, 128)),
    ('model.dec.8x8_in1.affine.bias', (128,)),
    ('model.dec.8x8_in1.norm1.weight', (64,)),
    ('model.dec.8x8_in1.norm1.bias', (64,)),
    ('model.dec.8x8_in1.conv1.weight', (64, 64, 3, 3)),
    ('model.dec.8x8_in1.conv1.bias', (64,)),
    ('model.dec.8x8_block0.norm0.weight', (128,)),
    ('model.dec.8x8_block0.norm0.bias', (128,)),
    ('model.dec.8x8_block0.conv0.weight', (64, 128, 3, 3)),
    ('model.dec.8x8_block0.conv0.bias', (64,)),
    ('model.dec.8x8_block0.affine.weight', (128, 128)),
    ('model.dec.8x8_block0.affine.bias', (128,)),
    ('model.dec.8x8_block0.norm1.weight', (64,)),
    ('model.dec.8x8_block0.norm1.bias', (64,)),
    ('model.dec.8x8_block0.conv1.weight', (64, 64, 3, 3)),
    ('model.dec.8x8_block0.conv1.bias', (64,)),
    ('model.dec.8x8_block0.skip.weight', (64, 128, 1, 1)),
    ('model.dec.8x8_block0.skip.bias', (64,)),
    ('model.dec.8x8_block0.norm2.weight', (64,)),
    ('model.dec.8x8_block0.norm2.bias', (64,)),
    ('model.dec.8x8_block0.qkv.weight', (192, 64, 1, 1)),
    ('model.dec.8x8_block0.qkv.bias', (192,)),
    ('model.dec.8x8_block0.proj.weight', (64, 64, 1, 1)),
    ('model.dec.8x8_block0.proj.bias', (64,)),
    ('model.dec.8x8_block1.norm0.weight', (96,)),
    ('model.dec.8x8_block1.norm0.bias', (96,)),
    ('model.dec.8x8_block1.conv0.weight', (64, 96, 3, 3)),
    ('model.dec.8x8_block1.conv0.bias', (64,)),
    ('model.dec.8x8_block1.affine.weight', (128, 128)),
    ('model.dec.8x8_block1.affine.bias', (128,)),
    ('model.dec.8x8_block1.norm1.weight', (64,)),
    ('model.dec.8x8_block1.norm1.bias', (64,)),
    ('model.dec.8x8_block1.conv1.weight', (64, 64, 3, 3)),
    ('model.dec.8x8_block1.conv1.bias', (64,)),
    ('model.dec.8x8_block1.skip.weight', (64, 96, 1, 1)),
    ('model.dec.8x8_block1.skip.bias', (64,)),
    ('model.dec.8x8_block1.norm2.weight', (64,)),
    ('model.dec.8x8_block1.norm2.bias', (64,)),
    ('model.dec.8x8_block1.qkv.weight', (192, 64, 1, 1)),
    ('model.dec.8x8_block1.qkv.bias', (192,)),
    ('model.dec.8x8_block1.proj.weight', (64, 64, 1, 1)),
    ('model.dec.8x8_block1.proj.bias', (64,)),
    ('model.dec.16x16_up.norm0.weight', (64,)),
    ('model.dec.16x16_up.norm0.bias', (64,)),
    ('model.dec.16x16_up.conv0.weight', (64, 64, 3, 3)),
    ('model.dec.16x16_up.conv0.bias', (64,)),
    ('model.dec.16x16_up.conv0.resample_filter', (1, 1, 2, 2)),
    ('model.dec.16x16_up.affine.weight', (128, 128)),
    ('model.dec.16x16_up.affine.bias', (128,)),
    ('model.dec.16x16_up.norm1.weight', (64,)),
    ('model.dec.16x16_up.norm1.bias', (64,)),
    ('model.dec.16x16_up.conv1.weight', (64, 64, 3, 3)),
    ('model.dec.16x16_up.conv1.bias', (64,)),
    ('model.dec.16x16_up.skip.resample_filter', (1, 1, 2, 2)),
    ('model.dec.16x16_block0.norm0.weight', (96,)),
    ('model.dec.16x16_block0.norm0.bias', (96,)),
    ('model.dec.16x16_block0.conv0.weight', (32, 96, 3, 3)),
    ('model.dec.16x16_block0.conv0.bias', (32,)),
    ('model.dec.16x16_block0.affine.weight', (64, 128)),
    ('model.dec.16x16_block0.affine.bias', (64,)),
    ('model.dec.16x16_block0.norm1.weight', (32,)),
    ('model.dec.16x16_block0.norm1.bias', (32,)),
    ('model.dec.16x16_block0.conv1.weight', (32, 32, 3, 3)),
    ('model.dec.16x16_block0.conv1.bias', (32,)),
    ('model.dec.16x16_block0.skip.weight', (32, 96, 1, 1)),
    ('model.dec.16x16_block0.skip.bias', (32,)),
    ('model.dec.16x16_block1.norm0.weight', (64,)),
    ('model.dec.16x16_block1.norm0.bias', (64,)),
    ('model.dec.16x16_block1.conv0.weight', (32, 64, 3, 3)),
    ('model.dec.16x16_block1.conv0.bias', (32,)),
    ('model.dec.16x16_block1.affine.weight', (64, 128)),
    ('model.dec.16x16_block1.affine.bias', (64,)),
    ('model.dec.16x16_block1.norm1.weight', (32,)),
    ('model.dec.16x16_block1.norm1.bias', (32,)),
    ('model.dec.16x16_block1.conv1.weight', (32, 32, 3, 3)),
    ('model.dec.16x16_block1.conv1.bias', (32,)),
    ('model.dec.16x16_block1.skip.weight', (32, 64, 1, 1)),
    ('model.dec.16x16_block1.skip.bias', (32,)),
    ('model.out_norm.weight', (32,)),
    ('model.out_norm.bias', (32,)),
    ('model.out_conv.weight', (3, 32, 3, 3)),
    ('model.out_conv.bias', (3,)),
]
EXPECTED_KEYS = {'ddpmpp': DDPMPP_KEYS, 'ncsnpp': NCSNPP_KEYS, 'adm': ADM_KEYS}


def make_net(arch, precond=EDMPrecond, label_dim=LABEL_DIM, pos_channels=2, **kwargs):
    torch.manual_seed(0)
    return precond(RES, IMG_CHANNELS, label_dim=label_dim, pos_channels=pos_channels, **{**ARCHS[arch], 'dropout': 0, **kwargs})


def randomize_(net):
    """Replace the (partly zero) init by random weights so every path influences the output."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net


def coords(n, size):
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing='ij')
    return torch.stack([xs, ys])[None].repeat(n, 1, 1, 1)


@pytest.mark.parametrize('arch', ARCHS)
def test_state_dict_matches_edm_layout(arch):
    net = make_net(arch, augment_dim=9)
    assert [(k, tuple(v.shape)) for k, v in net.state_dict().items()] == EXPECTED_KEYS[arch]
    assert [k for k, _ in net.named_parameters()] == [k for k, _ in EXPECTED_KEYS[arch] if not k.endswith(('resample_filter', 'freqs'))]
    in_conv = net.state_dict()['model.enc.16x16_conv.weight']
    assert in_conv.shape[1] == IMG_CHANNELS + 2


@pytest.mark.parametrize('arch', ARCHS)
def test_pos_channels_zero_is_plain_edm_layout(arch):
    expected = [(k, (s[0], IMG_CHANNELS, *s[2:]) if k.endswith('16x16_conv.weight') or k.endswith('aux_residual.weight') else s)
                for k, s in EXPECTED_KEYS[arch]]
    net = make_net(arch, pos_channels=0, augment_dim=9)
    assert [(k, tuple(v.shape)) for k, v in net.state_dict().items()] == expected


@pytest.mark.parametrize('arch', ARCHS)
def test_checkpoint_roundtrip_strict(arch):
    src, dst = randomize_(make_net(arch)), make_net(arch)
    dst.load_state_dict(src.state_dict(), strict=True)
    x, sigma = torch.randn(2, IMG_CHANNELS, RES, RES), torch.tensor([0.5, 2.0])
    assert torch.equal(src(x, sigma, coords(2, RES)), dst(x, sigma, coords(2, RES)))


@pytest.mark.parametrize('with_labels', [True, False])
@pytest.mark.parametrize('size', [RES, RES // 2, RES // 4])
@pytest.mark.parametrize('pos_channels', [2, 0])
@pytest.mark.parametrize('arch', ARCHS)
def test_forward_backward_patch_sizes(arch, pos_channels, size, with_labels):
    net = randomize_(make_net(arch, pos_channels=pos_channels, augment_dim=9)).train()
    x = torch.randn(2, IMG_CHANNELS, size, size, requires_grad=True)
    x_pos = coords(2, size) if pos_channels else None
    labels = torch.eye(LABEL_DIM)[[1, 7]] if with_labels else None
    out = net(x, torch.tensor([0.3, 4.0]), x_pos, class_labels=labels, augment_labels=torch.randn(2, 9))
    assert out.shape == x.shape and out.dtype == torch.float32
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize('precond', [VPPrecond, VEPrecond])
def test_vp_ve_preconditioners(precond):
    net = make_net('ddpmpp', precond=precond)
    x = torch.randn(2, IMG_CHANNELS, RES // 2, RES // 2)
    sigma = torch.tensor([net.sigma_min, 1.0]) if precond is VPPrecond else torch.tensor([net.sigma_min, net.sigma_max])
    out = net(x, sigma, coords(2, RES // 2))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert net.round_sigma(0.7).item() == pytest.approx(0.7)


def test_precond_attributes():
    net = make_net('adm', sigma_min=0.002, sigma_max=80)
    assert (net.img_resolution, net.img_channels, net.label_dim, net.use_fp16) == (RES, IMG_CHANNELS, LABEL_DIM, False)
    assert (net.sigma_min, net.sigma_max, net.sigma_data) == (0.002, 80, 0.5)
    assert isinstance(net.model, DhariwalUNet) and isinstance(make_net('ddpmpp').model, SongUNet)


def test_output_has_image_channels_only():
    net = make_net('ddpmpp', pos_channels=3, label_dim=0)
    x = torch.randn(1, IMG_CHANNELS, RES, RES)
    assert net(x, torch.tensor(1.0), torch.randn(1, 3, RES, RES)).shape == (1, IMG_CHANNELS, RES, RES)
    assert net.model.enc['16x16_conv'].in_channels == IMG_CHANNELS + 3


def test_check_patch_size_messages():
    assert min_input_size([1, 2, 2, 2]) == 8 and min_input_size([1]) == 1
    with pytest.raises(ValueError, match=r'patch size 2 is too small for channel_mult \[1,2,2,2\]: '
                                         r'each side must be a multiple of 8 \(3 downsampling levels\)'):
        check_patch_size([1, 2, 2, 2], 2)
    with pytest.raises(ValueError, match=r'patch size 12 is not a multiple of 8 .*a multiple of 8 \(3 downsampling levels\)'):
        check_patch_size([1, 2, 2, 2], 12)
    with pytest.raises(ValueError, match=r'patch size 16x12 is not a multiple of 8 for channel_mult \[1,2,2,2\]'):
        check_patch_size([1, 2, 2, 2], (16, 12))
    for ok in [8, 16, 24, (32, 32), (16, 8)]:
        check_patch_size([1, 2, 2, 2], ok)


def test_precond_rejects_bad_patch_sizes():
    net = make_net('ncsnpp', channel_mult=[1, 2, 2])
    with pytest.raises(ValueError, match=r'patch size 2 is too small for channel_mult \[1,2,2\]: '
                                         r'.*multiple of 4 \(2 downsampling levels\)'):
        net(torch.randn(1, IMG_CHANNELS, 2, 2), torch.tensor(1.0), coords(1, 2))
    with pytest.raises(ValueError, match=r'patch size 6 is not a multiple of 4'):
        net(torch.randn(1, IMG_CHANNELS, 6, 6), torch.tensor(1.0), coords(1, 6))
    with pytest.raises(ValueError, match=r'patch size 8x6 is not a multiple of 4'):
        net(torch.randn(1, IMG_CHANNELS, 8, 6), torch.tensor(1.0), torch.zeros(1, 2, 8, 6))
    assert net(torch.randn(1, IMG_CHANNELS, 8, 4), torch.tensor(1.0), torch.zeros(1, 2, 8, 4)).shape == (1, IMG_CHANNELS, 8, 4)


def test_x_pos_errors():
    x, sigma = torch.randn(1, IMG_CHANNELS, RES, RES), torch.tensor(1.0)
    with pytest.raises(ValueError, match=r'x_pos is required: the network takes 2 coordinate channels'):
        make_net('ddpmpp')(x, sigma)
    with pytest.raises(ValueError, match=r'x_pos was given but the network has pos_channels=0'):
        make_net('ddpmpp', pos_channels=0)(x, sigma, coords(1, RES))
    with pytest.raises(ValueError, match=r'x_pos has shape \[1, 2, 8, 8\], expected \[N, 2, 16, 16\]'):
        make_net('ddpmpp')(x, sigma, coords(1, 8))
    with pytest.raises(ValueError, match=r'x has 5 channels, expected img_channels=3'):
        make_net('ddpmpp')(torch.randn(1, 5, RES, RES), sigma, coords(1, RES))


@pytest.mark.parametrize('arch', ARCHS)
def test_label_dropout(arch):
    net = randomize_(make_net(arch, label_dropout=1.0))
    x, sigma, x_pos = torch.randn(2, IMG_CHANNELS, RES, RES), torch.tensor([0.5, 3.0]), coords(2, RES)
    labels, zeros = torch.eye(LABEL_DIM)[[2, 5]], torch.zeros(2, LABEL_DIM)
    net.train()
    assert torch.equal(net(x, sigma, x_pos, labels), net(x, sigma, x_pos, zeros))
    net.eval()
    assert not torch.allclose(net(x, sigma, x_pos, labels), net(x, sigma, x_pos, zeros))
    assert torch.equal(net(x, sigma, x_pos, None), net(x, sigma, x_pos, zeros))


@pytest.mark.parametrize('arch', ARCHS)
def test_bf16_on_cpu(arch):
    ref = randomize_(make_net(arch)).eval()
    bf16 = make_net(arch, use_bf16=True).eval()
    bf16.load_state_dict(ref.state_dict())
    x, sigma, x_pos = torch.randn(2, IMG_CHANNELS, RES, RES), torch.tensor([0.5, 3.0]), coords(2, RES)
    assert bf16.model_dtype(x.device) == torch.bfloat16
    out, expected = bf16(x, sigma, x_pos), ref(x, sigma, x_pos)
    assert out.dtype == torch.float32
    assert (out - expected).abs().max() < 0.1 * expected.abs().max()
    assert torch.equal(bf16(x, sigma, x_pos, force_fp32=True), expected)


def test_fp16_is_ignored_on_cpu():
    ref = make_net('ddpmpp').eval()
    fp16 = make_net('ddpmpp', use_fp16=True).eval()
    assert fp16.model_dtype(torch.device('cpu')) == torch.float32
    assert fp16.model_dtype(torch.device('cuda')) == torch.float16
    x, sigma = torch.randn(1, IMG_CHANNELS, RES, RES), torch.tensor(1.0)
    assert torch.equal(fp16(x, sigma, coords(1, RES)), ref(x, sigma, coords(1, RES)))


def test_attention_weights_gradient():
    torch.manual_seed(0)
    q, k = torch.randn(3, 8, 5, requires_grad=True), torch.randn(3, 8, 7, requires_grad=True)
    dw = torch.randn(3, 5, 7)
    dq, dk = torch.autograd.grad(networks._AttentionWeights.apply(q, k), [q, k], dw)
    ref = torch.einsum('ncq,nck->nqk', q, k / np.sqrt(8)).softmax(dim=2)
    rq, rk = torch.autograd.grad(ref, [q, k], dw)
    assert torch.allclose(dq, rq, atol=1e-5) and torch.allclose(dk, rk, atol=1e-5)


def test_invalid_arguments():
    with pytest.raises(ValueError, match='encoder_type'):
        SongUNet(RES, 3, 3, encoder_type='bogus')
    with pytest.raises(ValueError, match='unknown model_type'):
        EDMPrecond(RES, 3, model_type='Bogus')
    with pytest.raises(ValueError, match='invalid init mode'):
        networks.weight_init([2], 'xavier_bogus', 1, 1)
