"""Frechet Inception Distance (FID) and Kernel Inception Distance (KID) of a folder, a zip or a network's samples.

Examples (torchrun needs `--` before the script: otherwise it takes --num for an abbreviation of its --numa-binding):
  python fid.py ref --data=datasets/shapes-16x16.zip --dest=fid-refs/shapes-16x16.npz
  torchrun --standalone --nproc_per_node=8 -- fid.py calc --images=fid-tmp --ref=fid-refs/shapes-16x16.npz --num=50000
  torchrun --standalone --nproc_per_node=8 -- fid.py calc --network=snap.pkl --ref=fid-refs/shapes-16x16.npz --num=50000
  python fid.py calc --network=big.pkl --guide=small.pkl --guidance=2 --ref=fid-refs/shapes-16x16.npz --num=10000  # autoguidance
  python fid.py calc --images=fid-tmp --ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz  # FID only
  python fid.py calc --images=fid-tmp --ref=fid-refs/shapes-16x16.npz --detector=inception-offline  # no download
  python fid.py demo --network=demo-run --fid-data=datasets/shapes-16x16.zip  # the quick start's scores
"""

import hashlib
import io
import json
import os
import zipfile
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import click
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import dnnlib
from generate import open_decoder, open_guide, parse_int_list, resolve_sampling, sampling_options
from torch_utils import distributed
from training import demo_shapes
from training.dataset import DatasetError, ImageFolderDataset
from training.detector import DETECTOR_URL, OFFLINE_NAME, ONLINE_NAME, DetectorError, detector_source, load_detector
from training.evaluate import heldout_loss
from training.images import save_image_grid
from training.sampler import generate_images
from training.snapshot import SnapshotError, atomic_write, load_network

def open_detector(name_or_path: str, device: torch.device) -> Tuple[torch.nn.Module, str]:
    """load_detector() for the command line: rank 0 downloads first, and failures end with their one-line message."""
    try:
        return _rank0_first(load_detector, detector_source(name_or_path), device, distributed.print0)
    except DetectorError as err:
        raise click.ClickException(str(err))


def load_ref(path_or_url: str) -> Dict[str, np.ndarray]:
    """Reference statistics from an .npz: mu, sigma and, in files written by `fid.py ref`, the features KID needs."""
    try:
        with dnnlib.util.open_url(path_or_url) as f:
            data = f.read()
    except IOError as err:
        raise click.ClickException(f'--ref: {err}')
    try:
        ref = dict(np.load(io.BytesIO(data)))
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise click.ClickException(f'--ref: {path_or_url}: not an .npz of reference statistics ({type(err).__name__}: {err})')
    if 'mu' not in ref or 'sigma' not in ref:
        raise click.ClickException(f'--ref: {path_or_url}: has no "mu" and "sigma" arrays (found: {", ".join(ref) or "none"})')
    dim = len(ref['mu'])
    if ref['mu'].ndim != 1 or ref['sigma'].shape != (dim, dim) or ('features' in ref and ref['features'].shape[1:] != (dim,)):
        raise click.ClickException(f'--ref: {path_or_url}: "mu", "sigma" and "features" have inconsistent shapes')
    return ref


