-- Every query durable runs, by name. A block starts with `-- name --` and a one-line
-- description; durable/sql.py parses this file once. __SCHEMA__ is the quoted schema name.

-- claim_job --
-- Lock the most urgent due job of the given queues, skipping jobs other workers hold. Due
-- by the clock now (evaluated once, so the index still bounds the scan), not by the
-- transaction's start, which may predate the job.
SELECT id, queue, task, run_id, payload::text AS payload, priority, attempts, lease_token
FROM __SCHEMA__.jobs
WHERE run_at <= (SELECT clock_timestamp()) AND queue = ANY($1::text[])
ORDER BY priority DESC, run_at, id
LIMIT 1
FOR UPDATE SKIP LOCKED;

-- claim_job_by_id --
-- Lock one known job if it is due and free (a worker continuing a run it just advanced).
SELECT id, queue, task, run_id, payload::text AS payload, priority, attempts, lease_token
FROM __SCHEMA__.jobs
WHERE id = $1 AND run_at <= now()
FOR UPDATE SKIP LOCKED;

-- due_state --
-- For an idle worker: seconds until the next delayed job is due, and whether due jobs exist
-- (held by other transactions, or else a claim would have taken them).
SELECT
    (SELECT EXTRACT(EPOCH FROM (run_at - clock_timestamp()))::float8
       FROM __SCHEMA__.jobs
      WHERE queue = ANY($1::text[]) AND run_at > now()
      ORDER BY priority DESC, run_at, id
      LIMIT 1) AS next_due,
    EXISTS (SELECT 1 FROM __SCHEMA__.jobs WHERE queue = ANY($1::text[]) AND run_at <= now())
        AS held;

-- enqueue_job --
-- Insert a job due `$6` seconds from now on the database clock.
INSERT INTO __SCHEMA__.jobs (queue, task, run_id, payload, priority, run_at)
VALUES ($1, $2, $3, $4::jsonb, $5, now() + make_interval(secs => $6))
RETURNING id;

-- delete_job --
-- Remove a job whose work commits in this transaction.
DELETE FROM __SCHEMA__.jobs WHERE id = $1;

-- retry_job --
-- Count a failed attempt of a job and make it due again after a delay, unless another
-- worker holds it now.
UPDATE __SCHEMA__.jobs
SET attempts = attempts + 1, run_at = clock_timestamp() + make_interval(secs => $2),
    lease_token = NULL
WHERE id = (SELECT id FROM __SCHEMA__.jobs WHERE id = $1 FOR UPDATE SKIP LOCKED)
RETURNING attempts;

-- reschedule_job --
-- Make a held job due again after a delay, with a new payload (retries and re-parking).
UPDATE __SCHEMA__.jobs
SET run_at = now() + make_interval(secs => $2), payload = $3::jsonb, lease_token = NULL
WHERE id = $1;

-- lease_job --
-- Lease a held job to a handler running outside any transaction: the job stays invisible
-- to claims until the lease lapses, and only the lease holder may settle it.
UPDATE __SCHEMA__.jobs
SET lease_token = $2, run_at = now() + make_interval(secs => $3), attempts = attempts + 1
WHERE id = $1
RETURNING attempts;

-- extend_lease --
-- Heartbeat: push a lease's expiry if it is still ours.
UPDATE __SCHEMA__.jobs
SET run_at = now() + make_interval(secs => $3)
WHERE id = $1 AND lease_token = $2
RETURNING id;

-- claim_leased_job --
-- Lock a job for settling by its lease holder; nothing comes back if the lease was lost.
SELECT id, queue, task, run_id, payload::text AS payload, priority, attempts, lease_token
FROM __SCHEMA__.jobs
WHERE id = $1 AND lease_token = $2
FOR UPDATE;

-- count_jobs --
-- How many jobs are in the table (tests and operations).
SELECT count(*) FROM __SCHEMA__.jobs;

-- applied_migrations --
-- Versions of the migrations this schema has.
SELECT version FROM __SCHEMA__.migrations ORDER BY version;

-- record_migration --
-- Remember that a migration was applied.
INSERT INTO __SCHEMA__.migrations (version, name) VALUES ($1, $2);

