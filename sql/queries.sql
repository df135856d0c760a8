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
SELECT r.id, r.workflow, r.version, r.status, r.input::text AS input,
       r.result::text AS result, r.error, r.current_node, r.parent_id, r.created_at,
       r.updated_at, r.finished_at,
       __SCHEMA__.run_results_v1(r.id)::text AS results,
       ARRAY(SELECT c.id FROM __SCHEMA__.runs c WHERE c.parent_id = r.id ORDER BY c.id)
           AS children,
       r.paused_at IS NOT NULL AND r.finished_at IS NULL AS paused, r.forked_from
FROM __SCHEMA__.runs r
WHERE r.id = $1;

-- list_runs --
-- Runs, newest first (keyset: ids below $7), optionally filtered by status, workflow,
-- creation time, an id or idempotency key ($6) and version ($8). Run with plan_cache_mode =
-- force_custom_plan: a generic plan cannot know which filters are set, nor pick their index.
SELECT r.id, r.workflow, r.version, r.status, r.input::text AS input,
       r.result::text AS result, r.error, r.current_node, r.parent_id, r.created_at,
       r.updated_at, r.finished_at,
       __SCHEMA__.run_results_v1(r.id)::text AS results,
       ARRAY[]::text[] AS children,
       r.paused_at IS NOT NULL AND r.finished_at IS NULL AS paused, r.forked_from
FROM __SCHEMA__.runs r
WHERE ($1::text IS NULL OR r.status = $1) AND ($2::text IS NULL OR r.workflow = $2)
  AND ($4::timestamptz IS NULL OR r.created_at >= $4)
  AND ($5::timestamptz IS NULL OR r.created_at < $5)
  AND ($6::text IS NULL OR r.id = $6 OR r.idempotency_key = $6)
  AND ($7::text IS NULL OR r.id < $7)
  AND ($8::integer IS NULL OR r.version = $8)
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

-- claim_batch --
-- Claim up to $2 due jobs of the given queues at once, with their runs locked and read
-- (claim_batch_v1); the results are not read for the jobs in $3 (the worker knows them).
SELECT * FROM __SCHEMA__.claim_batch_v1($1::text[], $2, $3::bigint[]);

-- run_results_many --
-- The results of several runs' completed nodes, each as one JSON object.
SELECT x.id AS run_id, __SCHEMA__.run_results_v1(x.id)::text AS results
FROM unnest($1::text[]) AS x(id);

-- relock --
-- Re-lock a job and its run as this worker left them (relock_v1). Sent after COMMIT and
-- BEGIN in one simple-protocol message, so no parameters: the two %d are the job id and
-- the transaction id that wrote the run.
SELECT __SCHEMA__.relock_v1(%d, '%d'::xid);

-- lock_job --
-- Lock job %d again, sent in one simple-protocol message with the ROLLBACK of the
-- transaction that failed on it and the next BEGIN: in between it is free and due, and
-- another slot would run its work again before this one records the failure.
SELECT 1 FROM __SCHEMA__.jobs WHERE id = %d FOR UPDATE SKIP LOCKED;

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
-- Put a signal in a run's mailbox (once per dedupe key) and wake the run if it waits for it.
SELECT __SCHEMA__.signal_v2($1, $2, $3, $4);

-- record_signal --
-- Put a signal in the mailbox of the run whose handler sends it (that run is not waiting:
-- it runs this handler), once per dedupe key.
INSERT INTO __SCHEMA__.signals (run_id, name, payload, dedupe_key) VALUES ($1, $2, $3::jsonb, $4)
ON CONFLICT (run_id, dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING;

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

-- ensure_partitions --
-- Make the history tables' month partitions for this month (by the real clock, which makes
-- run ids) and the $1 after it; those made.
SELECT __SCHEMA__.ensure_partitions_v1(clock_timestamp(), $1);

-- history_partitions --
-- The history tables' partitions, oldest first: name, range of run ids, estimated runs.
SELECT name, lo, hi, runs FROM __SCHEMA__.history_partitions_v1();

-- history_blocker --
-- Why a history partition cannot be dropped with a retention of $2 seconds (NULL: it can).
SELECT __SCHEMA__.history_blocker_v1($1, $2);

