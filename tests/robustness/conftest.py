"""Robustness suite: hostile and corrupt inputs through the public entry points.

Each group records, per input, one outcome: "clear error" (our exception type, one line, naming the file), "result"
(a value in the documented range, checked against an independent expectation), "crash" (anything else: another
exception type, a message without the file name, a hang) or "silent wrong result" (a result that contradicts the
expectation). Targets: 0 crashes, 0 silent wrong results. The counts are printed at the end of the session."""

from __future__ import annotations

import contextlib
import signal
from collections import Counter, defaultdict

OUTCOMES = ("clear error", "result", "crash", "silent wrong result")
COUNTS: dict[str, Counter] = defaultdict(Counter)


def record(group: str, outcome: str) -> str:
    assert outcome in OUTCOMES, outcome
    COUNTS[group][outcome] += 1
    return outcome


@contextlib.contextmanager
def time_limit(seconds: int):
    """TimeoutError after ``seconds`` (a hang counts as a crash); main thread, POSIX only."""
    def handler(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def pytest_terminal_summary(terminalreporter):
    if not COUNTS:
        return
    terminalreporter.section("robustness: outcomes per input")
    terminalreporter.write_line(f"{'group':<44}{'tried':>7}" + "".join(f"{o:>21}" for o in OUTCOMES))
    for group, counts in sorted(COUNTS.items()):
        terminalreporter.write_line(f"{group:<44}{sum(counts.values()):>7}"
                                    + "".join(f"{counts[o]:>21}" for o in OUTCOMES))