-- insert_run --
-- Create a run and its first job in one statement; nothing when the idempotency key is taken.
WITH run AS (
    INSERT INTO __SCHEMA__.runs
        (id, workflow, input, current_node, idempotency_key, parent_id, parent_node)
    VALUES ($1, $2, $3::jsonb, $4, $5, $6, $7)
    ON CONFLICT (workflow, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id, workflow
), job AS (
    INSERT INTO __SCHEMA__.jobs (queue, task, run_id, payload)
    SELECT workflow, 'advance', id, '{"c": 0, "a": 1}'::jsonb FROM run
)
SELECT id FROM run;

-- find_idempotent_run --
-- The run that already holds an idempotency key.
SELECT id FROM __SCHEMA__.runs WHERE workflow = $1 AND idempotency_key = $2;

-- lock_run --
-- Lock a run (always after its job: one lock order everywhere) and read what a node needs.
SELECT r.id, r.workflow, r.status, r.input::text AS input, r.cursor, r.current_node,
       r.error, r.parent_id, r.wake_at, r.waiting_for, clock_timestamp() AS now,
       __SCHEMA__.run_results_v1(r.id)::text AS results
FROM __SCHEMA__.runs r
WHERE r.id = $1
FOR NO KEY UPDATE OF r;

-- complete_node --
-- Journal a node's result, move the cursor and hand the run's job on to the next node.
WITH entry AS (
    INSERT INTO __SCHEMA__.journal (run_id, key, node, status, result, attempts, started_at)
    VALUES ($1, $2, $2, 'completed', $3::jsonb, $4, coalesce($5, now()))
), run AS (
    UPDATE __SCHEMA__.runs
    SET cursor = $6, current_node = $7, status = 'running', wake_at = NULL, waiting_for = NULL,
        updated_at = now()
    WHERE id = $1
)
-- run_at only moves back (from a lapsed lease's expiry): left alone, no indexed column
-- changes and the update can be HOT.
UPDATE __SCHEMA__.jobs
SET task = 'advance', payload = $8::jsonb, run_at = least(run_at, now()), lease_token = NULL
WHERE id = $9;

-- complete_run --
-- Journal the last node, finish the run with every node's result, drop its job and wake
-- its parent (a child's terminal transaction is what resumes the parent: no polling).
WITH entry AS (
    INSERT INTO __SCHEMA__.journal (run_id, key, node, status, result, attempts, started_at)
    VALUES ($1, $2, $2, 'completed', $3::jsonb, $4, coalesce($5, now()))
), run AS (
    UPDATE __SCHEMA__.runs
    SET cursor = $6, current_node = NULL, status = 'completed', result = $7::jsonb,
        wake_at = NULL, waiting_for = NULL, finished_at = now(), updated_at = now()
    WHERE id = $1
    RETURNING watched, result::text AS stored
), job AS (
    DELETE FROM __SCHEMA__.jobs WHERE id = $8
), parent AS (
    INSERT INTO __SCHEMA__.jobs (queue, task, run_id, payload)
    SELECT p.workflow, 'advance', p.id, jsonb_build_object('c', p.cursor, 'a', 1)
    FROM __SCHEMA__.runs p
    WHERE p.id = (SELECT parent_id FROM __SCHEMA__.runs WHERE id = $1) AND p.status = 'waiting'
)
-- A small result (as stored) rides along, so that Engine.wait need not read it back.
SELECT pg_notify(
    $9, CASE WHEN length(run.stored) < 7000 THEN $1 || E'\n' || run.stored ELSE $1 END
)
FROM run WHERE run.watched;

-- retry_node --
-- Record a failed attempt and make the run's job due again after the backoff, counted from
-- the failure (the clock now), not from the attempt's start.
WITH attempt AS (
    INSERT INTO __SCHEMA__.attempts (run_id, key, attempt, error, started_at)
    VALUES ($1, $2, $3, $4, coalesce($5, now()))
), run AS (
    UPDATE __SCHEMA__.runs
    SET status = CASE WHEN status = 'pending' THEN 'running' ELSE status END,
        updated_at = now()
    WHERE id = $1
)
UPDATE __SCHEMA__.jobs
SET run_at = clock_timestamp() + make_interval(secs => $6), payload = $7::jsonb,
    lease_token = NULL
WHERE id = $8;

-- fail_node --
-- Record the last failed attempt (of key $2: the node, a branch or an iteration), journal
-- node $6 as failed and turn the job into the first compensation step.
WITH attempt AS (
    INSERT INTO __SCHEMA__.attempts (run_id, key, attempt, error, started_at)
    VALUES ($1, $2, $3, $4, coalesce($5, now()))
), entry AS (
    INSERT INTO __SCHEMA__.journal (run_id, key, node, status, error, attempts, started_at)
    VALUES ($1, $6, $6, 'failed', $4, $3, coalesce($5, now()))
), run AS (
    UPDATE __SCHEMA__.runs
    SET status = 'compensating', error = $4, current_node = $6, updated_at = now()
    WHERE id = $1
)
UPDATE __SCHEMA__.jobs
SET task = 'compensate', payload = $7::jsonb, run_at = now(), lease_token = NULL
WHERE id = $8;

-- compensation_state --
-- The run's journal, newest first, for choosing the next compensation.
SELECT key, node, status, result::text AS result
FROM __SCHEMA__.journal
WHERE run_id = $1
ORDER BY seq DESC;

-- journal_compensation --
-- Journal the outcome of one compensator and hand the job on to the next one.
WITH entry AS (
    INSERT INTO __SCHEMA__.journal
        (run_id, key, node, status, result, error, attempts, started_at)
    VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, coalesce($8, now()))
), run AS (
    UPDATE __SCHEMA__.runs SET updated_at = now() WHERE id = $1
)
UPDATE __SCHEMA__.jobs
SET task = 'compensate', payload = $9::jsonb, run_at = now(), lease_token = NULL
WHERE id = $10;

-- finish_run --
-- End a run as failed or cancelled, drop its job, wake its parent and whoever waits for it.
WITH run AS (
    UPDATE __SCHEMA__.runs
    SET status = $2, current_node = NULL, wake_at = NULL, waiting_for = NULL,
        finished_at = now(), updated_at = now(), error = coalesce(error, $3)
    WHERE id = $1
    RETURNING watched
), job AS (
    DELETE FROM __SCHEMA__.jobs WHERE id = $4
), parent AS (
    INSERT INTO __SCHEMA__.jobs (queue, task, run_id, payload)
    SELECT p.workflow, 'advance', p.id, jsonb_build_object('c', p.cursor, 'a', 1)
    FROM __SCHEMA__.runs p
    WHERE p.id = (SELECT parent_id FROM __SCHEMA__.runs WHERE id = $1) AND p.status = 'waiting'
)
SELECT pg_notify($5, $1) FROM run WHERE run.watched;

-- lease_node --
-- Lease the run's job to a non-transactional step: invisible to claims until the lease
-- lapses; a worker that takes it over after that starts the next attempt.
WITH run AS (
    UPDATE __SCHEMA__.runs SET status = 'running', updated_at = now() WHERE id = $1
)
UPDATE __SCHEMA__.jobs
SET lease_token = $2, run_at = now() + make_interval(secs => $3), payload = $4::jsonb
WHERE id = $5;

-- get_run --
-- A run with the results of its completed nodes.
SELECT r.id, r.workflow, r.status, r.input::text AS input, r.result::text AS result, r.error,
       r.current_node, r.parent_id, r.created_at, r.updated_at, r.finished_at,
       __SCHEMA__.run_results_v1(r.id)::text AS results,
       ARRAY(SELECT c.id FROM __SCHEMA__.runs c WHERE c.parent_id = r.id ORDER BY c.id)
           AS children
FROM __SCHEMA__.runs r
WHERE r.id = $1;

-- list_runs --
-- Runs, newest first, optionally filtered by status and workflow.
SELECT r.id, r.workflow, r.status, r.input::text AS input, r.result::text AS result, r.error,
       r.current_node, r.parent_id, r.created_at, r.updated_at, r.finished_at,
       __SCHEMA__.run_results_v1(r.id)::text AS results,
       ARRAY[]::text[] AS children
FROM __SCHEMA__.runs r
WHERE ($1::text IS NULL OR r.status = $1) AND ($2::text IS NULL OR r.workflow = $2)
ORDER BY r.id DESC
LIMIT $3;

-- get_journal --
-- A run's journal in commit order.
SELECT key, node, status, result::text AS result, error, attempts, started_at, finished_at
FROM __SCHEMA__.journal
WHERE run_id = $1
ORDER BY seq;

-- get_attempts --
-- A run's failed attempts in order.
SELECT key, attempt, error, started_at, failed_at
FROM __SCHEMA__.attempts
WHERE run_id = $1
ORDER BY id;

-- run_status --
-- The status of a run (None when it does not exist).
SELECT status FROM __SCHEMA__.runs WHERE id = $1;

-- lock_run_jobs --
-- Lock every job of a run, first (jobs before runs: one lock order everywhere).
SELECT id FROM __SCHEMA__.jobs WHERE run_id = $1 ORDER BY id FOR UPDATE;

-- begin_cancel --
-- Drop a run's pending jobs and start its compensation towards `cancelled`.
WITH gone AS (
    DELETE FROM __SCHEMA__.jobs WHERE run_id = $1
), run AS (
    UPDATE __SCHEMA__.runs
    SET status = 'compensating', error = $2, updated_at = now()
    WHERE id = $1
)
INSERT INTO __SCHEMA__.jobs (queue, task, run_id, payload)
VALUES ($3, 'compensate', $1, $4::jsonb)
RETURNING id;

-- park_run --
-- Put a run to sleep: `waiting`, with its wake time and awaited signal; its job either
-- waits for the wake time (`$6` true) or is dropped (a signal will bring a new one).
WITH run AS (
    UPDATE __SCHEMA__.runs
    SET status = 'waiting', wake_at = $2, waiting_for = $3, updated_at = now()
    WHERE id = $1
), dropped AS (
    DELETE FROM __SCHEMA__.jobs WHERE id = $4 AND NOT $6
)
UPDATE __SCHEMA__.jobs
SET task = 'advance', run_at = coalesce($2, now()), payload = $5::jsonb, lease_token = NULL
WHERE id = $4 AND $6;

-- consume_signal --
-- Take the oldest unconsumed signal of a name from a run's mailbox.
UPDATE __SCHEMA__.signals
SET consumed_by = $3, consumed_at = now()
WHERE id = (
    SELECT id FROM __SCHEMA__.signals
    WHERE run_id = $1 AND name = $2 AND consumed_at IS NULL
    ORDER BY id
    LIMIT 1
    FOR UPDATE
)
RETURNING id, payload::text AS payload;

-- record_signal --
-- Put a signal in a run's mailbox.
INSERT INTO __SCHEMA__.signals (run_id, name, payload) VALUES ($1, $2, $3::jsonb)
RETURNING id;

-- wake_run --
-- Make a parked run's job due now (only jobs this transaction locked: a job another signal
-- added since may be held by a worker waiting for the run), or give it one; then wake the
-- workers.
WITH moved AS (
    UPDATE __SCHEMA__.jobs SET run_at = now() WHERE id = ANY($5::bigint[]) RETURNING id
), added AS (
    INSERT INTO __SCHEMA__.jobs (queue, task, run_id, payload)
    SELECT $2, 'advance', $1, $3::jsonb
    WHERE NOT EXISTS (SELECT 1 FROM moved)
)
SELECT pg_notify($4, '')
WHERE EXISTS (
    SELECT 1 FROM __SCHEMA__.listeners WHERE seen_at > now() - interval '1 minute'
);

-- journal_entry --
-- Journal one outcome without moving the cursor (branches, iterations, route choices,
-- child markers).
INSERT INTO __SCHEMA__.journal (run_id, key, node, status, result, error, attempts, started_at)
VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, coalesce($8, now()));

