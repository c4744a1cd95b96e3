"""How torch's OpenMP threads wait, chosen before torch loads, so that a shared CPU is not a collapse.

libgomp, torch's OpenMP runtime, reads its wait policy once, when torch is imported. Its default makes a
thread that reaches a barrier spin for a while before it sleeps: the fastest choice on a quiet machine, and
a collapse beside another CPU-bound process, because the spinning thread holds a core that its team-mate
needs. OMP_WAIT_POLICY=PASSIVE (sleep at once) degrades gracefully but is about twice as slow on a quiet
machine. bench/busy.py measures both (numbers in bench/README.md, "A busy machine").

So this module looks the moment torch is first imported, before it loads (`install` puts a hook on
Python's import system that runs once; a process that never imports torch, such as the summary, the
dashboard or run.sh's stage list, never looks). If other processes keep at least BUSY_CORES cores busy, it sets
OMP_WAIT_POLICY=PASSIVE; otherwise it leaves libgomp's default. The wait policy changes no result (the
same config and seed give the same metrics bit for bit under either, measured and tested), only speed,
so the choice may depend on the moment. A policy or spin count the user put in the environment is theirs
and is kept. The choice is written to the environment (CHOICE), so that child processes (decode workers,
DataLoader workers) inherit it instead of looking again.

Written by hand: neither torch nor threadpoolctl can change libgomp's wait policy once it has loaded, and
no library chooses it from the load of the machine.
"""
from __future__ import annotations

import importlib.abc
import os
import sys
import time

BUSY_CORES = 0.5   # other processes' load, in cores, from which threads sleep when idle
WINDOW_S = 0.1     # how long to look (/proc/stat counts in 10 ms ticks: 10 per core in the window)
CHOICE = "MASKFOLD_OMP_WAIT"
USER_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) ticks of all CPUs since boot, from /proc/stat's first line."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:9]]
    idle = values[3] + values[4]  # idle, iowait
    return sum(values) - idle, sum(values)


def others_busy_cores(window_s: float = WINDOW_S) -> float | None:
    """How many cores other processes kept busy over `window_s` (this process sleeps meanwhile), or None
    where /proc/stat cannot tell (not Linux)."""
    try:
        busy0, total0 = _cpu_ticks()
        time.sleep(window_s)
        busy1, total1 = _cpu_ticks()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (busy1 - busy0) / (total1 - total0) * (os.cpu_count() or 1)


def decide(environ, busy_cores) -> str:
    """The wait policy for this process: 'user' (the environment names one), 'inherited' (a parent chose),
    'passive' or 'default'; sets OMP_WAIT_POLICY and CHOICE in `environ` accordingly. `busy_cores` is called
    only when there is something to decide."""
    if CHOICE in environ:
        return "inherited"
    if any(key in environ for key in USER_KEYS):
        return "user"
    busy = busy_cores()
    choice = "passive" if busy is not None and busy >= BUSY_CORES else "default"
    if choice == "passive":
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
    environ[CHOICE] = f"{choice} ({'unknown' if busy is None else f'{busy:.1f}'} cores busy elsewhere)"
    return choice


def choose_wait_policy() -> str:
    """Decide once per process tree, before torch loads."""
    if "torch" in sys.modules:
        return "torch already loaded"
    choice = decide(os.environ, others_busy_cores)
    if choice == "passive":
        print(f"[maskfold] torch's threads sleep when idle (OMP_WAIT_POLICY=PASSIVE; same results, fairer speed): "
              f"{os.environ[CHOICE]}", file=sys.stderr)
    return choice


class _BeforeTorch(importlib.abc.MetaPathFinder):
    """Chooses the wait policy when `import torch` starts, then leaves the import to the usual finders."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            choose_wait_policy()
        return None


def install() -> None:
    """Choose the wait policy when torch is first imported (pipeline/__init__.py calls this)."""
    if "torch" not in sys.modules and not any(isinstance(f, _BeforeTorch) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorch())
