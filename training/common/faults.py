"""Fault injection for tests: a training process kills itself with SIGKILL (as ``kill -9`` would) at a named point.

Set ``OPENUS_HUB_TEST_KILL_AT=POINT[:KEY=VALUE[,KEY=VALUE...]]`` in a job's environment; the process dies the first
time it reaches ``POINT`` with every ``KEY`` of its context equal to ``VALUE``. The points:

* ``checkpoint`` (context ``stage``, ``file``: the checkpoint's name): each step of
  :func:`training.common.checkpoint.save_checkpoint`: ``partial`` (the temporary file partly written), ``written``
  (the temporary file complete and synced), ``pending`` (its sha256 recorded as pending), ``replaced`` (renamed over
  the target), ``confirmed`` (its sha256 confirmed);
* ``step`` (context ``step``: optimiser steps done, ``rank``): after each training step, once that step's
  checkpoint (if any) is saved. E.g. ``OPENUS_HUB_TEST_KILL_AT=step:step=5`` stops every rank after step 5.

Without the variable (always, outside tests) a point costs one environment lookup and does nothing.
"""

from __future__ import annotations

import os
import signal

__all__ = ["ENV", "point"]

ENV = "OPENUS_HUB_TEST_KILL_AT"


def point(name: str, **context) -> None:
    """Die here (SIGKILL) when ``$OPENUS_HUB_TEST_KILL_AT`` names this point and context."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    want, _, filters = spec.partition(":")
    if want != name:
        return
    for item in filter(None, filters.split(",")):
        key, _, value = item.partition("=")
        if str(context.get(key)) != value:
            return
    os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
