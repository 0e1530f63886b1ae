"""Mixed precision, loss scaling, fused Adam, channels-last and torch.compile in training, on the CPU at 16x16.

1. a bfloat16 autocast step trains on a fixed batch while weights, gradients and Adam state stay float32;
2. the GradScaler (float16 autocast, which this torch also runs on the CPU) skips inf steps, its state is in the
   training-state file, and resuming with it (and with channels-last) is bit-exact;
3. torch.compile compiles once per patch size, matches eager, and runs under 2-process DDP;
4. train.py --bf16 --channels-last writes snapshots that load; bad flag combinations are one-line errors.
"""

import copy
import os
import subprocess
from typing import Any, Callable, Dict, Optional

import pytest
import torch
from torch._dynamo.utils import counters

import dnnlib
from multiproc import run_in_children, run_ranks
from train import build_config, find_cxx, preset_options
from training.patch import PatchSchedule
from training.snapshot import load_network
from training.training_loop import _match_param_layouts, compile_network, optimizer_step
import training_helpers as h

RES = 16


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> str:
    """64 demo:shapes images at 16x16."""
    return h.make_dataset(str(tmp_path_factory.mktemp('data') / 'shapes-16x16.zip'), resolution=RES, num=64)


def tiny_net(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """The tiny patch DDPM++ of training_helpers, in training mode."""
    torch.manual_seed(seed)
    kwargs = dict(h.tiny_songunet_kwargs(), **overrides)
    return dnnlib.construct_class_by_name(**kwargs, img_resolution=RES, img_channels=3, label_dim=0).train().requires_grad_(True)


def fused_adam(net: torch.nn.Module, lr: float = 1e-2) -> torch.optim.Optimizer:
    """Adam as train.py builds it."""
    return torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)


def fixed_rounds(num: int = 32, seed: int = 1) -> Callable:
    """next_round(multiplier) of optimizer_step(): always the same first 8 * multiplier of `num` random images."""
    images = torch.rand([num, 3, RES, RES], generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return lambda multiplier: (images[:8 * multiplier], torch.zeros([8 * multiplier, 0]))


def fp16_autocast_on_cpu() -> bool:
    """Whether this torch runs float16 autocast on the CPU."""
    try:
        with torch.autocast('cpu', dtype=torch.float16):
            return torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 1, 1)).dtype == torch.float16
    except RuntimeError:
        return False

#----------------------------------------------------------------------------
# 1. bfloat16 autocast.

@pytest.mark.parametrize('use_bf16', [False, True], ids=['autocast-only', 'with-network-flag'])
def test_bf16_step_trains_and_keeps_float32_state(use_bf16):
    net = tiny_net(use_bf16=use_bf16)
    reference = copy.deepcopy(net)
    optimizer = fused_adam(net)
    output_dtypes = []
    net.model.register_forward_hook(lambda _module, _inputs, output: output_dtypes.append(output.dtype))
    loss_fn, next_round = h.RecordingLoss(), fixed_rounds()
    for _ in range(8):
        torch.manual_seed(2)  # the same crops, noise levels and noise every step: only the weights change
        optimizer_step(net, optimizer, loss_fn, next_round, 8, 2, 1, 1e-2, autocast_dtype=torch.bfloat16)
    assert output_dtypes == [torch.bfloat16] * 8  # the U-Net really ran in bfloat16
    losses = loss_fn.losses
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.95 * losses[0], losses

    # Master weights, gradients and Adam state stay float32.
    for name, param in net.named_parameters():
        assert param.dtype == torch.float32 and param.grad.dtype == torch.float32, name
    states = list(optimizer.state.values())
    assert len(states) == len(list(net.parameters()))
    assert all(v.dtype == torch.float32 for s in states for v in s.values())

    # The first loss (before any update) is the float32 loss up to bfloat16 rounding.
    fp32_loss = h.RecordingLoss()
    torch.manual_seed(2)
    optimizer_step(reference, fused_adam(reference), fp32_loss, next_round, 8, 2, 1, 1e-2)
    assert loss_fn.losses[0] == pytest.approx(fp32_loss.losses[0], rel=0.05)


def test_resumed_adam_state_takes_the_parameter_layout():
    # A state file from a run without --channels-last, loaded into a channels-last network: fused Adam would read
    # the moments in the wrong element order, so the loop gives them the parameter's layout first.
    weights = torch.randn(4, 3, 5, 5)
    grads = [torch.randn(4, 3, 5, 5) for _ in range(2)]
    results = []
    for channels_last in (False, True):
        param = torch.nn.Parameter(weights.clone())
        optimizer = torch.optim.Adam([param], lr=0.1, fused=True)
        param.grad = grads[0].clone()
        optimizer.step()
        saved = copy.deepcopy(optimizer.state_dict())
        if channels_last:
            param.data = param.data.to(memory_format=torch.channels_last)
            optimizer = torch.optim.Adam([param], lr=0.1, fused=True)
            optimizer.load_state_dict(saved)
            _match_param_layouts(optimizer)
            assert optimizer.state[param]['exp_avg'].is_contiguous(memory_format=torch.channels_last)
        param.grad = grads[1].clone().to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        optimizer.step()
        results.append(param.detach().contiguous())
    assert torch.equal(results[0], results[1])

