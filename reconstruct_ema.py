"""Post-hoc EMA: build the EMA network of any length from a run trained with --phema (EDM2, section 3).

Examples:
  python reconstruct_ema.py --run=training-runs/00000-x --sigma-rel=0.02,0.05,0.1,0.2
  python reconstruct_ema.py --run=training-runs/00000-x --halflife-kimg=500 --at-kimg=20000 --outdir=phema-out
"""

import os
from typing import List, Optional

import click

import training.augment
import training.loss
from torch_utils.safe_unpickle import Persisted, loads
from training.phema import RESIDUAL_WARNING, find_phema_snapshots, halflife_to_sigma_rel, load_phema_snapshot, \
    reconstruct, sigma_rel_to_gamma
from training.snapshot import SnapshotError, load_network, newest_file, save_network_snapshot


def parse_float_list(value: Optional[str], hint: str) -> List[float]:
    """'0.05,0.1' -> [0.05, 0.1]; None -> []."""
    if value is None:
        return []
    try:
        return [float(v) for v in value.split(',')]
    except ValueError:
        raise click.BadParameter(f'"{value}" is not a comma-separated list of numbers', param_hint=hint) from None


def rebuild(record, module) -> Optional[object]:
    """This project's loss or augmentation object for a pickled one (class name and arguments only), else None."""
    if isinstance(record, Persisted) and isinstance(getattr(module, record.class_name, None), type):
        return getattr(module, record.class_name)(**record.init_kwargs)
    return None


@click.command()
@click.option('--run', 'run_dir', help='Run directory trained with --phema', metavar='DIR', required=True)
@click.option('--sigma-rel', 'sigma_rels', help='Relative EMA lengths to reconstruct (std of the averaging profile / training time)', metavar='LIST')
@click.option('--halflife-kimg', 'halflifes', help='Classic EMA half-lives to approximate, as sigma_rel = h / (t ln 2)', metavar='LIST')
@click.option('--at-kimg', help='Training time of the reconstruction  [default: the newest phema snapshot]', metavar='KIMG', type=click.FloatRange(min=0, min_open=True))
@click.option('--outdir', help='Where to write the snapshots  [default: --run]', metavar='DIR')
def main(run_dir: str, sigma_rels: Optional[str], halflifes: Optional[str], at_kimg: Optional[float], outdir: Optional[str]) -> None:
    """Combine a run's stored power-function EMA profiles into network snapshots of other EMA lengths."""
    targets = [(s, f'{s:g}') for s in parse_float_list(sigma_rels, '--sigma-rel')]
    halflife_kimgs = parse_float_list(halflifes, '--halflife-kimg')
    if not targets and not halflife_kimgs:
        raise click.UsageError('give --sigma-rel, --halflife-kimg, or both')
    if not os.path.isdir(run_dir):
        raise click.BadParameter(f'{run_dir}: no such directory', param_hint='--run')
    paths = find_phema_snapshots(run_dir)
    if not paths:
        raise click.ClickException(f'{run_dir}: no phema-snapshot-*.pt files (trained without --phema?)')
    network_path = newest_file(run_dir, 'network-snapshot', '.pkl')
    if network_path is None:
        raise click.ClickException(f'{run_dir}: no network-snapshot-*.pkl to take the architecture from')
    try:
        newest_nimg = max(int(load_phema_snapshot(path)['cur_nimg']) for path in paths)
    except ValueError as err:
        raise click.ClickException(str(err))
    target_nimg = newest_nimg if at_kimg is None else int(round(at_kimg * 1000))
    if target_nimg > newest_nimg:
        raise click.BadParameter(f'{at_kimg:g} kimg is after the newest phema snapshot ({newest_nimg / 1000:g} kimg)',
                                 param_hint='--at-kimg')
    targets += [(halflife_to_sigma_rel(h * 1000, target_nimg), f'halflife-{h:g}kimg') for h in halflife_kimgs]
    for sigma_rel, label in targets:
        try:
            sigma_rel_to_gamma(sigma_rel)
        except ValueError as err:
            hint = '--halflife-kimg' if label.startswith('halflife') else '--sigma-rel'
            raise click.BadParameter(f'{label}: {err}' if hint == '--halflife-kimg' else str(err), param_hint=hint)

    try:
        results = reconstruct(paths, [sigma_rel for sigma_rel, _ in targets], target_nimg)
        net = load_network(network_path)
        with open(network_path, 'rb') as f:
            pickled = loads(f.read())
    except (ValueError, SnapshotError) as err:
        raise click.ClickException(str(err))
    outdir = outdir or run_dir
    os.makedirs(outdir, exist_ok=True)
    print(f'{len(paths)} phema snapshots in {run_dir}; reconstructing at {target_nimg / 1000:g} kimg '
          f'into the architecture of {os.path.basename(network_path)}')
    for (sigma_rel, label), result in zip(targets, results):
        try:
            net.load_state_dict(result['weights'])
        except RuntimeError as err:
            raise click.ClickException(f'{network_path}: does not fit the phema snapshots ({str(err).splitlines()[0]})')
        stem = os.path.join(outdir, f'network-snapshot-{target_nimg // 1000:06d}-phema-{label}')
        save_network_snapshot(stem, dict(ema=net, loss_fn=rebuild(pickled.get('loss_fn'), training.loss),
                                         augment_pipe=rebuild(pickled.get('augment_pipe'), training.augment),
                                         dataset_kwargs=pickled.get('dataset_kwargs'),
                                         training_options=pickled.get('training_options')))
        print(f'sigma_rel {sigma_rel:<8.4g} gamma {result["gamma"]:<9.3f} snapshots used {result["used"]:<5d} '
              f'relative residual {result["residual"]:.2e}  -> {stem}.pkl')
        if result['residual'] > RESIDUAL_WARNING:
            print(f'Warning: sigma_rel {sigma_rel:.4g}: relative residual {result["residual"]:.2e} > {RESIDUAL_WARNING:g}; '
                  'the stored profiles do not represent this EMA well (too long or too short for them)')


if __name__ == '__main__':
    main()
