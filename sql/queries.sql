-- Every query durable runs, by name. A block starts with `-- name --` and a one-line
-- description; durable/sql.py parses this file once. __SCHEMA__ is the quoted schema name.

-- claim_job --
-- Lock the most urgent due job of the given queues, skipping jobs other workers hold. Due
-- by the clock now (evaluated once, so the index still bounds the scan), not by the
-- transaction's start, which may predate the job.
SELECT id, queue, task, run_id, payload::text AS payload, priority, attempts, lease_token
FROM __SCHEMA__.jobs
WHERE run_at <= (SELECT __SCHEMA__.now_v1()) AND queue = ANY($1::text[])
ORDER BY priority DESC, run_at, id
LIMIT 1
FOR UPDATE SKIP LOCKED;

-- claim_job_by_id --
-- Lock one known job if it is due and free (a worker continuing a run it just advanced).
SELECT id, queue, task, run_id, payload::text AS payload, priority, attempts, lease_token
FROM __SCHEMA__.jobs
WHERE id = $1 AND run_at <= (SELECT __SCHEMA__.now_v1())
FOR UPDATE SKIP LOCKED;

-- due_state --
-- For an idle worker: seconds until the next delayed job is due, and whether due jobs exist
-- (held by other transactions, or else a claim would have taken them); jobs of paused
-- workflows left out. The next due job is looked for at each priority level there is (a
-- walk of jobs_ready_idx from level to level), as the index orders by priority first.
WITH RECURSIVE levels AS (
    (SELECT priority FROM __SCHEMA__.jobs ORDER BY priority DESC LIMIT 1)
    UNION ALL
    SELECT (
        SELECT j.priority FROM __SCHEMA__.jobs j WHERE j.priority < l.priority
        ORDER BY j.priority DESC LIMIT 1
    )
    FROM levels l WHERE l.priority IS NOT NULL
), served AS (
    SELECT coalesce(array_agg(q), '{}') AS queues FROM unnest($1::text[]) AS q
    WHERE split_part(q, '@', 1) NOT IN (SELECT workflow FROM __SCHEMA__.paused_workflows)
)
SELECT
    (SELECT EXTRACT(EPOCH FROM (min(x.run_at) - __SCHEMA__.now_v1()))::float8
       FROM levels l, served, LATERAL (
           SELECT j.run_at FROM __SCHEMA__.jobs j
           WHERE j.priority = l.priority AND j.queue = ANY (served.queues)
             AND j.run_at > (SELECT __SCHEMA__.now_v1())
           ORDER BY j.run_at
           LIMIT 1
       ) AS x) AS next_due,
    EXISTS (
        SELECT 1 FROM __SCHEMA__.jobs, served
        WHERE queue = ANY (served.queues) AND run_at <= (SELECT __SCHEMA__.now_v1())
    )
        AS held;

-- enqueue_job --
-- Insert a job due `$6` seconds from now on the database clock.
INSERT INTO __SCHEMA__.jobs (queue, task, run_id, payload, priority, run_at)
VALUES ($1, $2, $3, $4::jsonb, $5, __SCHEMA__.now_v1() + make_interval(secs => $6))
RETURNING id;

-- delete_job --
-- Remove a job whose work commits in this transaction.
DELETE FROM __SCHEMA__.jobs WHERE id = $1;

-- retry_job --
-- Count a failed attempt of a job and make it due again after a delay, unless another
-- worker holds it now.
UPDATE __SCHEMA__.jobs
SET attempts = attempts + 1, run_at = __SCHEMA__.now_v1() + make_interval(secs => $2),
    lease_token = NULL
WHERE id = (SELECT id FROM __SCHEMA__.jobs WHERE id = $1 FOR UPDATE SKIP LOCKED)
RETURNING attempts;

-- lease_job --
-- Lease a held job to a handler running outside any transaction: the job stays invisible
-- to claims until the lease lapses, and only the lease holder may settle it.
UPDATE __SCHEMA__.jobs
SET lease_token = $2, run_at = __SCHEMA__.now_v1() + make_interval(secs => $3), attempts = attempts + 1
WHERE id = $1
RETURNING attempts;

