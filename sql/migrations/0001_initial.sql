-- 0001: the first schema: runs, journal, attempts, signal mailbox, jobs.
-- __SCHEMA__ is replaced by the validated, quoted schema name before execution.

CREATE TABLE __SCHEMA__.migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- One row per workflow run. `cursor` is the index of the node the run is at.
CREATE TABLE __SCHEMA__.runs (
    id text PRIMARY KEY,
    workflow text NOT NULL CHECK (workflow <> ''),
    status text NOT NULL DEFAULT 'pending' CHECK (status IN
        ('pending', 'running', 'waiting', 'compensating', 'completed', 'failed', 'cancelled')),
    input jsonb NOT NULL,
    result jsonb,
    error text,
    cursor integer NOT NULL DEFAULT 0 CHECK (cursor >= 0),
    current_node text,
    wake_at timestamptz,
    waiting_for text,
    parent_id text REFERENCES __SCHEMA__.runs (id) ON DELETE SET NULL,
    parent_node text,
    idempotency_key text,
    -- Someone is in Engine.wait for this run: its final transaction sends a NOTIFY.
    watched boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    CONSTRAINT runs_finished_iff_terminal
        CHECK ((status IN ('completed', 'failed', 'cancelled')) = (finished_at IS NOT NULL))
) WITH (fillfactor = 80);  -- room for HOT updates of the cursor
CREATE UNIQUE INDEX runs_idempotency_key ON __SCHEMA__.runs (workflow, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX runs_status_idx ON __SCHEMA__.runs (status, id DESC);
CREATE INDEX runs_workflow_idx ON __SCHEMA__.runs (workflow, id DESC);
CREATE INDEX runs_finished_idx ON __SCHEMA__.runs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX runs_parent_idx ON __SCHEMA__.runs (parent_id) WHERE parent_id IS NOT NULL;

-- Statuses move only along these edges; the database refuses anything else.
CREATE FUNCTION __SCHEMA__.runs_status_guard_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT (
        (OLD.status = 'pending' AND NEW.status IN
            ('running', 'waiting', 'compensating', 'completed', 'failed', 'cancelled'))
        OR (OLD.status = 'running' AND NEW.status IN
            ('waiting', 'compensating', 'completed', 'failed', 'cancelled'))
        OR (OLD.status = 'waiting' AND NEW.status IN
            ('running', 'compensating', 'completed', 'failed', 'cancelled'))
        OR (OLD.status = 'compensating' AND NEW.status IN ('failed', 'cancelled'))
        OR (OLD.status = 'failed' AND NEW.status = 'running')
    ) THEN
        RAISE EXCEPTION 'durable: illegal run status change % -> % for run %',
            OLD.status, NEW.status, OLD.id USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER runs_status_guard BEFORE UPDATE OF status ON __SCHEMA__.runs
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION __SCHEMA__.runs_status_guard_v1();

-- Every committed node outcome: `key` is the node name, `name#branch`, `name#N`,
-- `name@route` or `name@compensate`. The primary key makes a second commit impossible.
CREATE TABLE __SCHEMA__.journal (
    run_id text NOT NULL REFERENCES __SCHEMA__.runs (id) ON DELETE CASCADE,
    key text NOT NULL,
    node text NOT NULL,
    status text NOT NULL CHECK (status IN ('completed', 'failed')),
    result jsonb,
    error text,
    attempts integer NOT NULL DEFAULT 1 CHECK (attempts >= 1),
    started_at timestamptz,
    finished_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    seq bigint GENERATED ALWAYS AS IDENTITY,
    PRIMARY KEY (run_id, key)
);

-- Failed attempts, for retries and the timeline; the node's final outcome is in journal.
-- A retried run (Engine.retry) starts its failed node's attempts at 1 again, so the
-- attempt number is not a key.
CREATE TABLE __SCHEMA__.attempts (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id text NOT NULL REFERENCES __SCHEMA__.runs (id) ON DELETE CASCADE,
    key text NOT NULL,
    attempt integer NOT NULL CHECK (attempt >= 1),
    error text NOT NULL,
    started_at timestamptz,
    failed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX attempts_run_idx ON __SCHEMA__.attempts (run_id, key);

-- Runs someone is cancelling. Claims skip their jobs, so that a worker continuing a run
-- node after node cannot keep winning the job's lock from the waiting cancel.
CREATE TABLE __SCHEMA__.cancel_requests (
    run_id text PRIMARY KEY REFERENCES __SCHEMA__.runs (id) ON DELETE CASCADE,
    requested_at timestamptz NOT NULL DEFAULT now()
);

-- The per-run signal mailbox; a signal is consumed once, by the first wait for its name.
CREATE TABLE __SCHEMA__.signals (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id text NOT NULL REFERENCES __SCHEMA__.runs (id) ON DELETE CASCADE,
    name text NOT NULL,
    payload jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    consumed_by text,
    consumed_at timestamptz,
    CHECK ((consumed_by IS NULL) = (consumed_at IS NULL))
);
CREATE INDEX signals_pending_idx ON __SCHEMA__.signals (run_id, name, id)
    WHERE consumed_at IS NULL;
CREATE INDEX signals_run_idx ON __SCHEMA__.signals (run_id);

-- The job queue. Rows are deleted in the transaction that commits their work, so the table
-- holds only live jobs. `run_at` is on the database clock; a job leased to a
-- non-transactional handler has `run_at` pushed to its lease expiry and a `lease_token`.
CREATE TABLE __SCHEMA__.jobs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue text NOT NULL,
    task text NOT NULL,
    run_id text REFERENCES __SCHEMA__.runs (id) ON DELETE CASCADE,
    payload jsonb NOT NULL DEFAULT '{}',
    priority smallint NOT NULL DEFAULT 0,
    run_at timestamptz NOT NULL DEFAULT now(),
    attempts integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    lease_token uuid,
    created_at timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 70);  -- room on the page for HOT updates as a job moves from node to node
-- The claim walks this index in (priority desc, run_at) order and stops at the first future job.
CREATE INDEX jobs_ready_idx ON __SCHEMA__.jobs (priority DESC, run_at, id);
CREATE INDEX jobs_run_idx ON __SCHEMA__.jobs (run_id) WHERE run_id IS NOT NULL;

-- Workers that have an idle slot say so here (refreshed while idle). Job inserts send a
-- NOTIFY only while some worker listens: a NOTIFY serialises committing transactions on a
-- cluster-wide lock, so a busy system, whose workers find work without being told, skips it.
CREATE UNLOGGED TABLE __SCHEMA__.listeners (
    worker text PRIMARY KEY,
    seen_at timestamptz NOT NULL DEFAULT now()
);

-- One coalesced wake-up per inserting statement; PostgreSQL folds identical notifications
-- of one transaction into one, so a transaction that enqueues many jobs notifies once.
CREATE FUNCTION __SCHEMA__.jobs_notify_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM __SCHEMA__.listeners WHERE seen_at > now() - interval '1 minute'
    ) THEN
        PERFORM pg_notify(TG_TABLE_SCHEMA || '_jobs', '');
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_notify AFTER INSERT ON __SCHEMA__.jobs
    FOR EACH STATEMENT EXECUTE FUNCTION __SCHEMA__.jobs_notify_v1();