def rank_batches(items: Sequence[int], batch_size: int) -> List[np.ndarray]:
    """This rank's contiguous share of `items`, cut into batches of at most `batch_size` (no empty batches)."""
    share = np.array_split(np.asarray(items, dtype=np.int64), distributed.get_world_size())[distributed.get_rank()]
    num_batches = -(-len(share) // batch_size)
    return np.array_split(share, num_batches) if num_batches else []


def open_dataset(path: str, num: Optional[int], seed: int, option: str) -> ImageFolderDataset:
    """The images at `path`, or a random subset of `num` of them fixed by `seed`; at least two and no fewer than `num`."""
    try:
        dataset = ImageFolderDataset(path, max_size=num, random_seed=seed)
    except DatasetError as err:
        raise click.BadParameter(str(err), param_hint=option)
    if num is not None and len(dataset) < num:
        raise click.ClickException(f'{path} has {len(dataset)} images, fewer than --num={num}')
    if len(dataset) < 2:
        raise click.ClickException(f'{path} has {len(dataset)} image; statistics need at least 2')
    return dataset


def dataset_batches(dataset: ImageFolderDataset, batch_size: int, workers: int) -> Iterator[torch.Tensor]:
    """This rank's share of the data set as uint8 NCHW batches, with a progress bar on rank 0."""
    dataset.close()  # forked loader workers must not share the zip handle (and its file offset) opened while checking images
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=[b.tolist() for b in rank_batches(range(len(dataset)), batch_size)],
                                         num_workers=workers)
    for images, _labels in tqdm(loader, unit='batch', disable=distributed.get_rank() != 0):
        yield images


def network_batches(net: torch.nn.Module, seeds: Sequence[int], batch_size: int, device: torch.device,
                    class_idx: Optional[int] = None, **sampler_kwargs) -> Iterator[torch.Tensor]:
    """This rank's share of the seeds, sampled in memory as uint8 NCHW batches, with a progress bar on rank 0."""
    for batch in tqdm(rank_batches(seeds, batch_size), unit='batch', disable=distributed.get_rank() != 0):
        yield generate_images(net, batch.tolist(), device, class_idx=class_idx, **sampler_kwargs)