-- drop_history_partition --
-- Drop a history partition whole, unless something keeps it (then the reason).
SELECT __SCHEMA__.drop_history_partition_v1($1, $2);

-- detached_history --
-- Tables of history partitions detached and not dropped yet.
SELECT __SCHEMA__.detached_history_v1();

-- drop_detached_history --
-- Drop one of those tables (false if it is not one).
SELECT __SCHEMA__.drop_detached_history_v1($1);

-- history_lock_timeout --
-- How long a drop of a history partition waits for its locks, in this transaction.
SELECT set_config('lock_timeout', $1, true);

-- forget_keys --
-- Delete up to $3 run_keys rows of runs gone from the id range $1 to $2; how many.
SELECT __SCHEMA__.forget_keys_v1($1, $2, $3);

-- reschedule_job --
-- Make a held job due again after a delay, with a new payload.
UPDATE __SCHEMA__.jobs
SET run_at = __SCHEMA__.now_v1() + make_interval(secs => $2), payload = $3::jsonb,
    lease_token = NULL
WHERE id = $1;

-- db_now --
-- The database clock (shifted when a test harness shifts it).
SELECT __SCHEMA__.now_v1();

-- unserved_runs --
-- Unfinished runs of these workflows pinned to a queue this worker does not serve, by queue,
-- with the shape recorded for it. (Unfinished by status, which an index covers.)
SELECT r.workflow, r.version, r.queue, count(*) AS runs,
       (SELECT s.shape::text FROM __SCHEMA__.shapes s WHERE s.queue = r.queue) AS shape
FROM __SCHEMA__.runs r
WHERE r.status IN ('pending', 'running', 'waiting', 'compensating')
  AND r.workflow = ANY ($1::text[]) AND NOT (r.queue = ANY ($2::text[]))
GROUP BY r.workflow, r.version, r.queue
ORDER BY r.workflow, r.version, r.queue;

-- check_runs --
-- Every unfinished run by queue: how many, the ids of those of a queue not in $1, and the
-- shape recorded for the queue.
SELECT r.workflow, r.version, r.queue, count(*) AS runs,
       CASE WHEN r.queue = ANY ($1::text[]) THEN ARRAY[]::text[]
            ELSE array_agg(r.id ORDER BY r.id) END AS ids,
       (SELECT s.shape::text FROM __SCHEMA__.shapes s WHERE s.queue = r.queue) AS shape
FROM __SCHEMA__.runs r
WHERE r.status IN ('pending', 'running', 'waiting', 'compensating')
GROUP BY r.workflow, r.version, r.queue
ORDER BY r.workflow, r.version, r.queue;

-- upgrade_candidates --
-- Unfinished runs of workflow $1 at version $2 that are not on queue $3, oldest first.
SELECT r.id FROM __SCHEMA__.runs r
WHERE r.status IN ('pending', 'running', 'waiting', 'compensating')
  AND r.workflow = $1 AND r.version = $2 AND r.queue <> $3
ORDER BY r.id;

-- lock_for_upgrade --
-- Lock a run for an upgrade (advisory lock, jobs, run, its child) and read its position.
SELECT * FROM __SCHEMA__.lock_for_upgrade_v1($1);

-- upgrade_run --
-- Move a locked run to another queue (version or shape) at a new cursor, with its jobs.
SELECT __SCHEMA__.upgrade_run_v1($1, $2, $3, $4);

-- run_status --
-- The status of a run (None when it does not exist).
SELECT status FROM __SCHEMA__.runs WHERE id = $1;

-- run_queue --
-- The queue (workflow and shape) of a run and whether it finished, or nothing.
SELECT queue, finished_at IS NOT NULL AS finished FROM __SCHEMA__.runs WHERE id = $1;

-- note_journal --
-- Say on a completed node's journal row how it completed (a wait that used its default).
UPDATE __SCHEMA__.journal SET error = $3 WHERE run_id = $1 AND key = $2;

-- pause_run --
-- Pause a run (NULL: no such run; false: finished or paused already).
SELECT __SCHEMA__.pause_run_v1($1);

-- resume_run --
-- Resume a paused run (NULL: no such run; false: it was not paused).
SELECT __SCHEMA__.resume_run_v1($1);

-- fork_run --
-- Fork a run from a node, with another input or its own; the new id (NULL: no such run).
SELECT __SCHEMA__.fork_run_v1($1, $2, $3, $4);