#----------------------------------------------------------------------------
# 2. GradScaler: skipped steps, state file, exact resume.

def train_in_process(run_dir: str, data: str, total_kimg: float, resume_state: Optional[str] = None) -> None:
    """training_loop() with float16 autocast, a GradScaler starting at 2^12 (it must back off) and channels-last."""
    torch.set_num_threads(1)
    from training.training_loop import training_loop
    os.makedirs(run_dir, exist_ok=True)
    training_loop(
        run_dir=run_dir,
        dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=data),
        data_loader_kwargs=dict(num_workers=0),
        network_kwargs=dict(h.tiny_songunet_kwargs(), dropout=0.1, use_fp16=True),
        loss_kwargs=dict(class_name='training.loss.PatchEDMLoss'),
        optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=2e-3, betas=[0.9, 0.999], eps=1e-8, fused=True),
        augment_kwargs=dict(class_name='training.augment.AugmentPipe', p=0.5, xflip=1e8, yflip=1, scale=1,
                            rotate_frac=1, aniso=1, translate_frac=1),
        patch_kwargs=dict(real_p=0.5), seed=3, batch_size=8, total_kimg=total_kimg, ema_halflife_kimg=0.5,
        lr_rampup_kimg=0, kimg_per_tick=0.05, snapshot_ticks=None, state_dump_ticks=1000, precision='fp16',
        loss_scaling=2.0 ** 12, channels_last=True, resume_state=resume_state)


def replay_steps(seed: int, total_nimg: int) -> tuple:
    """(steps, cur_nimg) of a stochastic real_p=0.5 run with batch 8 that trains until total_nimg."""
    schedule = PatchSchedule(RES, real_p=0.5, seed=seed)
    steps = nimg = 0
    while nimg < total_nimg:
        nimg += 8 * schedule.batch_multiplier(schedule.sample())
        steps += 1
    return steps, nimg


def test_grad_scaler_state_resumes_bit_exactly(data, tmp_path):
    if not fp16_autocast_on_cpu():
        pytest.skip(f'torch {torch.__version__} has no float16 autocast on the CPU, so no GradScaler step runs here')
    short_dir, long_dir = str(tmp_path / 'short'), str(tmp_path / 'long')
    run_in_children(train_in_process, [(long_dir, data, 0.2), (short_dir, data, 0.1)])
    state_path = os.path.join(short_dir, 'training-state-000000.pt')
    short = torch.load(state_path, map_location='cpu', weights_only=False)
    long = torch.load(os.path.join(long_dir, 'training-state-000000.pt'), map_location='cpu', weights_only=False)

    # The scaler backed off from 2^12 (skipped steps: fused Adam did not count them) and is in the state file.
    assert short['scaler']['scale'] < 2.0 ** 12 and long['scaler']['scale'] <= short['scaler']['scale']
    steps, _ = replay_steps(3, short['cur_nimg'])
    assert 0 < int(next(iter(short['optimizer']['state'].values()))['step']) < steps
    assert short['net']['model.enc.16x16_conv.weight'].dtype == torch.float32

    run_in_children(train_in_process, [(short_dir, data, 0.2, state_path)])
    resumed = torch.load(state_path, map_location='cpu', weights_only=False)
    assert resumed['cur_nimg'] == long['cur_nimg']
    assert h.assert_states_equal(resumed, long, ['net', 'ema', 'optimizer', 'scaler', 'rng', 'schedule', 'consumed']) > 50


#----------------------------------------------------------------------------
# 3. torch.compile.

def test_compile_once_per_patch_size():
    # Dynamo decides what to compile, whatever the backend: 'eager' keeps this fast. The real flags' path:
    # bfloat16 autocast and channels-last.
    torch._dynamo.reset()
    counters.clear()
    net = tiny_net().to(memory_format=torch.channels_last)
    compile_network(net, dict(dynamic=False, backend='eager'))
    optimizer, loss_fn, next_round = fused_adam(net), h.RecordingLoss(), fixed_rounds()
    schedule = PatchSchedule(RES, real_p=0.5)
    for size in [16, 8, 4, 16, 8, 4, 4]:
        optimizer_step(net, optimizer, loss_fn, next_round, size, schedule.batch_multiplier(size), 1, 1e-3,
                       autocast_dtype=torch.bfloat16, channels_last=True)
    assert counters['stats']['unique_graphs'] == 3, dict(counters['stats'])
    assert not counters['graph_break'], dict(counters['graph_break'])
    assert net.state_dict().keys() == tiny_net().state_dict().keys()  # no _orig_mod. prefixes
    torch._dynamo.reset()


