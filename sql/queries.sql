-- Every query durable runs, by name. A block starts with `-- name --` and a one-line
-- description; durable/sql.py parses this file once. __SCHEMA__ is the quoted schema name.

-- claim_job --
-- Lock the most urgent due job of the given queues, skipping jobs other workers hold.
SELECT id, queue, task, run_id, payload::text AS payload, priority, attempts, lease_token
FROM __SCHEMA__.jobs
WHERE run_at <= now() AND queue = ANY($1::text[])
ORDER BY priority DESC, run_at, id
LIMIT 1
FOR UPDATE SKIP LOCKED;

-- claim_job_by_id --
-- Lock one known job if it is due and free (a worker continuing a run it just advanced).
SELECT id, queue, task, run_id, payload::text AS payload, priority, attempts, lease_token
FROM __SCHEMA__.jobs
WHERE id = $1 AND run_at <= now()
FOR UPDATE SKIP LOCKED;

-- next_due --
-- Seconds from the database clock until the next job of the given queues is due.
SELECT EXTRACT(EPOCH FROM (min(run_at) - clock_timestamp()))::float8
FROM __SCHEMA__.jobs
WHERE queue = ANY($1::text[]);

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
SET attempts = attempts + 1, run_at = now() + make_interval(secs => $2), lease_token = NULL
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
