-- The full durable schema, as a fresh database gets it.
-- Must equal every file of sql/migrations applied in order (tests/integration/test_migrations.py).
-- __SCHEMA__ is replaced by the validated, quoted schema name before execution.

-- One clock for every statement: the database's, shifted by the `durable.clock_offset`
-- setting in seconds (unset in production; a test harness sets it, for a database or a
-- session, to skip time). A SQL function without FROM, so the planner inlines it.
CREATE FUNCTION __SCHEMA__.now_v1() RETURNS timestamptz
LANGUAGE sql VOLATILE AS $$
    SELECT clock_timestamp() + make_interval(
        secs => coalesce(nullif(current_setting('durable.clock_offset', true), ''), '0')::float8
    )
$$;

CREATE TABLE __SCHEMA__.migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT __SCHEMA__.now_v1()
);

-- What every row of runs satisfies (status values, a finished run and only a finished run has
-- finished_at, counters in range), as one function that runs' one CHECK constraint calls:
-- PostgreSQL re-reads each CHECK expression from its stored text in every statement that
-- writes the table, which cost twelve separate checks about 60 µs of each step's UPDATE
-- (sql/migrations/0011_run_row_check.sql).
CREATE FUNCTION __SCHEMA__.run_row_ok_v1(
    p_workflow text, p_status text, p_cursor integer, p_finished timestamptz,
    p_iteration integer, p_attempt integer, p_epoch integer, p_ending text,
    p_version integer, p_priority smallint, p_concurrency integer, p_slot text
) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN p_workflow <> ''
        AND p_status IN ('pending', 'running', 'waiting', 'compensating', 'completed',
                         'failed', 'cancelled')
        AND (p_status IN ('completed', 'failed', 'cancelled')) = (p_finished IS NOT NULL)
        AND p_cursor >= 0 AND p_iteration >= 0 AND p_attempt >= 1 AND p_epoch >= 0
        AND p_version >= 1 AND p_priority BETWEEN -100 AND 100
        AND (p_ending IS NULL OR p_ending IN ('failed', 'cancelled'))
        AND (p_concurrency IS NULL OR p_concurrency >= 1)
        AND (p_slot IS NULL OR p_slot IN ('held', 'queued'));
END
$$;

