-- Cron schedules (Engine(schedules=...)): one row per schedule declared in code.
-- Must leave a database equal to a fresh sql/schema.sql (tests/integration/test_migrations.py).

-- Cron schedules declared in code (Engine(schedules=...)), one row each, written when an
-- engine that declares them first needs them. `next_at` is the first tick not yet handled:
-- a scheduler that locks the row (FOR UPDATE SKIP LOCKED) starts the runs of the ticks due
-- and moves `next_at` past now in the same transaction, so every tick starts one run
-- however many workers run the schedule. `last_run_id` is the run the latest tick (or
-- trigger) started, which the overlap policy looks at.
CREATE TABLE __SCHEMA__.schedules (
    name text PRIMARY KEY CHECK (name <> ''),
    workflow text NOT NULL,
    cron text NOT NULL,
    timezone text NOT NULL,
    input jsonb NOT NULL DEFAULT '{}',
    overlap text NOT NULL CHECK (overlap IN ('skip', 'allow', 'cancel_previous')),
    catch_up text NOT NULL CHECK (catch_up IN ('none', 'latest', 'all')),
    max_catch_up integer NOT NULL CHECK (max_catch_up >= 1),
    paused boolean NOT NULL DEFAULT false,
    next_at timestamptz NOT NULL,
    last_tick timestamptz,
    last_run_id text REFERENCES __SCHEMA__.runs (id) ON DELETE SET NULL,
    created_at timestamptz NOT NULL DEFAULT __SCHEMA__.now_v1(),
    updated_at timestamptz NOT NULL DEFAULT __SCHEMA__.now_v1()
);
