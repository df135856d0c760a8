"""How many jobs a worker slot claims at once: the batch size, grown and shrunk by what
the slot sees (pure, no I/O).

Theory of operation. A slot that finds a deep queue claims several due jobs in one
statement, runs them one after the other in one transaction and commits them together, so
that one commit (and one claim) serves many steps. The size starts at 1: a slot that
finds one job at a time (an idle system, a chain continuing on its slot) claims exactly
as it would without batching. Each claim that comes back full and whose jobs all ran
within the window doubles the size, up to `limit` and to as many jobs as fit in the window
at the slot's recent time of user code per job. A claim that comes back short (the queue is shallow)
sets the size to what it found; a window that ran out sets it to what ran; a slow job (one
that alone took the window), a `transactional=False` step and an empty claim set it back
to 1.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The most jobs one claim takes by default: 1, batches off. Measured on 2 cores, batches
#: of up to 16 doubled the drain of a worker with 4 slots but did not clearly pay with the
#: default 16 slots (docs/performance.md), so they are opt-in (`batch_size=16`).
DEFAULT_BATCH_SIZE = 1
#: The bound of a batch. Every job of a batch after the first runs under a savepoint, a
#: subtransaction with its own transaction id once it writes; past 64 of them in one
#: transaction (handlers' own savepoints count too) PostgreSQL's snapshots slow down for
#: every session, so the bound stays well under that.
MAX_BATCH_SIZE = 32
#: The most consecutive steps of one run a slot runs in one transaction (a chain, see
#: `durable.working.Working._work`). Handlers that use `ctx.conn` set a savepoint each, so
#: the bound stays well under PostgreSQL's 64 subtransactions, as the batch's does.
DEFAULT_CHAIN_SIZE = 16
#: Seconds of user code (handlers) after which a batch commits, leaving its unrun jobs to
#: any worker; a batch also commits after `WALL_WINDOWS` windows of wall-clock time.
DEFAULT_BATCH_WINDOW = 0.005
#: A batch's bound in wall-clock time, in windows: on a busy event loop a job's wall time
#: counts every other slot's work too, so the window itself counts only user code.
WALL_WINDOWS = 10


@dataclass
class BatchSizer:
    """The batch size of one slot (see the module's docstring)."""

    limit: int = DEFAULT_BATCH_SIZE
    window: float = DEFAULT_BATCH_WINDOW
    size: int = 1
    #: Seconds of user code per job, a moving average over the jobs this slot ran.
    per_job: float = 0.0
    #: Seconds of user code of the job observed last.
    last: float = 0.0
    #: Whether the last claim came back full.
    full: bool = False

    def observe(self, seconds: float) -> None:
        """One job spent `seconds` in user code (its handler)."""
        self.last = seconds
        self.per_job = seconds if self.per_job == 0.0 else 0.75 * self.per_job + 0.25 * seconds

    def done(self, claimed: int, ran: int, *, slow: bool = False) -> None:
        """A claim took `claimed` jobs of which `ran` ran before the batch committed;
        `slow`: a job took the window alone or left the transaction (a lease)."""
        if claimed == 0 or slow or self.limit <= 1:
            self.size, self.full = 1, False
            return
        if self.size == 1 and not self.full:
            # One job found once says nothing of the queue's depth: an idle worker finds
            # its jobs one at a time, and its next claim (usually empty) stays the plain one.
            self.full = True
            return
        self.full = claimed >= self.size
        # Full and all ran: grow. Short (a shallow queue): what was found. Cut: what ran.
        grown = 2 * self.size if claimed >= self.size else claimed
        target = grown if ran >= claimed else ran
        cap = self.limit
        if self.per_job > 0.0:
            cap = min(cap, max(1, int(self.window / self.per_job)))
        self.size = max(1, min(target, cap))


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_BATCH_WINDOW",
    "DEFAULT_CHAIN_SIZE",
    "MAX_BATCH_SIZE",
    "WALL_WINDOWS",
    "BatchSizer",
]
