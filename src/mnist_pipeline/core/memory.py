"""Memory: how much any limit on this process leaves free (``stages.model.check_memory``
refuses a network that cannot fit), and a run the kernel's out-of-memory killer ended told
from one that was simply killed.

The limits read here are the ones that kill: the machine's available memory, the memory
cgroup the process runs in (v1 or v2: a container's or a job's limit) and ``ulimit -v``.
Nothing here imports TensorFlow.
"""

from __future__ import annotations

import resource
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_bytes() -> tuple[int, str] | None:
    """The least memory any limit on this process leaves free, and which limit that is."""
    found: list[tuple[int, str]] = []
    meminfo = _read(Path("/proc/meminfo"))
    for line in (meminfo or "").splitlines():
        if line.startswith("MemAvailable:"):
            found.append((int(line.split()[1]) * 1024, "available on this machine"))
    folder = memory_cgroup()
    if folder is not None:
        for limit_file, usage_file in (
            ("memory.limit_in_bytes", "memory.usage_in_bytes"),
            ("memory.max", "memory.current"),
        ):
            limit, usage = _read(folder / limit_file), _read(folder / usage_file)
            if limit and usage and limit.strip().isdigit() and int(limit) < 1 << 60:
                found.append((int(limit) - int(usage), f"left under the memory cgroup {folder}"))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        found.append((soft - _vm_size(), "left under ulimit -v"))
    return min(found) if found else None


def memory_cgroup(pid: str = "self") -> Path | None:
    """The folder of the memory cgroup ``pid`` runs in (v1 or v2), as this container sees it."""
    text = _read(Path(f"/proc/{pid}/cgroup")) or ""
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(",") or (controllers == "" and path):
            base = CGROUP_ROOT / "memory" if "memory" in controllers else CGROUP_ROOT
            parts = [p for p in path.split("/") if p]
            # A container sees its own cgroup at the root: drop leading parts until it exists.
            for start in range(len(parts) + 1):
                folder = base.joinpath(*parts[start:])
                if (folder / "memory.limit_in_bytes").exists() or (folder / "memory.max").exists():
                    return folder
    return None


def oom_kills(cgroup: Path | None = None) -> dict[str, int]:
    """The kernel's out-of-memory kill counters that can see this process: the machine's
    and its memory cgroup's."""
    counts = {}
    for text, where in (
        (_read(Path("/proc/vmstat")), "machine"),
        (_read(cgroup / "memory.oom_control") if cgroup else None, str(cgroup)),
        (_read(cgroup / "memory.events") if cgroup else None, str(cgroup)),
    ):
        for line in (text or "").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                counts[where] = int(value)
    return counts


def snapshot_tag() -> str:
    """What a run records at its start, for ``killed_by_oom`` to compare with later."""
    cgroup = memory_cgroup()
    return ";".join(f"{where}={count}" for where, count in oom_kills(cgroup).items())


def killed_by_oom(tag: str) -> str | None:
    """Evidence that the kernel's OOM killer ran since ``tag`` was recorded, else None. It is
    evidence, not proof: another process may have been the one killed."""
    for item in filter(None, tag.split(";")):
        where, _, then = item.rpartition("=")
        cgroup = None if where == "machine" else Path(where)
        now = oom_kills(cgroup).get(where)
        if now is not None and then.isdigit() and now > int(then):
            scope = "this machine" if where == "machine" else f"the memory cgroup {where}"
            return f"the kernel's out-of-memory killer ran in {scope} ({then} -> {now} kills)"
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _vm_size() -> int:
    for line in (_read(Path("/proc/self/status")) or "").splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
