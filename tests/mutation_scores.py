"""Mutation scores of the modules where a silent bug changes results (outside CI; see docs/testing.md).

For each module in MODULES this writes the [mutmut] section of setup.cfg (the module, the tests to run), runs
`mutmut run` from a clean mutants/ folder, and counts the outcome of every mutant per function. Functions outside a
module's `functions` list are mutated too (mutmut works per file) but left out of its score. setup.cfg is restored
at the end.

  .venv/bin/python tests/mutation_scores.py                        # every module, about 15 minutes on 2 cores
  .venv/bin/python tests/mutation_scores.py training/loss.py --json=mutation.json
"""

import collections
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

import click

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MUTMUT = os.path.join(os.path.dirname(sys.executable), 'mutmut')
ALSO_COPY = ['dnnlib/', 'torch_utils/', 'training/', 'configs/', 'fid.py', 'generate.py', 'train.py', 'dataset_tool.py',
             'reconstruct_ema.py', 'pytest.ini']

# module: (tests that run against its mutants, functions scored; None scores all). Only tests that call the code in
# their own process: mutmut's bookkeeping fails in the subprocesses of train.py runs and multi-rank tests.
MODULES = {
    'training/patch.py': (['tests/test_patch.py'], None),
    'training/loss.py': (['tests/test_loss.py', 'tests/test_loss_norm.py'], None),
    'training/sampler.py': (['tests/test_sampler.py', 'tests/test_generate.py'], None),
    'fid.py': (['tests/test_fid.py', 'tests/test_behaviour.py::test_fid_with_non_commuting_covariances'],
               ['compute_feature_stats', 'psd_sqrt', 'trace_sqrt_product', 'calculate_fid', 'kid_subset_estimates',
                'calculate_kid']),
    'training/training_loop.py': ([f'tests/test_behaviour.py::{name}' for name in (
                                      'test_learning_rate_ramp_up_is_linear_in_images',
                                      'test_ema_beta_halves_the_old_weight_once_per_half_life',
                                      'test_ema_beta_at_the_first_step_takes_the_network_weights',
                                      'test_update_ema_moves_each_parameter_by_one_minus_beta',
                                      'test_gradient_accumulation_rounds_equal_one_round',
                                      'test_optimizer_step_sets_the_learning_rate_and_the_default_is_edms_image_norm',
                                      'test_optimizer_step_replaces_nan_and_inf_gradients_as_edm_does',
                                      'test_optimizer_step_multiplies_the_loss_by_loss_scaling_without_a_scaler',
                                      'test_optimizer_step_with_a_grad_scaler_unscales_before_the_update',
                                      'test_optimizer_step_passes_labels_augment_pipe_autocast_and_layout_to_the_loss',
                                      'test_optimizer_step_reports_the_loss_as_loss_slash_loss',
                                      'test_optimizer_step_all_reduces_only_in_the_last_accumulation_round')] +
                                  [f'tests/test_loss_norm.py::{name}' for name in (
                                      'test_patch_steps_weigh_equally_per_pixel_and_by_area_per_image',
                                      'test_unknown_loss_norm_is_rejected', 'test_image_norm_is_edms_formula_bit_for_bit',
                                      'test_pixel_norm_changes_patch_steps_only')],
                                  ['split_batch', 'optimizer_step', 'ramped_lr', 'ema_beta']),
}
KILLED = ('killed', 'timeout')


def mutmut_section(module: str, tests: Sequence[str]) -> str:
    """The [mutmut] section of setup.cfg for one module."""
    lines = ['[mutmut]',
             '# torch is not fork-safe once its thread pool has run: fork each mutant\'s run from a clean server process.',
             'process_isolation = forkserver', 'source_paths =', f'    {module}', 'also_copy =',
             *[f'    {path}' for path in ALSO_COPY], 'pytest_add_cli_args_test_selection =', *[f'    {t}' for t in tests]]
    return '\n'.join(lines) + '\n'


def write_config(module: str, tests: Sequence[str]) -> None:
    """Replace setup.cfg's [mutmut] section, keeping everything before it."""
    path = os.path.join(ROOT, 'setup.cfg')
    text = open(path).read()
    head = text[:text.index('[mutmut]')] if '[mutmut]' in text else text
    with open(path, 'w') as f:
        f.write(head + mutmut_section(module, tests))


def function_of(mutant: str, module: str) -> str:
    """'fid.x_calculate_fid__mutmut_3' -> 'calculate_fid'; 'training.loss.xǁEDMLossǁnoise_level__mutmut_1' -> 'EDMLoss.noise_level'."""
    rest = mutant[len(module[:-3].replace('/', '.')) + 1:].rsplit('__mutmut_', 1)[0]
    return rest[2:].replace('ǁ', '.') if rest.startswith('xǁ') else rest[2:]


def score_module(module: str, tests: Sequence[str], functions: Optional[Sequence[str]]) -> Dict:
    """Run mutmut on one module; counts per outcome for the scored functions, and the survivors' names."""
    write_config(module, tests)
    shutil.rmtree(os.path.join(ROOT, 'mutants'), ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS='1')
    subprocess.run([MUTMUT, 'run'], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, check=True)
    listing = subprocess.run([MUTMUT, 'results', '--all', 'true'], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    counts: Dict[str, int] = collections.Counter()
    survivors: List[str] = []
    for name, status in re.findall(r'^\s*(\S+): (.+?)\s*$', listing, flags=re.M):
        if functions is not None and function_of(name, module) not in functions:
            continue
        counts[status] += 1
        if status == 'survived':
            survivors.append(name)
    tested = sum(n for status, n in counts.items() if status != 'no tests')
    diffs = {name: subprocess.run([MUTMUT, 'show', name], cwd=ROOT, capture_output=True, text=True).stdout for name in survivors}
    return dict(module=module, tests=list(tests), functions=functions, counts=dict(counts), survivors=diffs,
                score=sum(counts[s] for s in KILLED) / tested if tested else None)


@click.command()
@click.argument('modules', nargs=-1)
@click.option('--json', 'json_path', help='Also write the results here', metavar='PATH')
def main(modules: Sequence[str], json_path: Optional[str]) -> None:
    """Mutation score per module (all of MODULES unless named)."""
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        raise click.BadParameter(f'{unknown}: choose from {", ".join(MODULES)}', param_hint='MODULES')
    config = open(os.path.join(ROOT, 'setup.cfg')).read()
    results = []
    try:
        for module in modules or MODULES:
            results.append(score_module(module, *MODULES[module]))
            row = results[-1]
            print(f'{module}: score {row["score"]:.1%}  {row["counts"]}', flush=True)
            for name in row['survivors']:
                print(f'  survived: {name}')
            if json_path:  # after every module, so that a later failure keeps what was measured
                with open(json_path, 'w') as f:
                    json.dump(results, f, indent=2)
    finally:
        with open(os.path.join(ROOT, 'setup.cfg'), 'w') as f:
            f.write(config)


if __name__ == '__main__':
    main()