-- custom_plans --
-- Plan the next statements of this transaction for their parameters (filters that are
-- NULL or set choose different indexes).
SET LOCAL plan_cache_mode = force_custom_plan;

-- bulk_cancel --
-- Cancel runs $1, each with its children; the ids of those cancelled.
SELECT id FROM unnest($1::text[]) AS id WHERE __SCHEMA__.cancel_tree_v1(id, $2);

-- bulk_retry --
-- Retry failed runs $1; the ids of those retried.
SELECT id FROM unnest($1::text[]) AS id WHERE __SCHEMA__.retry_run_v1(id);

-- bulk_candidates --
-- Up to $3 ids (descending, below $7) of runs with a status in $8 that match the filters of
-- list_runs, for a bulk cancel or retry.
SELECT r.id FROM __SCHEMA__.runs r
WHERE r.status = ANY ($8::text[])
  AND ($1::text IS NULL OR r.status = $1) AND ($2::text IS NULL OR r.workflow = $2)
  AND ($4::timestamptz IS NULL OR r.created_at >= $4)
  AND ($5::timestamptz IS NULL OR r.created_at < $5)
  AND ($6::text IS NULL OR r.id = $6 OR r.idempotency_key = $6)
  AND ($7::text IS NULL OR r.id < $7)
ORDER BY r.id DESC
LIMIT $3;

-- worker_beat --
-- A running worker says it is alive, with what it is doing (the workers registry).
INSERT INTO __SCHEMA__.workers AS w
    (name, host, pid, workflows, concurrency, in_flight, processed, interval_seconds)
VALUES ($1, $2, $3, $4::text[], $5, $6, $7, $8)
ON CONFLICT (name) DO UPDATE
SET in_flight = EXCLUDED.in_flight, processed = EXCLUDED.processed,
    heartbeat_at = __SCHEMA__.now_v1();

-- worker_gone --
-- A worker stopped; rows of workers dead for a day go too.
DELETE FROM __SCHEMA__.workers
WHERE name = $1 OR heartbeat_at < __SCHEMA__.now_v1() - interval '1 day';

-- list_workers --
-- Registered workers, with the age of their last heartbeat and whether it is recent
-- (within three heartbeat intervals).
SELECT name, host, pid, workflows, concurrency, in_flight, processed, started_at,
       heartbeat_at, interval_seconds,
       extract(epoch FROM __SCHEMA__.now_v1() - heartbeat_at)::float8 AS heartbeat_age,
       heartbeat_at > __SCHEMA__.now_v1() - make_interval(secs => 3 * interval_seconds) AS alive
FROM __SCHEMA__.workers
ORDER BY started_at, name;

-- run_mailbox --
-- A run's signals, oldest first, with the node that consumed each.
SELECT id, name, payload::text AS payload, created_at, consumed_by, consumed_at
FROM __SCHEMA__.signals
WHERE run_id = $1
ORDER BY id;

-- run_relatives --
-- A run's parent and children, and the run it was forked from: id, workflow, status.
SELECT 'parent' AS relation, p.id, p.workflow, p.status
FROM __SCHEMA__.runs r JOIN __SCHEMA__.runs p ON p.id = r.parent_id
WHERE r.id = $1
UNION ALL
SELECT 'forked_from', f.id, f.workflow, f.status
FROM __SCHEMA__.runs r JOIN __SCHEMA__.runs f ON f.id = r.forked_from
WHERE r.id = $1
UNION ALL
(SELECT 'child', c.id, c.workflow, c.status
 FROM __SCHEMA__.runs c WHERE c.parent_id = $1 ORDER BY c.id LIMIT 500);

-- workflow_counts --
-- How many runs each workflow has in each status.
SELECT workflow, status, count(*)::bigint AS runs
FROM __SCHEMA__.runs
GROUP BY workflow, status
ORDER BY workflow, status;

-- workflow_shapes --
-- The shapes (queues) recorded for each workflow, first recorded first.
SELECT workflow, queue, shape::text AS shape, recorded_at
FROM __SCHEMA__.shapes
ORDER BY workflow, recorded_at;