-- extend_lease --
-- Heartbeat: push a lease's expiry if it is still ours.
UPDATE __SCHEMA__.jobs
SET run_at = __SCHEMA__.now_v1() + make_interval(secs => $3)
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

-- watch_run --
-- Ask for a NOTIFY when the run finishes (Engine.wait). The run is read afterwards, in a
-- statement of its own: this UPDATE may wait for a worker's lock on the run, and a read in
-- the same statement would see the run as it was before that wait.
UPDATE __SCHEMA__.runs SET watched = true
WHERE id = $1 AND NOT watched AND finished_at IS NULL;

-- register_listener --
-- A worker with an idle slot wants NOTIFYs of new jobs (refreshed while it stays idle).
INSERT INTO __SCHEMA__.listeners (worker) VALUES ($1)
ON CONFLICT (worker) DO UPDATE SET seen_at = __SCHEMA__.now_v1();

-- unregister_listener --
-- A worker is busy (or gone) and finds work without NOTIFYs.
DELETE FROM __SCHEMA__.listeners WHERE worker = $1;

-- claim --
-- Claim the most urgent due job of the given queues and read (and lock) its run.
SELECT * FROM __SCHEMA__.claim_v1($1::text[], NULL, NULL, true);

-- claim_by_id --
-- Claim a known job (a worker continuing a run) and read its run; the results only if $2.
SELECT * FROM __SCHEMA__.claim_v1(NULL, $1, NULL, $2);

-- commit_relock --
-- Commit, begin the next transaction and re-lock a job and its run as this worker left
-- them (relock_v1), in one simple-protocol message: the two %d are the job id and the
-- transaction id that wrote the run.
COMMIT; BEGIN; SELECT __SCHEMA__.relock_v1(%d, '%d'::xid);

-- run_results --
-- The results of a run's completed nodes, as one JSON object.
SELECT __SCHEMA__.run_results_v1($1)::text;

-- claim_leased --
-- Lock a leased job for settling by its lease holder, with its run; nothing if the lease
-- was lost.
SELECT * FROM __SCHEMA__.claim_v1(NULL, $1, $2, true);

-- count_claim --
-- Count a fresh claim of a job, outside its transaction; the number of claims so far.
SELECT __SCHEMA__.count_claim_v1($1);

-- forget_claims --
-- The job's attempt was recorded: its claims start counting again.
DELETE FROM __SCHEMA__.claims WHERE job_id = $1;

-- sweep_claims --
-- Claim counts of jobs that are gone.
DELETE FROM __SCHEMA__.claims c
WHERE NOT EXISTS (SELECT 1 FROM __SCHEMA__.jobs j WHERE j.id = c.job_id);

-- lease --
-- Lease the run's job to a non-transactional step: invisible to claims until the lease
-- lapses; a worker that takes it over then records the attempt as lost.
WITH run AS (
    UPDATE __SCHEMA__.runs SET status = 'running', updated_at = __SCHEMA__.now_v1()
    WHERE id = $1 AND status <> 'running'
)
UPDATE __SCHEMA__.jobs
SET lease_token = $2, run_at = __SCHEMA__.now_v1() + make_interval(secs => $3)
WHERE id = $4;

-- release_lease --
-- The lease holder (or the worker that found its lease lapsed) settles the attempt.
UPDATE __SCHEMA__.jobs SET lease_token = NULL WHERE id = $1;

-- ensure_jobs --
-- Make a run's jobs what its state needs; the id of its job if due now.
SELECT __SCHEMA__.ensure_jobs_v1($1);

-- complete_node --
-- Journal a completed node and move the run on (or finish it).
SELECT * FROM __SCHEMA__.complete_node_v2($1, $2, $3, $4, $5, $6, $7, $8, $9, $10);

-- retry_node --
-- Record a failed attempt and schedule the next.
SELECT __SCHEMA__.retry_node_v1($1, $2, $3, $4, $5, $6, $7);

-- fail_node --
-- Fail a node for good and start compensating.
SELECT __SCHEMA__.fail_node_v1($1, $2, $3, $4, $5, $6);