def _all_reduce(x: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized():
        x = x.to(distributed.collective_device())
        dist.all_reduce(x, op=op)
    return x


def _all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `x`, concatenated in rank order (ranks may hold different numbers of rows)."""
    if not dist.is_initialized():
        return x
    device = distributed.collective_device()
    counts = [torch.zeros([1], dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([len(x)], device=device))
    padded = torch.zeros([max(int(c) for c in counts), *x.shape[1:]], dtype=x.dtype, device=device)
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:int(c)] for part, c in zip(parts, counts)]).cpu()


@torch.no_grad()
def compute_feature_stats(batches: Iterable[torch.Tensor], detector: torch.nn.Module, device: torch.device,
                          keep_features: bool = False) -> Dict[str, np.ndarray]:
    """Feature statistics over every rank's uint8 NCHW `batches`: num, mu, sigma (float64) and, if asked, features (float32)."""
    num, total, outer, kept = 0, 0, 0, []
    for images in batches:
        if images.shape[1] == 1:
            images = images.repeat([1, 3, 1, 1])
        features = detector(images.to(device), return_features=True).to(torch.float64)
        num += len(features)
        total = total + features.sum(0)
        outer = outer + features.T @ features
        if keep_features:
            kept.append(features.to(torch.float32).cpu())

    # A rank with no images (fewer images than ranks) learns the feature size from the others.
    dim = int(_all_reduce(torch.tensor([len(total) if num else 0], device=device), op=dist.ReduceOp.MAX))
    if not num:
        total, outer = torch.zeros([dim], dtype=torch.float64, device=device), torch.zeros([dim, dim], dtype=torch.float64, device=device)
    num = int(_all_reduce(torch.tensor([num], device=device)))
    total, outer = _all_reduce(total).cpu(), _all_reduce(outer).cpu()
    mu = total / num
    stats = dict(num=num, mu=mu.numpy(), sigma=((outer - num * mu.outer(mu)) / (num - 1)).numpy())
    if keep_features:
        stats['features'] = _all_gather_rows(torch.cat(kept) if kept else torch.zeros([0, dim])).numpy()
    return stats


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance matrix (eigenvalues that rounding made slightly negative taken as 0)."""
    if not np.isfinite(sigma).all():
        raise ValueError('a covariance matrix has NaN or infinite entries')
    w, v = np.linalg.eigh(sigma)
    if w.min() < -1e-6 * max(abs(w).max(), 1):
        raise ValueError(f'a covariance matrix has a negative eigenvalue ({w.min():g}); it is not a valid covariance')
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr(sqrtm(S1 S2)) of two covariance matrices: the sum of the singular values of sqrt(S2) sqrt(S1).

    Those singular values are the square roots of the eigenvalues of sqrt(S1) S2 sqrt(S1), which are those of S1 S2.
    It is the number scipy.linalg.sqrtm of the product gives (EDM's way) up to rounding, but it stays exact to rounding
    when the covariances are singular, as with fewer images than features: the FID of 48 Inception feature vectors
    against themselves comes out 1e-4 with sqrtm and below 1e-9 here (tests/test_detector.py).
    """
    return float(np.linalg.svd(psd_sqrt(sigma2) @ psd_sqrt(sigma1), compute_uv=False).sum())


def calculate_fid(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance |mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2)) between two Gaussians."""
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))


def kid_subset_estimates(feats1: np.ndarray, feats2: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000,
                         seed: int = 0) -> np.ndarray:
    """Unbiased MMD^2 with the kernel (x.y / d + 1)^3 on `num_subsets` random subsets of both feature sets."""
    rng = np.random.RandomState(seed)
    m = min(len(feats1), len(feats2), max_subset_size)
    d = feats1.shape[1]
    estimates = np.zeros(num_subsets)
    for i in range(num_subsets):
        x = feats1[rng.choice(len(feats1), m, replace=False)].astype(np.float64)
        y = feats2[rng.choice(len(feats2), m, replace=False)].astype(np.float64)
        kxx, kyy, kxy = (k * k * k for k in (a @ b.T / d + 1 for a, b in [(x, x), (y, y), (x, y)]))  # ** 3 is much slower
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        estimates[i] = within - 2 * kxy.mean()
    return estimates


def calculate_kid(feats1: np.ndarray, feats2: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0) -> float:
    """Kernel Inception Distance: the mean of kid_subset_estimates()."""
    return float(kid_subset_estimates(feats1, feats2, num_subsets, max_subset_size, seed).mean())


def reference_cache_path(data_path: str, num: int, detector_name: str) -> str:
    """Where cached_reference() keeps the statistics of `num` images of `data_path`: beside the data set."""
    tag = {DETECTOR_URL: ONLINE_NAME, OFFLINE_NAME: OFFLINE_NAME}.get(detector_name)
    tag = tag or 'detector-' + hashlib.md5(detector_name.encode('utf-8')).hexdigest()[:8]
    return f'{os.path.splitext(os.path.normpath(data_path))[0]}-fid-{tag}-{num}.npz'


def cached_reference(data_path: str, num: int, detector: torch.nn.Module, detector_name: str, device: torch.device,
                     batch_size: int = 64) -> Dict[str, np.ndarray]:
    """Statistics and features of `num` random images (seed 0) of a data set, computed once and cached beside it.

    The cache is used again only while the data set's size and modification time are the ones it was made from.
    """
    path = reference_cache_path(data_path, num, detector_name)
    if not os.path.exists(data_path):
        raise click.BadParameter(f'{data_path}: no such directory or zip file', param_hint='--fid-data')
    stat = os.stat(data_path)
    source = f'{stat.st_size}:{stat.st_mtime_ns}'
    if os.path.isfile(path):
        with np.load(path) as cached:
            if 'source' in cached.files and str(cached['source']) == source:
                return dict(cached)
    stats = compute_feature_stats(dataset_batches(open_dataset(data_path, num, 0, '--fid-data'), batch_size, 0), detector, device,
                                  keep_features=True)
    stats = dict(mu=stats['mu'], sigma=stats['sigma'], features=stats['features'], source=np.array(source))
    atomic_write(path, lambda f: np.savez(f, **stats))
    return stats


def fid_kid(images: torch.Tensor, ref_stats: Dict[str, np.ndarray], detector: torch.nn.Module, device: torch.device,
            batch_size: int = 64) -> Dict[str, float]:
    """FID and KID of uint8 NCHW `images` (in this process) against reference statistics that include features."""
    stats = compute_feature_stats(images.split(batch_size), detector, device, keep_features=True)
    return dict(fid=calculate_fid(stats['mu'], stats['sigma'], ref_stats['mu'], ref_stats['sigma']),
                kid=calculate_kid(stats['features'], ref_stats['features']))


def _rank0_first(fn, path_or_url: str, *args):
    """fn(path_or_url, *args); for a URL, rank 0 goes first, then the first process of each other node, then the rest.

    So one process downloads into the cache when the nodes share it, and one per node when each has its own
    ($DNNLIB_CACHE_DIR on a local disk); the others read the cached file.
    """
    if not (dist.is_initialized() and dnnlib.util.is_url(path_or_url)):
        return fn(path_or_url, *args)
    turn = 0 if distributed.get_rank() == 0 else 1 if distributed.get_local_rank() == 0 else 2
    result = None
    for stage in range(3):
        if stage == turn:
            result = fn(path_or_url, *args)
        dist.barrier()
    return result


def _init(device: str) -> torch.device:
    try:
        return distributed.init(device)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint='--device')


def _finish() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _open_network(network_path: str, device: torch.device, class_idx: Optional[int], cfg: float) -> torch.nn.Module:
    try:
        net = _rank0_first(load_network, network_path, device)
    except SnapshotError as err:
        raise click.BadParameter(str(err), param_hint='--network')
    if class_idx is not None and not class_idx < net.label_dim:
        raise click.BadParameter(f'{class_idx}: the network has {net.label_dim} classes', param_hint='--class')
    if cfg != 1 and not net.label_dim:
        raise click.BadParameter('guidance needs a class-conditional network', param_hint='--cfg')
    return net


@click.group()
def main() -> None:
    """Calculate FID and KID against reference statistics (see the examples at the top of fid.py)."""




def detector_option(default: str):
    """The --detector option, with `default` as its default."""
    return click.option('--detector', 'detector_path', metavar='NAME|PKL|PT|URL', default=default, show_default=True,
                        help=f'Feature detector: {ONLINE_NAME} (NVIDIA\'s Inception-v3 pickle, downloaded once, as EDM uses; '
                             f'without internet it falls back to {OFFLINE_NAME}), {OFFLINE_NAME} (the same network from '
                             'requirements-fid.txt), or a pickle or torch.jit.save file or URL')


batch_option = click.option('--batch', 'batch_size', help='Maximum batch size per process', metavar='INT', type=click.IntRange(min=1),
                            default=64, show_default=True)
workers_option = click.option('--workers', help='Data loader processes per rank', metavar='INT', type=click.IntRange(min=0), default=2,
                              show_default=True)
device_option = click.option('--device', help='Where to run', type=click.Choice(['auto', 'cpu', 'cuda']), default='auto', show_default=True)


@main.command()
@click.option('--data', 'data_path', help='Data set', metavar='DIR|ZIP', required=True)
@click.option('--dest', 'dest_path', help='Where to write the statistics', metavar='NPZ', required=True)
@detector_option(ONLINE_NAME)
@batch_option
@workers_option
@device_option
def ref(data_path: str, dest_path: str, detector_path: str, batch_size: int, workers: int, device: str) -> None:
    """Write reference statistics of a data set: mu, sigma (EDM's layout) and the features for KID."""
    torch_device = _init(device)
    detector, detector_name = open_detector(detector_path, torch_device)
    dataset = open_dataset(data_path, None, 0, '--data')
    distributed.print0(f'Computing features of {len(dataset)} images from {data_path}...')
    stats = compute_feature_stats(dataset_batches(dataset, batch_size, workers), detector, torch_device, keep_features=True)
    if distributed.get_rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(dest_path)), exist_ok=True)
        atomic_write(dest_path, lambda f: np.savez(f, mu=stats['mu'], sigma=stats['sigma'], features=stats['features']))
    distributed.print0(f'Saved statistics of {stats["num"]} images to {dest_path}')
    _finish()