-- One row per workflow run, and the one place that says where it is: the node (`cursor`,
-- `current_node`), the loop `iteration`, the `attempt` of the work at that position, and
-- what it waits for (`wake_at`, `waiting_for`, `child_id`, parallel `branches`).
-- `queue` is what a worker must serve to claim its jobs: the workflow, its `version` and a
-- digest of its shape; `epoch` counts retries of the run (attempts are numbered per epoch);
-- `ending` is where compensation leads.
--
-- Runs, their journal, attempts and mailbox are history: partitioned by the run id, a ULID,
-- whose first 10 characters are its creation time, so that a month is a range of ids and
-- its partition of each table can be dropped whole once every run in it finished long
-- enough ago (drop_history_partition_v1). ensure_partitions_v1 creates the month
-- partitions ahead of time; the DEFAULT partitions catch any other id (never fail an
-- insert). A run and its history rows are always in the partitions of the same range, so
-- every statement about one run reads one partition of each table. The hot tables (jobs,
-- cancel_requests, run_keys) are not partitioned. See docs/guides/scaling.md.
CREATE TABLE __SCHEMA__.runs (
    id text PRIMARY KEY,
    workflow text NOT NULL,
    status text NOT NULL DEFAULT 'pending',
    input jsonb NOT NULL,
    result jsonb,
    error text,
    cursor integer NOT NULL DEFAULT 0,
    current_node text,
    wake_at timestamptz,
    waiting_for text,
    parent_id text REFERENCES __SCHEMA__.runs (id) ON DELETE SET NULL,
    parent_node text,
    idempotency_key text,
    -- Someone is in Engine.wait for this run: its final transaction sends a NOTIFY.
    watched boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT __SCHEMA__.now_v1(),
    updated_at timestamptz NOT NULL DEFAULT __SCHEMA__.now_v1(),
    finished_at timestamptz,
    queue text NOT NULL DEFAULT '',
    iteration integer NOT NULL DEFAULT 0,
    attempt integer NOT NULL DEFAULT 1,
    epoch integer NOT NULL DEFAULT 0,
    branches text[],
    child_id text,
    ending text,
    -- An operator paused the run (Engine.pause_run): it keeps its state and gets no job.
    paused_at timestamptz,
    -- The run this one was forked from (Engine.fork).
    forked_from text,
    version integer NOT NULL DEFAULT 1,
    -- Flow control (docs/guides/flow-control.md). `priority` orders every job of the run;
    -- `not_before`: its first node is not due before then (a delayed or debounced start).
    priority smallint NOT NULL DEFAULT 0,
    not_before timestamptz,
    -- A run of a workflow with a bound on active runs: the key it counts under, the bound,
    -- and its slot: 'held' (active), 'queued' (waits, without a job, for a slot to free),
    -- NULL (not admitted yet: its `admit` job decides when it is due).
    concurrency_key text,
    concurrency integer,
    slot text,
    singleton_key text,
    debounce_key text,
    -- The named limit and key whose slot or token the step at the run's position waits
    -- for (its job is due at `wake_at`; a holder that lets go wakes it sooner).
    limit_wait text
) PARTITION BY RANGE (id);
CREATE INDEX runs_status_idx ON __SCHEMA__.runs (status, id DESC);
CREATE INDEX runs_workflow_idx ON __SCHEMA__.runs (workflow, id DESC);
CREATE INDEX runs_finished_idx ON __SCHEMA__.runs (finished_at) WHERE finished_at IS NOT NULL;
-- The admin API finds a run by its idempotency key without knowing its workflow.
CREATE INDEX runs_idempotency_lookup_idx ON __SCHEMA__.runs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX runs_parent_idx ON __SCHEMA__.runs (parent_id) WHERE parent_id IS NOT NULL;
-- The active and queued runs of a bounded workflow, per key, in admission order.
CREATE INDEX runs_slot_idx ON __SCHEMA__.runs
    (workflow, concurrency_key, slot, priority DESC, created_at, id)
    WHERE concurrency_key IS NOT NULL AND finished_at IS NULL;
-- The pending run a debounced start coalesces into.
CREATE INDEX runs_debounce_idx ON __SCHEMA__.runs (workflow, debounce_key, created_at)
    WHERE debounce_key IS NOT NULL AND status = 'pending';
-- The runs waiting for a limit's slot or token, most urgent first.
CREATE INDEX runs_limit_wait_idx ON __SCHEMA__.runs (limit_wait, priority DESC, created_at, id)
    WHERE limit_wait IS NOT NULL;
-- Every partition of runs has the fillfactor: room for HOT updates of the cursor.
CREATE TABLE __SCHEMA__.runs_default PARTITION OF __SCHEMA__.runs DEFAULT
    WITH (fillfactor = 80);
-- NOT VALID, after the default partition, as the migration leaves it (the rows already there
-- had passed the twelve checks it replaced); every row written is checked all the same.
ALTER TABLE __SCHEMA__.runs ADD CONSTRAINT runs_row_check CHECK (__SCHEMA__.run_row_ok_v1(
    workflow, status, cursor, finished_at, iteration, attempt, epoch, ending, version,
    priority, concurrency, slot
)) NOT VALID;

