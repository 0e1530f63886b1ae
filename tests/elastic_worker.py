"""train.py for tests/test_multinode.py, which kills itself with SIGKILL at a chosen point of a chosen torchrun attempt.

    torchrun ... tests/elastic_worker.py TRAIN_OPTIONS...

$PATCHDIFF_TEST_KILL (read only here) is a JSON object {"ATTEMPT": [STATES, STEPS], ...}: on the attempt whose
TORCHELASTIC_RESTART_COUNT is ATTEMPT, the process SIGKILLs itself right after the STEPS-th optimizer step that
follows the STATES-th training-state file this attempt wrote (STATES 0: counted from the start). A step's tick
line and state file are written after its optimizer step, so the kill comes before the tick's bookkeeping:
as abrupt as an out-of-memory kill or a node failure, with no handler run.
"""

import json
import os
import signal
import sys

import train
from training import snapshot, training_loop

_counts = dict(states=0, steps=0)


def _kill_point():
    plan = json.loads(os.environ.get('PATCHDIFF_TEST_KILL', '{}'))
    return plan.get(os.environ.get('TORCHELASTIC_RESTART_COUNT', '0'))


def _install(states: int, steps: int) -> None:
    save_state, optimizer_step = snapshot.save_state, training_loop.optimizer_step

    def counting_save_state(*args, **kwargs):
        save_state(*args, **kwargs)
        _counts['states'] += 1

    def killing_optimizer_step(*args, **kwargs):
        optimizer_step(*args, **kwargs)
        if _counts['states'] >= states:
            _counts['steps'] += 1
            if _counts['steps'] >= steps:
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)

    snapshot.save_state = counting_save_state  # training_loop calls both through their modules, so these are used
    training_loop.optimizer_step = killing_optimizer_step


if __name__ == '__main__':
    point = _kill_point()
    if point is not None:
        _install(*point)
    train.main(prog_name='train.py')
