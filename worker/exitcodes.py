"""The exit codes of ``budget-worker`` and ``budgetctl``, in one place.

A script decides by them whether to retry: 2 (unreachable, no reply) may
pass with time, 1 and 64 never do. README, "Exit codes", is their one
description; both ``--help`` texts point there.
"""

import argparse
import sys
from enum import IntEnum
from typing import NoReturn

__all__ = ["EPILOG", "ExitCode", "UsageParser"]


class ExitCode(IntEnum):
    """What a process's exit status means, the same for every command."""

    #: Done (or healthy).
    OK = 0
    #: Refused or invalid: a refusal by the worker, invalid input, a rejected
    #: configuration (wrong broker login, another topology). Retrying the same
    #: thing fails the same way.
    REFUSED = 1
    #: The broker or the database is unreachable, or no reply came in time
    #: (no worker running): retrying later may succeed.
    UNREACHABLE = 2
    #: ``budgetctl reconcile``: a balance differs from its ledger.
    UNRECONCILED = 3
    #: The command line itself is wrong (sysexits' EX_USAGE).
    USAGE = 64


EPILOG = (
    "Exit codes: 0 done, 1 refused or invalid, 2 unreachable or no reply, "
    "3 the books do not reconcile, 64 usage error (README, 'Exit codes')."
)


class UsageParser(argparse.ArgumentParser):
    """argparse, but a usage error exits 64, not 2: 2 means "unreachable"."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")
