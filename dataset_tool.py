"""Prepare a training data set: convert a folder or zip of images (or the built-in demo set) into EDM's format.

Examples:
  python dataset_tool.py --source=demo:shapes --dest=datasets/shapes-16x16.zip --resolution=16x16
  python dataset_tool.py --source=downloads/celeba --dest=datasets/celeba-64x64.zip --resolution=64x64 --transform=center-crop
  python dataset_tool.py --source=/tmp/twemoji/package/img/twitter/64 --dest=datasets/twemoji-32x32.zip --resolution=32x32 \\
      --heldout=10 --heldout-dest=datasets/twemoji-32x32-heldout.zip
"""

import io
import json
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from typing import Callable, Iterator, Optional, Tuple

import click
import numpy as np
import PIL.Image
import torch
from tqdm import tqdm

from torch_utils import distributed
from training import demo_shapes, latents
from training.dataset import GRAYSCALE_MODES, IMAGE_EXTENSIONS

Item = Tuple[str, Callable[[], PIL.Image.Image], Optional[object]]  # (name, loader, label)
ALPHA_MODES = ('RGBA', 'LA', 'PA')


def parse_resolution(value: Optional[str]) -> Optional[Tuple[int, int]]:
    """'64x64' -> (64, 64); None stays None."""
    if value is None:
        return None
    match = re.fullmatch(r'(\d+)x(\d+)', value)
    if not match or int(match.group(1)) == 0 or int(match.group(2)) == 0:
        raise click.BadParameter(f'"{value}" is not of the form WxH, e.g. 64x64', param_hint='--resolution')
    return int(match.group(1)), int(match.group(2))


def parse_heldout(percent: Optional[float], heldout_dest: Optional[str], dest: str) -> Optional[Tuple[float, str]]:
    """--heldout and --heldout-dest -> (percent, heldout_dest), or None without a split."""
    if percent is None:
        if heldout_dest is not None:
            raise click.BadParameter('--heldout-dest needs --heldout=PERCENT', param_hint='--heldout-dest')
        return None
    if heldout_dest is None:
        raise click.BadParameter(f'--heldout={percent:g} needs --heldout-dest=ZIP|DIR for the held-out images', param_hint='--heldout-dest')
    if os.path.realpath(heldout_dest) == os.path.realpath(dest):
        raise click.BadParameter(f'{heldout_dest} is also --dest; give the held-out images their own place', param_hint='--heldout-dest')
    return percent, heldout_dest


def in_heldout(name: str, percent: float) -> bool:
    """Whether the source image `name` goes to the held-out share: crc32(name) % 10000 < percent * 100, fixed per name."""
    return zlib.crc32(name.encode('utf-8')) % 10000 < percent * 100


def list_source(source: str, max_images: Optional[int], seed: int, resolution: Optional[Tuple[int, int]],
                select: Optional[Callable[[str], bool]] = None) -> Tuple[int, Iterator[Item]]:
    """Number of images in `source` (those `select` keeps, then capped at max_images) and an iterator over them."""
    if source.startswith('demo:'):
        if source != 'demo:shapes':
            raise click.BadParameter(f'unknown demo set "{source}"; the built-in one is demo:shapes', param_hint='--source')
        if resolution is None:
            raise click.BadParameter('the demo set is drawn at any size; give one, e.g. --resolution=16x16', param_hint='--resolution')
        if resolution[0] != resolution[1]:
            raise click.BadParameter('the demo set is square; give WxW', param_hint='--resolution')
        num = max_images if max_images is not None else 5000

        def demo_items():
            for i in range(num):
                image, label = demo_shapes.make_image(i, resolution[0], seed)
                yield f'shapes{i:08d}.png', (lambda image=image: PIL.Image.fromarray(image)), label
        return num, demo_items()

    if os.path.isdir(source):
        names = sorted(os.path.relpath(os.path.join(root, f), source).replace(os.sep, '/')
                       for root, _dirs, files in os.walk(source) for f in files)
        archive = None
        open_file = lambda name: open(os.path.join(source, name), 'rb')  # noqa: E731
    elif os.path.isfile(source) and zipfile.is_zipfile(source):
        archive = zipfile.ZipFile(source)
        names = sorted(archive.namelist())
        open_file = lambda name: archive.open(name, 'r')  # noqa: E731
    else:
        raise click.BadParameter(f'{source}: not a directory, a zip file or demo:shapes', param_hint='--source')

    labels = {}
    if 'dataset.json' in names:
        try:
            with open_file('dataset.json') as f:
                labels = dict(json.load(f).get('labels') or [])
        except (ValueError, TypeError, AttributeError) as err:
            raise click.ClickException(f'{source}: dataset.json is malformed ({err})')
    images = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    if not images:
        raise click.ClickException(f'{source}: contains no images (expected {", ".join(IMAGE_EXTENSIONS)} files)')
    images = [name for name in images if select is None or select(name)][:max_images]

    def load(name):
        try:
            with open_file(name) as f:
                image = PIL.Image.open(io.BytesIO(f.read()))
                image.load()
            return image
        except (PIL.UnidentifiedImageError, OSError) as err:
            raise click.ClickException(f'{source}: cannot read {name} ({err})')
    return len(images), ((name, (lambda name=name: load(name)), labels.get(name)) for name in images)