-- journal_value --
-- One journal row's status and result.
SELECT status, result::text AS result FROM __SCHEMA__.journal WHERE run_id = $1 AND key = $2;

-- sub_results --
-- The committed branches or iterations of a node, in commit order.
SELECT key, result::text AS result
FROM __SCHEMA__.journal
WHERE run_id = $1 AND node = $2 AND strpos(key, '#') > 0 AND status = 'completed'
ORDER BY seq;

-- fan_out --
-- One job per branch of a parallel node.
INSERT INTO __SCHEMA__.jobs (queue, task, run_id, payload)
SELECT $1, 'branch', $2, jsonb_build_object('c', $3::int, 'b', b, 'a', 1)
FROM unnest($4::text[]) AS b;

-- peek_run --
-- Read a run without locking it (parallel branches run side by side).
SELECT r.id, r.workflow, r.status, r.input::text AS input, r.cursor, r.current_node,
       clock_timestamp() AS now,
       __SCHEMA__.run_results_v1(r.id)::text AS results
FROM __SCHEMA__.runs r
WHERE r.id = $1;

-- child_state --
-- A child run's status, result and error.
SELECT status, result::text AS result, error FROM __SCHEMA__.runs WHERE id = $1;

-- active_children --
-- The children of a run that have not finished.
SELECT id FROM __SCHEMA__.runs
WHERE parent_id = $1 AND status NOT IN ('completed', 'failed', 'cancelled')
ORDER BY id;

