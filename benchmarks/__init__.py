"""Benchmarks for durable: `python -m benchmarks.run [--quick]` (or `make bench`).

Every scenario runs against the public API (`durable.Engine`, `Workflow`, `engine.start`,
`wait`, `worker()`/`run_worker`) on a fresh, migrated database of a real PostgreSQL with
`fsync` and `synchronous_commit` on, next to a raw asyncpg baseline measured in the same run.
"""
