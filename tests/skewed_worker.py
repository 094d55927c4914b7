"""``python -m tests.skewed_worker``: the real worker on a host whose clock is
``BUDGET_TEST_CLOCK_OFFSET_SECONDS`` ahead (or behind), so that a test can put
a period boundary a few seconds away without waiting for one."""

import sys
from datetime import timedelta
from functools import partialmethod
from os import environ

from tests.clock import SkewedClock
from token_budget.worker.app import Worker
from token_budget.worker.launch import worker

if __name__ == "__main__":
    offset = timedelta(seconds=float(environ["BUDGET_TEST_CLOCK_OFFSET_SECONDS"]))
    Worker.__init__ = partialmethod(Worker.__init__, clock=SkewedClock(offset))  # type: ignore[method-assign]
    sys.exit(worker())
