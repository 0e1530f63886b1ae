"""Checks that need a CUDA device, at 16x16 with tiny networks, sized for about 90 s on one GPU.

1. torchrun + NCCL, --bf16 --deterministic: a resumed run is bit-identical to an uninterrupted one; its snapshot loads;
2. --fp16 (autocast and a GradScaler) trains like float32, with no inf/NaN in the weights;
3. generate.py on the device gives the CPU's images up to float rounding; in- and outpainting keep the known pixels;
4. torch.compile matches eager for one step at each patch size, and compiles once per size.

Run by `python -m pytest -m cuda tests/test_cuda.py` on a GPU (bench/gpu_suite.py). Without CUDA they are skipped,
unless PATCHDIFF_CUDA_TESTS_ON_CPU=1 runs them on the CPU as a smoke test (CI does, so that they keep working):
there the comparisons across devices compare the CPU with itself, and the CUDA-only or slow parts skip.
"""

import contextlib
import copy
import json
import os
import subprocess
import sys
from typing import Dict, Iterator, List, Tuple

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from torch._dynamo.utils import counters

import dnnlib
import generate
from training.networks import EDMPrecond
from training.patch import PatchSchedule, coordinate_grid
from training.snapshot import load_network, save_network_snapshot
from training.training_loop import compile_network, optimizer_step
import training_helpers as h

pytestmark = pytest.mark.cuda

RES = 16
ON_CPU_ENV = 'PATCHDIFF_CUDA_TESTS_ON_CPU'
TIMEOUT = 300  # seconds for a group of training processes: a hung run fails its test instead of stalling the suite


@pytest.fixture(scope='module')
def device() -> str:
    """'cuda' where there is a GPU; 'cpu' in smoke mode (PATCHDIFF_CUDA_TESTS_ON_CPU=1); else the test is skipped."""
    if torch.cuda.is_available():
        return 'cuda'
    if os.environ.get(ON_CPU_ENV) == '1':
        return 'cpu'
    pytest.skip(f'no CUDA device: run on a GPU by bench/gpu_suite.py (or {ON_CPU_ENV}=1 to run these on the CPU)')


@pytest.fixture(autouse=True)
def one_cpu_thread() -> Iterator[None]:
    """One torch thread for this process's CPU work, which is tiny: two threads crawl when other processes load the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> str:
    """64 demo:shapes images at 16x16."""
    return h.make_dataset(str(tmp_path_factory.mktemp('data') / 'shapes-16x16.zip'), resolution=RES, num=64)


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """float32 convolutions and matmuls on CUDA, as on the CPU: PyTorch lets cuDNN use TF32 unless told otherwise."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def tiny_options(device: str) -> List[str]:
    """training_helpers.TINY on `device`."""
    return [arg for arg in h.TINY if not arg.startswith('--device=')] + [f'--device={device}']


def torchrun_cmd(*args: str) -> List[str]:
    """train.py under a one-process torchrun (NCCL on CUDA, gloo on the CPU)."""
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1',
            os.path.join(h.REPO, 'train.py'), *args]


def run_parallel(*cmds: List[str], timeout: float = TIMEOUT) -> List[subprocess.CompletedProcess]:
    """training_helpers.run_parallel; a failed command fails the test with its output (stdout then stderr, in .stdout)."""
    results = [subprocess.CompletedProcess(r.args, r.returncode, r.stdout + r.stderr, '')
               for r in h.run_parallel(*cmds, timeout=timeout)]
    for result in results:
        assert result.returncode == 0 and 'Traceback' not in result.stdout, \
            f'{" ".join(result.args)}\nexit code {result.returncode}\n{result.stdout[-4000:]}'
    return results


def load_state(path: str) -> dict:
    """A training-state file, on the CPU."""
    return torch.load(path, map_location='cpu', weights_only=False)


def read_stats(run_dir: str) -> List[dict]:
    """The records of stats.jsonl."""
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        return [json.loads(line) for line in f if line.strip()]


def replay_sizes(seed: int, total_nimg: int, batch: int = 8) -> Tuple[List[int], int]:
    """(patch sizes, cur_nimg at the end) of the steps of a stochastic real_p=0.5 run with this seed until total_nimg."""
    schedule = PatchSchedule(RES, real_p=0.5, seed=seed)
    sizes, nimg = [], 0
    while nimg < total_nimg:
        sizes.append(schedule.sample())
        nimg += batch * schedule.batch_multiplier(sizes[-1])
    return sizes, nimg


