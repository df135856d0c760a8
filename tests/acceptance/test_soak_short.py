"""Acceptance: the chaos soak, short version (200 runs; `make soak` runs 2,000).

Three worker processes run 200 runs of the `soak` workflow (every node type) on a
PostgreSQL server of the soak's own, while the driver cancels 25 of them (some twice, some
while a worker holds their node), heals and retries the 20 doomed runs the input says,
SIGKILLs a random worker every 0.2-1 s, terminates worker (and its own) backends every few
seconds and restarts PostgreSQL once. The checker (`tests/soak/chaos.py`) must find zero
violations: every run terminal with the status its input and its cancels predict, every
effect and compensation exactly once per epoch (a retried run re-runs only its failed node
and compensated steps), a cancelled run's journal a prefix of the workflow, every signal
consumed exactly once or legitimately left in its mailbox, no job or lease left, and the
global invariant.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The repository root, so that `tests.soak` (also run as `python -m tests.soak.chaos`) imports.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.soak import chaos

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

RUNS = 200


async def test_chaos_soak_loses_nothing_and_repeats_nothing(tmp_path: Path) -> None:
    # Runs start over 30 s so that the chaos (about 50 SIGKILLs) overlaps every stage.
    config = chaos.SoakConfig(
        runs=RUNS, ramp=30.0, deadline=240.0, workdir=tmp_path, progress=False
    )
    report = await chaos.soak(config)
    print("\n" + report.render())

    assert report.violations.lines() == []

    counts = report.counts
    ended = counts["parents completed"] + counts["parents failed"] + counts["parents cancelled"]
    assert ended == RUNS, counts
    assert counts["parents retried"] == RUNS // 10  # every healed run, completed
    assert counts["parents failed"] <= RUNS // 10  # the doomed runs not healed
    assert counts["jobs left"] == 0

    # The chaos happened: kills that landed on open transactions, terminated backends,
    # one restart that the running workers rode out by themselves, a graceful stop.
    stats = report.stats
    assert stats.kills >= 5, stats
    assert stats.kills_in_flight >= 3, stats
    assert stats.backends_terminated >= 1, stats
    assert stats.restarts == 1, stats
    assert stats.restart_survivors >= 1, stats
    assert stats.survivors_resumed == stats.restart_survivors, stats
    assert stats.stop_codes == [0] * config.workers, stats
    # Cancels and retries happened during the chaos.
    assert sum(stats.cancels.values()) >= RUNS // 8, stats
    assert stats.cancels["accepted"] >= 5, stats
    assert counts["parents cancelled"] >= 5, counts
    assert stats.cancels_in_flight >= 1, stats
    assert stats.retries["accepted"] == RUNS // 10, stats
