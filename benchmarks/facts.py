"""Facts recorded at the top of every report: the machine and the PostgreSQL settings."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import asyncpg


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                kb = int(line.split()[1])
                return f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError):
        pass
    return "unknown"


def _event_loop() -> str:
    # The workers in-process run on whatever durable.cli.run_async picks.
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    return f"uvloop {uvloop.__version__}"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine skews the figures."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def machine() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "nproc": usable,
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory": _memory(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "asyncpg": asyncpg.__version__,
        "event_loop": _event_loop(),
        "load_average_at_start": load_average(),
    }


SETTINGS = (
    "fsync",
    "synchronous_commit",
    "shared_buffers",
    "max_connections",
    "wal_sync_method",
    "full_page_writes",
    "wal_level",
    "commit_delay",
    "autovacuum",
)


async def postgres(dsn: str, source: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        facts: dict[str, Any] = {
            "source": source,
            "version": await conn.fetchval("SELECT version()"),
            "server_version": await conn.fetchval("SHOW server_version"),
        }
        for name in SETTINGS:
            facts[name] = await conn.fetchval("SELECT current_setting($1, true)", name)
        host = await conn.fetchval("SELECT inet_server_addr()::text")
        facts["server_addr"] = host or "unix socket"
    finally:
        await conn.close()
    return facts
