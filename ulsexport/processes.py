"""Child processes the tool starts (a Triton server, the ranks of a healing run) never outlive it."""
from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int, sig: int = signal.SIGTERM):
    """preexec_fn of a child: `sig` when the tool dies, however it dies (SIGKILL too), so the child stops
    and cleans up after itself (Linux; elsewhere a no-op)."""
    def preexec():
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
        except (AttributeError, OSError):
            return
        if os.getppid() != parent:  # died before the prctl took hold
            os._exit(1)
    return preexec
