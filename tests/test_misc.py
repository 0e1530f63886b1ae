"""InfiniteSampler sharding, parameter copying, DDP sync context and the module summary."""

import itertools

import pytest
import torch

from torch_utils.misc import InfiniteSampler, copy_params_and_buffers, ddp_sync, print_module_summary


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


@pytest.mark.parametrize('length', [10, 11])
def test_sampler_shards_are_disjoint_and_cover_each_epoch(length):
    ranks = [InfiniteSampler(range(length), rank=r, num_replicas=2, seed=3) for r in range(2)]
    per_rank = [len(range(r, length, 2)) for r in range(2)]
    for epoch in range(3):
        shards = [take(s, per_rank[r] * (epoch + 1))[per_rank[r] * epoch:] for r, s in enumerate(ranks)]
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == list(range(length))
        assert len(set(shards[0])) == len(shards[0])


def test_sampler_is_seeded_shuffled_and_resumable():
    data = range(100)
    a = take(InfiniteSampler(data, rank=1, num_replicas=2, seed=7), 200)
    assert a == take(InfiniteSampler(data, rank=1, num_replicas=2, seed=7), 200)
    assert a != take(InfiniteSampler(data, rank=1, num_replicas=2, seed=8), 200)
    assert a[:50] != sorted(a[:50])  # shuffled within the epoch
    assert a[:50] != a[50:100]        # and a new order each epoch
    assert take(InfiniteSampler(data, rank=1, num_replicas=2, seed=7, start=73), 127) == a[73:]
    assert take(InfiniteSampler(data, shuffle=False), 5) == [0, 1, 2, 3, 4]


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match='non-empty'):
        InfiniteSampler([], 0, 1)
    with pytest.raises(ValueError, match='rank 2'):
        InfiniteSampler(range(4), rank=2, num_replicas=2)


def test_copy_params_and_buffers():
    src, dst = torch.nn.BatchNorm1d(4), torch.nn.BatchNorm1d(4)
    with torch.no_grad():
        src.weight.normal_()
        src.running_mean.normal_()
    copy_params_and_buffers(src, dst, require_all=True)
    for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match='missing'):
        copy_params_and_buffers(torch.nn.Sequential(torch.nn.BatchNorm1d(4)), dst, require_all=True)
    with pytest.raises(ValueError, match='shape'):
        copy_params_and_buffers(torch.nn.Linear(3, 4), torch.nn.Linear(4, 4))


def test_ddp_sync_is_noop_without_ddp():
    module = torch.nn.Linear(2, 2)
    with ddp_sync(module, sync=False):
        module(torch.ones(1, 2)).sum().backward()
    assert module.weight.grad is not None


def test_module_summary_lists_layers_and_totals(capsys):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 4 * 4, 5))
    out = print_module_summary(net, [torch.zeros(2, 3, 4, 4)])
    assert out.shape == (2, 5)
    text = capsys.readouterr().out
    n_params = sum(p.numel() for p in net.parameters())
    n_buffers = sum(b.numel() for b in net.buffers())
    total = [line for line in text.splitlines() if line.startswith('Total')][0].split()
    assert total[1:] == [str(n_params), str(n_buffers)]
    assert '[2, 8, 4, 4]' in text and '[2, 5]' in text and '<top-level>' in text
    assert any(line.split()[:2] == ['0', str(3 * 8 * 9 + 8)] for line in text.splitlines())  # the Conv2d row
