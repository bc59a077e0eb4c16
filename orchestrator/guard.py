"""Commands' errors as one line and an exit code, never a traceback, and tracking's background
services ended before the process exits: what ``main`` and the local executor's job processes share."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from orchestrator.artifacts import ArtifactError
from orchestrator.errors import OrchestratorError


def guarded(command: Callable[[], int]) -> int:
    """Run a command; print errors without a traceback and turn them into exit codes; then end
    the tracking backends' background services (bounded: ``tracking.end_services``)."""
    try:
        return _run(command)
    finally:
        from orchestrator.tracking import end_services

        end_services()


def _run(command: Callable[[], int]) -> int:
    try:
        return int(command())
    except OrchestratorError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head & co.: not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps interpreter shutdown from failing again
        return 0
    except OSError as e:  # the machine's, not the program's: a full disk, a vanished mount, permissions
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}; fix that and run the command again", file=sys.stderr)
        return 1
