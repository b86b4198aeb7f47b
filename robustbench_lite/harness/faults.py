"""A fault-injection hook for resume tests: kill this process at a named point of a run.

The harness calls :func:`point` right after each durable write (a stage of an evaluation, a
group's rows, the leaderboard files).  With the environment variable ``RBL_KILL_AT`` set to an
``fnmatch`` pattern, optionally followed by ``#k``, the process sends itself SIGKILL at the k-th
point whose name matches (default the first): what a power cut or ``kill -9`` would do there.
Unset, it costs a dictionary lookup.
"""

from __future__ import annotations

import fnmatch
import os
import signal

ENV = "RBL_KILL_AT"
_seen: dict[str, int] = {}


def point(name: str) -> None:
    """A place where a run may be killed (see the module docstring)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    pattern, _, nth = spec.partition("#")
    if not fnmatch.fnmatchcase(name, pattern):
        return
    _seen[spec] = _seen.get(spec, 0) + 1
    if _seen[spec] == (int(nth) if nth.isdigit() else 1):
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
