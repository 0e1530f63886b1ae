"""Helpers shared by the benchmark scripts: preset networks, timing, peak memory, tables and JSON.

Imported as `bench.common`; the scripts put the repository root on sys.path first (bench/ is not a package).
"""

import json
import os
import platform
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import psutil
import torch

import dnnlib

# Image size of each preset's data set (the presets name only training options, not the data).
PRESET_RESOLUTION = {'demo': 32, 'cifar10-32': 32, 'celeba64': 64, 'ffhq64': 64, 'afhqv2-64': 64}
CLASSES = 10  # label_dim given to class-conditional presets (CIFAR-10)
GIB = 2 ** 30


def preset_resolution(preset: str) -> int:
    """Image resolution of a preset's data set."""
    if preset not in PRESET_RESOLUTION:
        raise ValueError(f'no resolution known for preset "{preset}"; known: {", ".join(PRESET_RESOLUTION)}')
    return PRESET_RESOLUTION[preset]


def label_dim(opts: dnnlib.EasyDict) -> int:
    """Label dimension of a preset's network: CLASSES when conditional, else 0."""
    return CLASSES if opts.cond else 0


def build_network(network_kwargs: dict, resolution: int, labels: int, device: torch.device, seed: int = 0,
                  channels: int = 3) -> torch.nn.Module:
    """A network (RGB unless `channels` says otherwise) from build_config()'s network_kwargs, initialised from
    torch.manual_seed(seed), on the device."""
    torch.manual_seed(seed)
    net = dnnlib.construct_class_by_name(**network_kwargs, img_resolution=resolution, img_channels=channels, label_dim=labels)
    return net.to(device)


def parameter_count(net: torch.nn.Module) -> int:
    """Number of parameters of a network."""
    return sum(p.numel() for p in net.parameters())


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work (a no-op on the CPU)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall-clock seconds of fn(), synchronising the device before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def _peak_rss_bytes() -> Optional[int]:
    """The process's peak RSS (Linux VmHWM), or None where /proc does not have it."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS to its current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory over a region: CUDA max_memory_allocated on CUDA, else the process-wide peak RSS."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == 'cuda':
            self.kind = 'CUDA max_memory_allocated (this process, all live tensors)'
        elif _peak_rss_bytes() is not None and _reset_peak_rss():
            self.kind = 'process-wide peak RSS (Linux VmHWM, reset at each region)'
        else:
            self.kind = 'process-wide RSS at the end of each region (no peak RSS available here)'
        self._base = 0

    def _current(self) -> int:
        if self.device.type == 'cuda':
            return torch.cuda.memory_allocated(self.device)
        return psutil.Process(os.getpid()).memory_info().rss

    def start(self) -> None:
        """Begin a region: reset the peak and remember the memory in use now."""
        synchronize(self.device)
        if self.device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_peak_rss()
        self._base = self._current()

    def stop(self) -> Tuple[float, float]:
        """(peak GiB, peak minus the memory in use at start() in GiB) of the region."""
        synchronize(self.device)
        if self.device.type == 'cuda':
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = max(_peak_rss_bytes() or 0, self._current())
        return peak / GIB, max(peak - self._base, 0) / GIB


def _cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> Dict[str, Any]:
    """Where a benchmark ran: device name, CPU, thread count and versions."""
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{_cpu_name()} ({os.cpu_count()} CPUs)'
    return dict(device=str(device), device_name=name, cpu=_cpu_name(), cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(), torch=torch.__version__, cuda=torch.version.cuda,
                python=platform.python_version(), platform=platform.platform())


def format_table(rows: List[Dict[str, Any]], columns: Sequence[Tuple[str, str, str]]) -> str:
    """Aligned text table; columns are (header, row key, format spec), and None values print as '-'."""
    cells = [[header for header, _, _ in columns]]
    cells += [['-' if row.get(key) is None else format(row[key], spec) for _, key, spec in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ['  '.join(cell.rjust(width) if i else cell.ljust(width) for i, (cell, width) in enumerate(zip(line, widths)))
             for line in cells]
    lines.insert(1, '  '.join('-' * width for width in widths))
    return '\n'.join(lines)


def print_and_save(result: Dict[str, Any], printer: Callable[[Dict[str, Any]], None], json_path: Optional[str]) -> None:
    """Print a benchmark's report and, if a path is given, write its JSON there."""
    printer(result)
    if json_path:
        write_json(json_path, result)
        print(f'Wrote {json_path}')


def write_json(path: str, data: Dict[str, Any]) -> None:
    """Write data as indented JSON, creating the parent directory."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, 'w') as f:
        json.dump(data, f, indent=2)
        f.write('\n')


def _lighten(colour: str, share: float = 0.25) -> str:
    """A '#rrggbb' colour mixed with white, keeping `share` of the colour."""
    rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    return '#' + ''.join(f'{round(255 - (255 - c) * share):02x}' for c in rgb)


def line_plot(series: Dict[str, Sequence[Tuple[float, float]]], path: str, xlabel: str, ylabel: str,
              size: Tuple[int, int] = (720, 440), bands: Optional[Dict[str, Sequence[Tuple[float, float, float]]]] = None) -> None:
    """Draw named (x, y) series as a PNG line chart with axes, ticks and a legend (Pillow only); `bands` shades
    (x, low, high) ranges behind the series of the same name in a light version of its colour."""
    import PIL.Image
    import PIL.ImageDraw
    colours = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#17becf']
    bands = bands or {}
    points = [p for values in series.values() for p in values]
    points += [(x, y) for values in bands.values() for x, low, high in values for y in (low, high)]
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    width, height = size
    left, right, top, bottom = 70, 170, 20, 50
    image = PIL.Image.new('RGB', size, 'white')
    draw = PIL.ImageDraw.Draw(image)

    def to_px(x: float, y: float) -> Tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    for k, name in enumerate(series):
        if len(bands.get(name, [])) > 1:
            edge = [to_px(x, high) for x, _, high in bands[name]] + [to_px(x, low) for x, low, _ in reversed(bands[name])]
            draw.polygon(edge, fill=_lighten(colours[k % len(colours)]))
    draw.rectangle([left, top, width - right, height - bottom], outline='black')
    for i in range(6):
        xv, yv = x0 + (x1 - x0) * i / 5, y0 + (y1 - y0) * i / 5
        px, _ = to_px(xv, y0)
        _, py = to_px(x0, yv)
        draw.line([px, height - bottom, px, height - bottom + 4], fill='black')
        draw.text((px - 12, height - bottom + 8), f'{xv:.4g}', fill='black')
        draw.line([left - 4, py, left, py], fill='black')
        draw.text((8, py - 6), f'{yv:.4g}', fill='black')
    draw.text(((left + width - right) / 2 - 30, height - 18), xlabel, fill='black')
    draw.text((8, 2), ylabel, fill='black')
    for k, (name, values) in enumerate(series.items()):
        colour = colours[k % len(colours)]
        pixels = [to_px(x, y) for x, y in values]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        draw.line([width - right + 12, top + 10 + 18 * k, width - right + 36, top + 10 + 18 * k], fill=colour, width=3)
        draw.text((width - right + 42, top + 4 + 18 * k), name, fill='black')
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)
