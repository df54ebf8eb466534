"""CPU seconds of the machine's processes between two moments, summed by role.

``snapshot()`` reads every live process's own CPU (user + system) from ``/proc``; ``by_role(before, after,
role)`` sums what each process used between the two snapshots under ``role(pid, title)`` (a process that
ended meanwhile is not counted; one that started counts from zero). ``serve_role`` names the processes of
a local Ray Serve graph: its deployments' replicas by deployment, the HTTP proxy (HAProxy too), the benchmark
itself ("client") and everything else ("other": Ray's daemons, the Serve controller, the rest of the machine).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

_TICK = os.sysconf("SC_CLK_TCK")


def read_stat(pid: int | str) -> tuple[str, float, float] | None:
    """``(name, own CPU seconds, reaped children's CPU seconds)`` of one process from ``/proc/<pid>/stat``
    (user + system each), or None when it has ended."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # ended meanwhile
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return (stat[stat.find("(") + 1:stat.rfind(")")], (int(fields[11]) + int(fields[12])) / _TICK,
            (int(fields[13]) + int(fields[14])) / _TICK)


def pids() -> list[int]:
    """Every live process's pid."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def snapshot() -> dict[int, tuple[str, float]]:
    """``{pid: (title, CPU seconds so far)}`` of every live process (its own CPU, not its children's)."""
    out = {}
    for pid in pids():
        stat = read_stat(pid)
        if stat is None:
            continue
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # ended meanwhile
            continue
        out[pid] = (title or stat[0], stat[1])
    return out


def by_role(before: dict, after: dict, role: Callable[[int, str], str]) -> dict[str, float]:
    """CPU seconds used between ``before`` and ``after`` (two ``snapshot()``s), summed by role, largest first."""
    sums: dict[str, float] = {}
    for pid, (title, cpu) in after.items():
        used = cpu - before[pid][1] if pid in before else cpu  # a Ray worker retitles itself per call
        if used > 0:
            key = role(pid, title)
            sums[key] = sums.get(key, 0.0) + used
    return dict(sorted(sums.items(), key=lambda kv: -kv[1]))


def serve_role(client_pid: int) -> Callable[[int, str], str]:
    """The role of a process in a local Serve benchmark: ``ray::ServeReplica:<app>:<deployment>`` is its
    deployment, ``ray::ProxyActor`` and ``haproxy`` the proxy, ``client_pid`` the client, anything else
    "other"."""
    def role(pid: int, title: str) -> str:
        if pid == client_pid:
            return "client"
        if title.startswith("ray::ServeReplica:"):
            return title.split()[0].split(":")[-1].split(".")[0]
        if title.startswith("ray::ProxyActor") or os.path.basename(title.split()[0]) == "haproxy":
            return "proxy"  # Serve's Python proxy, or the actor that runs HAProxy and HAProxy itself
        return "other"
    return role
