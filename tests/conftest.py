"""Pytest setup: make the repository root importable, and end the run if one test hangs."""
import faulthandler
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WATCHDOG_S = 900  # far above the slowest test; a hang prints every thread's stack and fails CI now, not at its limit


@pytest.fixture(autouse=True)
def watchdog():
    """Kill pytest with a stack dump if this test runs longer than WATCHDOG_S."""
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()
