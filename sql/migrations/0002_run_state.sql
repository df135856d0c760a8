-- The run row as the one source of truth for a run's position, and one function,
-- ensure_jobs_v1, that gives a run exactly the jobs its state needs.
-- Must leave a database equal to a fresh sql/schema.sql (tests/integration/test_migrations.py).

-- One clock for every statement: the database's, shifted by the `durable.clock_offset`
-- setting in seconds (unset in production; a test harness sets it, for a database or a
-- session, to skip time). A SQL function without FROM, so the planner inlines it.
CREATE FUNCTION __SCHEMA__.now_v1() RETURNS timestamptz
LANGUAGE sql VOLATILE AS $$
    SELECT clock_timestamp() + make_interval(
        secs => coalesce(nullif(current_setting('durable.clock_offset', true), ''), '0')::float8
    )
$$;

ALTER TABLE __SCHEMA__.migrations ALTER COLUMN applied_at SET DEFAULT __SCHEMA__.now_v1();
ALTER TABLE __SCHEMA__.runs ALTER COLUMN created_at SET DEFAULT __SCHEMA__.now_v1();
ALTER TABLE __SCHEMA__.runs ALTER COLUMN updated_at SET DEFAULT __SCHEMA__.now_v1();
ALTER TABLE __SCHEMA__.journal ALTER COLUMN finished_at SET DEFAULT __SCHEMA__.now_v1();
ALTER TABLE __SCHEMA__.attempts ALTER COLUMN failed_at SET DEFAULT __SCHEMA__.now_v1();
ALTER TABLE __SCHEMA__.signals ALTER COLUMN created_at SET DEFAULT __SCHEMA__.now_v1();
ALTER TABLE __SCHEMA__.jobs ALTER COLUMN run_at SET DEFAULT __SCHEMA__.now_v1();
ALTER TABLE __SCHEMA__.jobs ALTER COLUMN created_at SET DEFAULT __SCHEMA__.now_v1();
ALTER TABLE __SCHEMA__.listeners ALTER COLUMN seen_at SET DEFAULT __SCHEMA__.now_v1();

ALTER TABLE __SCHEMA__.runs
    ADD COLUMN queue text NOT NULL DEFAULT '',
    ADD COLUMN iteration integer NOT NULL DEFAULT 0 CHECK (iteration >= 0),
    ADD COLUMN attempt integer NOT NULL DEFAULT 1 CHECK (attempt >= 1),
    ADD COLUMN epoch integer NOT NULL DEFAULT 0 CHECK (epoch >= 0),
    ADD COLUMN branches text[],
    ADD COLUMN child_id text,
    ADD COLUMN ending text CHECK (ending IN ('failed', 'cancelled'));
UPDATE __SCHEMA__.runs SET queue = workflow;
UPDATE __SCHEMA__.runs r SET ending = coalesce(j.payload ->> 'final', 'failed')
FROM __SCHEMA__.jobs j WHERE j.run_id = r.id AND j.task = 'compensate';
UPDATE __SCHEMA__.runs r SET attempt = greatest((j.payload ->> 'a')::int, 1),
    iteration = coalesce((j.payload ->> 'i')::int, 0)
FROM __SCHEMA__.jobs j WHERE j.run_id = r.id AND j.task = 'advance';
UPDATE __SCHEMA__.runs r SET child_id = e.result ->> 'run_id'
FROM __SCHEMA__.journal e
WHERE e.run_id = r.id AND e.key = r.current_node || '@child' AND r.finished_at IS NULL;

ALTER TABLE __SCHEMA__.attempts ADD COLUMN epoch integer NOT NULL DEFAULT 0;
ALTER TABLE __SCHEMA__.cancel_requests ALTER COLUMN requested_at SET DEFAULT __SCHEMA__.now_v1();
ALTER TABLE __SCHEMA__.cancel_requests ADD COLUMN reason text NOT NULL DEFAULT 'cancelled';

ALTER TABLE __SCHEMA__.jobs ADD COLUMN branch text;
UPDATE __SCHEMA__.jobs SET branch = payload ->> 'b' WHERE task = 'branch';
UPDATE __SCHEMA__.jobs j SET queue = r.queue FROM __SCHEMA__.runs r WHERE r.id = j.run_id;
-- Old jobs carried a cursor; the run row has it. Duplicates would break the unique index.
DELETE FROM __SCHEMA__.jobs a USING __SCHEMA__.jobs b
WHERE a.run_id = b.run_id AND a.task = b.task AND a.branch IS NOT DISTINCT FROM b.branch
  AND a.id > b.id;
UPDATE __SCHEMA__.jobs SET payload = '{}' WHERE run_id IS NOT NULL;
DROP INDEX __SCHEMA__.jobs_run_idx;
CREATE UNIQUE INDEX jobs_run_work_idx ON __SCHEMA__.jobs (run_id, task, coalesce(branch, ''))
    WHERE run_id IS NOT NULL;

-- A job a worker died holding is claimed again at once; this counts those claims (UNLOGGED:
-- written outside the job's transaction on every fresh claim, so it must be cheap).
CREATE UNLOGGED TABLE __SCHEMA__.claims (
    job_id bigint PRIMARY KEY,
    n integer NOT NULL DEFAULT 1
);

-- The results mapping reads only node rows, not the iterations of a long loop.
CREATE INDEX journal_nodes_idx ON __SCHEMA__.journal (run_id)
    WHERE status = 'completed' AND strpos(key, '@') = 0 AND strpos(key, '#') = 0;

DROP FUNCTION __SCHEMA__.claim_run_job_v1(text[], bigint, boolean);
DROP FUNCTION __SCHEMA__.relock_run_job_v1(bigint, integer);

CREATE OR REPLACE FUNCTION __SCHEMA__.jobs_notify_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM __SCHEMA__.notify_jobs_v1();
    RETURN NULL;
END
$$;

-- The shape (ordered node names, kinds and branch keys) of each queue a run was pinned to,
-- recorded when an engine first registers it: what retry reads to find node positions.
CREATE TABLE __SCHEMA__.shapes (
    queue text PRIMARY KEY,
    workflow text NOT NULL,
    shape jsonb NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT __SCHEMA__.now_v1()
);

-- A job as ensure_jobs_v1 sees it.
CREATE TYPE __SCHEMA__.job_v1 AS (
    id bigint, task text, branch text, run_at timestamptz, leased boolean
);
