"""EDM2's network (training/networks_edm2.py): the same state dict and outputs as NVlabs/edm2, forced weight
normalisation, coordinate channels, EDM2 snapshots and --transfer.

EDM2's outputs for bench/edm2_cases.py's networks were computed by EDM2's own code (bench/check_references.py
--edm2 --edm2-data, docs/compatibility.md) and are stored in tests/data/edm2-reference.pt, so no reference code is
needed here.
"""

import copy
import functools
import os

import numpy as np
import pytest
import torch

from bench import edm2_cases
from test_snapshot_import import edm_style_pickle, snapshot_data, stand_in_source
from torch_utils import persistence
from torch_utils.misc import copy_params_and_buffers
from training import networks_edm2
from training.networks_edm2 import EDM2Precond, MPConv, normalize
from training.snapshot import SnapshotError, load_network, save_network_snapshot

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'edm2-reference.pt')
REFERENCE = torch.load(DATA)['cases']
# EDM2's outputs were computed on one CPU, ours run on another, whose SIMD width and threads may sum the convolutions,
# norms and attention in another order. Against a float64 evaluation of the same network, float32 rounding moves D by
# at most 8.1e-7 and logvar by 1.9e-7 (values of up to 2.04), so two CPUs differ by 1.6e-6 at most; 1e-5 leaves a
# factor of 6. The mutations below move the outputs by 1e-4 or more.
ATOL = 1e-5
SMALL = dict(img_resolution=16, img_channels=3, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
             channels_per_head=8, logvar_channels=16)


def reference_net(case: str) -> EDM2Precond:
    return edm2_cases.fill_deterministic(EDM2Precond(**REFERENCE[case]['kwargs']))


def max_differences(net: EDM2Precond, case: str) -> float:
    """Largest difference of D and logvar from EDM2's, over the modes of edm2_cases.outputs."""
    expected = REFERENCE[case]
    ours = edm2_cases.outputs(net, expected)
    return max(float((a - b).abs().max()) for mode in ours for a, b in zip(ours[mode], expected[mode]))


@pytest.mark.parametrize('case', list(edm2_cases.CASES))
def test_state_dict_is_edm2s_key_for_key_and_shape_for_shape(case):
    layout = [(key, list(value.shape)) for key, value in reference_net(case).state_dict().items()]
    assert layout == [tuple(item) for item in REFERENCE[case]['layout']]


@pytest.mark.parametrize('case', list(edm2_cases.CASES))
def test_outputs_equal_edm2s_in_eval_and_training_mode(case):
    assert max_differences(reference_net(case), case) <= ATOL


def mutated_attention(qkv: torch.Tensor, num_heads: int, scale: bool, pixel_norm: bool) -> torch.Tensor:
    """cosine_attention without the 1/sqrt(channels) scale or without normalising q, k and v per pixel."""
    n, _, h, w = qkv.shape
    qkv = qkv.reshape(n, num_heads, -1, 3, h * w)
    q, k, v = (normalize(qkv, dim=2) if pixel_norm else qkv).unbind(3)
    weights = torch.einsum('nhcq,nhck->nhqk', q, k / (np.sqrt(q.shape[2]) if scale else 1)).softmax(dim=3)
    return torch.einsum('nhqk,nhck->nhcq', weights, v).reshape(n, -1, h, w)


@pytest.mark.parametrize('mutation', ['silu-constant', 'attention-scale', 'attention-normalisation'])
def test_the_output_check_catches_small_changes(monkeypatch, mutation):
    """Mutations of the network's constants move the outputs by far more than ATOL, in both cases."""
    if mutation == 'silu-constant':
        monkeypatch.setattr(networks_edm2, 'SILU_RMS', 0.597)
    else:
        scale = mutation != 'attention-scale'
        mutated = functools.partial(mutated_attention, scale=scale, pixel_norm=not scale)
        monkeypatch.setattr(networks_edm2, 'cosine_attention', mutated)
    for case in edm2_cases.CASES:
        assert max_differences(reference_net(case), case) > 10 * ATOL


def mpconv_row_rms(net: torch.nn.Module) -> torch.Tensor:
    """Root mean square over the fan-in of every output channel of every MPConv weight, concatenated."""
    return torch.cat([m.weight.detach().flatten(1).square().mean(1).sqrt() for m in net.modules() if isinstance(m, MPConv)])


