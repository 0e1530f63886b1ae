"""Tests for the self-attention implementations ('sdpa' vs 'explicit') and channels-last networks."""

import pytest
import torch

from training.networks import EDMPrecond, SongUNet, UNetBlock

RES = 16
IMG_CHANNELS = 3
SMALL = dict(channel_mult=[1, 2], num_blocks=1, dropout=0)
ARCHS = {
    'ddpmpp': dict(model_type='SongUNet', model_channels=16, attn_resolutions=[16, 8], **SMALL),
    'ncsnpp': dict(model_type='SongUNet', model_channels=16, attn_resolutions=[8], embedding_type='fourier',
                   channel_mult_noise=2, encoder_type='residual', resample_filter=[1, 3, 3, 1], **SMALL),
    'ncsnpp_skip': dict(model_type='SongUNet', model_channels=16, attn_resolutions=[8], embedding_type='fourier',
                        channel_mult_noise=2, encoder_type='skip', decoder_type='skip', resample_filter=[1, 3, 3, 1], **SMALL),
    # 128 channels at 8x8 and 64 channels per head: two heads, so the head layout is exercised.
    'adm': dict(model_type='DhariwalUNet', model_channels=64, attn_resolutions=[16, 8], **SMALL),
}
SIZES = [(RES, RES), (RES // 2, RES // 2), (RES, RES // 2)]


def make_net(arch: str, **kwargs) -> EDMPrecond:
    """EDMPrecond with pos_channels=2 and random (not partly zero) weights, the same for every call."""
    torch.manual_seed(0)
    net = EDMPrecond(RES, IMG_CHANNELS, pos_channels=2, **{**ARCHS[arch], **kwargs})
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net


def make_inputs(size: tuple, memory_format: torch.memory_format = torch.contiguous_format) -> tuple:
    """Noisy images, noise levels and coordinates for a batch of 2 patches of the given (height, width)."""
    torch.manual_seed(2)
    x = torch.randn(2, IMG_CHANNELS, *size).contiguous(memory_format=memory_format)
    x_pos = torch.randn(2, 2, *size).contiguous(memory_format=memory_format)
    return x, torch.tensor([0.3, 4.0]), x_pos


def run(net: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, x_pos: torch.Tensor) -> tuple:
    """Output and {name: gradient} (input and parameters) of a fixed random projection of net's output."""
    x = x.detach().clone().requires_grad_(True)
    out = net(x, sigma, x_pos)
    out_grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    names, params = zip(*net.named_parameters())
    grads = torch.autograd.grad((out * out_grad).sum(), [x, *params])
    return out, dict(zip(['input', *names], grads))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b||."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def assert_close(got: tuple, expected: tuple, tol: float) -> None:
    """Outputs and all gradients of two run() results agree within tol relative error."""
    assert rel(got[0], expected[0]) < tol
    assert got[1].keys() == expected[1].keys()
    for name, grad in got[1].items():
        assert rel(grad, expected[1][name]) < tol, name


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('arch', ['ddpmpp', 'adm'])
def test_sdpa_matches_explicit(arch, size):
    sdpa, explicit = make_net(arch, attn_impl='sdpa'), make_net(arch, attn_impl='explicit')
    inputs = make_inputs(size)
    assert_close(run(sdpa, *inputs), run(explicit, *inputs), 1e-5)


@pytest.mark.parametrize('num_heads', [1, 4])
def test_unet_block_many_heads(num_heads):
    torch.manual_seed(0)
    blocks = [UNetBlock(32, 32, 8, attention=True, num_heads=num_heads, init_zero={}, attn_impl=impl)
              for impl in ['sdpa', 'explicit']]
    blocks[1].load_state_dict(blocks[0].state_dict())
    x, emb = torch.randn(2, 32, 6, 4, requires_grad=True), torch.randn(2, 8)
    out_grad = torch.randn(2, 32, 6, 4)
    outs = [block(x, emb) for block in blocks]
    grads = [torch.autograd.grad(out, x, out_grad)[0] for out in outs]
    assert rel(outs[0], outs[1]) < 1e-5 and rel(grads[0], grads[1]) < 1e-5


@pytest.mark.parametrize('arch', ['ddpmpp', 'adm'])
def test_sdpa_and_explicit_under_bf16_autocast(arch):
    sdpa, explicit = make_net(arch, attn_impl='sdpa'), make_net(arch, attn_impl='explicit')
    qkv_dtypes = set()
    for name, module in [*sdpa.named_modules(), *explicit.named_modules()]:
        if name.endswith('.qkv'):
            module.register_forward_hook(lambda module, args, out: qkv_dtypes.add(out.dtype))
    inputs = make_inputs((RES, RES // 2))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got, expected = run(sdpa, *inputs), run(explicit, *inputs)
    assert qkv_dtypes == {torch.bfloat16}
    assert all(torch.isfinite(t).all() for t in [got[0], *got[1].values()])
    assert rel(got[0], expected[0]) < 2e-2
    assert rel(got[1]['input'], expected[1]['input']) < 2e-2


@pytest.mark.parametrize('attn_impl', ['sdpa', 'explicit'])
@pytest.mark.parametrize('arch', ARCHS)
def test_channels_last_matches_contiguous(arch, attn_impl):
    size = (RES, RES // 2)
    ref = run(make_net(arch, attn_impl=attn_impl), *make_inputs(size))
    net = make_net(arch, attn_impl=attn_impl).to(memory_format=torch.channels_last)
    got = run(net, *make_inputs(size, torch.channels_last))
    assert_close(got, ref, 1e-5)


def test_bad_attn_impl():
    message = r"attn_impl must be one of \('sdpa', 'explicit'\), got \"flash\""
    with pytest.raises(ValueError, match=message):
        UNetBlock(8, 8, 8, attention=True, attn_impl='flash')
    with pytest.raises(ValueError, match=message):
        SongUNet(RES, 3, 3, attn_impl='flash')
    with pytest.raises(ValueError, match=message):
        EDMPrecond(RES, 3, model_type='DhariwalUNet', attn_impl='flash')


@pytest.mark.parametrize('arch', ['ddpmpp', 'adm'])
def test_default_is_sdpa_and_checkpoints_interchange(arch):
    default = make_net(arch)
    blocks = [m for m in default.modules() if isinstance(m, UNetBlock)]
    assert blocks and all(block.attn_impl == 'sdpa' for block in blocks)
    explicit = EDMPrecond(RES, IMG_CHANNELS, pos_channels=2, attn_impl='explicit', **ARCHS[arch])
    assert list(explicit.state_dict()) == list(default.state_dict())
    explicit.load_state_dict(default.state_dict(), strict=True)
    inputs = make_inputs((RES, RES))
    assert rel(explicit(*inputs), default(*inputs)) < 1e-5
