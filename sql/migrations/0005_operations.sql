-- The operating surface: runs paused by an operator, forks, the lookup by idempotency key
-- of the admin API, and the registry of running workers.
-- Must leave a database equal to a fresh sql/schema.sql (tests/integration/test_migrations.py).

ALTER TABLE __SCHEMA__.runs
    ADD COLUMN paused_at timestamptz,
    ADD COLUMN forked_from text;

-- The admin API finds a run by its idempotency key without knowing its workflow.
CREATE INDEX runs_idempotency_lookup_idx ON __SCHEMA__.runs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Running workers, each refreshing its row (heartbeat) while it runs and deleting it when
-- it stops: a row whose heartbeat is old is a worker that died. UNLOGGED: written every
-- few seconds by every worker, and worthless after a crash of the server.
CREATE UNLOGGED TABLE __SCHEMA__.workers (
    name text PRIMARY KEY,
    host text NOT NULL,
    pid integer NOT NULL,
    workflows text[] NOT NULL,
    concurrency integer NOT NULL,
    in_flight integer NOT NULL DEFAULT 0,
    processed bigint NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL DEFAULT __SCHEMA__.now_v1(),
    heartbeat_at timestamptz NOT NULL DEFAULT __SCHEMA__.now_v1(),
    interval_seconds float8 NOT NULL
);