def normalised_rms(rms: torch.Tensor) -> torch.Tensor:
    """The RMS that normalize() leaves from rms: rms / (rms + 1e-4)."""
    return rms / (rms + 1e-4)


def test_forced_weight_normalisation_after_an_adam_step():
    """EDM2's normalize() divides each output channel's weights by their root mean square over the fan-in plus 1e-4.
    So a forward pass in training mode leaves every stored MPConv weight with RMS r / (r + 1e-4) per output channel
    (r: its RMS before; norm sqrt(fan_in) but for the 1e-4), and the weights the step moved are pulled back."""
    net = edm2_cases.fill_deterministic(EDM2Precond(**SMALL, label_dim=2, pos_channels=2)).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    x, x_pos = torch.randn([2, 3, 16, 16]), torch.rand([2, 2, 16, 16]) * 2 - 1
    sigma, labels = torch.tensor([0.5, 3.0]), torch.eye(2)
    before = mpconv_row_rms(net)
    D, logvar = net(x, sigma, x_pos, labels, return_logvar=True)
    torch.testing.assert_close(mpconv_row_rms(net), normalised_rms(before), rtol=1e-6, atol=0)
    ((D - x).square() / logvar.exp() + logvar).mean().backward()
    optimizer.step()
    stepped = mpconv_row_rms(net)
    assert (stepped - 1).abs().max() > 1e-3  # the step moved them off the unit sphere
    net.eval()(x, sigma, x_pos, labels, return_logvar=True)
    assert torch.equal(mpconv_row_rms(net), stepped)  # eval mode leaves the stored weights alone
    net.train()(x, sigma, x_pos, labels, return_logvar=True)  # logvar_linear runs (and is normalised) only for logvar
    torch.testing.assert_close(mpconv_row_rms(net), normalised_rms(stepped), rtol=1e-6, atol=0)
    assert (mpconv_row_rms(net) - 1).abs().max() < 2e-4