-- throughput --
-- Runs finished per minute over the last $1 minutes, by workflow and final status.
SELECT date_trunc('minute', finished_at) AS minute, workflow, status, count(*)::bigint AS runs
FROM __SCHEMA__.runs
WHERE finished_at > __SCHEMA__.now_v1() - make_interval(mins => $1)
GROUP BY 1, 2, 3
ORDER BY 1;

-- queue_stats --
-- Due jobs by queue and the age of the oldest due job (not leased), in seconds.
SELECT queue, count(*)::bigint AS due,
       extract(epoch FROM __SCHEMA__.now_v1() - min(run_at))::float8 AS oldest_age
FROM __SCHEMA__.jobs
WHERE run_at <= __SCHEMA__.now_v1() AND lease_token IS NULL
GROUP BY queue
ORDER BY queue;

-- run_shape --
-- The recorded shape of the queue a run is pinned to.
SELECT s.shape::text FROM __SCHEMA__.shapes s
JOIN __SCHEMA__.runs r ON r.queue = s.queue
WHERE r.id = $1;

-- doctor_stranded --
-- Unfinished, unpaused runs that have no job and no recorded reason to wait for none (a
-- signal without a timeout, an unfinished child, branches all committed, a slot of its
-- workflow's bound while all are held): the invariant ensure_jobs_v1 keeps, checked from
-- the outside. Up to $1 of them, and how many.
WITH stranded AS (
    SELECT r.id, r.workflow, r.status, r.current_node, r.updated_at
    FROM __SCHEMA__.runs r
    WHERE r.finished_at IS NULL AND r.paused_at IS NULL AND r.queue <> ''
      AND NOT EXISTS (SELECT 1 FROM __SCHEMA__.jobs j WHERE j.run_id = r.id)
      AND NOT coalesce(
          r.slot = 'queued' AND r.status <> 'compensating'
          AND __SCHEMA__.slots_held_v1(r.workflow, r.concurrency_key) >= r.concurrency,
          false
      )
      AND NOT (
          r.status <> 'compensating'
          AND NOT EXISTS (SELECT 1 FROM __SCHEMA__.cancel_requests q WHERE q.run_id = r.id)
          AND (
              (r.branches IS NOT NULL AND NOT EXISTS (
                  SELECT 1 FROM unnest(r.branches) AS b
                  WHERE NOT EXISTS (
                      SELECT 1 FROM __SCHEMA__.journal e
                      WHERE e.run_id = r.id AND e.key = r.current_node || '#' || b
                        AND e.status = 'completed')))
              OR (r.branches IS NULL AND r.child_id IS NOT NULL AND EXISTS (
                  SELECT 1 FROM __SCHEMA__.runs c
                  WHERE c.id = r.child_id AND c.finished_at IS NULL))
              OR (r.branches IS NULL AND r.child_id IS NULL AND r.waiting_for IS NOT NULL
                  AND r.wake_at IS NULL AND NOT EXISTS (
                      SELECT 1 FROM __SCHEMA__.signals s
                      WHERE s.run_id = r.id AND s.name = r.waiting_for
                        AND s.consumed_at IS NULL))
          )
      )
)
SELECT id, workflow, status, current_node, updated_at, count(*) OVER () AS total
FROM stranded
ORDER BY updated_at
LIMIT $1;

-- doctor_oldest_due --
-- The oldest job due now that no lease holds: its queue and age in seconds.
SELECT queue, task, run_id,
       extract(epoch FROM __SCHEMA__.now_v1() - run_at)::float8 AS age
FROM __SCHEMA__.jobs
WHERE run_at <= __SCHEMA__.now_v1() AND lease_token IS NULL
ORDER BY run_at
LIMIT 1;

-- doctor_transactions --
-- Transactions of this database open longer than $1 seconds that hold back the xmin
-- horizon (vacuum cannot remove rows they may still see), prepared ones included.
SELECT pid::text AS who, state, application_name,
       extract(epoch FROM clock_timestamp() - xact_start)::float8 AS age,
       left(regexp_replace(query, '\s+', ' ', 'g'), 80) AS query
FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND xact_start < clock_timestamp() - make_interval(secs => $1)
  AND (backend_xmin IS NOT NULL OR backend_xid IS NOT NULL)
UNION ALL
SELECT 'prepared ' || gid, 'prepared', owner::text,
       extract(epoch FROM clock_timestamp() - prepared)::float8, ''
FROM pg_prepared_xacts
WHERE database = current_database()
  AND prepared < clock_timestamp() - make_interval(secs => $1)
ORDER BY 4 DESC;

-- doctor_tables --
-- Size, live and dead rows of durable's tables and the size of their indexes.
SELECT c.relname AS name, s.n_live_tup AS live, s.n_dead_tup AS dead,
       pg_table_size(c.oid) AS table_bytes, pg_indexes_size(c.oid) AS index_bytes,
       s.last_autovacuum, s.last_vacuum
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_stat_all_tables s ON s.relid = c.oid
WHERE n.nspname = $1 AND c.relkind = 'r'
ORDER BY c.relname;

-- doctor_listeners --
-- The notification queue's use (a listener that stopped reading fills it), the sessions
-- that LISTEN, and idle workers whose listener registration is stale.
SELECT pg_notification_queue_usage()::float8 AS queue_usage,
       (SELECT count(*) FROM pg_stat_activity
        WHERE datname = current_database() AND query ILIKE 'LISTEN%') AS listening,
       (SELECT count(*) FROM __SCHEMA__.listeners
        WHERE seen_at < __SCHEMA__.now_v1() - interval '5 minutes') AS stale_listeners;

-- doctor_stale_workers --
-- Registered workers whose heartbeat is older than three intervals.
SELECT name, host, pid,
       extract(epoch FROM __SCHEMA__.now_v1() - heartbeat_at)::float8 AS age
FROM __SCHEMA__.workers
WHERE heartbeat_at < __SCHEMA__.now_v1() - make_interval(secs => 3 * interval_seconds)
ORDER BY heartbeat_at;

-- doctor_queues --
-- Every queue a job or a recorded shape names (what a worker could claim from).
SELECT DISTINCT queue FROM __SCHEMA__.jobs
UNION SELECT queue FROM __SCHEMA__.shapes
ORDER BY 1;

-- doctor_job_rows --
-- The planner's estimate of the job table's rows.
SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass('__SCHEMA__.jobs');

-- doctor_partitions --
-- This month and the $1 after it, by the real clock (which makes run ids): the month's
-- name (`yYYYYmMM`), how many months ahead it is, the history tables none of whose
-- partitions holds its run ids (its runs would go to their DEFAULT partitions), and
-- whether runs' DEFAULT partition holds runs of it already (then ensure_partitions_v1
-- cannot make the month: attaching it would have to move them).
WITH months AS (
    SELECT i AS ahead, to_char(m, '"y"YYYY"m"MM') AS name,
           __SCHEMA__.ulid_prefix_v1(m AT TIME ZONE 'UTC') AS lo,
           __SCHEMA__.ulid_prefix_v1((m + interval '1 month') AT TIME ZONE 'UTC') AS hi
    FROM generate_series(0, $1) AS i,
         LATERAL (SELECT date_trunc('month', clock_timestamp() AT TIME ZONE 'UTC')
                         + make_interval(months => i) AS m) AS x
), bounds AS (
    SELECT t.relname::text AS tab, b[1] AS lo, b[2] AS hi
    FROM pg_inherits i
    JOIN pg_class t ON t.oid = i.inhparent
    JOIN pg_class c ON c.oid = i.inhrelid,
    LATERAL regexp_match(
        pg_get_expr(c.relpartbound, c.oid),
        $re$^FOR VALUES FROM \((?:'([^']*)'|MINVALUE)\) TO \('([^']*)'\)$re$
    ) AS b
    WHERE t.relnamespace = '__SCHEMA__'::regnamespace
      AND t.relname IN ('runs', 'journal', 'attempts', 'signals') AND b IS NOT NULL
)
SELECT m.ahead, m.name,
       ARRAY(
           SELECT u.tab
           FROM unnest(ARRAY['runs', 'journal', 'attempts', 'signals']) WITH ORDINALITY
               AS u (tab, n)
           WHERE NOT EXISTS (SELECT 1 FROM bounds b
                             WHERE b.tab = u.tab AND coalesce(b.lo, '') <= m.lo
                               AND b.hi >= m.hi)
           ORDER BY u.n
       ) AS missing,
       EXISTS (SELECT 1 FROM __SCHEMA__.runs_default d WHERE d.id >= m.lo AND d.id < m.hi)
           AS in_default
FROM months m
ORDER BY m.ahead;

-- declare_schedule --
-- Write a schedule as declared in code; a new cron or time zone starts again from the next
-- tick ($9), anything else keeps the row's position. A row already as declared is left alone.
INSERT INTO __SCHEMA__.schedules AS s
    (name, workflow, cron, timezone, input, overlap, catch_up, max_catch_up, next_at)
VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9)
ON CONFLICT (name) DO UPDATE
SET workflow = EXCLUDED.workflow, input = EXCLUDED.input, overlap = EXCLUDED.overlap,
    catch_up = EXCLUDED.catch_up, max_catch_up = EXCLUDED.max_catch_up,
    next_at = CASE WHEN (s.cron, s.timezone) = (EXCLUDED.cron, EXCLUDED.timezone)
                   THEN s.next_at ELSE EXCLUDED.next_at END,
    cron = EXCLUDED.cron, timezone = EXCLUDED.timezone, updated_at = __SCHEMA__.now_v1()