-- mark_running --
-- A run whose node has work in flight elsewhere (parallel branches) is running.
UPDATE __SCHEMA__.runs
SET status = 'running', updated_at = now()
WHERE id = $1 AND status IN ('pending', 'waiting');

-- retry_run --
-- Resume a failed run at the node that failed, with a fresh attempt budget: forget the
-- node's failure (and the child it started, so a new one starts) and give the run a job.
WITH forgotten AS (
    DELETE FROM __SCHEMA__.journal
    WHERE run_id = $1
      AND (
        (status = 'failed' AND strpos(key, '@') = 0 AND strpos(key, '#') = 0)
        OR key = $2 || '@child'
      )
), run AS (
    UPDATE __SCHEMA__.runs
    SET status = 'running', error = NULL, finished_at = NULL, current_node = $2,
        wake_at = NULL, waiting_for = NULL, updated_at = now()
    WHERE id = $1
)
INSERT INTO __SCHEMA__.jobs (queue, task, run_id, payload)
VALUES ($3, 'advance', $1, jsonb_build_object('c', $4::int, 'a', 1));

-- failed_node --
-- The node a failed run failed at (its failed journal row).
SELECT node FROM __SCHEMA__.journal
WHERE run_id = $1 AND status = 'failed' AND strpos(key, '@') = 0 AND strpos(key, '#') = 0
ORDER BY seq DESC
LIMIT 1;

