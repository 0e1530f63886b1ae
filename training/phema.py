"""Post-hoc EMA (Karras et al., EDM2, CVPR 2024, section 3): power-function EMA profiles kept during training,
stored in snapshots, and combined afterwards into the EMA of any other length.

Time t is counted in training images, as the training loop counts them (a step on R//4 patches adds 4x the batch).
A profile with exponent gamma at time t averages the weights with density p(tau) = (gamma+1) tau^gamma / t^(gamma+1)
on [0, t]; its relative standard deviation sigma_rel (std / t) is sqrt((gamma+1) / ((gamma+2)^2 (gamma+3))).
"""

import copy
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from training.snapshot import atomic_write

FORMAT = 'phema-1'
GAMMA_PEAK = (math.sqrt(5) - 3) / 2  # sigma_rel is largest here; gamma in (GAMMA_PEAK, inf) maps one-to-one onto sigma_rel
RESIDUAL_WARNING = 0.01  # relative residual above which a reconstruction is reported as poor (docs/how_it_works.md)


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of the power-function profile with exponent gamma (> -1)."""
    if not gamma > -1:
        raise ValueError(f'gamma={gamma} is out of range: a power-function EMA needs gamma > -1')
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


SIGMA_REL_MAX = gamma_to_sigma_rel(GAMMA_PEAK)  # 0.3003...: no power-function profile is relatively wider


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the power-function profile with relative standard deviation sigma_rel."""
    if not 0 < sigma_rel <= SIGMA_REL_MAX:
        raise ValueError(f'sigma_rel={sigma_rel} is out of range: it must be in (0, {SIGMA_REL_MAX:.5f}]')
    t = sigma_rel ** -2.0
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])  # (gamma+2)^2 (gamma+3) = t (gamma+1)
    gamma = float(max(r.real for r in roots if abs(r.imag) <= 1e-6 * max(1.0, abs(r.real))))
    for _ in range(3):  # Newton polishes the root of the cubic (np.roots loses digits for large gamma)
        f = ((gamma + 7) * gamma + 16 - t) * gamma + 12 - t
        df = (3 * gamma + 14) * gamma + 16 - t
        if df != 0:
            gamma -= f / df
    return max(gamma, GAMMA_PEAK)


def halflife_to_sigma_rel(halflife_nimg: float, t: float) -> float:
    """sigma_rel of a classic EMA with half-life `halflife_nimg` images at time t images: h / (t ln 2), an approximation."""
    # The exponential profile's std is h / ln 2 when it has run for much longer than h; its shape still differs from
    # a power function's, so the reconstruction matches the classic EMA's width, not its exact weights.
    return halflife_nimg / (t * math.log(2))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * net, parameter by parameter."""
    for p_ema, p_net in zip(ema.parameters(), net.parameters()):
        p_ema.copy_(p_net.detach().lerp(p_ema, beta))


def power_beta(gamma: float, cur_nimg: int, step_nimg: int) -> float:
    """The decay of a step from cur_nimg to cur_nimg + step_nimg images: (1 - dt/t)^(gamma+1); 0 on the first step."""
    t = cur_nimg + step_nimg
    return (1 - step_nimg / t) ** (gamma + 1) if t > 0 else 0.0


class PowerEMA:
    """K power-function EMA profiles of a module's parameters; buffers are copied from the module as they are."""

    def __init__(self, net: torch.nn.Module, sigma_rels: Sequence[float]):
        self.sigma_rels = [float(s) for s in sigma_rels]
        if not self.sigma_rels:
            raise ValueError('PowerEMA needs at least one sigma_rel')
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.profiles = [copy.deepcopy(net).float().eval().requires_grad_(False) for _ in self.sigma_rels]
        self.buffer_names = [name for name, _ in net.named_buffers()]

    @torch.no_grad()
    def reset(self, net: torch.nn.Module) -> None:
        """Every profile <- the module's current parameters and buffers."""
        for profile in self.profiles:
            for dst, src in zip(profile.state_dict().values(), net.state_dict().values()):
                dst.copy_(src)

    @torch.no_grad()
    def update(self, net: torch.nn.Module, cur_nimg: int, step_nimg: int) -> None:
        """After a step of step_nimg images taken at cur_nimg: ema <- beta ema + (1 - beta) net in every profile."""
        for profile, gamma in zip(self.profiles, self.gammas):
            update_ema(profile, net, power_beta(gamma, cur_nimg, step_nimg))
            for b_ema, b_net in zip(profile.buffers(), net.buffers()):
                b_ema.copy_(b_net)

    def profile_state_dicts(self) -> List[Dict[str, torch.Tensor]]:
        """Each profile's weights and buffers, as detached CPU tensors (what a phema snapshot stores)."""
        return [{k: v.detach().cpu().clone() for k, v in p.state_dict().items()} for p in self.profiles]

    def state_dict(self) -> dict:
        """Everything needed to continue bit-exactly: the sigma_rels and the profiles (plain tensors and floats)."""
        return dict(sigma_rels=list(self.sigma_rels), profiles=self.profile_state_dicts())

    def load_state_dict(self, state: dict) -> None:
        """Restore profiles written by state_dict(); the sigma_rels must be the same."""
        if [float(s) for s in state['sigma_rels']] != self.sigma_rels:
            raise ValueError(f'the state holds post-hoc EMA profiles {list(state["sigma_rels"])}, not {self.sigma_rels}')
        for profile, weights in zip(self.profiles, state['profiles']):
            profile.load_state_dict(weights)


def phema_snapshot_name(cur_nimg: int) -> str:
    """The file name of the phema snapshot at cur_nimg images: phema-snapshot-<kimg>.pt."""
    return f'phema-snapshot-{cur_nimg // 1000:06d}.pt'


