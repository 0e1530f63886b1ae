"""The EDM2 networks that bench/check_references.py compares with NVlabs/edm2 and tests/test_networks_edm2.py checks
against the stored outputs (tests/data/edm2-reference.pt), and the weights both give them.

Self-contained (torch and the standard library only): the reference script imports it inside EDM2's checkout,
where this project's packages are not on the path. The weights come from integer arithmetic, not from a random
generator, so they are the same on every machine and torch version, and they are multiples of 2^-10 in [-1, 1),
which float16 holds exactly: an EDM2 snapshot, whose EMA is stored in float16, keeps them unchanged.
"""

import zlib
from typing import Dict, Tuple

import torch

TINY = dict(img_resolution=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], channels_per_head=8)
# name: (Precond arguments, encoder of the snapshot: 'rgb' (StandardRGBEncoder), 'vae' (StabilityVAEEncoder) or None,
#        dtype of the snapshot's EMA network)
CASES = {
    'edm2-cond': (dict(TINY, img_channels=3, label_dim=4, model_channels=16, logvar_channels=16), 'rgb', 'float16'),
    'edm2-uncond': (dict(TINY, img_channels=4, label_dim=0, model_channels=24, channel_mult_noise=1, channel_mult_emb=3,
                         logvar_channels=8, sigma_data=0.7, concat_balance=0.4, res_balance=0.35, attn_balance=0.25,
                         clip_act=None), 'vae', 'float32'),
}
VAE_ENCODER = dict(raw_mean=[5.5, 3.0, 0.25, -2.0], raw_std=[4.0, 4.5, 3.5, 3.25], final_mean=0.125, final_std=0.5)
SIGMA = [0.05, 0.7, 6.0]


def deterministic_values(name: str, numel: int) -> torch.Tensor:
    """numel multiples of 2^-10 in [-1, 1), a hash of (name, index): the same everywhere, exact in float16."""
    index = torch.arange(numel, dtype=torch.int64)
    mixed = (index * 40503 + zlib.crc32(name.encode())) % 65536 * 2654435761 % 4294967296
    return ((mixed // 65536) % 2048 - 1024).to(torch.float32) / 1024


@torch.no_grad()
def fill_deterministic(net: torch.nn.Module) -> torch.nn.Module:
    """Set every parameter and buffer of net from deterministic_values (by its state-dict name); returns net."""
    for name, tensor in net.state_dict().items():
        tensor.copy_(deterministic_values(name, tensor.numel()).reshape(tensor.shape))
    return net


def inputs(case: str) -> Dict[str, torch.Tensor]:
    """Noisy images x [3, C, 16, 16], sigma [3] and class labels (or None) for a case."""
    kwargs = CASES[case][0]
    x = deterministic_values(f'{case}.x', 3 * kwargs['img_channels'] * 16 * 16).reshape(3, -1, 16, 16) * 2
    labels = torch.eye(3, kwargs['label_dim']) * 1.5 if kwargs['label_dim'] else None
    return dict(x=x, sigma=torch.tensor(SIGMA), class_labels=labels)


MODES = {'eval': False, 'train': True, 'eval_after_train': False}  # in this order: name -> training mode


@torch.no_grad()
def outputs(net: torch.nn.Module, io: Dict[str, torch.Tensor]) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """(D, logvar) in eval mode, in training mode (the first call there, where forced weight normalisation rewrites
    the weights) and in eval mode after it; net is left in eval mode. EDM2's Precond and EDM2Precond both take this."""
    result = {mode: net.train(training)(io['x'], io['sigma'], class_labels=io['class_labels'], return_logvar=True)
              for mode, training in MODES.items()}
    net.eval()
    return result
