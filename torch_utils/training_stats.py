"""Scalar statistics reported anywhere during training, reduced across ranks when collected.

`report(name, value)` accumulates the count, sum and sum of squares of every element of `value`
on the value's own device, so reporting never forces a device sync. A `Collector` takes (and clears) the
moments, summed over devices and all ranks (all ranks must report the same names; `report0` registers a name on
every rank while only rank 0 contributes values) and exposes mean, std and count per name.
"""

import re
from typing import Dict, List, Union

import torch
import torch.distributed as dist

from dnnlib import EasyDict
from . import distributed

_moments: Dict[str, Dict[torch.device, torch.Tensor]] = {}  # name -> device -> [count, sum, sum of squares]


def report(name: str, value: Union[float, list, torch.Tensor]) -> torch.Tensor:
    """Accumulate the elements of `value` under `name`; returns `value` unchanged for chaining."""
    elems = torch.as_tensor(value).detach().flatten().to(torch.float64)
    per_device = _moments.setdefault(name, {})
    if elems.numel() == 0:
        return value
    moments = torch.stack([torch.ones_like(elems).sum(), elems.sum(), elems.square().sum()])
    if elems.device in per_device:
        per_device[elems.device].add_(moments)
    else:
        per_device[elems.device] = moments
    return value


def report0(name: str, value: Union[float, list, torch.Tensor]) -> Union[float, list, torch.Tensor]:
    """Like report(), but only rank 0's values count; other ranks register the name with no values."""
    report(name, value if distributed.get_rank() == 0 else [])
    return value


class Collector:
    """Gathers the statistics reported since the last update(), across all ranks."""

    def __init__(self, regex: str = '.*', keep_previous: bool = True):
        self._regex = re.compile(regex)
        self._keep_previous = keep_previous
        self._latest: Dict[str, torch.Tensor] = {}

    def names(self) -> List[str]:
        """Reported names that this collector follows, sorted so that every rank agrees on the order."""
        return sorted(name for name in _moments if self._regex.fullmatch(name))

    def update(self) -> None:
        """Take the moments reported since the previous update, reduced over devices and ranks."""
        names = self.names()
        device = distributed.collective_device()
        delta = torch.zeros(len(names), 3, dtype=torch.float64, device=device)
        for i, name in enumerate(names):
            for moments in _moments[name].values():
                delta[i] += moments.to(device)
                moments.zero_()
        if dist.is_initialized() and names:
            dist.all_reduce(delta)
        delta = delta.cpu()
        if not self._keep_previous:
            self._latest.clear()
        for i, name in enumerate(names):
            if delta[i, 0] > 0 or not self._keep_previous:
                self._latest[name] = delta[i]

    def num(self, name: str) -> int:
        """Number of scalars reported under `name` in the last update."""
        return int(self._get(name)[0])

    def mean(self, name: str) -> float:
        """Mean of the scalars reported under `name` in the last update (nan if none)."""
        count, total, _ = self._get(name).tolist()
        return total / count if count else float('nan')

    def std(self, name: str) -> float:
        """Population standard deviation of the scalars under `name` in the last update (nan if none)."""
        count, total, squares = self._get(name).tolist()
        if not count:
            return float('nan')
        mean = total / count
        return max(squares / count - mean * mean, 0.0) ** 0.5

    def as_dict(self) -> Dict[str, EasyDict]:
        """{name: EasyDict(num, mean, std)} for every name in the last update, ready for stats.jsonl."""
        return {name: EasyDict(num=self.num(name), mean=self.mean(name), std=self.std(name)) for name in self._latest}

    def __getitem__(self, name: str) -> float:
        return self.mean(name)

    def _get(self, name: str) -> torch.Tensor:
        return self._latest.get(name, torch.zeros(3, dtype=torch.float64))