-- The keys that make a start return an existing run: an idempotency key for as long as its
-- run exists, a singleton key while its run is active (finished_v1 deletes it). Not on
-- runs: a unique index of a partitioned table must include the run id, so it could not
-- keep a key unique across months. A key whose run is gone (purged, its month dropped) or,
-- for a singleton key, finished, is free: the next start with it takes the row over
-- (take_key_v1), so rows left behind by a dropped month are harmless until
-- drop_history_partition_v1's caller deletes them in batches (run_keys_run_idx).
CREATE TABLE __SCHEMA__.run_keys (
    kind text NOT NULL CHECK (kind IN ('idempotency', 'singleton')),
    workflow text NOT NULL,
    key text NOT NULL,
    run_id text NOT NULL,
    PRIMARY KEY (kind, workflow, key)
);
CREATE INDEX run_keys_run_idx ON __SCHEMA__.run_keys (run_id);

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
-- History (see runs): no foreign key to runs, whose partition it shares and goes with
-- (purge_v1 deletes a run's rows itself); a foreign key between partitioned tables would
-- cost a lookup of the run at every insert, and a scan of the table to add.
CREATE TABLE __SCHEMA__.journal (
    run_id text NOT NULL,
    key text NOT NULL,
    node text NOT NULL,
    status text NOT NULL CHECK (status IN ('completed', 'failed')),
    result jsonb,
    error text,
    attempts integer NOT NULL DEFAULT 1 CHECK (attempts >= 1),
    started_at timestamptz,
    finished_at timestamptz NOT NULL DEFAULT __SCHEMA__.now_v1(),
    seq bigint GENERATED ALWAYS AS IDENTITY,
    PRIMARY KEY (run_id, key)
) PARTITION BY RANGE (run_id);
-- The results mapping reads only node rows, not the iterations of a long loop.
CREATE INDEX journal_nodes_idx ON __SCHEMA__.journal (run_id)
    WHERE status = 'completed' AND strpos(key, '@') = 0 AND strpos(key, '#') = 0;
CREATE TABLE __SCHEMA__.journal_default PARTITION OF __SCHEMA__.journal DEFAULT;

-- Failed attempts, for retries and the timeline; the node's final outcome is in journal.
-- A retried run (Engine.retry) starts its failed node's attempts at 1 again, so the
-- attempt number is not a key.
-- History, partitioned as runs (see journal).
CREATE TABLE __SCHEMA__.attempts (
    id bigint GENERATED ALWAYS AS IDENTITY,
    run_id text NOT NULL,
    key text NOT NULL,
    attempt integer NOT NULL CHECK (attempt >= 1),
    error text NOT NULL,
    started_at timestamptz,
    failed_at timestamptz NOT NULL DEFAULT __SCHEMA__.now_v1(),
    epoch integer NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, id)
) PARTITION BY RANGE (run_id);
CREATE INDEX attempts_run_idx ON __SCHEMA__.attempts (run_id, key);
CREATE TABLE __SCHEMA__.attempts_default PARTITION OF __SCHEMA__.attempts DEFAULT;

-- Runs someone is cancelling. Claims skip their jobs, so that a worker continuing a run
-- node after node cannot keep winning the job's lock from the waiting cancel.
CREATE TABLE __SCHEMA__.cancel_requests (
    run_id text PRIMARY KEY REFERENCES __SCHEMA__.runs (id) ON DELETE CASCADE,
    requested_at timestamptz NOT NULL DEFAULT __SCHEMA__.now_v1(),
    reason text NOT NULL DEFAULT 'cancelled'
);

-- The per-run signal mailbox; a signal is consumed once, by the first wait for its name.
-- A signal sent with a dedupe key is recorded once per run, however often it is sent.
-- History, partitioned as runs (see journal).
CREATE TABLE __SCHEMA__.signals (
    id bigint GENERATED ALWAYS AS IDENTITY,
    run_id text NOT NULL,
    name text NOT NULL,
    payload jsonb,
    created_at timestamptz NOT NULL DEFAULT __SCHEMA__.now_v1(),
    consumed_by text,
    consumed_at timestamptz,
    dedupe_key text,
    CHECK ((consumed_by IS NULL) = (consumed_at IS NULL)),
    PRIMARY KEY (run_id, id)
) PARTITION BY RANGE (run_id);
CREATE INDEX signals_pending_idx ON __SCHEMA__.signals (run_id, name, id)
    WHERE consumed_at IS NULL;
CREATE UNIQUE INDEX signals_dedupe_idx ON __SCHEMA__.signals (run_id, dedupe_key)
    WHERE dedupe_key IS NOT NULL;
CREATE TABLE __SCHEMA__.signals_default PARTITION OF __SCHEMA__.signals DEFAULT;