@pytest.mark.slow
def test_compile_matches_eager_for_one_step():
    # Inductor's C++ backend: a few minutes of compiling on 2 shared cores.
    if find_cxx() is None:
        pytest.skip('no C++ compiler ($CXX or g++) for torch.compile on the CPU')
    torch._dynamo.reset()
    eager = tiny_net()
    compiled = copy.deepcopy(eager)
    compile_network(compiled, dict(dynamic=False))
    results = []
    for net in (eager, compiled):
        loss_fn = h.RecordingLoss()
        torch.manual_seed(4)
        optimizer_step(net, fused_adam(net), loss_fn, fixed_rounds(), 8, 2, 1, 1e-3)
        results.append((loss_fn.losses[0], {n: p.grad for n, p in net.named_parameters()}))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-4)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-3, atol=1e-4 * float(grad.abs().max()) + 1e-7)
    torch._dynamo.reset()


def ddp_compile_train(run_dir: str, data: str) -> Dict[str, Any]:
    """On every rank: the same 2-process training, eagerly and compiled (dynamo with the eager backend)."""
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch_utils import distributed
    from training.training_loop import training_loop
    distributed.init('cpu')
    params = {}
    for name, compile_kwargs in [('eager', None), ('compiled', dict(dynamic=False, backend='eager'))]:
        os.makedirs(os.path.join(run_dir, name), exist_ok=True)
        training_loop(
            run_dir=os.path.join(run_dir, name),
            dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=data),
            data_loader_kwargs=dict(num_workers=0), network_kwargs=h.tiny_songunet_kwargs(),
            loss_kwargs=dict(class_name='training.loss.PatchEDMLoss'),
            optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=2e-3, betas=[0.9, 0.999], eps=1e-8, fused=True),
            patch_kwargs=dict(real_p=0.5), seed=5, batch_size=8, batch_gpu=2, total_kimg=0.1, ema_halflife_kimg=0.5,
            lr_rampup_kimg=0, kimg_per_tick=1, snapshot_ticks=None, state_dump_ticks=1000, compile_kwargs=compile_kwargs,
            channels_last=True, device=torch.device('cpu'))
        dist.barrier()  # rank 0 writes the state file
        state = torch.load(os.path.join(run_dir, name, 'training-state-000000.pt'), map_location='cpu', weights_only=False)
        params[name] = state['net']
    graphs = counters['stats']['unique_graphs']
    dist.destroy_process_group()
    return dict(params=params, graphs=graphs)


def test_compile_under_ddp(data, tmp_path):
    results = run_ranks(ddp_compile_train, 2, str(tmp_path), data)
    for r in results:
        assert r['graphs'] >= 1  # the second run really was compiled
        for name, value in r['params']['eager'].items():
            assert torch.equal(r['params']['compiled'][name], value), name

#----------------------------------------------------------------------------
# 4. train.py.

def test_train_py_bf16_channels_last_snapshot_loads(data, tmp_path):
    proc = h.run_train(f'--outdir={tmp_path}', f'--data={data}', *h.TINY, '--bf16', '--channels-last', '--seed=1',
                       '--duration=0.00006', '--tick=0.02', '--snap=1', '--dump=1', '--nosubdir')
    assert proc.returncode == 0 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    state = torch.load(tmp_path / 'training-state-000000.pt', map_location='cpu', weights_only=False)
    assert state['scaler'] is None and state['cur_nimg'] >= 60
    floats = [v for key in ('net', 'ema', 'optimizer') for v in h.flatten_state(state[key]).values()
              if torch.is_tensor(v) and v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 for v in floats)

    for path in ('network-snapshot-000000.pkl', 'network-snapshot-000000.pt'):
        net = load_network(str(tmp_path / path))
        assert net.use_bf16 and all(p.dtype == torch.float32 for p in net.parameters())
        assert all(p.is_contiguous() for p in net.parameters())  # the EMA is stored in the ordinary layout
        x_pos = torch.zeros([2, 2, 8, 8])
        out = net(torch.randn([2, 3, 8, 8]), torch.full([2], 1.0), x_pos=x_pos)
        assert out.dtype == torch.float32 and out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()