@main.command()
@click.option('--images', 'image_path', help='Images to score', metavar='DIR|ZIP')
@click.option('--network', 'network_path', help='Or a network snapshot (or run directory) to sample from', metavar='PKL|PT|URL|DIR')
@click.option('--ref', 'ref_path', help='Reference statistics', metavar='NPZ|URL', required=True)
@click.option('--num', help='Number of images to score', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed', help='Seed of the random subset of --images', metavar='INT', type=int, default=0, show_default=True)
@click.option('--seeds', help='Seeds for --network  [default: 0 to num-1]', metavar='LIST')
@click.option('--class', 'class_idx', help='Class label for --network  [default: random]', metavar='INT', type=click.IntRange(min=0))
@sampling_options
@click.option('--json', 'json_path', help='Append the result as one JSON line', metavar='PATH')
@detector_option(ONLINE_NAME)
@batch_option
@workers_option
@device_option
@click.pass_context
def calc(ctx: click.Context, image_path: Optional[str], network_path: Optional[str], ref_path: str, num: int, seed: int,
         seeds: Optional[str], class_idx: Optional[int], json_path: Optional[str], detector_path: str, batch_size: int,
         workers: int, device: str, sampler: str, preset: Optional[str], vae: Optional[str], **sampler_kwargs) -> None:
    """Score --images or --num samples of --network against --ref: prints FID and KID."""
    sampler_kwargs = resolve_sampling(ctx, sampler_kwargs, sampler, preset)
    if (image_path is None) == (network_path is None):
        raise click.UsageError('give exactly one of --images and --network')
    seed_list = parse_int_list(seeds) if seeds is not None else list(range(num))
    if len(seed_list) < num:
        raise click.BadParameter(f'{len(seed_list)} seeds, fewer than --num={num}', param_hint='--seeds')
    torch_device = _init(device)
    ref_stats = _rank0_first(load_ref, ref_path)
    detector, detector_name = open_detector(detector_path, torch_device)
    if image_path is not None:
        batches = dataset_batches(open_dataset(image_path, num, seed, '--images'), batch_size, workers)
    else:
        net = _open_network(network_path, torch_device, class_idx, sampler_kwargs['cfg'])
        sampler_kwargs = open_guide(sampler_kwargs, net, torch_device, load=lambda path, dev: _rank0_first(load_network, path, dev))
        batches = network_batches(net, seed_list[:num], batch_size, torch_device, class_idx=class_idx,
                                  decoder=open_decoder(net, torch_device, vae), **sampler_kwargs)
    source = image_path or network_path
    distributed.print0(f'Computing features of {num} images from {source}...')
    stats = compute_feature_stats(batches, detector, torch_device, keep_features='features' in ref_stats)
    if stats['mu'].shape != ref_stats['mu'].shape:
        raise click.ClickException(f'the detector gives {len(stats["mu"])} features but {ref_path} has {len(ref_stats["mu"])}; '
                                   'use the --detector that made the reference')
    if distributed.get_rank() == 0:
        try:
            fid = calculate_fid(stats['mu'], stats['sigma'], ref_stats['mu'], ref_stats['sigma'])
        except ValueError as err:
            raise click.ClickException(f'FID: {err}')
        kid = calculate_kid(stats['features'], ref_stats['features']) if 'features' in ref_stats else None
        click.echo(f'FID {fid:g}')
        click.echo(f'KID {kid:g}' if kid is not None else
                   f'KID unavailable: {ref_path} has only mu and sigma; make a reference with features using "fid.py ref"')
        if json_path is not None:
            with open(json_path, 'a') as f:
                f.write(json.dumps(dict(fid=fid, kid=kid, num=stats['num'], ref=ref_path, source=source, detector=detector_name)) + '\n')
    _finish()


@main.command()
@click.option('--network', 'network_path', help='Snapshot (or run directory) of a model trained on the demo set', metavar='PKL|PT|URL|DIR', required=True)
@click.option('--num', help='Number of generated images to score', metavar='INT', type=click.IntRange(min=1), default=256, show_default=True)
@click.option('--heldout', help='Number of fresh demo images for the held-out loss', metavar='INT', type=click.IntRange(min=1),
              default=512, show_default=True)
@click.option('--steps', 'num_steps', help='Sampling steps', metavar='INT', type=click.IntRange(min=1), default=50, show_default=True)
@click.option('--fid-data', help='Also score FID and KID of the samples against as many images of this data set (statistics cached beside it)',
              metavar='ZIP|DIR')
@click.option('--fid-num', help='Score FID and KID on the first N samples only (Inception is the slow part)  [default: --num]',
              metavar='INT', type=click.IntRange(min=2))
@click.option('--grid', help='Also save the first 64 samples as a PNG grid', metavar='PATH.png')
@click.option('--json', 'json_path', help='Append the result as one JSON line', metavar='PATH')
@detector_option(OFFLINE_NAME)
@batch_option
@device_option
def demo(network_path: str, num: int, heldout: int, num_steps: int, fid_data: Optional[str], fid_num: Optional[int],
         grid: Optional[str], json_path: Optional[str], detector_path: str, batch_size: int, device: str) -> None:
    """Score a model of the built-in demo set: coherence of its samples, held-out denoising loss, and FID and KID with --fid-data."""
    torch_device = _init(device)
    if distributed.get_world_size() > 1:
        raise click.UsageError('fid.py demo runs in one process')
    if fid_data is not None and num < 2:
        raise click.BadParameter('FID and KID need at least 2 samples', param_hint='--num')
    fid_num = num if fid_num is None else fid_num
    if fid_num > num:
        raise click.BadParameter(f'{fid_num} is more than the {num} samples of --num', param_hint='--fid-num')
    net = _open_network(network_path, torch_device, None, 1.0)
    if net.img_channels != 3:
        raise click.BadParameter(f'the network makes {net.img_channels}-channel images; the demo set is RGB', param_hint='--network')
    detector, detector_name = open_detector(detector_path, torch_device) if fid_data is not None else (None, None)
    images = torch.cat(list(network_batches(net, list(range(num)), batch_size, torch_device, num_steps=num_steps))).cpu()
    coherence = demo_shapes.coherence_score(images)
    loss = heldout_loss(net, demo_shapes.heldout_images(heldout, net.img_resolution))
    shares = demo_shapes.colour_shares(images)
    click.echo(f'coherence_score {coherence:.4f}  (1.0 = every sample symmetric and one-coloured)')
    click.echo('colour_shares ' + ', '.join(f'{name} {share:.2f}' for name, share in shares.items())
               + '  (real data: 1/3 each, none blank)')
    click.echo(f'heldout_loss {loss["mean"]:.4f}  (' + ', '.join(f'{k} {v:.3f}' for k, v in loss.items() if k != 'mean') + ')')
    record = dict(coherence=coherence, colour_shares=shares, heldout_loss=loss, num=num, steps=num_steps, network=network_path)
    if fid_data is not None:
        distributed.print0(f'Computing Inception features of {fid_num} samples and {fid_num} images of {fid_data}...')
        ref_stats = cached_reference(fid_data, fid_num, detector, detector_name, torch_device, batch_size)
        record.update(fid_kid(images[:fid_num], ref_stats, detector, torch_device, batch_size), fid_data=fid_data,
                      detector=detector_name, fid_num=fid_num)
        click.echo(f'FID {record["fid"]:.2f}  ({fid_num} samples against {fid_num} images of {fid_data}; at so few images FID is biased upward, '
                   f'so compare it only at equal counts)')
        click.echo(f'KID {record["kid"]:.4f}  (the same images; unbiased at any count)')
    if grid is not None:
        save_image_grid(images[:64], grid)
        click.echo(f'Saved {min(num, 64)} samples to {grid}')
    if json_path is not None:
        with open(json_path, 'a') as f:
            f.write(json.dumps(record) + '\n')
    _finish()


if __name__ == '__main__':
    main()
