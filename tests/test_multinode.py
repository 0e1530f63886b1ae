"""Several nodes and elastic restarts (docs/cluster.md), on the CPU with gloo and the tiny network of training_helpers.

1. two torchrun launches joined by a c10d rendezvous on 127.0.0.1 (two "nodes" on one machine, one process
   each), with README's multi-node command: the same result as one 2-process torchrun, one run directory,
   disjoint data shards, one writer of logs and stats;
2. under torchrun --max-restarts, a worker SIGKILLed before and after its first state file: torchrun restarts
   it, --resume=auto comes back to the same run directory, and the run ends bit-identical to an uninterrupted one,
   with no tick counted twice;
3. the pieces: --resume=auto's choice of run directory, stats.jsonl trimming, fid.py's download order over nodes,
   and docs/train.sbatch's torchrun command from SLURM's variables.

Every launch has a hard deadline: a hung rendezvous or worker fails its test, and its process group is killed.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch

from multiproc import free_port, run_in_children
from torch_utils import misc
from training.training_loop import trim_stats
import train
import training_helpers as h

RES = 16
DEADLINE_S = 150  # for each group of launches; a healthy one takes 10-30 s on 2 shared cores
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run']  # the `torchrun` entry point of this Python
STATE_KEYS = ['net', 'ema', 'optimizer', 'rng', 'schedule', 'cur_nimg', 'cur_tick', 'consumed', 'seed']


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> str:
    """64 demo:shapes images at 16x16."""
    return h.make_dataset(str(tmp_path_factory.mktemp('data') / 'shapes-16x16.zip'), resolution=RES, num=64)


def _launch(cmd: list, log_path: str, env: dict = None) -> tuple:
    log = open(log_path, 'w')
    proc = subprocess.Popen(cmd, cwd=h.REPO, env=env or h.subprocess_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: torchrun and its workers die together
    return proc, log, log_path


def _finish(launches: list, deadline_s: float = DEADLINE_S) -> list:
    """Wait for every launch; past the deadline kill every process group and fail. Returns (exit code, output)."""
    deadline = time.monotonic() + deadline_s
    try:
        for proc, _, _ in launches:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        hung = [proc.args for proc, _, _ in launches if proc.poll() is None]
        for proc, log, _ in launches:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
    results = []
    for proc, _, path in launches:
        with open(path) as f:
            results.append((proc.returncode, f.read()))
    assert not hung, f'still running after {deadline_s} s (killed): {hung}\n' + '\n'.join(out[-2000:] for _, out in results)
    return results


def _assert_ok(code: int, output: str) -> None:
    assert code == 0, f'exit code {code}\n{output[-4000:]}'
    assert 'Traceback' not in output, output[-4000:]


def _load(path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=False)


def _stats(run_dir: str) -> list:
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        return [json.loads(line) for line in f if line.strip()]


def _readme_multinode_command() -> tuple:
    """(torchrun options, train.py options) of README's multi-node command."""
    with open(os.path.join(h.REPO, 'README.md')) as f:
        lines = [line for line in f.read().splitlines() if line.startswith('torchrun --nnodes=')]
    assert len(lines) == 1, lines
    tokens = shlex.split(lines[0])
    split = tokens.index('train.py')
    return tokens[1:split], tokens[split + 1:]


def _option(tokens: list, name: str) -> str:
    values = [t.split('=', 1)[1] for t in tokens if t.startswith(name + '=')]
    assert len(values) == 1, (name, tokens)
    return values[0]


def _training_args(data: str, outdir, *extra: str) -> list:
    # seed 5: 12 steps of sizes 8, 16, 16, 16, 4, 16, 8, 8, 8, 16, 4, 4 until 200 images; one tick per step.
    return [f'--outdir={outdir}', f'--data={data}', *h.TINY, '--seed=5', '--duration=0.0002', '--tick=0.001',
            '--snap=1000', *extra]

#----------------------------------------------------------------------------
# 1. Two nodes on one machine.

