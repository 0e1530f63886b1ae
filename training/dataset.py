"""Image data sets in EDM's format: a directory or zip of PNG/JPEG files with optional labels in dataset.json."""

import io
import json
import mmap
import os
import shutil
import sys
import zipfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import PIL.Image
import psutil
import torch

from training.latents import LatentNorm, latent_record

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')
GRAYSCALE_MODES = ('1', 'L', 'LA', 'I', 'I;16', 'F')


class DatasetError(ValueError):
    """A data set that cannot be used; the message names the source and, where there is one, the file.

    A DataLoader worker's exception comes back to the loading process as `DatasetError(<worker name and the whole
    traceback>)`; that is cut back to the original one-line message plus the worker that raised it.
    """

    def __init__(self, message: object = ''):
        if isinstance(message, str) and message.startswith('Caught DatasetError') and '\n' in message:
            where = message.split('\n', 1)[0][len('Caught DatasetError '):].rstrip('.')
            original = message.rstrip().rsplit('\n', 1)[-1].split('DatasetError: ', 1)[-1]
            message = f'{original} (raised {where})'
        super().__init__(message)


SHM_HEADROOM = 256 * 2**20  # /dev/shm left free beside the caches: the loader's workers pass batches through it


class SharedImageCache:
    """Decoded items of one rank's shard (the raw indices `keys`) in one array that the rank's loader workers share.

    It is allocated in the rank's main process before the DataLoader starts its workers (training_loop.make_loader
    does this) and filled lazily: whichever process decodes an item first stores it, and every other process of
    the rank reads it from then on, so the rank holds one copy of its shard, not one per worker. The memory is

    - 'shm': a torch tensor in /dev/shm when /dev/shm has room for the caches of all ranks on this machine. Its
      pages are committed at allocation (torch copies into the segment). Forked and spawned workers share it.
    - 'mmap': otherwise (Docker's default /dev/shm is 64 MB) an anonymous shared mapping, which is not limited by
      /dev/shm's size and whose pages are committed as items are stored. Forked workers (the default on Linux)
      share it; a spawned worker cannot receive it and reads uncached.
    """

    def __init__(self, keys: Sequence[int], item_shape: Sequence[int], dtype: torch.dtype = torch.uint8,
                 ranks_on_node: int = 1):
        self.keys = np.unique(np.asarray(keys, dtype=np.int64))
        num = len(self.keys)
        if num == 0:
            raise ValueError('SharedImageCache needs at least one key')
        shape = [num, *item_shape]
        self.nbytes = int(np.prod(shape)) * torch.empty([], dtype=dtype).element_size()
        if _shm_free_bytes() > (self.nbytes + num) * ranks_on_node + SHM_HEADROOM:
            self.kind = 'shm'
            self.images = torch.empty(shape, dtype=dtype).share_memory_()
            self.filled = torch.zeros([num], dtype=torch.bool).share_memory_()
        else:
            self.kind = 'mmap'
            self._buffer = mmap.mmap(-1, self.nbytes + num)  # anonymous; MAP_SHARED, so forked workers share it
            self.images = torch.frombuffer(self._buffer, dtype=dtype, count=int(np.prod(shape))).view(shape)
            self.filled = torch.frombuffer(self._buffer, dtype=torch.bool, count=num, offset=self.nbytes)

    def _slot(self, idx: int) -> int:
        slot = int(np.searchsorted(self.keys, idx))
        return slot if slot < len(self.keys) and self.keys[slot] == idx else -1

    def get(self, idx: int) -> Optional[np.ndarray]:
        """Item `idx` if some process has decoded it already, else None."""
        slot = self._slot(idx)
        return self.images[slot].numpy() if slot >= 0 and self.filled[slot] else None

    def put(self, idx: int, image: np.ndarray) -> None:
        """Store decoded item `idx` (ignored outside the keys); the flag is set after the pixels so that readers
        never see a partial item."""
        slot = self._slot(idx)
        if slot >= 0:
            self.images[slot].numpy()[...] = image  # through NumPy: decoded images are read-only arrays
            self.filled[slot] = True

    @property
    def num_filled(self) -> int:
        """How many items are stored."""
        return int(self.filled.sum())

    def __getstate__(self):
        if self.kind == 'mmap':
            raise TypeError('an mmap-backed SharedImageCache cannot be sent to a spawned process')
        return self.__dict__


