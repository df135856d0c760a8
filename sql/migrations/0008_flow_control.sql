-- Flow control: a bound on a workflow's active runs (per key), named limits on steps
-- (concurrency and a sliding-window rate, per key), run priorities, delayed starts,
-- singleton and debounced starts, and paused workflows (sql/functions.sql has the logic).
-- Must leave a database equal to a fresh sql/schema.sql (tests/integration/test_migrations.py).

ALTER TABLE __SCHEMA__.runs
    ADD COLUMN priority smallint NOT NULL DEFAULT 0 CHECK (priority BETWEEN -100 AND 100),
    ADD COLUMN not_before timestamptz,
    ADD COLUMN concurrency_key text,
    ADD COLUMN concurrency integer CHECK (concurrency >= 1),
    ADD COLUMN slot text CHECK (slot IN ('held', 'queued')),
    ADD COLUMN singleton_key text,
    ADD COLUMN debounce_key text,
    ADD COLUMN limit_wait text;
-- The active and queued runs of a bounded workflow, per key, in admission order.
CREATE INDEX runs_slot_idx ON __SCHEMA__.runs
    (workflow, concurrency_key, slot, priority DESC, created_at, id)
    WHERE concurrency_key IS NOT NULL AND finished_at IS NULL;
CREATE UNIQUE INDEX runs_singleton_key ON __SCHEMA__.runs (workflow, singleton_key)
    WHERE singleton_key IS NOT NULL AND finished_at IS NULL;
CREATE INDEX runs_debounce_idx ON __SCHEMA__.runs (workflow, debounce_key, created_at)
    WHERE debounce_key IS NOT NULL AND status = 'pending';
CREATE INDEX runs_limit_wait_idx ON __SCHEMA__.runs (limit_wait, priority DESC, created_at, id)
    WHERE limit_wait IS NOT NULL;

CREATE TABLE __SCHEMA__.paused_workflows (
    workflow text PRIMARY KEY,
    paused_at timestamptz NOT NULL DEFAULT __SCHEMA__.now_v1()
);

CREATE TABLE __SCHEMA__.limit_slots (
    name text NOT NULL,
    key text NOT NULL,
    slot integer NOT NULL,
    holder_job bigint,
    holder_token uuid,
    PRIMARY KEY (name, key, slot)
);

CREATE TABLE __SCHEMA__.limit_tokens (
    name text NOT NULL,
    key text NOT NULL,
    slot integer NOT NULL,
    used_at timestamptz NOT NULL DEFAULT '-infinity',
    PRIMARY KEY (name, key, slot)
) WITH (fillfactor = 70);  -- taking a token is a HOT update of its row