def test_two_nodes_match_one_node_and_share_one_run_directory(data, tmp_path):
    launcher, readme_train = _readme_multinode_command()
    assert [t.split('=')[0] for t in launcher] == ['--nnodes', '--nproc_per_node', '--rdzv-backend', '--rdzv-endpoint',
                                                   '--rdzv-id', '--max-restarts']
    assert _option(launcher, '--rdzv-backend') == 'c10d' and '--resume=auto' in readme_train
    values = {'--nnodes': '2', '--nproc_per_node': '1', '--rdzv-endpoint': f'127.0.0.1:{free_port()}',
              '--rdzv-id': f'test-{uuid.uuid4().hex[:8]}'}
    node_cmd = TORCHRUN + [f'{name}={values.get(name, value)}' for name, value in (t.split('=', 1) for t in launcher)]
    node_cmd += ['train.py', *_training_args(data, tmp_path / 'runs', '--dump=1000', '--resume=auto')]
    one_node_cmd = TORCHRUN + ['--standalone', '--nproc_per_node=2', 'train.py',
                               *_training_args(data, tmp_path / 'one-node', '--dump=1000', '--resume=auto')]
    node0, node1, one_node = _finish([_launch(node_cmd, str(tmp_path / 'node0.out')),
                                      _launch(node_cmd, str(tmp_path / 'node1.out')),
                                      _launch(one_node_cmd, str(tmp_path / 'one-node.out'))])
    for code, output in (node0, node1, one_node):
        _assert_ok(code, output)

    # One run directory for the whole job, named for 2 processes, claimed by this launch.
    run_dir = h.only_run_dir(str(tmp_path / 'runs'))
    assert '-gpus2-batch8-' in os.path.basename(run_dir)
    assert train.read_run_id(run_dir) == values['--rdzv-id']

    # Two nodes train exactly as two processes on one node: weights, EMA, Adam moments, every rank's RNG streams,
    # the patch schedule and the data position. A node that took the local rank for the data shard or the seed
    # (0 on both nodes) would have fed both processes the same images and ended elsewhere.
    state = _load(os.path.join(run_dir, 'training-state-000000.pt'))
    reference = _load(os.path.join(h.only_run_dir(str(tmp_path / 'one-node')), 'training-state-000000.pt'))
    assert h.assert_states_equal(state, reference, STATE_KEYS) > 50
    assert state['cur_nimg'] == 200 and len(state['rng']) == 2
    assert not torch.equal(state['rng'][0]['torch'], state['rng'][1]['torch'])  # ranks 0 and 1, not 0 twice

    # The data shards of ranks 0 and 1 at the state's seed are disjoint within every epoch (32 of 64 images each).
    dataset = list(range(64))
    shards = [misc.InfiniteSampler(dataset, rank=rank, num_replicas=2, seed=state['seed']) for rank in range(2)]
    taken = [[index for index, _ in zip(iter(shard), range(state['consumed']))] for shard in shards]
    assert state['consumed'] >= 32
    for epoch in range(state['consumed'] // 32):
        part0, part1 = (set(t[epoch * 32:(epoch + 1) * 32]) for t in taken)
        assert len(part0) == len(part1) == 32 and not part0 & part1

    # One writer: every tick once in stats.jsonl and log.txt; the tick lines on one node's console only.
    stats = _stats(run_dir)
    assert [record['progress']['tick'] for record in stats] == list(range(12))
    with open(os.path.join(run_dir, 'log.txt')) as f:
        log = f.read()
    assert log.count('Training for') == 1 and log.count('\ntick 0 ') == 1 and log.count('\ntick ') == 12
    assert sorted(output.count('\ntick ') for _, output in (node0, node1)) == [0, 12]

#----------------------------------------------------------------------------
# 2. Elastic restarts.

def test_sigkilled_worker_restarts_and_ends_bit_identical(data, tmp_path):
    # Attempt 0 dies after its first step, before any state file (--dump=3 writes one at ticks 0, 3, 6, 9 and
    # the end); attempt 1 starts from scratch in the same run directory and dies two steps after its state at
    # tick 3, having logged tick 4; attempt 2 resumes from that state and finishes.
    outdir = tmp_path / 'runs'
    env = dict(h.subprocess_env(), PATCHDIFF_TEST_KILL=json.dumps({'0': [0, 1], '1': [2, 2]}))
    elastic_cmd = TORCHRUN + ['--standalone', '--nproc_per_node=1', '--max-restarts=2',
                              os.path.join('tests', 'elastic_worker.py'),
                              *_training_args(data, outdir, '--dump=3', '--resume=auto')]
    (code, output), reference = _finish([_launch(elastic_cmd, str(tmp_path / 'elastic.out'), env),
                                         _launch(h.train_cmd(*_training_args(data, tmp_path / 'ref', '--dump=3')),
                                                 str(tmp_path / 'ref.out'))])
    _assert_ok(code, output)
    _assert_ok(*reference)

    # Three attempts in one run directory; only the last resumed, and it says so once.
    run_dir = h.only_run_dir(str(outdir))
    ref_dir = h.only_run_dir(str(tmp_path / 'ref'))
    assert os.path.basename(run_dir) == os.path.basename(ref_dir)
    with open(os.path.join(run_dir, 'log.txt')) as f:
        log = f.read()
    assert log.count('Training for') == 3
    state_path = os.path.join(run_dir, 'training-state-000000.pt')
    assert log.count('Resuming from') == 1 and f'Resuming from "{state_path}"' in log
    assert output.count('Resuming from') == 1
    assert 'Dropped 1 line(s) of stats.jsonl from tick 4 on' in log

    # The final network, EMA, optimizer, RNGs, schedule and counters equal the uninterrupted run's, bit for bit.
    state, ref_state = _load(state_path), _load(os.path.join(ref_dir, 'training-state-000000.pt'))
    assert h.assert_states_equal(state, ref_state, STATE_KEYS) > 50
    assert state['cur_nimg'] == 200 and state['cur_tick'] == 12
    assert all(int(s['step']) == 12 for s in state['optimizer']['state'].values())  # 12 Adam steps, none twice
    snap, ref_snap = (torch.load(os.path.join(d, 'network-snapshot-000000.pt'), weights_only=True) for d in (run_dir, ref_dir))
    assert h.assert_states_equal(snap, ref_snap, ['state_dict']) > 20

    # Every tick once, with the uninterrupted run's kimg, loss and patch size.
    stats, ref_stats = _stats(run_dir), _stats(ref_dir)
    assert [r['progress']['tick'] for r in stats] == list(range(12))
    for key in ('Loss/loss', 'Patch/size'):
        assert [r[key] for r in stats] == [r[key] for r in ref_stats], key
    assert [r['progress']['kimg'] for r in stats] == [r['progress']['kimg'] for r in ref_stats]

#----------------------------------------------------------------------------
# 3. The pieces.

def _make_run(outdir, name: str, run_id: str = None, state: bool = False) -> str:
    path = os.path.join(outdir, name)
    os.makedirs(path)
    train.write_run_id(path, run_id)
    if state:
        open(os.path.join(path, 'training-state-000004.pt'), 'wb').close()
    return path


def test_resume_auto_comes_back_to_the_directory_of_its_torchrun_launch(tmp_path):
    outdir = str(tmp_path)
    desc = 'shapes-uncond-ddpmpp-edm-patch0.5-gpus8-batch256-fp32'
    older = _make_run(outdir, f'00000-{desc}', 'old-job', state=True)
    mine = _make_run(outdir, f'00001-{desc}', 'job-7')          # killed before its first state file
    _make_run(outdir, '00002-other-uncond-ddpmpp-edm-patch0.5-gpus8-batch256-fp32', 'job-7', state=True)

    # A restart of launch job-7 comes back to its own directory, state file or not; other descriptions never match.
    assert train.choose_run_dir(outdir, desc, False, 'auto', 'job-7') == (mine, None)
    # A restart after the world size changed (elastic min:max nodes) too.
    assert train.choose_run_dir(outdir, desc.replace('gpus8', 'gpus16'), False, 'auto', 'job-7') == (mine, None)
    # Another launch (a new sbatch, plain python) continues the newest run of this description with a state.
    assert train.choose_run_dir(outdir, desc, False, 'auto', 'job-8') == (older, os.path.join(older, 'training-state-000004.pt'))
    assert train.choose_run_dir(outdir, desc, False, 'auto', None)[0] == older
    # Without --resume=auto every launch starts a new run directory.
    assert train.choose_run_dir(outdir, desc, False, None, 'job-7') == (os.path.join(outdir, f'00003-{desc}'), None)
    open(os.path.join(mine, 'training-state-000002.pt'), 'wb').close()
    assert train.choose_run_dir(outdir, desc, False, 'auto', 'job-7') == (mine, os.path.join(mine, 'training-state-000002.pt'))


def test_launch_run_id_ignores_torchruns_default(monkeypatch):
    monkeypatch.setenv('TORCHELASTIC_RUN_ID', 'none')  # torchrun without --rdzv-id or --standalone
    assert train.launch_run_id() is None
    monkeypatch.setenv('TORCHELASTIC_RUN_ID', '123456')
    assert train.launch_run_id() == '123456'
    monkeypatch.delenv('TORCHELASTIC_RUN_ID')
    assert train.launch_run_id() is None


def test_trim_stats_drops_ticks_to_be_rerun_and_a_torn_line(tmp_path):
    path = str(tmp_path / 'stats.jsonl')
    lines = [json.dumps(dict(progress=dict(tick=t, kimg=t / 10))) + '\n' for t in range(5)]
    with open(path, 'w') as f:
        f.writelines(lines + ['{"progress": {"tick": 5, "ki'])  # a kill in the middle of a write
    assert trim_stats(path, 3) == 3
    with open(path) as f:
        assert f.read() == ''.join(lines[:3])
    assert trim_stats(path, 3) == 0 and trim_stats(str(tmp_path / 'none.jsonl'), 0) == 0
    assert trim_stats(path, 0) == 3 and os.path.getsize(path) == 0  # a fresh start in the directory


def _download_turn(log_path: str, url: str) -> int:
    import fid
    from torch_utils import distributed
    import torch.distributed as dist
    distributed.init('cpu')
    rank = distributed.get_rank()

    def fetch(path_or_url):
        with open(log_path, 'a') as f:
            f.write(f'{rank}\n')
        time.sleep(0.3)
        return path_or_url
    assert fid._rank0_first(fetch, url) == url
    dist.destroy_process_group()
    return rank


def test_fid_downloads_first_on_rank0_then_once_per_other_node(tmp_path):
    # Ranks 0, 1 on node A and rank 2 on node B: rank 0 fills a shared cache, rank 2 a node-local one, rank 1 reads.
    port, log_path = free_port(), str(tmp_path / 'order.txt')
    envs = [dict(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(local),
                 WORLD_SIZE='3', LOCAL_WORLD_SIZE='2') for rank, local in ((0, 0), (1, 1), (2, 0))]
    assert run_in_children(_download_turn, [(log_path, 'https://example.invalid/detector.pkl')] * 3, envs, timeout=120) == [0, 1, 2]
    with open(log_path) as f:
        assert f.read().split() == ['0', '2', '1']


def _run_sbatch(tmp_path, **slurm_env: str) -> list:
    """docs/train.sbatch under bash with stand-ins for scontrol and srun; returns the command srun was given."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / 'scontrol').write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[03-04]" ] && printf "gpu03\\ngpu04\\n"\n')
    (bin_dir / 'srun').write_text(f'#!/bin/sh\nfor a in "$@"; do echo "$a"; done > {tmp_path}/srun-args.txt\n')
    for name in ('scontrol', 'srun'):
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}', SLURM_NNODES='2', SLURM_JOB_ID='4242',
               SLURM_JOB_NODELIST='gpu[03-04]', **slurm_env)
    proc = subprocess.run(['bash', os.path.join(h.REPO, 'docs', 'train.sbatch'), '--preset=celeba64', '--outdir=runs'],
                          env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return (tmp_path / 'srun-args.txt').read_text().splitlines()


def test_sbatch_script_runs_one_torchrun_per_node_with_readmes_options(tmp_path):
    srun_args = _run_sbatch(tmp_path, SLURM_GPUS_ON_NODE='8')
    assert '--ntasks-per-node=1' in srun_args[:srun_args.index('torchrun')]
    cmd = srun_args[srun_args.index('torchrun') + 1:]
    launcher, train_args = cmd[:cmd.index('train.py')], cmd[cmd.index('train.py') + 1:]
    readme_launcher, _ = _readme_multinode_command()
    assert [t.split('=')[0] for t in launcher] == [t.split('=')[0] for t in readme_launcher]
    assert _option(launcher, '--nnodes') == '2' and _option(launcher, '--nproc_per_node') == '8'
    assert _option(launcher, '--rdzv-endpoint') == f'gpu03:{29500 + 4242 % 1000}'
    assert _option(launcher, '--rdzv-id') == '4242' and _option(launcher, '--rdzv-backend') == 'c10d'
    assert train_args == ['--preset=celeba64', '--outdir=runs', '--resume=auto']
    # Without SLURM_GPUS_ON_NODE the count comes from --gpus-per-node, with or without a GPU type.
    srun_args = _run_sbatch(tmp_path, SLURM_GPUS_PER_NODE='a100:4')
    assert _option(srun_args, '--nproc_per_node') == '4'
