"""What Linux's ``/proc`` says about a process: the few fields visionflow reads to find and stop the processes
of its local clusters (``ray_private``, ``ray_runtime``) and the benchmarks read to sum a process tree's
memory. Elsewhere (no ``/proc``) nothing is found."""
from __future__ import annotations

import os


def pids() -> list[int]:
    """Every process's PID (empty without ``/proc``)."""
    try:
        return [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []


def _stat(pid: int) -> list[bytes] | None:
    # The fields after the command name, which is in parentheses and may hold spaces and parentheses itself.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def parent(pid: int) -> int | None:
    """The parent's PID, or None (gone, or unreadable)."""
    fields = _stat(pid)
    try:
        return int(fields[1]) if fields else None
    except (IndexError, ValueError):
        return None


def alive(pid: int) -> bool:
    """Running: it exists and is not a zombie (a zombie has exited, its parent has not reaped it yet)."""
    fields = _stat(pid)
    return bool(fields) and fields[0] != b"Z"


def children(pid: int) -> list[int]:
    """Every descendant's PID: its children, theirs, and so on (empty when it has none or is gone)."""
    below: dict[int, list[int]] = {}
    for p in pids():
        ppid = parent(p)
        if ppid is not None:
            below.setdefault(ppid, []).append(p)
    found, stack = [], list(below.get(pid, []))
    while stack:
        p = stack.pop()
        found.append(p)
        stack += below.get(p, [])
    return found


def rss_bytes(pid: int) -> int:
    """Resident memory in bytes (0 when gone, or unreadable)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def program(pid: int) -> str | None:
    """The first word of its command line (the program as started), or None (gone, or unreadable)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0", 1)[0].decode(errors="replace").strip()
    except OSError:
        return None


def environ_value(pid: int, name: str) -> str | None:
    """The value of environment variable ``name`` as process ``pid`` started with it, or None (unset, or
    unreadable: another user's process)."""
    prefix = f"{name}=".encode()
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(prefix):
                    return item[len(prefix):].decode(errors="replace")
    except OSError:
        pass
    return None


def listening() -> dict[int, list[int]]:
    """Every TCP port something listens on (IPv4 or IPv6, any address) -> the PIDs of the processes holding
    those sockets, from ``/proc/net/tcp*`` and each process's open files; another user's processes are not
    seen (their ports map to no PID)."""
    ports: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A":  # LISTEN
                ports[f"socket:[{fields[9]}]"] = int(fields[1].rsplit(":", 1)[1], 16)
    found: dict[int, list[int]] = {port: [] for port in ports.values()}
    for pid in pids() if ports else []:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        held = set()
        for fd in fds:
            try:
                port = ports.get(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
            if port is not None and port not in held:
                held.add(port)
                found[port].append(pid)
    return found


def listeners(port: int) -> list[int]:
    """PIDs of the processes holding a TCP socket that listens on ``port`` (``listening``)."""
    return listening().get(port, [])