def save_phema_snapshot(path: str, phema: PowerEMA, cur_nimg: int) -> None:
    """Write the profiles at cur_nimg images atomically, as a file that torch.load(weights_only=True) reads."""
    data = dict(format=FORMAT, cur_nimg=int(cur_nimg), sigma_rels=list(phema.sigma_rels), gammas=list(phema.gammas),
                buffers=list(phema.buffer_names), profiles=phema.profile_state_dicts())
    atomic_write(path, lambda f: torch.save(data, f))


def load_phema_snapshot(path: str, mmap: bool = True) -> dict:
    """A phema snapshot; with mmap the tensors are read from disk only when used."""
    try:
        data = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - truncation and foreign files raise many different types
        raise ValueError(f'{path}: not a phema snapshot ({type(err).__name__}: {err})'.split('\n')[0]) from None
    if not isinstance(data, dict) or data.get('format') != FORMAT:
        raise ValueError(f'{path}: not a phema snapshot (no format "{FORMAT}")')
    return data


def inner_products(t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray) -> np.ndarray:
    """<p_a, p_b> = integral of the two profiles' product, for every pair (broadcast), in float64."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, g_a, t_b, g_b))
    m = np.minimum(t_a, t_b)
    # (ga+1)(gb+1) m^(ga+gb+1) / ((ga+gb+1) ta^(ga+1) tb^(gb+1)), with both ratios m/t <= 1.
    return ((g_a + 1) * (g_b + 1) / (g_a + g_b + 1) / m
            * np.exp((g_a + 1) * np.log(m / t_a) + (g_b + 1) * np.log(m / t_b)))


def solve_coefficients(stored_t: Sequence[float], stored_gamma: Sequence[float], target_t: float,
                       target_gamma: float) -> Tuple[np.ndarray, float]:
    """(x, relative residual): the combination sum x_i p_i of the stored profiles nearest the target, as EDM2 solves it.

    x is the least-squares solution of A x = b, rescaled to sum to 1 (EDM2's reconstruct_phema.py does the same): every
    profile is an average (it integrates to 1), so the combination must be one too, or the reconstructed weights would
    be scaled. The residual is that of the rescaled x: ||p_r - sum x_i p_i||^2 / ||p_r||^2.
    """
    scale = float(target_t)  # the coefficients do not depend on the unit of time; this keeps A near 1
    t = np.asarray(stored_t, dtype=np.float64) / scale
    g = np.asarray(stored_gamma, dtype=np.float64)
    A = inner_products(t[:, None], g[:, None], t[None, :], g[None, :])
    b = inner_products(t, g, 1.0, target_gamma)
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    x = x / x.sum()
    target_norm = float(inner_products(1.0, target_gamma, 1.0, target_gamma))
    residual = (target_norm - 2 * float(x @ b) + float(x @ A @ x)) / target_norm
    return x, max(residual, 0.0)


def reconstruct(paths: Sequence[str], target_sigma_rels: Sequence[float],
                target_nimg: Optional[int] = None) -> List[dict]:
    """Per target sigma_rel: dict(weights=state dict, residual, gamma, nimg, used) from phema snapshot files.

    The target time defaults to the newest snapshot's; snapshots after it are not used. Files are read one at a time
    (memory-mapped); parameters are accumulated in float64 and returned in the stored dtype, buffers are the newest
    used snapshot's.
    """
    headers = []
    for path in paths:
        data = load_phema_snapshot(path)
        headers.append((int(data['cur_nimg']), path, [float(g) for g in data['gammas']]))
        del data
    if not headers:
        raise ValueError('no phema snapshots given')
    headers.sort()
    if target_nimg is None:
        target_nimg = headers[-1][0]
    headers = [h for h in headers if h[0] <= target_nimg]
    if not headers:
        raise ValueError(f'no phema snapshot at or before {target_nimg} images')
    stored_t = [t for t, _, gammas in headers for _ in gammas]
    stored_g = [g for _, _, gammas in headers for g in gammas]
    targets = []
    for sigma_rel in target_sigma_rels:
        gamma = sigma_rel_to_gamma(sigma_rel)
        x, residual = solve_coefficients(stored_t, stored_g, target_nimg, gamma)
        targets.append(dict(sigma_rel=float(sigma_rel), gamma=gamma, nimg=int(target_nimg), used=len(headers),
                            residual=residual, coefficients=x, weights={}))
    row = 0
    for index, (_, path, gammas) in enumerate(headers):
        data = load_phema_snapshot(path)
        buffers = set(data.get('buffers', []))
        for k, profile in enumerate(data['profiles']):
            for target in targets:
                coefficient = float(target['coefficients'][row + k])
                for name, tensor in profile.items():
                    acc = target['weights']
                    if name in buffers or not tensor.is_floating_point():
                        if index == len(headers) - 1:
                            acc[name] = tensor.clone()
                        continue
                    if name not in acc:
                        acc[name] = torch.zeros(tensor.shape, dtype=torch.float64)
                    acc[name].add_(tensor.to(torch.float64), alpha=coefficient)
        row += len(gammas)
        del data
    dtypes = {name: tensor.dtype for name, tensor in load_phema_snapshot(headers[-1][1])['profiles'][0].items()}
    for target in targets:  # the stored dtypes and key order
        target['weights'] = {name: target['weights'][name].to(dtype) for name, dtype in dtypes.items()}
    return targets


def find_phema_snapshots(run_dir: str) -> List[str]:
    """Paths of the phema-snapshot-*.pt files in a run directory, oldest first."""
    names = sorted(n for n in os.listdir(run_dir) if n.startswith('phema-snapshot-') and n.endswith('.pt'))
    return [os.path.join(run_dir, n) for n in names]
