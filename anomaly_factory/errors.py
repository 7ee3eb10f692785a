"""Exit codes, and the base exception class whose subclasses carry them.

Every command exits with one of these codes (its ``--help`` and README's "Exit codes"
say the same):

====  ==============================================================================
code  meaning
====  ==============================================================================
0     success
1     quality gates failed: the version is not publishable
2     usage, bad configuration or bad input; the message names the file, field or value
3     infrastructure: a server, S3, a worker, the disk, or a lease (lock) that another
      process holds on the same output
130   interrupted by Ctrl-C (143: by SIGTERM); what finished is kept, a rerun resumes
====  ==============================================================================

Each exception class of the package derives from :class:`FactoryError` and says its
code in ``exit_code``; ``cli._common.exit_code_for`` maps exceptions to codes in one
place (OS errors by errno: a read-only folder is 2, a full disk is 3).

>>> class TooBig(InputError): ...
>>> TooBig("x").exit_code, isinstance(TooBig("x"), ValueError)
(2, True)
"""

from __future__ import annotations

import signal

OK = 0
GATES_FAILED = 1
BAD_INPUT = 2
INFRASTRUCTURE = 3
INTERRUPTED = 128  # + the signal's number, as shells report it: 130 Ctrl-C, 143 SIGTERM

EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 quality gates failed; 2 usage, bad config or bad input "
    "(the message names the file, field or value); 3 infrastructure (server, S3, worker, "
    "disk full, or a lock/lease held by another run); 130 / 143 interrupted (Ctrl-C / "
    "SIGTERM; a rerun resumes). --verbose (before the command) shows tracebacks."
)


class FactoryError(Exception):
    """Base of the package's exceptions: a one-line message naming the culprit, and
    the exit code the CLI ends with."""

    exit_code: int = BAD_INPUT


class InputError(FactoryError, ValueError):
    """Bad input, configuration or usage (exit 2)."""

    exit_code = BAD_INPUT


class InfrastructureError(FactoryError, RuntimeError):
    """A server, store, worker or the disk failed, or another run holds a lock (exit 3)."""

    exit_code = INFRASTRUCTURE


class Busy(InfrastructureError):
    """Another process writes the same output (its lock or lease is held)."""


class GatesFailed(FactoryError):
    """The quality gates say the version may not be published (exit 1)."""

    exit_code = GATES_FAILED


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a run (exit 128 + the signal's number).

    A KeyboardInterrupt, not a FactoryError: orchestrators and ``except Exception``
    blocks must let it through rather than retry the step it interrupted.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return INTERRUPTED + self.signum
