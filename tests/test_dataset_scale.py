"""Data sets of ImageNet size: each rank caches only its shard, shared by its loader workers; a cache too big for
the machine is refused in one warning line; startup decodes one image and a bad image is named when it is met."""

import io
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch.distributed as dist

from multiproc import run_ranks
from torch_utils.misc import InfiniteSampler
from training import dataset as dataset_module
from training.dataset import DatasetError, ImageFolderDataset
from training.training_loop import make_loader

NUM, RES = 2000, 8  # images in the sharding test: enough to see halves, tiny to keep it quick
FORK_LOADER = dict(num_workers=2, persistent_workers=True, prefetch_factor=2, multiprocessing_context='fork')


def image_name(i):
    return f'{i // 1000:05d}/img{i:08d}.png'


def make_zip(path, num, corrupt=(), res=RES):
    """A zip of `num` random RES x RES PNGs (as dataset_tool.py writes: stored), with garbage in the images `corrupt`."""
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as zf:
        for i in range(num):
            buffer = io.BytesIO()
            PIL.Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)).save(buffer, format='png', compress_level=0)
            data = buffer.getvalue()
            zf.writestr(image_name(i), data[:40] + b'\0' * 30 if i in corrupt else data)
    return str(path)


@pytest.fixture(scope='module')
def small_zip(tmp_path_factory):
    return make_zip(tmp_path_factory.mktemp('scale') / 'small.zip', NUM)