def float_tensors(state: dict, keys: List[str]) -> Dict[str, torch.Tensor]:
    """The floating-point tensors under `keys` of a state file, by flattened name."""
    return {f'{key}.{name}': value for key in keys for name, value in h.flatten_state(state[key]).items()
            if torch.is_tensor(value) and value.is_floating_point()}

#----------------------------------------------------------------------------
# 1. torchrun, bfloat16, --deterministic: exact resume, and a snapshot that loads on the device.

def test_torchrun_bf16_deterministic_resume_is_bit_identical(device, data, tmp_path):
    # Patches on with real_p=0.5 (sizes 16, 8, 4), dropout and augmentation on: every random stream must resume,
    # and on CUDA the kernels must be deterministic (--deterministic) for the bits to match.
    common = [f'--data={data}', *tiny_options(device), '--patch=on', '--real_p=0.5', '--seed=6', '--dropout=0.1',
              '--augment=0.5', '--bf16', '--bench=False', '--deterministic', '--tick=0.05', '--snap=1000', '--dump=1000',
              '--nosubdir']
    short_nimg, long_nimg = 80, 160  # with seed 6: 6 steps, then 5 more that take every patch size
    long_dir, short_dir = str(tmp_path / 'long'), str(tmp_path / 'short')
    outputs = [p.stdout for p in run_parallel(torchrun_cmd(f'--outdir={long_dir}', f'--duration={long_nimg / 1e6}', *common),
                                              torchrun_cmd(f'--outdir={short_dir}', f'--duration={short_nimg / 1e6}', *common))]
    state_path = os.path.join(short_dir, 'training-state-000000.pt')
    short, long = load_state(state_path), load_state(os.path.join(long_dir, 'training-state-000000.pt'))

    short_sizes, expected_short = replay_sizes(6, short_nimg)
    long_sizes, expected_long = replay_sizes(6, long_nimg)
    assert short_sizes == long_sizes[:len(short_sizes)] and set(long_sizes[len(short_sizes):]) == {RES, RES // 2, RES // 4}
    assert short['cur_nimg'] == expected_short and long['cur_nimg'] == expected_long
    assert ('cuda' in long['rng'][0]) == (device != 'cpu')  # the CUDA generator's state exists only if it trained there
    assert not torch.equal(short['net']['model.enc.16x16_conv.weight'], long['net']['model.enc.16x16_conv.weight'])

    outputs += [p.stdout for p in run_parallel(torchrun_cmd(f'--outdir={short_dir}', f'--duration={long_nimg / 1e6}',
                                                            f'--resume={state_path}', *common))]
    assert f'Resuming from "{state_path}"' in outputs[-1]
    resumed = load_state(state_path)
    compared = h.assert_states_equal(resumed, long, ['net', 'ema', 'optimizer', 'rng', 'schedule', 'cur_nimg',
                                                     'consumed', 'seed'])
    assert compared > 50
    assert all(int(s['step']) == len(long_sizes) for s in resumed['optimizer']['state'].values())

    # The snapshot holds the final EMA and runs on the device.
    net = load_network(os.path.join(long_dir, 'network-snapshot-000000.pkl'), torch.device(device))
    assert net.use_bf16 and {p.device.type for p in net.parameters()} == {torch.device(device).type}
    for name, value in net.state_dict().items():
        assert torch.equal(value.cpu(), long['ema'][name]), name
    torch.manual_seed(0)
    x = torch.randn([2, 3, RES // 2, RES // 2], device=device)
    x_pos = coordinate_grid(RES, RES // 2, top=4, left=2, device=device).expand(2, -1, -1, -1)
    with torch.no_grad():
        out = net(x, torch.tensor([0.5, 2.0], device=device), x_pos=x_pos)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()

    # torch warns (warn_only) about each op that has no deterministic version or keeps a non-deterministic one
    # (flash attention), and about cuBLAS without the workspace setting that --deterministic makes: none may occur.
    for output in outputs:
        for warning in ('CUBLAS_WORKSPACE_CONFIG', 'does not have a deterministic implementation', 'non-deterministic'):
            assert warning not in output, output[-4000:]

#----------------------------------------------------------------------------
# 2. float16 autocast with dynamic loss scaling.

def test_fp16_trains_like_fp32(device, data, tmp_path):
    if device == 'cpu':
        pytest.skip('fp16 autocast with GradScaler is CUDA-only')
    common = [f'--data={data}', *tiny_options(device), '--seed=3', '--duration=0.0004', '--tick=0.1', '--snap=1000',
              '--dump=1000', '--nosubdir', '--bench=False', '--deterministic']
    dirs = {name: str(tmp_path / name) for name in ('fp32', 'fp16', 'fp16-ls16')}
    run_parallel(h.train_cmd(f'--outdir={dirs["fp32"]}', *common), h.train_cmd(f'--outdir={dirs["fp16"]}', '--fp16', *common),
                 h.train_cmd(f'--outdir={dirs["fp16-ls16"]}', '--fp16', '--ls=16', *common))
    states = {name: load_state(os.path.join(d, 'training-state-000000.pt')) for name, d in dirs.items()}
    losses = {name: [r['Loss/loss']['mean'] for r in read_stats(d)] for name, d in dirs.items()}
    assert states['fp32']['scaler'] is None and len(set(map(len, losses.values()))) == 1

    weights32 = float_tensors(states['fp32'], ['net', 'ema'])
    for name in ('fp16', 'fp16-ls16'):
        weights16 = float_tensors(states[name], ['net', 'ema'])
        for key, value in weights16.items():
            assert value.dtype == torch.float32 and torch.isfinite(value).all(), f'{name}: {key}'
        assert any(not torch.equal(weights16[key], weights32[key]) for key in weights32), name  # float16 really ran

    # Starting at 2^16, the scaler skips the first steps, whose float16 gradients overflow, and halves its scale
    # each time (to 64 in this run on the CPU's float16 autocast), so the run trains ~10 steps fewer: its last tick's
    # loss was 10-16% above float32's there (4 seeds). 30% allows for that; no training at all is ~40% above.
    assert 0 < states['fp16']['scaler']['scale'] < 2.0 ** 16
    assert losses['fp16'][-1] == pytest.approx(losses['fp32'][-1], rel=0.3), losses
    # At 16, 4x below the 64 that held, no step overflows: same seed, data, crops and noise, early in training, so
    # only float16's rounding differs. Each tick's loss, a mean over ~100 images' pixels, was within 0.02% of
    # float32's on the CPU; 2% leaves room for other kernels. Another seed's ticks differ by 1-20%.
    assert losses['fp16-ls16'] == pytest.approx(losses['fp32'], rel=0.02), losses


#----------------------------------------------------------------------------
# 3. generate.py on the device.

@pytest.fixture(scope='module')
def snapshot(tmp_path_factory) -> str:
    """A 16x16 EDMPrecond snapshot with random weights (a zero output layer would give blank images)."""
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=16, img_channels=3, model_channels=8, channel_mult=[1, 2], num_blocks=1,
                     attn_resolutions=[8]).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    stem = str(tmp_path_factory.mktemp('snap') / 'network-snapshot-000000')
    save_network_snapshot(stem, dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs={}))
    return f'{stem}.pkl'


def generate_on(device: str, outdir: str, *args: str) -> Dict[str, np.ndarray]:
    """generate.py's images (HWC uint8) by file name."""
    result = CliRunner().invoke(generate.main, [*args, f'--outdir={outdir}', f'--device={device}'])
    assert result.exit_code == 0, result.output
    return {name: np.asarray(PIL.Image.open(os.path.join(outdir, name))) for name in sorted(os.listdir(outdir))}


def assert_close_images(a: Dict[str, np.ndarray], b: Dict[str, np.ndarray]) -> None:
    """Images equal up to float32 rounding differences between devices, amplified by the sampler's ODE."""
    # Different kernels sum in different orders: ~1e-6 relative per operation, against 4e-3 for one uint8 level, so
    # only values near a rounding boundary flip, by a level or two, unless the 18 Heun steps amplify the difference
    # where the ODE diverges: 1% of the values may differ by more than 2 levels, none by more than 32.
    assert list(a) == list(b)
    diff = np.abs(np.stack(list(a.values())).astype(int) - np.stack(list(b.values())).astype(int))
    assert (diff > 2).mean() <= 0.01 and diff.max() <= 32, (float((diff > 2).mean()), int(diff.max()))


def test_generate_on_device_matches_cpu_and_paints(device, snapshot, tmp_path):
    # In float32 on both: generate.py leaves PyTorch's default, under which cuDNN convolves in TF32 (10-bit mantissa),
    # a deliberate loss of precision that this tolerance is not meant for. The painting below runs with the default.
    common = [f'--network={snapshot}', '--seeds=0-3', '--steps=18']
    with full_float32():
        on_device = generate_on(device, str(tmp_path / 'device'), *common)
    assert_close_images(on_device, on_device if device == 'cpu' else generate_on('cpu', str(tmp_path / 'cpu'), *common))
    assert not np.array_equal(on_device['000000.png'], on_device['000001.png'])

    rng = np.random.default_rng(0)
    known = rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)
    PIL.Image.fromarray(known).save(tmp_path / 'known.png')
    mask = np.zeros((RES, RES), np.uint8)
    mask[4:12, 4:12] = 255  # white: generate
    PIL.Image.fromarray(mask).save(tmp_path / 'mask.png')
    inpaint = [f'--network={snapshot}', '--seeds=0-1', '--steps=18', f'--inpaint={tmp_path / "known.png"}',
               f'--mask={tmp_path / "mask.png"}']
    painted = generate_on(device, str(tmp_path / 'inpaint'), *inpaint)
    keep = mask == 0
    assert list(painted) == ['000000.png', '000001.png']
    for image in painted.values():
        assert np.abs(image[keep].astype(int) - known[keep].astype(int)).max() <= 1  # uint8 round trip
        assert np.abs(image[~keep].astype(int) - known[~keep].astype(int)).mean() > 5  # the hole was generated

    outpainted = generate_on(device, str(tmp_path / 'outpaint'), f'--network={snapshot}', '--seeds=0', '--steps=18',
                             f'--inpaint={tmp_path / "known.png"}', '--outpaint=32x16')['000000.png']
    assert outpainted.shape == (RES, 2 * RES, 3)
    assert np.abs(outpainted[:, 8:24].astype(int) - known.astype(int)).max() <= 1  # centred on the wider canvas
    assert np.abs(outpainted[:, :8].astype(int) - 128).mean() > 5  # the sides were generated, not left grey

#----------------------------------------------------------------------------
# 4. torch.compile at every patch size.

def test_compile_matches_eager_at_every_patch_size(device):
    if device == 'cpu':
        pytest.skip('compiling on the CPU takes minutes (tests/test_precision.py compiles one size there, as a slow test)')
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = dnnlib.construct_class_by_name(**h.tiny_songunet_kwargs(), img_resolution=RES, img_channels=3, label_dim=0)
    with torch.no_grad():  # the zero-initialised output layer would leave every other layer without a gradient
        for p in eager.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    eager.train().requires_grad_(True).to(device)
    compiled = copy.deepcopy(eager)
    compile_network(compiled, dict(dynamic=False))
    images = torch.rand([32, 3, RES, RES], generator=torch.Generator().manual_seed(1)).to(device) * 2 - 1
    next_round = lambda multiplier: (images[:8 * multiplier], torch.zeros([8 * multiplier, 0], device=device))
    schedule = PatchSchedule(RES, real_p=0.5)
    for size in (RES, RES // 2, RES // 4):
        compiled.load_state_dict(eager.state_dict())
        results = []
        for net in (eager, compiled):
            loss_fn = h.RecordingLoss()
            optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, fused=True)
            torch.manual_seed(4)  # the same crops, noise levels and noise for both
            with full_float32():  # as train.py trains without --tf32
                optimizer_step(net, optimizer, loss_fn, next_round, size, schedule.batch_multiplier(size), 1, 1e-3)
            results.append((loss_fn.losses[0], {n: p.grad.clone() for n, p in net.named_parameters()}))
        # Fused kernels reorder float32 sums: relative differences of ~1e-6 per operation, more in small gradients.
        assert results[1][0] == pytest.approx(results[0][0], rel=1e-4), size
        for name, grad in results[0][1].items():
            torch.testing.assert_close(results[1][1][name], grad, rtol=1e-3, atol=1e-4 * float(grad.abs().max()) + 1e-7,
                                       msg=lambda m: f'{size}: {name}: {m}')
    assert counters['stats']['unique_graphs'] == 3, dict(counters['stats'])  # one graph per patch size
    assert not counters['graph_break'], dict(counters['graph_break'])
    torch._dynamo.reset()