def _shm_free_bytes() -> int:
    try:
        return shutil.disk_usage('/dev/shm').free
    except OSError:
        return 0


class ImageFolderDataset(torch.utils.data.Dataset):
    """Square images of one size from a directory or zip, as uint8 CHW arrays with one-hot labels.

    Options: `max_size` keeps a random subset (fixed by `random_seed`), `xflip` appends mirrored copies,
    `use_labels` reads labels from dataset.json, `cache` keeps decoded images in a SharedImageCache.

    Checked up front, without decoding every image: the file list (a zip's central directory or a directory
    walk), dataset.json's labels (with `use_labels`: valid JSON, one label per image) and the first image, decoded
    in full (square, power-of-two side, `resolution` if given); its size and channel count are the data set's.
    Checked lazily, as each image is decoded: that it decodes and has the first image's size. A bad image met
    mid-run raises DatasetError with one line naming the file, in a loader worker as in the main process.

    The cache: `prepare_cache(items)` allocates it for those items only (one rank's shard; training_loop.make_loader
    calls it before the loader's workers start, so that they share it). A cache that would take more than
    `cache_limit` bytes summed over the ranks on this machine (default: half the memory psutil reports available)
    is not made: one warning line, and the data set reads uncached. Without a prepare_cache call, the first item
    read in the process that made the data set allocates a cache for the whole data set.
    """

    extensions = IMAGE_EXTENSIONS  # the files that hold items
    item_kind = 'images'           # what they hold, for error messages
    how_to_make = ''               # hint for a source without such files
    latent: Optional[dict] = None  # for latent data sets: the VAE that encoded them (see LatentFolderDataset)

    def __init__(self, path: str, resolution: Optional[int] = None, max_size: Optional[int] = None,
                 xflip: bool = False, use_labels: bool = False, cache: bool = False, random_seed: int = 0,
                 cache_limit: Optional[float] = None):
        self.path = path
        self._zip, self._zip_pid = None, None
        self._cache: Optional[SharedImageCache] = None
        self._cache_wanted, self._cache_limit, self._owner_pid = bool(cache), cache_limit, os.getpid()
        if os.path.isdir(path):
            self._type = 'dir'
            self._all_names = sorted(os.path.relpath(os.path.join(root, f), path).replace(os.sep, '/')
                                     for root, _dirs, files in os.walk(path) for f in files)
        elif os.path.isfile(path) and zipfile.is_zipfile(path):
            self._type = 'zip'
            self._all_names = sorted(self._get_zip().namelist())
        elif os.path.isfile(path):
            raise DatasetError(f'{path}: not a zip archive; expected a directory or a .zip of images')
        else:
            raise DatasetError(f'{path}: no such directory or zip file')
        self._image_names = [n for n in self._all_names if n.lower().endswith(self.extensions)]
        if not self._image_names:
            raise DatasetError(f'{path}: contains no {self.item_kind} '
                               f'(expected {", ".join(self.extensions)} files){self.how_to_make}')

        self._raw_shape = self._check_shapes(resolution)
        self._raw_labels = self._load_labels() if use_labels else None

        self._raw_idx = np.arange(len(self._image_names), dtype=np.int64)
        if max_size is not None and max_size < len(self._raw_idx):
            rng = np.random.RandomState(random_seed % (1 << 31))
            self._raw_idx = np.sort(rng.choice(self._raw_idx, size=max_size, replace=False))
        self._xflip = np.zeros(len(self._raw_idx), dtype=np.uint8)
        if xflip:
            self._raw_idx = np.tile(self._raw_idx, 2)
            self._xflip = np.concatenate([self._xflip, np.ones_like(self._xflip)])

    # --- what the files hold (LatentFolderDataset overrides these) ------------------------------------------

    def _stored_shape(self) -> Sequence[int]:
        return self._raw_shape[1:]

    def _stored_dtype(self) -> torch.dtype:
        return torch.uint8

    def _view(self, stored: np.ndarray, flip: bool) -> np.ndarray:
        """The item as returned, from the stored array: mirrored for x-flipped copies."""
        return stored[:, :, ::-1] if flip else stored

    # --- validation -------------------------------------------------------------------------------------

    def _check_shapes(self, resolution: Optional[int]) -> Tuple[int, int, int, int]:
        """Shape [N, C, R, R] from the first image, decoded in full; the others are checked as they are decoded."""
        name = self._image_names[0]
        try:
            with self._open_file(name) as f, PIL.Image.open(f) as img:
                img.load()
                size, channels = img.size, 1 if img.mode in GRAYSCALE_MODES else 3
        except (PIL.UnidentifiedImageError, OSError, zipfile.BadZipFile) as err:
            raise DatasetError(f'{self._where(name)}: cannot read image ({err})') from None
        if size[0] != size[1]:
            raise DatasetError(f'{self._where(name)}: image is {size[0]}x{size[1]}; images must be square')
        res = size[0]
        if res & (res - 1) != 0:
            raise DatasetError(f'{self.path}: resolution {res} is not a power of two')
        if resolution is not None and resolution != res:
            raise DatasetError(f'{self.path}: images are {res}x{res}, expected {resolution}x{resolution}')
        return len(self._image_names), channels, res, res

    def _load_labels(self) -> np.ndarray:
        if 'dataset.json' not in self._all_names:
            raise DatasetError(f'{self.path}: use_labels is set but there is no dataset.json')
        where = self._where('dataset.json')
        try:
            with self._open_file('dataset.json') as f:
                meta = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DatasetError(f'{where}: not valid JSON ({err})') from None
        entries = meta.get('labels') if isinstance(meta, dict) else None
        if not isinstance(entries, list):
            raise DatasetError(f'{where}: expected {{"labels": [["file.png", label], ...]}}')
        labels: Dict[str, object] = {}
        for entry in entries:
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
                raise DatasetError(f'{where}: malformed entry {entry!r}; expected ["file.png", label]')
            labels[entry[0]] = entry[1]
        missing = [name for name in self._image_names if name not in labels]
        if missing:
            raise DatasetError(f'{where}: no label for {missing[0]} ({len(missing)} images unlabelled)')
        values = [labels[name] for name in self._image_names]
        if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            return np.array(values, dtype=np.int64)
        try:
            array = np.array(values, dtype=np.float32)
        except (TypeError, ValueError):
            array = None
        if array is None or array.ndim != 2:
            raise DatasetError(f'{where}: labels must be non-negative integers or equal-length lists of numbers')
        return array

    def _where(self, name: str) -> str:
        return f'{self.path}:{name}' if self._type == 'zip' else os.path.join(self.path, name)

    # --- file access ------------------------------------------------------------------------------------

    def _get_zip(self) -> zipfile.ZipFile:
        # A forked loader worker inherits the parent's handle, whose file position all processes would then move:
        # each process opens its own.
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip, self._zip_pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip

    def _open_file(self, name: str):
        if self._type == 'dir':
            return open(os.path.join(self.path, name), 'rb')
        return self._get_zip().open(name, 'r')

    def _load_raw_image(self, raw_idx: int) -> np.ndarray:
        name = self._image_names[raw_idx]
        try:
            with self._open_file(name) as f:
                data = f.read()
            with PIL.Image.open(io.BytesIO(data)) as img:
                array = np.asarray(img.convert('L' if self._raw_shape[1] == 1 else 'RGB'))
        except (PIL.UnidentifiedImageError, OSError, zipfile.BadZipFile, ValueError) as err:
            raise DatasetError(f'{self._where(name)}: cannot decode image ({err})') from None
        height, width = array.shape[:2]
        if (height, width) != tuple(self._raw_shape[2:]):
            first = self._image_names[0]
            raise DatasetError(f'{self._where(name)}: image is {width}x{height} but {first} is '
                               f'{self._raw_shape[3]}x{self._raw_shape[2]}; all images must be square and of one size')
        if array.ndim == 2:
            array = array[:, :, np.newaxis]
        return array.transpose(2, 0, 1)

    def __getstate__(self):
        state = dict(self.__dict__, _zip=None)  # a ZipFile handle cannot go to loader workers
        if self._cache is not None and self._cache.kind == 'mmap':
            state.update(_cache=None, _cache_wanted=False)  # a spawned worker cannot map it: it reads uncached
        return state

    def close(self) -> None:
        """Close the zip file handle, if one is open."""
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    # --- the cache ----------------------------------------------------------------------------------------

    def cache_budget(self) -> int:
        """Bytes the caches of all ranks on this machine may take together: `cache_limit`, or half the memory
        psutil reports available now."""
        if self._cache_limit is not None:
            return int(self._cache_limit)
        return int(psutil.virtual_memory().available * 0.5)

    def prepare_cache(self, items: Optional[Sequence[int]] = None, ranks_on_node: int = 1) -> bool:
        """Allocate the cache for items `items` (default: all) in this process, before loader workers start.

        `ranks_on_node` ranks of this machine each allocate one such cache (their shards); if together they would
        exceed cache_budget(), print one warning line and read uncached. Returns whether the data set caches.
        A no-op returning False when the data set was made with cache=False.
        """
        if not self._cache_wanted:
            return False
        items = np.arange(len(self)) if items is None else np.asarray(items, dtype=np.int64)
        keys = np.unique(self._raw_idx[items])
        item_bytes = int(np.prod(self._stored_shape())) * torch.empty([], dtype=self._stored_dtype()).element_size()
        need, budget = len(keys) * item_bytes * ranks_on_node, self.cache_budget()
        if need > budget:
            self._cache, self._cache_wanted = None, False
            print(f'Warning: {self.path}: caching {len(keys)} {self.item_kind} x {ranks_on_node} rank(s) on this machine '
                  f'takes {need / 2**30:.2f} GiB, more than the cache limit of {budget / 2**30:.2f} GiB '
                  f'({"--cache-limit" if self._cache_limit is not None else "half the available memory"}); '
                  'reading without the cache.', file=sys.stderr, flush=True)
            return False
        self._cache = SharedImageCache(keys, self._stored_shape(), self._stored_dtype(), ranks_on_node)
        return True

    @property
    def cache(self) -> Optional[SharedImageCache]:
        """The cache, once allocated; None without one."""
        return self._cache

    @property
    def raw_indices(self) -> np.ndarray:
        """The source image of each item (an image and its x-flipped copy share one); InfiniteSampler keeps
        items of one source image on one rank, so that a rank caches only its own shard."""
        return self._raw_idx

    # --- public interface -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._raw_idx)

    def __getitem__(self, idx: int) -> Tuple[np.ndarray, np.ndarray]:
        raw_idx = int(self._raw_idx[idx])
        if self._cache is None and self._cache_wanted and os.getpid() == self._owner_pid:
            self.prepare_cache()  # used without make_loader: cache the whole data set, in the process that made it
        image = self._cache.get(raw_idx) if self._cache is not None else None
        if image is None:
            image = self._load_raw_image(raw_idx)
            if self._cache is not None:
                self._cache.put(raw_idx, image)
        return self._view(image, bool(self._xflip[idx])).copy(), self.get_label(idx)

    def get_label(self, idx: int) -> np.ndarray:
        """The label of item `idx`: one-hot float32 for integer labels, the raw vector otherwise."""
        if self._raw_labels is None:
            return np.zeros([0], dtype=np.float32)
        label = self._raw_labels[self._raw_idx[idx]]
        if self._raw_labels.dtype == np.int64:
            onehot = np.zeros(self.label_dim, dtype=np.float32)
            onehot[label] = 1
            return onehot
        return label.copy()

    @property
    def name(self) -> str:
        """The source's file name without extension."""
        return os.path.splitext(os.path.basename(os.path.normpath(self.path)))[0]

    @property
    def image_names(self) -> List[str]:
        """File names of the images in the source, in index order (before max_size and xflip)."""
        return list(self._image_names)

    @property
    def image_shape(self) -> List[int]:
        """[channels, height, width]."""
        return list(self._raw_shape[1:])

    @property
    def num_channels(self) -> int:
        """1 for grayscale, 3 for RGB."""
        return self._raw_shape[1]

    @property
    def resolution(self) -> int:
        """Side length in pixels."""
        return self._raw_shape[2]

    @property
    def label_dim(self) -> int:
        """Length of the label vector, 0 without labels."""
        if self._raw_labels is None:
            return 0
        if self._raw_labels.dtype == np.int64:
            return int(self._raw_labels.max()) + 1
        return self._raw_labels.shape[1]

    @property
    def label_shape(self) -> List[int]:
        """[label_dim], as in EDM."""
        return [self.label_dim]

    @property
    def has_labels(self) -> bool:
        """True when labels were requested and read."""
        return self.label_dim > 0