WHERE (s.workflow, s.cron, s.timezone, s.input, s.overlap, s.catch_up, s.max_catch_up)
    IS DISTINCT FROM (EXCLUDED.workflow, EXCLUDED.cron, EXCLUDED.timezone, EXCLUDED.input,
                      EXCLUDED.overlap, EXCLUDED.catch_up, EXCLUDED.max_catch_up);

-- due_schedule --
-- The most overdue of these schedules that no other scheduler holds, locked, with the clock.
SELECT name, cron, timezone, overlap, catch_up, max_catch_up, next_at, last_run_id,
       __SCHEMA__.now_v1() AS now
FROM __SCHEMA__.schedules
WHERE name = ANY ($1::text[]) AND NOT paused AND next_at <= __SCHEMA__.now_v1()
ORDER BY next_at
LIMIT 1
FOR UPDATE SKIP LOCKED;

-- lock_schedule --
-- A schedule locked for a trigger, pause or resume (waits for a scheduler firing it).
SELECT name, cron, timezone, overlap, catch_up, max_catch_up, next_at, last_run_id, paused,
       __SCHEMA__.now_v1() AS now
FROM __SCHEMA__.schedules
WHERE name = $1
FOR UPDATE;

-- schedule_seconds_to_next --
-- Seconds until the first of these schedules is due (NULL if none is active).
SELECT extract(epoch FROM min(next_at) - __SCHEMA__.now_v1())::float8
FROM __SCHEMA__.schedules
WHERE name = ANY ($1::text[]) AND NOT paused;