def flatten(image: PIL.Image.Image) -> PIL.Image.Image:
    """L (grayscale) or RGB image; one with an alpha channel or a 'transparency' entry is composited onto white."""
    mode = 'L' if image.mode in GRAYSCALE_MODES else 'RGB'
    if image.mode not in ALPHA_MODES and not (image.mode in ('P', 'L', 'RGB') and 'transparency' in image.info):
        return image.convert(mode)
    image = image.convert(mode + 'A')
    background = PIL.Image.new(mode, image.size, 'white')
    background.paste(image.convert(mode), mask=image.getchannel('A'))
    return background


def transform_image(image: PIL.Image.Image, resolution: Optional[Tuple[int, int]], transform: Optional[str]) -> np.ndarray:
    """Flatten, crop and resize as asked; returns a uint8 HWC (or HW for grayscale) array."""
    image = flatten(image)
    w, h = image.size
    if transform == 'center-crop':
        side = min(w, h)
        image = image.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    elif transform == 'center-crop-wide':
        width, height = resolution
        crop_h = min(h, round(w * height / width))
        crop_w = round(crop_h * width / height)
        image = image.crop(((w - crop_w) // 2, (h - crop_h) // 2, (w - crop_w) // 2 + crop_w, (h - crop_h) // 2 + crop_h))
        image = image.resize((width, height), PIL.Image.LANCZOS)
        canvas = PIL.Image.new(image.mode, (width, width))
        canvas.paste(image, (0, (width - height) // 2))
        return np.asarray(canvas)
    if resolution is not None and image.size != resolution:
        image = image.resize(resolution, PIL.Image.LANCZOS)
    return np.asarray(image)


class DatasetWriter:
    """Writes images and dataset.json to a zip or directory under a temporary name, renamed on commit()."""

    def __init__(self, dest: str, param_hint: str = '--dest'):
        self.dest = dest
        self.is_zip = dest.lower().endswith('.zip')
        parent = os.path.dirname(os.path.abspath(dest))
        os.makedirs(parent, exist_ok=True)
        if self.is_zip:
            fd, self.tmp = tempfile.mkstemp(dir=parent, prefix='.' + os.path.basename(dest), suffix='.tmp')
            os.close(fd)
            self.zip = zipfile.ZipFile(self.tmp, 'w', compression=zipfile.ZIP_STORED)
        else:
            if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
                raise click.BadParameter(f'{dest} already exists and is not an empty directory', param_hint=param_hint)
            self.tmp = tempfile.mkdtemp(dir=parent, prefix='.' + os.path.basename(dest), suffix='.tmp')

    def write(self, name: str, data: bytes) -> None:
        """Add one file under its archive name."""
        if self.is_zip:
            self.zip.writestr(name, data)
        else:
            path = os.path.join(self.tmp, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, 'wb') as f:
                f.write(data)

    def commit(self) -> None:
        """Move the finished data set to its destination."""
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, (0o666 if self.is_zip else 0o777) & ~umask)  # mkstemp/mkdtemp create owner-only files
        if self.is_zip:
            self.zip.close()
            os.replace(self.tmp, self.dest)
        else:
            if os.path.isdir(self.dest):
                os.rmdir(self.dest)
            os.rename(self.tmp, self.dest)

    def abort(self) -> None:
        """Remove the partial output."""
        if self.is_zip:
            self.zip.close()
            os.remove(self.tmp)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _checked_arrays(items: Iterator[Item], num: int, resolution: Optional[Tuple[int, int]], transform: Optional[str],
                    first: dict, desc: str = 'dataset_tool') -> Iterator[Tuple[str, np.ndarray, Optional[object]]]:
    """(archive name, uint8 array, label) per item after the transform, with a progress bar; all one square size,
    that of the first array in any call sharing the dict `first`."""
    for index, (name, load, label) in enumerate(tqdm(items, total=num, desc=desc, unit='img')):
        array = transform_image(load(), resolution, transform)
        if 'shape' not in first:
            first['shape'] = shape = array.shape
            if shape[0] != shape[1] or shape[0] & (shape[0] - 1):
                raise click.ClickException(f'{name}: output would be {shape[1]}x{shape[0]}; the result must be square with a '
                                           'power-of-two side: pass e.g. --resolution=64x64 --transform=center-crop')
        elif array.shape != first['shape']:
            shape = first['shape']
            raise click.ClickException(f'{name}: image is {array.shape[1]}x{array.shape[0]} but the first was '
                                       f'{shape[1]}x{shape[0]}; pass --resolution to resize all images to one size')
        yield f'{index // 1000:05d}/img{index:08d}', array, label


def batched(items: Iterator, size: int) -> Iterator[list]:
    """Lists of `size` consecutive items (the last one shorter)."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _parts(source: str, dest: str, max_images: Optional[int], seed: int, resolution: Optional[Tuple[int, int]],
           heldout: Optional[Tuple[float, str]]) -> list:
    """(dest, flag, number, items) per output: all of `source` to dest, or split as heldout=(percent, heldout_dest) asks."""
    if heldout is None:
        return [(dest, '--dest') + list_source(source, max_images, seed, resolution)]
    if source.startswith('demo:'):
        raise click.BadParameter('demo:shapes has its own held-out images (fid.py demo --heldout); drop --heldout', param_hint='--heldout')
    percent, heldout_dest = heldout
    parts = [(dest, '--dest') + list_source(source, max_images, seed, resolution, lambda name: not in_heldout(name, percent)),
             (heldout_dest, '--heldout-dest') + list_source(source, None, seed, resolution, lambda name: in_heldout(name, percent))]
    for part_dest, flag, num, _items in parts:
        if num == 0:
            raise click.ClickException(f'{source}: --heldout={percent:g} leaves no images for {flag}={part_dest}')
    return parts


def _write_dataset(source: str, dest: str, resolution: Optional[Tuple[int, int]], transform: Optional[str],
                   max_images: Optional[int], seed: int, write_items: Callable, meta: Optional[dict] = None,
                   heldout: Optional[Tuple[float, str]] = None) -> Tuple[int, int]:
    """Shared body of convert() and encode_latents(): write_items(writer, arrays) writes the files and returns
    [archive name, label] per item; dataset.json gets the labels (if every item has one) and `meta`. With
    heldout=(percent, heldout_dest) the images that in_heldout() picks go to heldout_dest instead; no output is
    committed before all are written. Returns the number of images written to dest and to heldout_dest (0 without)."""
    if transform is not None and resolution is None:
        raise click.BadParameter(f'--transform={transform} needs --resolution', param_hint='--transform')
    if resolution is not None and resolution[0] != resolution[1] and transform != 'center-crop-wide':
        raise click.BadParameter('images must be square: give WxW, or HxW with --transform=center-crop-wide', param_hint='--resolution')
    parts = _parts(source, dest, max_images, seed, resolution, heldout)
    writers, first = [], {}
    try:
        for part_dest, flag, _num, _items in parts:
            writers.append(DatasetWriter(part_dest, flag))
        for writer, (_dest, flag, num, items) in zip(writers, parts):
            desc = 'dataset_tool' if flag == '--dest' else 'dataset_tool (held out)'
            labels = write_items(writer, _checked_arrays(items, num, resolution, transform, first, desc))
            has_labels = all(label is not None for _name, label in labels)
            writer.write('dataset.json', json.dumps(dict(labels=labels if has_labels else None, **(meta or {}))).encode('utf-8'))
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    for writer in writers:
        writer.commit()
    return parts[0][2], (parts[1][2] if heldout is not None else 0)


def convert(source: str, dest: str, resolution: Optional[Tuple[int, int]], transform: Optional[str],
            max_images: Optional[int], seed: int = 0, heldout: Optional[Tuple[float, str]] = None) -> Tuple[int, int]:
    """Convert `source` into an EDM-format data set of PNGs at `dest` (and the held-out share at heldout=(percent, dest));
    returns the number of images written to each."""
    def write_pngs(writer: DatasetWriter, arrays: Iterator) -> list:
        labels = []
        for name, array, label in arrays:
            buffer = io.BytesIO()
            PIL.Image.fromarray(array).save(buffer, format='png', compress_level=0, optimize=False)
            writer.write(f'{name}.png', buffer.getvalue())
            labels.append([f'{name}.png', label])
        return labels
    return _write_dataset(source, dest, resolution, transform, max_images, seed, write_pngs, heldout=heldout)


def encode_latents(source: str, dest: str, resolution: Optional[Tuple[int, int]], transform: Optional[str],
                   max_images: Optional[int], vae: Optional[str], xflip: bool, batch_size: int, device: str, seed: int = 0,
                   heldout: Optional[Tuple[float, str]] = None, norm: str = 'sd') -> Tuple[int, int]:
    """Encode every image of `source` once with the VAE (None: the normalisation's) into a LatentFolderDataset at `dest`
    (moments, and of mirrors, with the latent normalisation `norm` recorded; the held-out share likewise at
    heldout=(percent, dest)); returns the number of images written to each."""
    setting = latents.latent_setting(norm, vae)
    try:
        codec = latents.LatentCodec.of(setting, distributed.choose_device(device))
    except (latents.LatentError, ValueError) as err:
        raise click.BadParameter(str(err), param_hint='--vae' if isinstance(err, latents.LatentError) else '--device')

    def write_moments(writer: DatasetWriter, arrays: Iterator) -> list:
        labels = []
        for batch in batched(arrays, batch_size):
            rgb = [np.broadcast_to(np.atleast_3d(array), array.shape[:2] + (3,)) for _name, array, _label in batch]
            images = torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2)
            views = [images, images.flip(3)] if xflip else [images]
            moments = torch.stack([codec.encode_moments(v).cpu() for v in views], dim=1)  # [N, F, 2C, h, w]
            for (name, _array, label), item_moments in zip(batch, moments.numpy()):
                buffer = io.BytesIO()
                np.save(buffer, item_moments)
                writer.write(f'{name}.npy', buffer.getvalue())
                labels.append([f'{name}.npy', label])
        return labels
    meta = dict(latents=dict(setting, channels=codec.channels, factor=codec.factor, flips=xflip))
    return _write_dataset(source, dest, resolution, transform, max_images, seed, write_moments, meta, heldout)


@click.command()
@click.option('--source', required=True, metavar='DIR|ZIP|demo:shapes', help='Input: a folder or zip of images, or the built-in demo set')
@click.option('--dest', required=True, metavar='DIR|ZIP', help='Output folder or .zip (written atomically)')
@click.option('--resolution', metavar='WxH', help='Output size, e.g. 64x64')
@click.option('--transform', type=click.Choice(['center-crop', 'center-crop-wide']), help='Crop before resizing')
@click.option('--max-images', type=click.IntRange(min=1), help='Keep at most this many images (with --heldout: of the training part, --dest; demo: how many to draw, default 5000)')
@click.option('--heldout', 'heldout_percent', type=click.FloatRange(0, 100, min_open=True, max_open=True), metavar='PERCENT',
              help='Hold out this share of the source for scoring, chosen by file name: crc32(name) % 10000 < PERCENT*100')
@click.option('--heldout-dest', metavar='DIR|ZIP', help='With --heldout: where the held-out images go (same format and transforms as --dest)')
@click.option('--seed', type=int, default=0, show_default=True, help='Seed of the demo set')
@click.option('--encode-latents', 'encode', is_flag=True, help='Write VAE latents (posterior mean and std) instead of PNGs, for train.py --latents')
@click.option('--vae', metavar='DIR|HUB_ID', help=f'AutoencoderKL for --encode-latents  [default: {latents.SD_VAE}; {latents.EDM2_VAE} with --latent-norm=edm2]')
@click.option('--latent-norm', 'norm', type=click.Choice(latents.LATENT_NORMS), default='sd', show_default=True,
              help='With --encode-latents: sd (pixels in [-1, 1], scale 0.18215) or edm2 (EDM2\'s: pixels in [0, 1], per-channel scale and bias)')
@click.option('--xflip', type=bool, default=False, show_default=True, help='With --encode-latents: also encode mirrored images')
@click.option('--batch', 'batch_size', type=click.IntRange(min=1), default=32, show_default=True, help='Images per VAE call')
@click.option('--device', type=click.Choice(['auto', 'cpu', 'cuda']), default='auto', show_default=True, help='Where the VAE runs')
def main(source: str, dest: str, resolution: Optional[str], transform: Optional[str], max_images: Optional[int],
         heldout_percent: Optional[float], heldout_dest: Optional[str], seed: int, encode: bool, vae: Optional[str],
         norm: str, xflip: bool, batch_size: int, device: str) -> None:
    """Convert images into a data set that train.py, fid.py and ImageFolderDataset read, or encode them into VAE latents."""
    heldout = parse_heldout(heldout_percent, heldout_dest, dest)
    if encode:
        num, num_heldout = encode_latents(source, dest, parse_resolution(resolution), transform, max_images, vae, xflip,
                                          batch_size, device, seed, heldout, norm)
        what = 'the latents of '
    else:
        num, num_heldout = convert(source, dest, parse_resolution(resolution), transform, max_images, seed, heldout)
        what = ''
    click.echo(f'Wrote {what}{num} images to {dest}')
    if heldout is not None:
        click.echo(f'Wrote {what}{num_heldout} held-out images to {heldout_dest}')


if __name__ == '__main__':
    main()