-- The job queue. Rows are deleted in the transaction that commits their work, so the table
-- holds only live jobs. `run_at` is on the database clock; a job leased to a
-- non-transactional handler has `run_at` pushed to its lease expiry and a `lease_token`.
-- `run_id` has no foreign key to runs: checking one against the partitioned runs cost
-- three quarters of a job insert's time (migration 0012). Jobs are inserted only for runs
-- that exist; purge_v1 and drop_history_partition_v1 delete a run's jobs first; a job
-- whose run is gone all the same (a race with a purge) is deleted by the claim that finds
-- it (claim_v1, claim_batch_v1).
CREATE TABLE __SCHEMA__.jobs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue text NOT NULL,
    task text NOT NULL,
    run_id text,
    payload jsonb NOT NULL DEFAULT '{}',
    priority smallint NOT NULL DEFAULT 0,
    run_at timestamptz NOT NULL DEFAULT __SCHEMA__.now_v1(),
    attempts integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    lease_token uuid,
    created_at timestamptz NOT NULL DEFAULT __SCHEMA__.now_v1(),
    branch text
) WITH (fillfactor = 70);  -- room on the page for HOT updates as a job moves from node to node
-- The claim walks this index in (priority desc, run_at) order and stops at the first future job.
CREATE INDEX jobs_ready_idx ON __SCHEMA__.jobs (priority DESC, run_at, id);
-- A run's jobs, at most one of each kind of work (one per branch): the database refuses
-- a second.
CREATE UNIQUE INDEX jobs_run_work_idx ON __SCHEMA__.jobs (run_id, task, coalesce(branch, ''))
    WHERE run_id IS NOT NULL;

-- Workers that have an idle slot say so here (refreshed while idle). Job inserts send a
-- NOTIFY only while some worker listens: a NOTIFY serialises committing transactions on a
-- cluster-wide lock, so a busy system, whose workers find work without being told, skips it.
CREATE UNLOGGED TABLE __SCHEMA__.listeners (
    worker text PRIMARY KEY,
    seen_at timestamptz NOT NULL DEFAULT __SCHEMA__.now_v1()
);

-- A job a worker died holding is claimed again at once; this counts those claims (UNLOGGED:
-- written outside the job's transaction on every fresh claim, so it must be cheap).
CREATE UNLOGGED TABLE __SCHEMA__.claims (
    job_id bigint PRIMARY KEY,
    n integer NOT NULL DEFAULT 1
);

-- One coalesced wake-up per inserting statement; PostgreSQL folds identical notifications
-- of one transaction into one, so a transaction that enqueues many jobs notifies once.
CREATE FUNCTION __SCHEMA__.jobs_notify_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM __SCHEMA__.notify_jobs_v1();
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_notify AFTER INSERT ON __SCHEMA__.jobs
    FOR EACH STATEMENT EXECUTE FUNCTION __SCHEMA__.jobs_notify_v1();

-- The shape (ordered node names, kinds and branch keys) of each queue a run was pinned to,
-- recorded when an engine first registers it: what retry reads to find node positions, and
-- what `check` and `upgrade` compare with the code.
CREATE TABLE __SCHEMA__.shapes (
    queue text PRIMARY KEY,
    workflow text NOT NULL,
    shape jsonb NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT __SCHEMA__.now_v1(),
    version integer NOT NULL DEFAULT 1 CHECK (version >= 1)
);

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

-- Workflows whose jobs no worker claims (Engine.pause); runs keep their state and jobs.
CREATE TABLE __SCHEMA__.paused_workflows (
    workflow text PRIMARY KEY,
    paused_at timestamptz NOT NULL DEFAULT __SCHEMA__.now_v1()
);

-- Named limits (Engine(limits=...)), per key. A concurrency slot is one row: an attempt
-- holds it with a row lock for its transaction, or, for a `transactional=False` step, as
-- long as its job's lease (`holder_job`, `holder_token`) lives; either ends with the
-- attempt or with its worker. A rate of R starts per window is R rows, each the time of
-- its last start: a start takes a row last used a window ago or more, so no window holds
-- more than R starts. Rows are added on first use, each time in a transaction of its own.
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

-- A job as ensure_jobs_v1 sees it.
CREATE TYPE __SCHEMA__.job_v1 AS (
    id bigint, task text, branch text, run_at timestamptz, leased boolean
);

-- include: functions.sql