-- park --
-- Park a run until a time and/or a signal.
SELECT __SCHEMA__.park_v1($1, $2, $3);

-- iterate --
-- Journal a loop iteration and move to the next.
SELECT __SCHEMA__.iterate_v1($1, $2, $3, $4, $5, $6);

-- fan_out --
-- Start a parallel node's branches.
SELECT __SCHEMA__.fan_out_v1($1, $2::text[]);

-- branch_done --
-- Journal a branch; how many branches of the node are left.
SELECT __SCHEMA__.branch_done_v1($1, $2, $3, $4, $5, $6, $7);

-- choose --
-- Journal a route's choice.
SELECT __SCHEMA__.choose_v1($1, $2, $3, $4, $5);

-- start_child --
-- Start a child run (under its workflow's bound) and park the parent for it.
SELECT __SCHEMA__.start_child_v2($1, $2, $3, $4, $5, $6, $7, $8, $9, $10);

-- compensated --
-- Journal one compensator's outcome and go on.
SELECT __SCHEMA__.compensated_v1($1, $2, $3, $4, $5, $6, $7, $8);

-- finish_run --
-- End a compensated run as failed or cancelled.
SELECT __SCHEMA__.finish_run_v1($1, $2, $3);

-- apply_cancel --
-- A worker holding the run applies its cancel request (children with their own locks).
SELECT __SCHEMA__.cancel_run_v1($1, $2),
       (SELECT count(__SCHEMA__.cancel_tree_v1(c.id, 'parent run ' || $1 || ' was cancelled'))
        FROM __SCHEMA__.runs c
        WHERE c.parent_id = $1 AND c.finished_at IS NULL AND c.status <> 'compensating');

-- branch_check --
-- Lock the run of a branch that ran, to see whether it still fans that branch out.
SELECT r.status, r.cursor, r.epoch, r.branches,
       EXISTS (SELECT 1 FROM __SCHEMA__.cancel_requests q WHERE q.run_id = r.id) AS cancel
FROM __SCHEMA__.runs r
WHERE r.id = $1
FOR NO KEY UPDATE;

-- journal_value --
-- One journal row's result, if it completed.
SELECT result::text FROM __SCHEMA__.journal
WHERE run_id = $1 AND key = $2 AND status = 'completed';

-- journal_newest --
-- The run's journal, newest first, for choosing the next compensation.
SELECT key, node, status FROM __SCHEMA__.journal WHERE run_id = $1 ORDER BY seq DESC;

-- sub_results --
-- The committed branches or iterations of a node.
SELECT key, result::text AS result
FROM __SCHEMA__.journal
WHERE run_id = $1 AND node = $2 AND strpos(key, '#') > 0 AND status = 'completed'
ORDER BY seq;

-- oldest_signal --
-- The oldest unconsumed signal of a name in a run's mailbox.
SELECT id, coalesce(payload::text, 'null') AS payload FROM __SCHEMA__.signals
WHERE run_id = $1 AND name = $2 AND consumed_at IS NULL
ORDER BY id
LIMIT 1;

-- child_state --
-- A child run's status, result and error.
SELECT status, result::text AS result, error FROM __SCHEMA__.runs WHERE id = $1;

-- start_run --
-- Create a run and its first job (with its flow-control options); the id of the run that
-- holds the idempotency or singleton key, or that a debounced start joined, if any.
SELECT __SCHEMA__.start_run_v2(
    $1, $2, $3, $4, $5, $6, NULL, NULL, $7, $8, $9, $10, $11, $12, $13, $14, $15
);

-- signal --
-- Put a signal in a run's mailbox and wake the run if it waits for it.
SELECT __SCHEMA__.signal_v1($1, $2, $3);

-- record_signal --
-- Put a signal in the mailbox of the run whose handler sends it (that run is not waiting:
-- it runs this handler).
INSERT INTO __SCHEMA__.signals (run_id, name, payload) VALUES ($1, $2, $3::jsonb);

-- cancel --
-- Cancel a run and its unfinished children (NULL: no such run).
SELECT __SCHEMA__.cancel_tree_v1($1, $2);

-- request_cancel --
-- A handler cancels its own run: the worker applies the request when the node commits.
INSERT INTO __SCHEMA__.cancel_requests (run_id, reason)
SELECT id, $2 FROM __SCHEMA__.runs
WHERE id = $1 AND finished_at IS NULL AND status <> 'compensating'
ON CONFLICT (run_id) DO NOTHING
RETURNING run_id;

-- retry_run --
-- Resume a failed run where what is no longer in effect starts; false if not failed.
SELECT __SCHEMA__.retry_run_v1($1);

-- record_shape --
-- Remember the shape of a workflow's queue (once).
SELECT __SCHEMA__.record_shape_v1($1, $2, $3);

-- purge_candidates --
-- Up to $2 runs that finished more than $1 seconds ago, oldest first, keeping children
-- whose parent has not finished.
SELECT r.id FROM __SCHEMA__.runs r
WHERE r.finished_at < (SELECT __SCHEMA__.now_v1()) - make_interval(secs => $1)
  AND (
    r.parent_id IS NULL
    OR (SELECT p.finished_at FROM __SCHEMA__.runs p WHERE p.id = r.parent_id) IS NOT NULL
  )
ORDER BY r.finished_at
LIMIT $2;

-- purge --
-- Delete the given finished runs with their rows; how many went.
SELECT __SCHEMA__.purge_v1($1::text[]);

-- reschedule_job --
-- Make a held job due again after a delay, with a new payload.
UPDATE __SCHEMA__.jobs
SET run_at = __SCHEMA__.now_v1() + make_interval(secs => $2), payload = $3::jsonb,
    lease_token = NULL
WHERE id = $1;

-- db_now --
-- The database clock (shifted when a test harness shifts it).
SELECT __SCHEMA__.now_v1();

-- other_shapes --
-- Unfinished runs of these workflows pinned to a shape this worker does not serve.
SELECT workflow, queue, count(*) AS runs FROM __SCHEMA__.runs
WHERE workflow = ANY ($1::text[]) AND finished_at IS NULL AND NOT (queue = ANY ($2::text[]))
GROUP BY workflow, queue
ORDER BY workflow, queue;

-- run_status --
-- The status of a run (None when it does not exist).
SELECT status FROM __SCHEMA__.runs WHERE id = $1;

-- run_queue --
-- The queue (workflow and shape) of a run and whether it finished, or nothing.
SELECT queue, finished_at IS NOT NULL AS finished FROM __SCHEMA__.runs WHERE id = $1;

-- note_journal --
-- Say on a completed node's journal row how it completed (a wait that used its default).
UPDATE __SCHEMA__.journal SET error = $3 WHERE run_id = $1 AND key = $2;

-- pause_workflow --
-- Stop claiming a workflow's jobs; true unless it was paused already.
SELECT __SCHEMA__.pause_workflow_v1($1);

-- resume_workflow --
-- Claim a paused workflow's jobs again (waking idle workers); true if it was paused.
SELECT __SCHEMA__.resume_workflow_v1($1);

-- paused_workflows --
-- The paused workflows, by name.
SELECT workflow FROM __SCHEMA__.paused_workflows ORDER BY workflow;

-- limit_usage --
-- What each named limit uses now, per key.
SELECT * FROM __SCHEMA__.limit_usage_v1();

-- admit --
-- An `admit` job: the run takes a slot of its workflow's bound or is queued for one; its
-- advance job if due.
SELECT __SCHEMA__.admit_v1($1);

-- limit_acquire --
-- Take a named limit's slot and token for the attempt about to run: no wake time if taken,
-- else when to try again; or what rows to add first.
SELECT * FROM __SCHEMA__.limit_acquire_v1($1, $2, $3, $4, $5, $6, $7, $8);

-- limit_grow --
-- Add a limit key's slot or token rows, committed on their own.
SELECT __SCHEMA__.limit_grow_v1($1, $2, $3, $4);

-- limit_park --
-- The step waits for a limit's slot or token, without an attempt.
SELECT __SCHEMA__.limit_park_v1($1, $2, $3);

-- limit_wake --
-- A slot of a limit frees with this transaction: the next run waiting for one is due.
SELECT __SCHEMA__.limit_wake_v1($1);
