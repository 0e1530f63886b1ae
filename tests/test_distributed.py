"""distributed.init() and training_stats in a plain process and in a 2-process gloo group."""

import os

import pytest
import torch
import torch.distributed as dist

from multiproc import run_ranks
from torch_utils import distributed, misc, training_stats


def _allreduce_and_stats():
    device = distributed.init(device='cpu')
    rank, world = distributed.get_rank(), distributed.get_world_size()
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)

    # Rank 0 reports [1, 2], rank 1 reports [3, 4, 5]: pooled mean 3, population std sqrt(2).
    training_stats.report('Loss/test', torch.arange(1, 3) if rank == 0 else torch.arange(3, 6))
    training_stats.report0('Only/rank0', 7.0 + rank)
    collector = training_stats.Collector(regex='.*/.*')
    collector.update()
    stats = collector.as_dict()

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    misc.check_ddp_consistency(model)
    with torch.no_grad():
        model.bias += rank
    try:
        misc.check_ddp_consistency(model)
        mismatch = None
    except RuntimeError as err:
        mismatch = str(err)
    stop = distributed.should_stop()
    dist.destroy_process_group()
    return dict(device=str(device), rank=rank, world=world, total=total.item(), stats=stats, mismatch=mismatch, stop=stop)


def test_two_process_gloo_group():
    results = run_ranks(_allreduce_and_stats, 2)
    for rank, r in enumerate(results):
        assert r['device'] == 'cpu' and r['rank'] == rank and r['world'] == 2
        assert r['total'] == 3.0
        loss = r['stats']['Loss/test']
        assert loss.num == 5 and loss.mean == pytest.approx(3.0) and loss.std == pytest.approx(2 ** 0.5)
        only0 = r['stats']['Only/rank0']
        assert only0.num == 1 and only0.mean == 7.0
        assert r['stop'] is False
    assert results[0]['mismatch'] is None  # rank 0 compares with itself
    assert 'bias differs between rank 1 and rank 0' in results[1]['mismatch']


def test_plain_process_is_world_of_one(monkeypatch):
    for var in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK'):
        monkeypatch.delenv(var, raising=False)
    device = distributed.init(device='auto')
    assert device.type == ('cuda' if torch.cuda.is_available() else 'cpu')
    assert not dist.is_initialized()
    assert distributed.get_rank() == 0 and distributed.get_world_size() == 1
    assert distributed.should_stop() is False


def test_cuda_request_without_cuda_is_clear_error():
    if torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    with pytest.raises(ValueError, match='CUDA is not available'):
        distributed.choose_device('cuda')


def test_collector_single_process():
    collector = training_stats.Collector(regex='Single/.*')
    training_stats.report('Single/a', torch.tensor([1.0, 3.0]))
    training_stats.report('Single/a', 5.0)
    collector.update()
    assert collector.num('Single/a') == 3 and collector['Single/a'] == pytest.approx(3.0)
    assert collector.std('Single/a') == pytest.approx((8 / 3) ** 0.5)
    collector.update()  # nothing new: keep_previous keeps the last values
    assert collector.num('Single/a') == 3


def test_update_progress_writes_file(tmp_path, monkeypatch):
    path = tmp_path / 'progress.txt'
    monkeypatch.setenv('PATCHDIFF_PROGRESS_FILE', str(path))
    distributed.update_progress(5, 20)
    assert path.read_text() == '5 20\n'


def test_stop_on_signals_turns_signal_into_request_and_restores_handlers():
    import signal
    old_int, old_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with distributed.stop_on_signals():
        assert distributed.should_stop() is False
        os.kill(os.getpid(), signal.SIGTERM)
        assert distributed.should_stop() is True
    # Handlers left behind would swallow SIGTERM after training returns (a worker pool could then never stop it).
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == (old_int, old_term)
    with distributed.stop_on_signals():
        assert distributed.should_stop() is False  # a new block starts without the old request