-- run_active --
-- Whether a run exists and has not finished.
SELECT EXISTS (SELECT 1 FROM __SCHEMA__.runs WHERE id = $1 AND finished_at IS NULL);

-- schedule_started --
-- Remember the run a schedule's tick (or trigger) started.
UPDATE __SCHEMA__.schedules
SET last_tick = $2, last_run_id = $3, updated_at = __SCHEMA__.now_v1()
WHERE name = $1;

-- schedule_advance --
-- Move a schedule past the ticks it handled.
UPDATE __SCHEMA__.schedules SET next_at = $2, updated_at = __SCHEMA__.now_v1() WHERE name = $1;

-- pause_schedule --
-- Pause a schedule; its name if it was running.
UPDATE __SCHEMA__.schedules SET paused = true, updated_at = __SCHEMA__.now_v1()
WHERE name = $1 AND NOT paused
RETURNING name;

-- resume_schedule --
-- Resume a paused schedule from its next tick ($2).
UPDATE __SCHEMA__.schedules SET paused = false, next_at = $2, updated_at = __SCHEMA__.now_v1()
WHERE name = $1 AND paused
RETURNING name;

-- list_schedules --
-- Every schedule with the status of the run it started last.
SELECT s.name, s.workflow, s.cron, s.timezone, s.input::text AS input, s.overlap, s.catch_up,
       s.max_catch_up, s.paused, s.next_at, s.last_tick, s.last_run_id,
       r.status AS last_run_status, s.created_at, s.updated_at
FROM __SCHEMA__.schedules s
LEFT JOIN __SCHEMA__.runs r ON r.id = s.last_run_id
ORDER BY s.name;

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
