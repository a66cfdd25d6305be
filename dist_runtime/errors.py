"""The errors a user can cause, and how a rank reports one and exits.

Every such error prints one line, prefixed with the rank and host, and exits non-zero
on that rank; the coordinator also tells the other ranks to stop, so none waits for it.
"""

from __future__ import annotations

import sys

from dist_runtime.checkpoint import CheckpointError
from dist_runtime.partition import PlanError
from dist_runtime.tokenizer import TokenizerError
from dist_runtime.transport import OP_ABORT, Header, TransportError
from models import ConfigError, UnknownModelType

EXIT_USER_ERROR = 2

# ValueError covers bad arguments (sampling ranges, presets, context length).
USER_ERRORS = (CheckpointError, ConfigError, UnknownModelType, PlanError, TokenizerError,
               TransportError, ValueError, FileNotFoundError)


def fail(me: str, err: Exception, rank: int, abort=None) -> int:
    """Print `err` for this rank; on the coordinator, send ABORT round the ring first."""
    print(f"[{me}] error: {err}", file=sys.stderr, flush=True)
    if abort is not None and rank == 0:
        try:
            abort.send(1, Header(OP_ABORT))
        except Exception:
            pass
    return EXIT_USER_ERROR
