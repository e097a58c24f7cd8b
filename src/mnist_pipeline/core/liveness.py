"""Is the process that owns something still alive? An owner is recorded as host, pid, the
process's start time and the machine's boot id, because a pid alone is reused: a trial whose
call died must not be taken for one still running just because a new process got its pid
(nor the other way round after a reboot).

Only owners on this machine can be checked; one on another host is taken to be alive (its
own machine's next call decides), as ``tracking.close_dead_runs`` does for MLflow runs.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _stat(pid: int) -> list[str]:
    """``/proc/<pid>/stat`` from field 3 (the state) on; empty where there is none."""
    stat = _read(f"/proc/{pid}/stat")
    # The command name (field 2) is in parentheses and may hold spaces or ')': after the last.
    return stat[stat.rfind(")") + 2 :].split() if stat else []


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat`` field 22); None
    where there is no ``/proc`` or no such process."""
    try:
        return int(_stat(pid)[19])
    except (IndexError, ValueError):
        return None


def boot_id() -> str | None:
    text = _read("/proc/sys/kernel/random/boot_id")
    return text.strip() if text else None


def identity(pid: int | None = None) -> dict[str, Any]:
    """This process (or ``pid`` on this machine) as an owner record: JSON-serialisable, to be
    kept in a database (an Optuna study's attributes)."""
    pid = os.getpid() if pid is None else pid
    return {"host": socket.gethostname(), "pid": pid, "start": start_ticks(pid), "boot": boot_id()}


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie (dead, not yet reaped by its parent) does not."""
    if pid <= 0 or _stat(pid)[:1] == ["Z"]:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def alive(owner: dict[str, Any]) -> bool:
    """Whether the process ``owner`` records is still running. On another host: True (it
    cannot be told from here). A record without start time or boot id (no ``/proc``) is
    judged by its pid only."""
    if owner.get("host") != socket.gethostname():
        return True
    pid = int(owner.get("pid") or 0)
    if pid <= 0 or not pid_alive(pid):
        return False
    if owner.get("boot") and boot_id() and owner["boot"] != boot_id():
        return False  # recorded before this machine last started
    if owner.get("start") is not None and start_ticks(pid) is not None:
        return start_ticks(pid) == owner["start"]  # else the pid was reused
    return True


def describe(owner: dict[str, Any]) -> str:
    return f"process {owner.get('pid')} on {owner.get('host')}"