@pytest.mark.parametrize('size', [16, 8, 4])
def test_coordinate_channels_forward_and_backward_at_every_patch_size(size):
    net = edm2_cases.fill_deterministic(EDM2Precond(**SMALL, pos_channels=2)).train()
    assert net.unet.enc['16x16_conv'].weight.shape[1] == 3 + 2 + 1  # image, coordinates, the constant channel
    x, x_pos = torch.randn([2, 3, size, size]), torch.rand([2, 2, size, size]) * 2 - 1
    D, logvar = net(x, torch.tensor([0.2, 2.0]), x_pos, return_logvar=True)
    assert D.shape == x.shape and D.dtype == torch.float32 and logvar.shape == (2, 1, 1, 1)
    (D.square().mean() + logvar.mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert net.unet.enc['16x16_conv'].weight.grad[:, 3:5].abs().sum() > 0  # the coordinates reach the loss
    with torch.no_grad():
        assert not torch.equal(net.eval()(x, torch.tensor([0.2, 2.0]), -x_pos), D)


@pytest.mark.parametrize('call, message', [
    (lambda net: net(torch.zeros([1, 4, 16, 16]), 1.0, torch.zeros([1, 2, 16, 16])), 'x has 4 channels, expected img_channels=3'),
    (lambda net: net(torch.zeros([1, 3, 16, 16]), 1.0), 'x_pos is required'),
    (lambda net: net(torch.zeros([1, 3, 16, 16]), 1.0, torch.zeros([1, 2, 8, 8])), r'x_pos has shape \[1, 2, 8, 8\]'),
    (lambda net: net(torch.zeros([1, 3, 7, 7]), 1.0, torch.zeros([1, 2, 7, 7])), 'patch size 7 is not a multiple of 2'),
])
def test_arguments_are_checked_as_in_edms_preconditioners(call, message):
    with pytest.raises(ValueError, match=message):
        call(EDM2Precond(**SMALL, pos_channels=2))
    with pytest.raises(ValueError, match='pos_channels=0'):
        EDM2Precond(**SMALL)(torch.zeros([1, 3, 16, 16]), 1.0, torch.zeros([1, 2, 16, 16]))


def test_model_is_the_unet_and_not_a_second_state_dict_entry():
    net = EDM2Precond(**SMALL)
    assert net.model is net.unet and not any(key.startswith('model.') for key in net.state_dict())
    assert net.round_sigma(0.3) == torch.tensor(0.3) and net.model_dtype(torch.device('cpu')) == torch.float32
    assert EDM2Precond(**SMALL, use_bf16=True).model_dtype(torch.device('cpu')) == torch.bfloat16

#----------------------------------------------------------------------------
# EDM2's snapshots.

@persistence.persistent_class
class StabilityVAEEncoder:
    """Stand-in with the class name and state of EDM2's encoder (training/encoders.py); pickled, not run, by loaders."""

    def __init__(self, vae_name: str, raw_mean, raw_std, final_mean: float, final_std: float):
        self.vae_name = vae_name
        self.scale = np.float32(final_std) / np.float32(raw_std)
        self.bias = np.float32(final_mean) - np.float32(raw_mean) * self.scale
        self.batch_size = 8
        self._vae = None


@persistence.persistent_class
class StandardRGBEncoder:
    """Stand-in with the class name of EDM2's pixel encoder."""


def edm2_snapshot(net: EDM2Precond, encoder, marker: str) -> bytes:
    """net's float16 copy pickled as EDM2's training loop writes snapshots, as EDM2's Precond with its arguments."""
    kwargs = {k: v for k, v in net.init_kwargs.items() if k not in ('pos_channels', 'use_bf16', 'latent')}
    ema = copy.deepcopy(net).eval().requires_grad_(False).to(torch.float16)
    return edm_style_pickle(dict(snapshot_data(ema), encoder=encoder), ema, 'Precond', kwargs, stand_in_source(marker))


def test_an_edm2_snapshot_with_float16_weights_and_a_vae_encoder_loads_without_running_its_code(tmp_path):
    net = reference_net('edm2-uncond')
    vae = dict(vae_name='stabilityai/sd-vae-ft-mse', **edm2_cases.VAE_ENCODER)
    marker = tmp_path / 'executed'
    (tmp_path / 'edm2.pkl').write_bytes(edm2_snapshot(net, StabilityVAEEncoder(**vae), str(marker)))
    loaded = load_network(str(tmp_path / 'edm2.pkl'))
    assert not marker.exists()
    assert type(loaded) is EDM2Precond and loaded.pos_channels == 0 and loaded.img_channels == 4
    assert all(t.dtype == torch.float16 for t in loaded.state_dict().values())  # run as stored, as EDM2 does
    assert all(torch.equal(a, b.half()) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))
    loaded.float()  # EDM2's float32 outputs, below, are for float32 gains
    expected = np.float32(0.5) / np.float32(edm2_cases.VAE_ENCODER['raw_std'])
    assert loaded.latent['vae'] == vae['vae_name'] and loaded.latent['scale'] == [float(v) for v in expected]
    assert max_differences(loaded, 'edm2-uncond') <= ATOL  # the weights are multiples of 2^-10, exact in float16


def test_an_edm2_snapshot_of_pixels_loads_as_a_pixel_network(tmp_path):
    net = edm2_cases.fill_deterministic(EDM2Precond(**SMALL, label_dim=2))
    (tmp_path / 'edm2.pkl').write_bytes(edm2_snapshot(net, StandardRGBEncoder(), str(tmp_path / 'executed')))
    loaded = load_network(str(tmp_path / 'edm2.pkl'))
    assert loaded.latent is None and loaded.label_dim == 2 and not (tmp_path / 'executed').exists()


def test_an_unknown_encoder_is_one_line_naming_it(tmp_path):
    net = EDM2Precond(**SMALL)
    (tmp_path / 'edm2.pkl').write_bytes(edm2_snapshot(net, copy.deepcopy(net.logvar_fourier), str(tmp_path / 'executed')))
    with pytest.raises(SnapshotError, match='its encoder is a MPFourier') as err:
        load_network(str(tmp_path / 'edm2.pkl'))
    assert '\n' not in str(err.value)


def test_this_projects_edm2_snapshots_load_from_pkl_and_pt(tmp_path):
    net = edm2_cases.fill_deterministic(EDM2Precond(**SMALL, pos_channels=2)).eval()
    save_network_snapshot(str(tmp_path / 'net'), snapshot_data(net))
    x, x_pos = torch.randn([2, 3, 16, 16]), torch.rand([2, 2, 16, 16]) * 2 - 1
    for suffix in ('.pkl', '.pt'):
        loaded = load_network(str(tmp_path / f'net{suffix}'))
        assert type(loaded) is EDM2Precond and torch.equal(loaded(x, 1.5, x_pos), net(x, 1.5, x_pos))