class LatentFolderDataset(ImageFolderDataset):
    """VAE posterior moments written by `dataset_tool.py --encode-latents`: items are float32 [2C, h, w] (mean, std).

    Each .npy file holds [F, 2C, h, w]: the moments of the image and, with F = 2, of its mirror image, so that
    x-flipped items are the encodings of flipped images (the VAE does not commute with flips). dataset.json holds
    the labels and a "latents" entry naming the VAE and its normalisation (scale, and bias and pixels if not Stable
    Diffusion's: training.latents.latent_setting). `image_shape` and `num_channels` describe the latents.
    """

    extensions = ('.npy',)
    item_kind = 'latents'
    how_to_make = '; make them with dataset_tool.py --encode-latents'

    def __init__(self, path: str, resolution: Optional[int] = None, max_size: Optional[int] = None,
                 xflip: bool = False, use_labels: bool = False, cache: bool = False, random_seed: int = 0,
                 cache_limit: Optional[float] = None):
        super().__init__(path, resolution, max_size, xflip, use_labels, cache, random_seed, cache_limit)
        if xflip and self._num_flips < 2:
            raise DatasetError(f'{path}: xflip needs the encodings of mirrored images; re-encode with '
                               'dataset_tool.py --encode-latents --xflip=True')

    def _check_shapes(self, resolution: Optional[int]) -> Tuple[int, int, int, int]:
        where = self._where('dataset.json')
        meta = None
        if 'dataset.json' in self._all_names:
            try:
                with self._open_file('dataset.json') as f:
                    meta = json.load(f).get('latents')
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
                raise DatasetError(f'{where}: not valid JSON with a "latents" entry ({err})') from None
        if not isinstance(meta, dict) or not {'vae', 'scale'} <= set(meta):
            raise DatasetError(f'{self.path}: not a latent data set (dataset.json has no "latents" entry with "vae" and '
                               '"scale"); make one with dataset_tool.py --encode-latents')
        self.latent = latent_record(meta)
        try:
            LatentNorm.of(self.latent)
        except (TypeError, ValueError) as err:
            raise DatasetError(f'{where}: its "latents" entry holds no valid normalisation ({err})') from None
        first = self._load_raw_image(0)
        if first.ndim != 4 or first.shape[0] not in (1, 2) or first.shape[1] % 2 or first.shape[2] != first.shape[3]:
            raise DatasetError(f'{self._where(self._image_names[0])}: shape {list(first.shape)} is not [1 or 2, 2C, h, h]')
        self._num_flips, self._item_shape = first.shape[0], first.shape
        channels, res = first.shape[1] // 2, first.shape[2]
        if res & (res - 1) != 0:
            raise DatasetError(f'{self.path}: latent resolution {res} is not a power of two')
        if resolution is not None and resolution != res:
            raise DatasetError(f'{self.path}: latents are {res}x{res}, expected {resolution}x{resolution}')
        return len(self._image_names), channels, res, res

    def _stored_shape(self) -> Sequence[int]:
        return self._item_shape

    def _stored_dtype(self) -> torch.dtype:
        return torch.float32

    def _view(self, stored: np.ndarray, flip: bool) -> np.ndarray:
        return stored[int(flip)]

    def _load_raw_image(self, raw_idx: int) -> np.ndarray:
        name = self._image_names[raw_idx]
        try:
            with self._open_file(name) as f:
                array = np.load(io.BytesIO(f.read()), allow_pickle=False)
        except (ValueError, OSError, zipfile.BadZipFile) as err:
            raise DatasetError(f'{self._where(name)}: cannot read latents ({err})') from None
        if getattr(self, '_item_shape', array.shape) != array.shape:
            raise DatasetError(f'{self._where(name)}: shape {list(array.shape)}, but the first file has {list(self._item_shape)}')
        return array.astype(np.float32, copy=False)
