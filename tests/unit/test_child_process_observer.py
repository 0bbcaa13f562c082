"""Rank 0 that reports a lost peer must not be SIGKILLed by Lightning's child-process observer mid-report.

Uses Lightning's real observer on real processes: a long ``sleep`` stands in for rank 0 (the observer's
``main_pid``) and a process that exits 1 is the lost rank.
"""

from __future__ import annotations

import subprocess
import sys
import time

from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

from t2i_train.run_state import disarm_child_process_observer


def _observe(disarm: bool) -> bool:
    """Whether the stand-in for rank 0 is still alive 1.5 s after its peer died."""
    rank0 = subprocess.Popen(["sleep", "30"])
    lost = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    lost.wait()
    observer = _ChildProcessObserver(main_pid=rank0.pid, child_processes=[lost], sleep_period=0.2)
    observer.start()  # first check after sleep_period: time enough to disarm it, as rank 0 does
    if disarm:
        disarm_child_process_observer()
    try:
        time.sleep(1.5)
        return rank0.poll() is None
    finally:
        rank0.kill()
        rank0.wait()
        observer.join(timeout=2)


def test_observer_kills_rank0_when_not_disarmed() -> None:
    assert not _observe(disarm=False), "the observer no longer kills rank 0: the disarm test proves nothing"


def test_disarmed_observer_leaves_rank0_alive() -> None:
    assert _observe(disarm=True)