-- The results of a run's completed nodes (not branches, iterations, choices or
-- compensations) as one JSON object, or NULL when none completed yet.
-- PL/pgSQL rather than SQL: an aggregate keeps a SQL function from being inlined, and
-- PL/pgSQL keeps its plan for the session instead of planning on every call.
CREATE FUNCTION __SCHEMA__.run_results_v1(p_run text) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (
        SELECT jsonb_object_agg(e.key, e.result)
        FROM __SCHEMA__.journal e
        WHERE e.run_id = p_run AND e.status = 'completed'
          AND strpos(e.key, '@') = 0 AND strpos(e.key, '#') = 0
    );
END
$$;

-- Claim a job for the workflow engine and, in the same round trip, lock its run (jobs
-- before runs: one lock order everywhere) and read what the node needs. `p_job` claims that
-- job (a worker continuing a run); otherwise the most urgent due job of `p_queues`.
-- Branch jobs do not lock the run, so branches of one node run side by side. The results
-- mapping is only built when `p_results` is set (a worker continuing a run has it cached).
CREATE FUNCTION __SCHEMA__.claim_run_job_v1(p_queues text[], p_job bigint, p_results boolean)
RETURNS TABLE (
    id bigint, queue text, task text, run_id text, payload text, priority smallint,
    attempts integer, lease_token uuid, workflow text, status text, input text,
    "cursor" integer, current_node text, error text, parent_id text, wake_at timestamptz,
    waiting_for text, now timestamptz, results text
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    j __SCHEMA__.jobs%ROWTYPE;
    -- The clock now, not the transaction's start: a worker's transaction may have begun
    -- before a job that is due by now was even inserted.
    v_now timestamptz := clock_timestamp();
BEGIN
    IF p_job IS NULL THEN
        SELECT * INTO j FROM __SCHEMA__.jobs
        WHERE run_at <= v_now AND queue = ANY(p_queues)
          AND NOT EXISTS (
            SELECT 1 FROM __SCHEMA__.cancel_requests c WHERE c.run_id = jobs.run_id
          )
        ORDER BY priority DESC, run_at, id
        LIMIT 1
        FOR UPDATE SKIP LOCKED;
    ELSE
        SELECT * INTO j FROM __SCHEMA__.jobs
        WHERE id = p_job AND run_at <= v_now
          AND NOT EXISTS (
            SELECT 1 FROM __SCHEMA__.cancel_requests c WHERE c.run_id = jobs.run_id
          )
        FOR UPDATE SKIP LOCKED;
    END IF;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF j.task <> 'branch' THEN
        PERFORM 1 FROM __SCHEMA__.runs WHERE id = j.run_id FOR NO KEY UPDATE;
    END IF;
    RETURN QUERY
    SELECT j.id, j.queue, j.task, j.run_id, j.payload::text, j.priority, j.attempts,
           j.lease_token, r.workflow, r.status, r.input::text, r.cursor, r.current_node,
           r.error, r.parent_id, r.wake_at, r.waiting_for, clock_timestamp(),
           CASE WHEN p_results THEN __SCHEMA__.run_results_v1(j.run_id)::text END
    FROM (SELECT 1) AS one
    LEFT JOIN __SCHEMA__.runs r ON r.id = j.run_id;
END
$$;

-- A worker that just committed a node re-locks the run's job and run for the next node in
-- the same round trip as its COMMIT, without reading anything back: it raises DU001 when
-- the job or run is no longer where that worker left it (taken, moved on, being
-- cancelled).
CREATE FUNCTION __SCHEMA__.relock_run_job_v1(p_job bigint, p_cursor integer)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM __SCHEMA__.jobs
    WHERE id = p_job AND run_at <= now() AND task = 'advance' AND lease_token IS NULL
      AND (payload ->> 'c')::integer = p_cursor
      AND NOT EXISTS (
        SELECT 1 FROM __SCHEMA__.cancel_requests c WHERE c.run_id = jobs.run_id
      )
    FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'durable: job % is not free at node #%', p_job, p_cursor
            USING ERRCODE = 'DU001';
    END IF;
    PERFORM 1 FROM __SCHEMA__.runs r
    WHERE r.id = (SELECT run_id FROM __SCHEMA__.jobs WHERE id = p_job)
      AND r.cursor = p_cursor AND r.status = 'running'
    FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'durable: the run of job % moved on from node #%', p_job, p_cursor
            USING ERRCODE = 'DU001';
    END IF;
END
$$;