def _rank_cache(path, batch):
    """One gloo rank: the training loader (make_loader) with a cache and x-flips, pulled for two passes over its shard."""
    dist.init_process_group('gloo')
    rank, world_size = dist.get_rank(), dist.get_world_size()
    ds = ImageFolderDataset(path, xflip=True, cache=True)
    sampler, loader = make_loader(ds, rank, world_size, seed=1, start=0, batch_gpu=batch, data_loader_kwargs=FORK_LOADER)
    allocated = ds.cache.num_filled
    served = []
    iterator = iter(loader)
    for _ in range(2 * len(sampler.items) // batch):
        images, _labels = next(iterator)
        served.append(images.shape[0])
    del iterator, loader
    result = dict(rank=rank, kind=ds.cache.kind, keys=ds.cache.keys.tolist(), nbytes=ds.cache.nbytes, allocated=allocated,
                  filled=ds.cache.filled.numpy().copy(), items=sampler.items.tolist(), served=sum(served),
                  item_bytes=3 * RES * RES)
    dist.barrier()
    dist.destroy_process_group()
    return result


def test_each_rank_caches_only_its_shard_and_its_workers_share_it(small_zip):
    batch = 50
    r0, r1 = run_ranks(_rank_cache, 2, small_zip, batch)
    keys0, keys1 = set(r0['keys']), set(r1['keys'])
    # Each rank's cache holds its half of the source images, and the two halves make one copy of the data set.
    assert len(keys0) == len(keys1) == NUM // 2
    assert not keys0 & keys1 and keys0 | keys1 == set(range(NUM))
    for r, keys in ((r0, keys0), (r1, keys1)):
        assert r['nbytes'] == len(keys) * r['item_bytes']  # allocated for the shard, not the whole data set
        assert r['allocated'] == 0                          # empty until read
        # The rank's items are its images and their mirrored copies (index + NUM), and nothing else.
        assert set(r['items']) == keys | {k + NUM for k in keys}
        # Only the loader's workers decoded (the rank's process pulled batches), yet the rank sees every entry
        # filled: the workers wrote into the one cache the rank allocated before they started.
        assert r['filled'].all() and r['served'] >= 2 * NUM // 2


def test_workers_share_the_cache_without_shm(tmp_path, monkeypatch):
    # With /dev/shm too small the cache is an anonymous shared mapping: forked workers still fill one copy.
    monkeypatch.setattr(dataset_module, '_shm_free_bytes', lambda: 0)
    ds = ImageFolderDataset(make_zip(tmp_path / 'd.zip', 40), cache=True)
    sampler, loader = make_loader(ds, 0, 1, seed=0, start=0, batch_gpu=8, data_loader_kwargs=FORK_LOADER)
    assert ds.cache.kind == 'mmap' and ds.cache.num_filled == 0
    iterator = iter(loader)
    for _ in range(5):
        next(iterator)
    del iterator, loader
    assert ds.cache.num_filled == 40
    np.testing.assert_array_equal(ds.cache.get(7), ImageFolderDataset(str(tmp_path / 'd.zip'))[7][0])


def test_sampler_keeps_an_image_and_its_flip_on_one_rank(small_zip):
    ds = ImageFolderDataset(small_zip, xflip=True, max_size=101)
    shards = [InfiniteSampler(ds, rank=r, num_replicas=3, seed=2) for r in range(3)]
    raws = [set(ds.raw_indices[s.items].tolist()) for s in shards]
    assert sum(len(r) for r in raws) == 101 and not (raws[0] & raws[1] or raws[1] & raws[2] or raws[0] & raws[2])
    for s in shards:
        assert len(s.items) == 2 * len(set(ds.raw_indices[s.items].tolist()))
        order = s.epoch_order(0)
        assert sorted(order.tolist()) == s.items.tolist()  # an epoch is a permutation of the shard
    # One rank keeps the order it had before shards: a permutation of the whole data set.
    one = InfiniteSampler(ds, seed=5)
    np.testing.assert_array_equal(one.epoch_order(3), np.random.default_rng([5, 3]).permutation(len(ds)))


def test_cache_too_big_warns_once_and_reads_uncached(small_zip, capsys, monkeypatch):
    ds = ImageFolderDataset(small_zip, cache=True, cache_limit=NUM * 3 * RES * RES)  # room for exactly one copy
    items = np.arange(0, NUM, 2)
    assert ds.prepare_cache(items, ranks_on_node=2)      # two half shards fit
    assert ds.cache.nbytes == NUM // 2 * 3 * RES * RES
    ds = ImageFolderDataset(small_zip, cache=True, cache_limit=NUM * 3 * RES * RES - 1)
    assert not ds.prepare_cache(items, ranks_on_node=2)  # one byte short
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('Warning: ') and 'small.zip' in err
    assert '1000 images x 2 rank(s)' in err and '--cache-limit' in err and 'reading without the cache' in err
    image, _ = ds[3]  # the data set still reads, uncached, and does not try again
    assert ds.cache is None and image.shape == (3, RES, RES)
    assert capsys.readouterr().err == ''

    # Without --cache-limit the budget is half the memory psutil reports available.
    class Memory:
        available = 2 * NUM * 3 * RES * RES - 2
    monkeypatch.setattr(dataset_module.psutil, 'virtual_memory', lambda: Memory)
    ds = ImageFolderDataset(small_zip, cache=True)
    assert ds.cache_budget() == NUM * 3 * RES * RES - 1
    assert not ds.prepare_cache()
    assert 'half the available memory' in capsys.readouterr().err
    # Through make_loader, as training does: the loader still yields images.
    ds = ImageFolderDataset(small_zip, cache=True, cache_limit=1)
    _sampler, loader = make_loader(ds, 0, 1, seed=0, start=0, batch_gpu=4, data_loader_kwargs=dict(num_workers=0))
    assert next(iter(loader))[0].shape == (4, 3, RES, RES) and ds.cache is None
    assert capsys.readouterr().err.count('Warning: ') == 1


def test_train_py_cache_limit_reaches_the_data_set():
    from train import build_config, preset_options
    assert 'cache_limit' not in build_config(preset_options('demo', data='x.zip'), 'x', 32, 1).dataset_kwargs
    assert build_config(preset_options('demo', data='x.zip', cache_limit=1.5), 'x', 32, 1).dataset_kwargs.cache_limit == 3 * 2**29


def test_startup_decodes_one_image_and_a_corrupt_one_is_named_mid_run(tmp_path, monkeypatch):
    path = make_zip(tmp_path / 'bad.zip', 400, corrupt={233})
    opened = []
    real_open = PIL.Image.open
    monkeypatch.setattr(dataset_module.PIL.Image, 'open', lambda *a, **k: opened.append(1) or real_open(*a, **k))
    ds = ImageFolderDataset(path, cache=True)  # startup is fine: the file list and the first image only
    assert len(ds) == 400 and ds.resolution == RES and len(opened) == 1
    monkeypatch.undo()

    for workers in (0, 2):
        kwargs = dict(FORK_LOADER, num_workers=2) if workers else dict(num_workers=0)
        _sampler, loader = make_loader(ds, 0, 1, seed=0, start=0, batch_gpu=16, data_loader_kwargs=kwargs)
        iterator, batches = iter(loader), 0
        with pytest.raises(DatasetError) as info:
            for _ in range(400 // 16 + 1):  # one pass reaches the corrupt image
                next(iterator)
                batches += 1
        message = str(info.value)
        assert batches < 400 // 16 + 1 and '\n' not in message
        assert message.startswith(f'{path}:{image_name(233)}: cannot decode image (')
        assert ('(raised in DataLoader worker process' in message) == bool(workers)
        del iterator, loader


def test_a_worker_traceback_is_cut_to_the_original_line():
    wrapped = ('Caught DatasetError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n'
               '  File "x.py", line 1, in f\ntraining.dataset.DatasetError: d.zip:a.png: cannot decode image (broken)\n')
    assert str(DatasetError(wrapped)) == 'd.zip:a.png: cannot decode image (broken) (raised in DataLoader worker process 1)'
    assert str(DatasetError('plain')) == 'plain'


def test_bench_data_scale_runs_and_reports_one_copy_over_ranks(tmp_path):
    import json

    from click.testing import CliRunner

    from bench import data_scale
    path = make_zip(tmp_path / 'b.zip', 64)
    result = CliRunner().invoke(data_scale.main, [f'--data={path}', '--workers=1', '--batch=8', '--epochs=2',
                                                 f'--json={tmp_path / "r.json"}'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = json.loads((tmp_path / 'r.json').read_text())['rows']
    assert [(r['setting'], r['epoch']) for r in rows] == [('cache on', 1), ('cache on', 2), ('cache off', 1), ('cache off', 2)]
    assert rows[1]['cache_items'] == rows[1]['filled'] == 64 and rows[1]['cache_mib'] == 64 * 3 * RES * RES / 2**20
    assert rows[3]['cache_items'] == 0 and rows[3]['processes'] == 4 and rows[3]['pss_total_mib'] > 0
    assert 'PSS total MiB' in result.output