#----------------------------------------------------------------------------
# --transfer: an EDM2 network without coordinate channels into one with them.

def effective_weight(conv: MPConv) -> torch.Tensor:
    """The weight MPConv convolves with (gain 1)."""
    w = normalize(conv.weight.detach())
    return w / np.sqrt(w[0].numel())


def test_transfer_inserts_zero_columns_for_the_coordinates_before_the_constant_channel():
    """The coordinates have no effect after the transfer. The outputs change only through normalize()'s eps: the
    effective weight of output channel o is w_o / (|w_o| + 1e-4 sqrt(fan_in)), and the fan-in grows from 4*9 to 6*9."""
    source = reference_net('edm2-cond').eval()
    kwargs = dict(REFERENCE['edm2-cond']['kwargs'], pos_channels=2)
    widened = EDM2Precond(**kwargs).eval()
    with pytest.raises(ValueError, match='does not match'):
        copy_params_and_buffers(source, widened)
    copy_params_and_buffers(source, widened, extra_inputs=2)
    old, new = source.unet.enc['16x16_conv'], widened.unet.enc['16x16_conv']
    assert torch.equal(new.weight[:, :3], old.weight[:, :3]) and torch.equal(new.weight[:, 5:], old.weight[:, 3:])
    assert not new.weight[:, 3:5].any()
    norms = old.weight.flatten(1).norm(dim=1)
    ratio = (norms + 1e-4 * np.sqrt(4 * 9)) / (norms + 1e-4 * np.sqrt(6 * 9))
    expected = effective_weight(old) * ratio.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(effective_weight(new)[:, [0, 1, 2, 5]], expected, rtol=1e-6, atol=0)
    io = edm2_cases.inputs('edm2-cond')
    x_pos = torch.rand([3, 2, 16, 16]) * 2 - 1
    with torch.no_grad():
        D = widened(io['x'], io['sigma'], x_pos, io['class_labels'])
        assert torch.equal(widened(io['x'], io['sigma'], -x_pos, io['class_labels']), D)
        torch.testing.assert_close(D, source(io['x'], io['sigma'], class_labels=io['class_labels']), rtol=0, atol=1e-4)

#----------------------------------------------------------------------------
# Reduced precision.

def reduced_and_full_precision(net: EDM2Precond, device: str):
    """(D, logvar) of the cond test network on `device` in its reduced precision, and with force_fp32."""
    io = {k: v.to(device) for k, v in edm2_cases.inputs('edm2-cond').items()}
    with torch.no_grad():
        return [net.to(device)(io['x'], io['sigma'], class_labels=io['class_labels'], return_logvar=True, force_fp32=full)
                for full in (False, True)]


def test_bfloat16_on_the_cpu_matches_float32():
    """use_bf16 runs the U-Net in bfloat16 (8 significant bits, relative rounding 3.9e-3): D moves by 1.3e-2 (of 2.04)."""
    net = EDM2Precond(**REFERENCE['edm2-cond']['kwargs'], use_bf16=True)
    (D16, logvar16), (D32, logvar32) = reduced_and_full_precision(edm2_cases.fill_deterministic(net).eval(), 'cpu')
    assert D16.dtype == torch.float32 and torch.equal(logvar16, logvar32)  # logvar is computed in float32 outside the U-Net
    torch.testing.assert_close(D16, D32, rtol=0, atol=5e-2)
    assert not torch.equal(D16, D32)


@pytest.mark.cuda
def test_float16_on_cuda_matches_float32():
    """use_fp16 runs the U-Net in float16 on CUDA (EDM2's default). float16 keeps 11 significant bits; run in float16 on
    the CPU, the test network's D moves by 1.1e-3 (of 2.04), so 1e-2 leaves a factor of 9."""
    if not torch.cuda.is_available():
        pytest.skip('no CUDA device: run on a GPU by bench/gpu_suite.py')
    net = reference_net('edm2-cond').eval()
    assert net.model_dtype(torch.device('cuda')) == torch.float16
    (D16, logvar16), (D32, logvar32) = reduced_and_full_precision(net, 'cuda')
    assert D16.dtype == torch.float32 and torch.equal(logvar16, logvar32)
    torch.testing.assert_close(D16, D32, rtol=0, atol=1e-2)
    assert not torch.equal(D16, D32)