def test_build_config_speed_options():
    c = build_config(preset_options(None, fp16=True, compile=True, channels_last=True, attn_impl='explicit'), 'x', RES, 1)
    assert c.precision == 'fp16' and c.loss_scaling == 2 ** 16 and c.network_kwargs.use_fp16
    assert c.compile_kwargs == dict(dynamic=False) and c.channels_last and c.network_kwargs.attn_impl == 'explicit'
    assert c.optimizer_kwargs.fused and c.desc.endswith('-fp16')
    c = build_config(preset_options(None, bf16=True, ls=8.0), 'x', RES, 1)
    assert c.precision == 'bf16' and c.loss_scaling == 8 and c.compile_kwargs is None and not c.channels_last
    c = build_config(preset_options(None), 'x', RES, 1)
    assert c.precision == 'fp32' and c.loss_scaling == 1 and c.network_kwargs.attn_impl == 'sdpa'


def _error_line(tmp_path, *args: str, env: Optional[Dict[str, str]] = None) -> str:
    proc = subprocess.run(h.train_cmd(f'--outdir={tmp_path}/runs', *args), cwd=h.REPO, env=env or h.subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and 'Traceback' not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith('Error:')]
    assert len(errors) == 1, proc.stderr
    assert not os.path.exists(tmp_path / 'runs')
    return errors[0]


@pytest.mark.parametrize('args, env, words', [
    (['--fp16', '--bf16'], {}, ['--fp16', '--bf16']),
    (['--fp16'], {}, ['--fp16', 'CUDA', '--bf16']),
    (['--compile'], {'CXX': '/nonexistent/c++'}, ['--compile', 'C++ compiler']),
], ids=['fp16-and-bf16', 'fp16-on-cpu', 'compile-without-compiler'])
def test_error_bad_speed_options(data, tmp_path, args, env, words):
    error = _error_line(tmp_path, f'--data={data}', *h.TINY, *args, env=dict(h.subprocess_env(), **env))
    assert all(word in error for word in words), error


class _LoopReached(Exception):
    """Raised by a stand-in to stop training_loop() where it switches to deterministic kernels."""


def test_deterministic_flag_reaches_the_loop(data, tmp_path, monkeypatch):
    import json
    from training import training_loop as loop
    proc = h.run_train(f'--outdir={tmp_path}/runs', f'--data={data}', *h.TINY, '--deterministic', '--dry-run', timeout=120)
    assert proc.returncode == 0 and 'Dry run; exiting.' in proc.stdout, proc.stderr[-3000:]
    printed = json.loads(proc.stdout[proc.stdout.index('{'):proc.stdout.rindex('}') + 1])
    assert printed['deterministic'] is True and printed['training_options']['deterministic'] is True
    assert build_config(preset_options(None), 'x', RES, 1).deterministic is False
    assert build_config(preset_options(None, deterministic=True), 'x', RES, 1).deterministic is True

    # training_loop(deterministic=True) switches kernels before it touches data or the network.
    def reached(device: torch.device) -> None:
        raise _LoopReached(device)
    monkeypatch.setattr(loop, 'use_deterministic_algorithms', reached)
    kwargs = dict(run_dir=str(tmp_path), dataset_kwargs={}, data_loader_kwargs={}, network_kwargs={}, loss_kwargs={},
                  optimizer_kwargs={}, device=torch.device('cpu'))
    with pytest.raises(_LoopReached):
        loop.training_loop(deterministic=True, **kwargs)
    with pytest.raises(Exception) as failure:  # without the flag it goes on, until the empty dataset_kwargs fail
        loop.training_loop(**kwargs)
    assert not isinstance(failure.value, _LoopReached)
    monkeypatch.undo()

    # What it switches: restored afterwards, as it is global to the process.
    cuda = torch.backends.cuda
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    saved_sdpa = (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.cudnn_sdp_enabled())
    monkeypatch.delenv('CUBLAS_WORKSPACE_CONFIG', raising=False)
    try:
        cuda.enable_flash_sdp(True)
        loop.use_deterministic_algorithms(torch.device('cpu'))
        assert 'CUBLAS_WORKSPACE_CONFIG' not in os.environ and cuda.flash_sdp_enabled()
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        loop.use_deterministic_algorithms(torch.device('cuda'))  # sets flags and the environment only: no GPU needed
        assert os.environ['CUBLAS_WORKSPACE_CONFIG'] == ':4096:8'
        assert not (cuda.flash_sdp_enabled() or cuda.mem_efficient_sdp_enabled() or cuda.cudnn_sdp_enabled())
        assert cuda.math_sdp_enabled()
        monkeypatch.setenv('CUBLAS_WORKSPACE_CONFIG', ':16:8')
        loop.use_deterministic_algorithms(torch.device('cuda'))
        assert os.environ['CUBLAS_WORKSPACE_CONFIG'] == ':16:8'  # a user's own setting stays
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
        for enable, value in zip((cuda.enable_flash_sdp, cuda.enable_mem_efficient_sdp, cuda.enable_cudnn_sdp), saved_sdpa):
            enable(value)
