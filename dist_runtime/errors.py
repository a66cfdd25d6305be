"""The errors a user can cause, and how a rank reports one and exits.

Every such error prints one line, prefixed with the rank and host, and exits non-zero
on that rank; the rank also tells the next one (an ABORT naming itself, or the rank it
lost), and the news goes round the ring, so no rank waits for it. The README's
Troubleshooting section lists the messages and their fixes.
"""

from __future__ import annotations

import sys
import traceback

from dist_runtime.checkpoint import CheckpointError
from dist_runtime.partition import PlanError
from dist_runtime.tokenizer import TokenizerError
from dist_runtime.faults import EXIT_PEER_LOST, PeerLost
from dist_runtime.transport import TransportError
from models import ConfigError, UnknownModelType

EXIT_USER_ERROR = 2
EXIT_INTERNAL = 1


class PreflightError(ValueError):
    """A check before loading failed: hostfile, versions, config, prompt, plan, or a rank
    that could not open its model. The message names the rank and host, the value and
    the fix."""


class StartError(RuntimeError):
    """The ranks could not connect at start: the message names the address and the fix."""


# ValueError covers bad arguments (sampling ranges, presets, context length).
USER_ERRORS = (CheckpointError, ConfigError, UnknownModelType, PlanError, TokenizerError,
               TransportError, ValueError, FileNotFoundError, PreflightError, StartError)


def exit_code(err: Exception) -> int:
    """2 for a user's error, 3 for a lost rank, 1 for anything else (a bug)."""
    if isinstance(err, PeerLost):
        return EXIT_PEER_LOST
    if isinstance(err, USER_ERRORS):
        return EXIT_USER_ERROR
    return EXIT_INTERNAL


def fail(err: Exception, life, faults=None):
    """Report `err` for this rank, tell the next rank (through `faults`, once the ring
    carries data), let the coordinator print its text so far, and exit: never returns."""
    code = exit_code(err)
    text = str(err) if code != EXIT_INTERNAL else f"internal error: {type(err).__name__}: {err}"
    then = (lambda: faults.notify_failure(err)) if faults is not None else None
    if code == EXIT_INTERNAL:  # a bug: the traceback helps whoever reports it
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    life.exit_with_error(text, code, reason=f"error: {text}", then=then,
                         word=getattr(err, "blame", None))
