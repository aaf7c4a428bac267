"""Which addresses a process tree listens on, read from /proc: the check that the tests' servers (Ray, process-group
stores, ranks' HTTP and gRPC) listen on loopback only."""

from __future__ import annotations

import os
from pathlib import Path

LOOPBACK_HEX = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}
"""127.0.0.1 in /proc/net/tcp, as an IPv4-mapped IPv6 address and ::1 in /proc/net/tcp6."""


def parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state; the name may hold spaces


def descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        pid = parent(pid)
    return False


def process_tree(root: int) -> list[int]:
    """`root` and every live process under it."""
    pids = [root]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != root:
            try:
                if descends_from(int(entry.name), root):
                    pids.append(int(entry.name))
            except (OSError, ValueError):
                continue  # exited meanwhile
    return pids


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def listening_addresses(*roots: int) -> set[str]:
    """The local addresses (hex, as /proc/net/tcp* writes them) that the processes `roots`, and every process under
    them, listen on."""
    inodes: set[str] = set()
    for pid in {pid for root in roots for pid in process_tree(root)}:
        try:
            inodes |= _socket_inodes(pid)
        except OSError:
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                found.add(fields[1].rsplit(":", 1)[0])
    return found