-- purge_runs --
-- Delete up to $2 runs that finished more than $1 seconds ago (journal, attempts and
-- mailbox go with them), keeping children whose parent has not finished.
WITH doomed AS (
    SELECT r.id FROM __SCHEMA__.runs r
    WHERE r.finished_at < now() - make_interval(secs => $1)
      AND (
        r.parent_id IS NULL
        OR (SELECT p.finished_at FROM __SCHEMA__.runs p WHERE p.id = r.parent_id) IS NOT NULL
      )
    ORDER BY r.finished_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM __SCHEMA__.runs WHERE id IN (SELECT id FROM doomed) RETURNING 1
)
SELECT count(*) FROM gone;

-- claim_run_job --
-- Claim the most urgent due job of the given workflows and lock its run, in one round trip.
SELECT * FROM __SCHEMA__.claim_run_job_v1($1::text[], NULL, true);

-- claim_run_job_by_id --
-- Claim a known job (a worker continuing a run) and lock its run; results only if asked.
SELECT * FROM __SCHEMA__.claim_run_job_v1(NULL, $1, $2);

-- run_results --
-- The results of a run's completed nodes, as one JSON object.
SELECT __SCHEMA__.run_results_v1($1)::text;

-- has_journal --
-- Whether a run has committed anything that compensation might have to undo.
SELECT EXISTS (SELECT 1 FROM __SCHEMA__.journal WHERE run_id = $1 AND status = 'completed');

-- cancel_now --
-- Cancel a run that has nothing to compensate: drop its jobs, end it, wake its parent and
-- whoever waits for it.
WITH gone AS (
    DELETE FROM __SCHEMA__.jobs WHERE run_id = $1
), run AS (
    UPDATE __SCHEMA__.runs
    SET status = 'cancelled', error = $2, current_node = NULL, wake_at = NULL,
        waiting_for = NULL, finished_at = now(), updated_at = now()
    WHERE id = $1
    RETURNING watched
), parent AS (
    INSERT INTO __SCHEMA__.jobs (queue, task, run_id, payload)
    SELECT p.workflow, 'advance', p.id, jsonb_build_object('c', p.cursor, 'a', 1)
    FROM __SCHEMA__.runs p
    WHERE p.id = (SELECT parent_id FROM __SCHEMA__.runs WHERE id = $1) AND p.status = 'waiting'
)
SELECT pg_notify($3, $1) FROM run WHERE run.watched;

-- db_now --
-- The database clock.
SELECT clock_timestamp();

-- watch_run --
-- Ask for a NOTIFY when the run finishes (Engine.wait). The run is read afterwards, in a
-- statement of its own: this UPDATE may wait for a worker's lock on the run, and a read in
-- the same statement would see the run as it was before that wait.
UPDATE __SCHEMA__.runs SET watched = true
WHERE id = $1 AND NOT watched AND finished_at IS NULL;

-- register_listener --
-- A worker with an idle slot wants NOTIFYs of new jobs (refreshed while it stays idle).
INSERT INTO __SCHEMA__.listeners (worker) VALUES ($1)
ON CONFLICT (worker) DO UPDATE SET seen_at = now();

-- unregister_listener --
-- A worker is busy (or gone) and finds work without NOTIFYs.
DELETE FROM __SCHEMA__.listeners WHERE worker = $1;

-- request_cancel --
-- Announce a cancel so that claims leave the run's jobs alone until it is done.
INSERT INTO __SCHEMA__.cancel_requests (run_id)
SELECT id FROM __SCHEMA__.runs WHERE id = $1
ON CONFLICT (run_id) DO NOTHING;

-- drop_cancel_request --
-- The cancel is done (or failed): claims may take the run's jobs again.
DELETE FROM __SCHEMA__.cancel_requests WHERE run_id = $1;
