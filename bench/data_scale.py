"""The training data loader on a large data set: startup time, memory per process and in total, images/s.

Spawns `--ranks` gloo ranks on the CPU. Each builds its data set and loader the way train.py does (train.py's
build_config for the dataset and DataLoader options, training_loop.make_loader for the sampler, the cache and the
loader) and pulls `--epochs` passes over its shard, with `--cache` on and off in turn. Reported per setting:

- startup, per rank (the slower rank): `list s` constructing the data set (listing the zip, reading dataset.json,
  checking the first image), `cache s` make_loader (sharding, allocating the cache), `first batch s` the loader's
  workers starting and delivering one batch;
- images/s of all ranks together in each epoch (epoch 1 decodes and fills the cache; later epochs read it);
- memory after each epoch, measured by psutil on every rank process and its loader workers: the sum of PSS
  (shared pages divided among the processes that map them, so the sum is the memory the job really holds,
  shared memory included), the largest USS (pages one process alone maps) of a rank process and of a worker, the
  growth of /dev/shm, and the cache each rank allocated (its items and bytes) and filled.

Run from the repository root (the 100k-image set takes about a minute and 1.2 GB of disk to make):
  python dataset_tool.py --source=demo:shapes --dest=/tmp/scale-64x64.zip --resolution=64x64 --max-images=100000
  python bench/data_scale.py --data=/tmp/scale-64x64.zip --json=bench-out/data_scale.json
"""

import math
import multiprocessing
import os
import shutil
import socket
import sys
import time
from typing import Any, Dict, List

import click
import psutil
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dnnlib  # noqa: E402
from bench import common  # noqa: E402
from train import build_config, preset_options  # noqa: E402
from training.training_loop import make_loader  # noqa: E402

MIB = 2 ** 20


def _shm_used() -> int:
    try:
        return shutil.disk_usage('/dev/shm').used
    except OSError:
        return 0


def process_memory() -> Dict[str, Any]:
    """PSS, USS and RSS of this process and of each of its children (the loader's workers)."""
    me = psutil.Process()
    result = dict(main=None, workers=[])
    for proc in [me] + me.children(recursive=True):
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        entry = dict(pid=proc.pid, pss=info.pss, uss=info.uss, rss=info.rss)
        if proc.pid == me.pid:
            result['main'] = entry
        else:
            result['workers'].append(entry)
    return result


def cache_state(dataset) -> Dict[str, Any]:
    """The cache this rank allocated: kind, items, bytes and how many are filled (zeros without one)."""
    cache = getattr(dataset, 'cache', None)
    if cache is None:
        return dict(kind=None, items=0, bytes=0, filled=0)
    return dict(kind=cache.kind, items=len(cache.keys), bytes=cache.nbytes, filled=cache.num_filled)


def rank_main(rank: int, world_size: int, port: int, cfg: Dict[str, Any], queue) -> None:
    """One rank: build the data set and loader as training does, time them, iterate, measure, report to `queue`."""
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    # A rank that torchrun starts forks its loader workers (Linux's default); one that multiprocessing spawned
    # would spawn them, re-importing this script in every worker.
    multiprocessing.set_start_method('fork', force=True)
    dist.init_process_group('gloo', rank=rank, world_size=world_size)
    opts = preset_options(cfg['preset'], data=cfg['data'], cache=cfg['cache'], workers=cfg['workers'], device='cpu',
                          xflip=cfg['xflip'], cache_limit=cfg['cache_limit'])
    c = build_config(opts, 'bench', cfg['resolution'], world_size)
    report: Dict[str, Any] = dict(rank=rank)
    dist.barrier()

    start = time.perf_counter()
    dataset = dnnlib.construct_class_by_name(**c.dataset_kwargs)
    report['list_s'] = time.perf_counter() - start
    start = time.perf_counter()
    sampler, loader = make_loader(dataset, rank, world_size, cfg['seed'], 0, cfg['batch'], c.data_loader_kwargs)
    report['cache_s'] = time.perf_counter() - start
    report['shard'] = len(sampler.items)
    report['cache_alloc'] = cache_state(dataset)
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    report['first_batch_s'] = time.perf_counter() - start

    batches = math.ceil(len(sampler.items) / cfg['batch'])  # a little over one pass over the shard
    if cfg['max_batches']:
        batches = min(batches, cfg['max_batches'])
    report['epochs'] = []
    for _epoch in range(cfg['epochs']):
        dist.barrier()
        start = time.perf_counter()
        images = 0
        for _ in range(batches):
            images += len(next(iterator)[0])
        elapsed = time.perf_counter() - start
        dist.barrier()
        shm = _shm_used()
        report['epochs'].append(dict(images=images, seconds=elapsed, memory=process_memory(), shm_used=shm,
                                     cache=cache_state(dataset)))
        dist.barrier()
    del iterator, loader
    dist.barrier()
    dist.destroy_process_group()
    queue.put(report)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_setting(cfg: Dict[str, Any], ranks: int) -> List[Dict[str, Any]]:
    """Spawn the ranks for one setting and return their reports, by rank."""
    context = multiprocessing.get_context('spawn')
    queue = context.Queue()
    port = free_port()
    procs = [context.Process(target=rank_main, args=(rank, ranks, port, cfg, queue)) for rank in range(ranks)]
    for proc in procs:
        proc.start()
    reports = []
    try:
        while len(reports) < ranks:
            try:
                reports.append(queue.get(timeout=5))
            except Exception:  # queue.Empty: check that the ranks still live
                if any(proc.exitcode not in (None, 0) for proc in procs):
                    raise click.ClickException(f'a rank failed: exit codes {[proc.exitcode for proc in procs]}')
    finally:
        for proc in procs:
            proc.join(60)
            if proc.is_alive():
                proc.kill()
    return sorted(reports, key=lambda r: r['rank'])


def summarize(name: str, reports: List[Dict[str, Any]], shm_before: int) -> List[Dict[str, Any]]:
    """Table rows (one per epoch) of one setting from its ranks' reports."""
    rows = []
    for epoch in range(len(reports[0]['epochs'])):
        parts = [r['epochs'][epoch] for r in reports]
        mains = [p['memory']['main'] for p in parts]
        workers = [w for p in parts for w in p['memory']['workers']]
        rows.append(dict(
            setting=name, epoch=epoch + 1,
            list_s=max(r['list_s'] for r in reports), cache_s=max(r['cache_s'] for r in reports),
            first_s=max(r['first_batch_s'] for r in reports),
            images_s=sum(p['images'] for p in parts) / max(p['seconds'] for p in parts),
            pss_total_mib=sum(m['pss'] for m in mains + workers) / MIB,
            rank_uss_mib=max(m['uss'] for m in mains) / MIB, rank_pss_mib=max(m['pss'] for m in mains) / MIB,
            worker_uss_mib=max((w['uss'] for w in workers), default=0) / MIB,
            worker_pss_mib=max((w['pss'] for w in workers), default=0) / MIB,
            shm_mib=(max(p['shm_used'] for p in parts) - shm_before) / MIB,
            cache_mib=sum(r['cache_alloc']['bytes'] for r in reports) / MIB,
            cache_items=sum(r['cache_alloc']['items'] for r in reports),
            filled=sum(p['cache']['filled'] for p in parts),
            processes=len(mains) + len(workers)))
    return rows


COLUMNS = [('setting', 'setting', 's'), ('epoch', 'epoch', 'd'), ('list s', 'list_s', '.2f'), ('cache s', 'cache_s', '.2f'),
           ('1st batch s', 'first_s', '.2f'), ('img/s', 'images_s', '.0f'), ('PSS total MiB', 'pss_total_mib', '.0f'),
           ('rank USS MiB', 'rank_uss_mib', '.0f'), ('rank PSS MiB', 'rank_pss_mib', '.0f'),
           ('worker USS MiB', 'worker_uss_mib', '.0f'), ('worker PSS MiB', 'worker_pss_mib', '.0f'),
           ('/dev/shm +MiB', 'shm_mib', '.0f'), ('cache MiB', 'cache_mib', '.0f'), ('cache items', 'cache_items', 'd'),
           ('filled', 'filled', 'd')]


def print_report(result: Dict[str, Any]) -> None:
    args = result['args']
    print(f'{args["data"]}: {result["images"]} images of {result["resolution"]}x{result["resolution"]}, {args["ranks"]} ranks x '
          f'{args["workers"]} workers, loader batch {args["batch"]} per rank; rows: max over ranks for times and '
          'per-process memory, sums for totals')
    print(common.format_table(result['rows'], COLUMNS))


@click.command()
@click.option('--data', help='Data set (zip or directory of images)', metavar='ZIP|DIR', required=True)
@click.option('--ranks', help='gloo ranks to spawn', metavar='INT', type=click.IntRange(min=1), default=2, show_default=True)
@click.option('--workers', help='Loader workers per rank', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True)
@click.option('--batch', help='Loader batch per rank (batch_gpu)', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--epochs', help='Passes over each rank\'s shard', metavar='INT', type=click.IntRange(min=1), default=2, show_default=True)
@click.option('--max-batches', help='Cap on the batches of a pass (0: a whole pass)', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--caches', help='--cache settings to run, in order', metavar='LIST', default='on,off', show_default=True)
@click.option('--cache-limit', help='train.py --cache-limit, GiB', metavar='GIB', type=click.FloatRange(min=0, min_open=True))
@click.option('--preset', help='train.py preset whose loader options to use', metavar='NAME', default='celeba64', show_default=True)
@click.option('--xflip', help='train.py --xflip', type=bool, default=False, show_default=True)
@click.option('--seed', help='Sampler seed', metavar='INT', type=int, default=0, show_default=True)
@click.option('--json', 'json_path', help='Also write the results here', metavar='PATH')
def main(data: str, ranks: int, workers: int, batch: int, epochs: int, max_batches: int, caches: str, cache_limit: float,
         preset: str, xflip: bool, seed: int, json_path: str) -> None:
    """Measure the training loader's startup, memory and images/s with the cache on and off."""
    names = caches.split(',')
    if not names or any(n not in ('on', 'off') for n in names):
        raise click.BadParameter(f'"{caches}": a list of on and off', param_hint='--caches')
    if not os.path.exists(data):
        raise click.BadParameter(f'{data} does not exist', param_hint='--data')
    dataset = dnnlib.construct_class_by_name(**build_config(preset_options(preset, data=data, cache=False), 'bench', 0, 1).dataset_kwargs)
    args = dict(data=data, ranks=ranks, workers=workers, batch=batch, epochs=epochs, max_batches=max_batches, caches=caches,
                cache_limit=cache_limit, preset=preset, xflip=xflip, seed=seed)
    rows = []
    for name in names:
        cfg = dict(args, cache=name == 'on', resolution=dataset.resolution)
        shm_before = _shm_used()
        reports = run_setting(cfg, ranks)
        rows += summarize(f'cache {name}', reports, shm_before)
        print(f'[cache {name}] done', flush=True)
    result = dict(environment=common.environment(torch.device('cpu')), args=args, images=len(dataset),
                  resolution=dataset.resolution, rows=rows)
    common.print_and_save(result, print_report, json_path)


if __name__ == '__main__':
    main()
