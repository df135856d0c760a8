-- The runtime's functions: how a run's state becomes jobs, how a worker claims one, and one
-- function per transition of a run. Included by sql/schema.sql; an existing database gets
-- this whole file again (CREATE OR REPLACE) after any migration is applied, so a release
-- that changes a function ships a migration (empty if no table changes) to carry it. A
-- function whose contract changes takes a new suffix (`_v2`) so that workers of the old
-- release, still running during a rolling deploy, keep the `_v1` they call.
--
-- Theory of operation. The run row alone says where a run is: its node (`cursor`,
-- `current_node`), the loop `iteration`, the `attempt` of the work at that position, and
-- what it waits for (`wake_at`, `waiting_for`, `child_id`, `branches`). A job says only
-- which run and what kind of work: `advance` (run the node at the run's position),
-- `branch` (one branch of the parallel node there) or `compensate`. Every function that
-- moves a run ends by calling ensure_jobs_v1, which makes the run's jobs exactly what
-- its state needs. Lock order everywhere: a client's advisory lock on the run, then jobs,
-- then the run row; a worker locks its job, then the run.
--
-- Flow control. A run of a workflow with a bound on its active runs counts under its
-- `concurrency_key`: its `slot` is 'held' while it is active, 'queued' while it waits for
-- one (no job), NULL until admitted (an `admit` job, due at `not_before`, takes a slot or
-- queues it). Admissions and releases of one key take its advisory lock (slot_lock_v1), in
-- the transaction that starts, admits or finishes a run, so a bound holds across
-- processes; that lock is taken after the caller's own job and run, and its holder never
-- waits for another run's lock except a queued run's. A named limit's slots and tokens
-- live in `limit_slots` and `limit_tokens` (see sql/schema.sql); a step that gets neither
-- waits with its job at `wake_at` and its run's `limit_wait` set, without an attempt.
--
-- Every function that reads a run's rows says `SET enable_seqscan = off SET jit = off
-- SET plan_cache_mode = force_generic_plan`. Its statements' plans are cached per
-- session, and a plan made while a table looked empty (a fresh install, a new month's
-- partition, or VACUUM ANALYZE after `durable purge`) scans the whole table for each run
-- until autovacuum next analyzes it; the lookups here are by run or job id, for which an
-- index is always right (tests/integration/test_stale_plans.py). `SET jit = off`: a scan
-- with no index to use (the tiny listeners table) then looks so costly to the planner
-- that it would JIT-compile the statement, 150 ms for a sub-millisecond query. And
-- `force_generic_plan`: on the partitioned history tables a generic plan looks as costly
-- as reading every partition (it prunes them only as it runs), so PostgreSQL would plan
-- each statement afresh on every call instead, which more than doubles the server's
-- time per step (docs/guides/scaling.md); the plan is the same for every run anyway.

-- A worker with an idle slot wants to hear of new due jobs (see the listeners table).
CREATE OR REPLACE FUNCTION __SCHEMA__.notify_jobs_v1() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM __SCHEMA__.listeners
        WHERE seen_at > __SCHEMA__.now_v1() - interval '1 minute'
    ) THEN
        PERFORM pg_notify('__SCHEMA_NAME___jobs', '');
    END IF;
END
$$;

-- The results of a run's completed nodes (not branches, iterations, choices or
-- compensations) as one JSON object, or NULL when none completed yet.
-- PL/pgSQL rather than SQL: an aggregate keeps a SQL function from being inlined, and
-- PL/pgSQL keeps its plan for the session instead of planning on every call.
CREATE OR REPLACE FUNCTION __SCHEMA__.run_results_v1(p_run text) RETURNS jsonb
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan STABLE AS $$
BEGIN
    RETURN (
        SELECT jsonb_object_agg(e.key, e.result)
        FROM __SCHEMA__.journal e
        WHERE e.run_id = p_run AND e.status = 'completed'
          AND strpos(e.key, '@') = 0 AND strpos(e.key, '#') = 0
    );
END
$$;

-- What a finished run needs: no job, and no cancel request. Jobs another transaction
-- holds stay (their worker finds the run finished), and so does the lease of a paused run
-- (its holder's to settle). ensure_jobs_v1 decides this for a finished run, and
-- finished_v1, which knows the run just finished, calls it directly: reading the run's
-- state and jobs again there cost about 8% of a one-step run's PostgreSQL CPU
-- (docs/performance.md).
CREATE OR REPLACE FUNCTION __SCHEMA__.drop_jobs_v1(p_run text, p_paused boolean) RETURNS void
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    DELETE FROM __SCHEMA__.jobs WHERE id IN (
        SELECT j.id FROM __SCHEMA__.jobs j
        WHERE j.run_id = p_run AND NOT (p_paused AND j.lease_token IS NOT NULL)
        FOR UPDATE SKIP LOCKED
    );
    DELETE FROM __SCHEMA__.cancel_requests WHERE run_id = p_run;
END
$$;

-- Give run `p_run` exactly the jobs its state needs: none when it is finished or paused
-- (a lease in flight is its holder's to settle), one `compensate` job while it
-- compensates, an `admit` job (due at `not_before`) while a run of a bounded workflow is
-- not admitted, none while it is queued for a slot of its workflow's bound, one `branch`
-- job per uncommitted branch while a parallel node fans out, else one `advance` job, due
-- when the run's state says (its wake time or retry backoff, now when an awaited signal
-- or child is there or a cancel was requested) or none while it waits for a signal, a
-- child or branches. Jobs another
-- transaction holds are left alone: their worker reads the run after that transaction
-- and finds nothing to do. Returns the run's advance or compensate job when it is due
-- now, so that the caller may continue the run on the same worker.
CREATE OR REPLACE FUNCTION __SCHEMA__.ensure_jobs_v1(p_run text) RETURNS bigint
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan
-- Its statements are the same for every run: plan them once per session.
AS $$
DECLARE
    r record;
    v_now timestamptz := __SCHEMA__.now_v1();
    v_task text;
    v_due timestamptz;
    v_job bigint;
    v_run_at timestamptz;
    v_leased boolean;
    v_jobs integer;
    v_one __SCHEMA__.job_v1;
    v_open text[];
BEGIN
    -- The run, whether a cancel is requested, and its jobs as they are (whoever holds
    -- them), in one statement: this runs at the end of every transition.
    SELECT x.id, x.queue, x.status, x.current_node, x.wake_at, x.waiting_for, x.child_id,
           x.branches, x.finished_at IS NOT NULL AS finished,
           x.paused_at IS NOT NULL AS paused, x.priority, x.not_before,
           x.concurrency_key IS NOT NULL AND x.slot IS DISTINCT FROM 'held' AS unadmitted,
           x.slot,
           EXISTS (SELECT 1 FROM __SCHEMA__.cancel_requests c WHERE c.run_id = x.id)
               AS cancel,
           (SELECT array_agg(ROW(j.id, j.task, j.branch, j.run_at, j.lease_token IS NOT NULL)
                             ::__SCHEMA__.job_v1)
              FROM __SCHEMA__.jobs j WHERE j.run_id = x.id) AS jobs
    INTO r FROM __SCHEMA__.runs x WHERE x.id = p_run;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF r.finished THEN
        PERFORM __SCHEMA__.drop_jobs_v1(p_run, r.paused);
        RETURN NULL;
    ELSIF r.paused THEN
        v_task := NULL;  -- an operator paused it: no job until resume_run_v1
    ELSIF r.status = 'compensating' THEN
        v_task := 'compensate';
        v_due := coalesce(r.wake_at, v_now);
        IF r.cancel THEN
            DELETE FROM __SCHEMA__.cancel_requests WHERE run_id = p_run;
        END IF;
    ELSIF r.cancel THEN
        v_task := 'advance';  -- a worker applies the cancel
        v_due := v_now;
    ELSIF r.unadmitted THEN
        -- Not admitted yet: an `admit` job when due; none while queued for a slot.
        IF r.slot IS NULL THEN
            v_task := 'admit';
            v_due := greatest(v_now, r.not_before);
        END IF;
    ELSIF r.branches IS NOT NULL THEN
        v_task := NULL;
        -- the branches that have not committed: one job each
        SELECT array_agg(b) INTO v_open FROM unnest(r.branches) AS b
        WHERE NOT EXISTS (
            SELECT 1 FROM __SCHEMA__.journal e
            WHERE e.run_id = p_run AND e.key = r.current_node || '#' || b
              AND e.status = 'completed'
        );
    ELSIF r.child_id IS NOT NULL THEN
        IF NOT EXISTS (
            SELECT 1 FROM __SCHEMA__.runs c WHERE c.id = r.child_id AND c.finished_at IS NULL
        ) THEN
            v_task := 'advance';
            v_due := v_now;
        END IF;
    ELSIF r.waiting_for IS NOT NULL THEN
        IF EXISTS (
            SELECT 1 FROM __SCHEMA__.signals s
            WHERE s.run_id = p_run AND s.name = r.waiting_for AND s.consumed_at IS NULL
        ) THEN
            v_task := 'advance';
            v_due := v_now;
        ELSIF r.wake_at IS NOT NULL THEN
            v_task := 'advance';
            v_due := r.wake_at;
        END IF;
    ELSE
        v_task := 'advance';
        v_due := greatest(coalesce(r.wake_at, v_now), r.not_before);
    END IF;

    -- The run's jobs against what the state needs.
    v_jobs := coalesce(cardinality(r.jobs), 0);
    IF v_task IS NOT NULL AND v_jobs > 0 THEN
        FOREACH v_one IN ARRAY r.jobs LOOP
            IF v_one.task = v_task AND v_one.branch IS NULL THEN
                v_job := v_one.id;
                v_run_at := v_one.run_at;
                v_leased := v_one.leased;
            END IF;
        END LOOP;
    END IF;
    IF v_jobs > (CASE WHEN v_job IS NULL THEN 0 ELSE 1 END) THEN
        -- Something the state does not need: it goes, unless another transaction holds it.
        DELETE FROM __SCHEMA__.jobs WHERE id IN (
            SELECT j.id FROM __SCHEMA__.jobs j
            WHERE j.run_id = p_run
              AND j.id IS DISTINCT FROM v_job
              AND NOT (j.task = 'branch' AND j.branch = ANY (coalesce(v_open, '{}')))
              AND NOT (r.paused AND j.lease_token IS NOT NULL)
            FOR UPDATE SKIP LOCKED
        );
    END IF;

    IF v_task IS NOT NULL THEN
        IF v_job IS NULL THEN
            INSERT INTO __SCHEMA__.jobs (queue, task, run_id, run_at, priority)
            VALUES (r.queue, v_task, p_run, v_due, r.priority)
            ON CONFLICT (run_id, task, (coalesce(branch, ''))) WHERE run_id IS NOT NULL
            DO NOTHING
            RETURNING id, run_at INTO v_job, v_run_at;
            v_leased := false;
        ELSIF NOT v_leased AND v_run_at IS DISTINCT FROM v_due
              AND (v_run_at > v_now OR v_due > v_now) THEN
            -- A due job stays as it is (no index changes, a HOT update); a lease is its
            -- holder's until it lapses.
            UPDATE __SCHEMA__.jobs SET run_at = v_due
            WHERE id = (
                SELECT j.id FROM __SCHEMA__.jobs j WHERE j.id = v_job FOR UPDATE SKIP LOCKED
            )
            RETURNING run_at INTO v_run_at;
            IF FOUND AND v_due <= v_now THEN
                PERFORM __SCHEMA__.notify_jobs_v1();
            END IF;
        END IF;
        IF v_job IS NOT NULL AND NOT v_leased AND v_run_at <= v_now THEN
            RETURN v_job;
        END IF;
    ELSIF v_open IS NOT NULL THEN
        INSERT INTO __SCHEMA__.jobs (queue, task, run_id, branch, priority)
        SELECT r.queue, 'branch', p_run, b, r.priority FROM unnest(v_open) AS b
        WHERE NOT EXISTS (
            SELECT 1 FROM __SCHEMA__.jobs j
            WHERE j.run_id = p_run AND j.task = 'branch' AND j.branch = b
        )
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END
$$;

-- Claim a job of the workflow engine and read the run it belongs to. `p_job` claims that
-- job (a worker continuing a run; with `p_token`, the holder of its lease); otherwise the
-- most urgent due job of `p_queues`. The run is locked (jobs before runs), except for
-- branch jobs, so that branches of one node run side by side. A run a client is changing (cancel, signal: they hold the run's
-- advisory lock) is left to that client; the job skipped stays locked until this
-- transaction ends, and whoever claims it next finds the run as the client left it. The
-- results mapping is only read when `p_results` is set (a worker continuing a run knows it).
-- Jobs of paused workflows are not claimed, except by the holder of a lease settling it.
CREATE OR REPLACE FUNCTION __SCHEMA__.claim_v1(
    p_queues text[], p_job bigint, p_token uuid, p_results boolean
)
RETURNS TABLE (
    id bigint, queue text, task text, branch text, run_id text, lease_token uuid, workflow text,
    status text, input text, "cursor" integer, current_node text, iteration integer,
    attempt integer, epoch integer, wake_at timestamptz, waiting_for text, child_id text,
    branches text[], error text, parent_id text, ending text, now timestamptz,
    results text, replay text, cancel text, suspicious boolean
)
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    -- The job, and its xmax before this claim locked it (a locking SELECT returns the row
    -- as it was scanned): the transaction that locked it last.
    j record;
    v_found boolean := false;
    v_suspicious boolean;
    -- The clock now, not the transaction's start: a worker's transaction may have begun
    -- before a job that is due by now was even inserted.
    v_now timestamptz := __SCHEMA__.now_v1();
    c refcursor;
BEGIN
    IF p_job IS NULL THEN
        IF EXISTS (SELECT 1 FROM __SCHEMA__.paused_workflows) THEN
            -- A queue is `workflow@shape`: leave out those of paused workflows.
            p_queues := ARRAY(
                SELECT q FROM unnest(p_queues) AS q
                WHERE split_part(q, '@', 1) NOT IN (
                    SELECT w.workflow FROM __SCHEMA__.paused_workflows w
                )
            );
        END IF;
        OPEN c FOR
            SELECT jobs.id, jobs.queue, jobs.task, jobs.branch, jobs.run_id, jobs.lease_token,
                   jobs.xmax AS locker
            FROM __SCHEMA__.jobs
            WHERE run_at <= v_now AND queue = ANY (p_queues)
            ORDER BY priority DESC, run_at, jobs.id
            FOR UPDATE SKIP LOCKED;
        LOOP
            FETCH c INTO j;
            EXIT WHEN NOT FOUND;
            IF j.task = 'branch'
               OR pg_try_advisory_xact_lock_shared(hashtextextended(j.run_id, 0)) THEN
                v_found := true;
                EXIT;
            END IF;
        END LOOP;
        CLOSE c;
    ELSIF p_token IS NOT NULL THEN
        -- The lease holder settles: the job is its own, unless the lease lapsed and another
        -- worker took it over.
        SELECT jobs.id, jobs.queue, jobs.task, jobs.branch, jobs.run_id, jobs.lease_token,
               jobs.xmax AS locker
        INTO j
        FROM __SCHEMA__.jobs
        WHERE jobs.id = p_job AND lease_token = p_token
        FOR UPDATE;
        v_found := FOUND;
    ELSE
        SELECT jobs.id, jobs.queue, jobs.task, jobs.branch, jobs.run_id, jobs.lease_token,
               jobs.xmax AS locker
        INTO j
        FROM __SCHEMA__.jobs
        WHERE jobs.id = p_job AND run_at <= v_now
        FOR UPDATE SKIP LOCKED;
        v_found := FOUND AND (
            j.task = 'branch'
            OR pg_try_advisory_xact_lock_shared(hashtextextended(j.run_id, 0))
        ) AND NOT EXISTS (
            SELECT 1 FROM __SCHEMA__.paused_workflows w
            WHERE w.workflow = split_part(j.queue, '@', 1)
        );
    END IF;
    IF NOT v_found THEN
        RETURN;
    END IF;
    -- Whether the job's last locker aborted: a job whose claimer died mid-job looks so.
    v_suspicious := __SCHEMA__.locker_aborted_v1(j.locker);
    IF j.task <> 'branch' THEN
        -- Locked in a statement of its own: a read in the same statement would see the run
        -- as it was before waiting for its lock.
        PERFORM 1 FROM __SCHEMA__.runs WHERE runs.id = j.run_id FOR NO KEY UPDATE;
        -- The clock again: that lock may have waited for a transaction that moved the run,
        -- and a deadline computed from the earlier reading would come early.
        v_now := __SCHEMA__.now_v1();
    END IF;
    -- The run's history by `j.run_id`, the variable, not `r.id`: partitions of journal and
    -- attempts are then pruned as the statement starts, not opened every one for a
    -- correlated subquery (sql/schema.sql).
    RETURN QUERY
    SELECT j.id, j.queue, j.task, j.branch, j.run_id, j.lease_token, r.workflow, r.status,
           r.input::text, r.cursor, r.current_node, r.iteration,
           CASE WHEN j.task = 'branch' THEN 1 + (
               SELECT count(*)::integer FROM __SCHEMA__.attempts a
               WHERE a.run_id = j.run_id AND a.key = r.current_node || '#' || j.branch
                 AND a.epoch = r.epoch
           ) ELSE r.attempt END,
           r.epoch, r.wake_at, r.waiting_for, r.child_id, r.branches, r.error, r.parent_id,
           r.ending, v_now,
           CASE WHEN p_results THEN __SCHEMA__.run_results_v1(j.run_id)::text END,
           (SELECT e.result::text FROM __SCHEMA__.journal e
             WHERE e.run_id = j.run_id AND e.status = 'completed'
               AND e.key = CASE WHEN j.task = 'branch'
                                THEN r.current_node || '#' || j.branch
                                ELSE r.current_node END),
           (SELECT q.reason FROM __SCHEMA__.cancel_requests q WHERE q.run_id = r.id),
           v_suspicious
    FROM __SCHEMA__.runs r
    WHERE r.id = j.run_id;
    IF NOT FOUND THEN
        -- Its run is gone (jobs have no foreign key to runs, see sql/schema.sql): nothing
        -- can serve the job, which would otherwise head the queue for good.
        DELETE FROM __SCHEMA__.jobs WHERE jobs.id = j.id;
    END IF;
END
$$;

-- Whether transaction `p_xid` (a job's xmax before a claim locked it: its last locker)
-- aborted, as when a worker died mid-job. (PostgreSQL 15 has no xid -> xid8 cast: the epoch
-- comes from the current snapshot, as an xmax is never in the future.)
CREATE OR REPLACE FUNCTION __SCHEMA__.locker_aborted_v1(p_xid xid) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_xid bigint := p_xid::text::bigint;
    v_next bigint;
BEGIN
    IF v_xid < 3 THEN  -- 0: never locked; 1, 2: bootstrap and frozen ids
        RETURN false;
    END IF;
    v_next := pg_snapshot_xmax(pg_current_snapshot())::text::bigint;
    v_xid := (v_next & ~4294967295::bigint) | v_xid;
    IF v_xid >= v_next THEN
        v_xid := v_xid - 4294967296;
    END IF;
    RETURN v_xid > 0 AND pg_xact_status(v_xid::text::xid8) = 'aborted';
END
$$;

-- Claim up to `p_limit` due jobs of `p_queues` at once, of different runs, in the order and
-- with the filters of claim_v1 (served queues, paused workflows, a client holding the run,
-- priorities), and read (and lock) their runs: a worker slot that finds a deep queue runs
-- them one after the other in this transaction and commits them together (group commit).
-- The first job is exactly claim_v1's. More are taken only after a job that is not a
-- branch nor suspicious (a claimer died holding it), from the same walk of the index, and
-- they are never branches (the batch ends at the first one): branches of one node lock
-- their run as they finish, so two batches each holding a branch of two runs could wait
-- for each other; and a job that may kill its worker runs alone. Jobs skipped because
-- their run is a client's or already in the batch, and the branch that ended it, stay
-- locked until this transaction ends, as in claim_v1. Runs are locked in id order (two claims never wait for
-- each other in a circle). `p_known`: jobs whose run's results the worker already holds
-- (its memo), for which the results are not read.
CREATE OR REPLACE FUNCTION __SCHEMA__.claim_batch_v1(
    p_queues text[], p_limit integer, p_known bigint[]
)
RETURNS TABLE (
    id bigint, queue text, task text, branch text, run_id text, lease_token uuid, workflow text,
    status text, input text, "cursor" integer, current_node text, iteration integer,
    attempt integer, epoch integer, wake_at timestamptz, waiting_for text, child_id text,
    branches text[], error text, parent_id text, ending text, now timestamptz,
    results text, replay text, cancel text, suspicious boolean
)
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    j record;
    v_ids bigint[] := '{}';
    v_runs text[] := '{}';
    v_suspicious boolean[] := '{}';
    v_branch bigint;
    v_count integer;
    v_now timestamptz := __SCHEMA__.now_v1();
    c refcursor;
BEGIN
    IF EXISTS (SELECT 1 FROM __SCHEMA__.paused_workflows) THEN
        p_queues := ARRAY(
            SELECT q FROM unnest(p_queues) AS q
            WHERE split_part(q, '@', 1) NOT IN (
                SELECT w.workflow FROM __SCHEMA__.paused_workflows w
            )
        );
    END IF;
    -- One walk of the index: the later jobs are the ones after the first in the same
    -- cursor. A second walk from the head visited again every due job other transactions
    -- hold (SKIP LOCKED reads past them), which with a worker's slots all batching cost
    -- more than the commits the batch saved.
    OPEN c FOR
        SELECT jobs.id, jobs.task, jobs.run_id, jobs.xmax AS locker
        FROM __SCHEMA__.jobs
        WHERE run_at <= v_now AND queue = ANY (p_queues)
        ORDER BY priority DESC, run_at, jobs.id
        FOR UPDATE SKIP LOCKED;
    LOOP
        FETCH c INTO j;
        EXIT WHEN NOT FOUND;
        IF j.task = 'branch'
           OR pg_try_advisory_xact_lock_shared(hashtextextended(j.run_id, 0)) THEN
            v_ids := ARRAY[j.id];
            v_runs := ARRAY[j.run_id];
            v_branch := CASE WHEN j.task = 'branch' THEN j.id END;
            v_suspicious := ARRAY[__SCHEMA__.locker_aborted_v1(j.locker)];
            EXIT;
        END IF;
    END LOOP;
    IF cardinality(v_ids) > 0 AND p_limit > 1 AND v_branch IS NULL AND NOT v_suspicious[1] THEN
        LOOP
            FETCH c INTO j;
            -- A branch ends the batch (it runs alone); the cursor locked it, so it waits
            -- for this batch's commit, as a job of a run already in the batch does.
            EXIT WHEN NOT FOUND OR j.task = 'branch';
            IF j.run_id <> ALL (v_runs)
               AND pg_try_advisory_xact_lock_shared(hashtextextended(j.run_id, 0)) THEN
                v_ids := v_ids || j.id;
                v_runs := v_runs || j.run_id;
                v_suspicious := v_suspicious || __SCHEMA__.locker_aborted_v1(j.locker);
                EXIT WHEN cardinality(v_ids) >= p_limit;
            END IF;
        END LOOP;
    END IF;
    CLOSE c;
    IF cardinality(v_ids) = 0 THEN
        RETURN;
    END IF;
    IF v_branch IS NULL THEN
        -- Locked in a statement of their own, read in the next (see claim_v1).
        PERFORM 1 FROM __SCHEMA__.runs x WHERE x.id = ANY (v_runs) ORDER BY x.id
        FOR NO KEY UPDATE;
        v_now := __SCHEMA__.now_v1();  -- after the lock waits, as in claim_v1
    END IF;
    RETURN QUERY
    SELECT u.job, b.queue, b.task, b.branch, b.run_id, b.lease_token, r.workflow, r.status,
           r.input::text, r.cursor, r.current_node, r.iteration,
           CASE WHEN b.task = 'branch' THEN 1 + (
               SELECT count(*)::integer FROM __SCHEMA__.attempts a
               WHERE a.run_id = r.id AND a.key = r.current_node || '#' || b.branch
                 AND a.epoch = r.epoch
           ) ELSE r.attempt END,
           r.epoch, r.wake_at, r.waiting_for, r.child_id, r.branches, r.error, r.parent_id,
           r.ending, v_now,
           CASE WHEN u.job <> ALL (coalesce(p_known, '{}'))
                THEN __SCHEMA__.run_results_v1(r.id)::text END,
           (SELECT e.result::text FROM __SCHEMA__.journal e
             WHERE e.run_id = r.id AND e.status = 'completed'
               AND e.key = CASE WHEN b.task = 'branch'
                                THEN r.current_node || '#' || b.branch
                                ELSE r.current_node END),
           (SELECT q.reason FROM __SCHEMA__.cancel_requests q WHERE q.run_id = r.id),
           u.suspicious
    FROM unnest(v_ids, v_suspicious) WITH ORDINALITY AS u(job, suspicious, ord)
    JOIN __SCHEMA__.jobs b ON b.id = u.job
    JOIN __SCHEMA__.runs r ON r.id = b.run_id
    ORDER BY u.ord;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    IF v_count < cardinality(v_ids) THEN
        -- Jobs whose run is gone, as in claim_v1.
        DELETE FROM __SCHEMA__.jobs b WHERE b.id = ANY (v_ids)
          AND NOT EXISTS (SELECT 1 FROM __SCHEMA__.runs r WHERE r.id = b.run_id);
    END IF;
END
$$;

-- The version a queue pins its runs to: `order@v2@<digest>` is version 2, and a queue
-- without a version (`order@<digest>`, as queues were before versions) is version 1.
-- Workflow names cannot hold '@', so the name never reads as a version.
CREATE OR REPLACE FUNCTION __SCHEMA__.queue_version_v1(p_queue text) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce((regexp_match(p_queue, '@v([0-9]+)@[^@]*$'))[1]::integer, 1)
$$;

-- The lock that serialises admissions to the bound of workflow `p_workflow`, key `p_key`
-- (the two-key advisory space, apart from the runs' one-key locks), for this transaction.
CREATE OR REPLACE FUNCTION __SCHEMA__.slot_lock_v1(p_workflow text, p_key text) RETURNS void
LANGUAGE sql AS $$
    SELECT pg_advisory_xact_lock(hashtext('durable.slot'), hashtext(p_workflow || chr(31) || p_key))
$$;

-- How many runs of workflow `p_workflow` hold a slot of key `p_key` (take the key's lock first).
CREATE OR REPLACE FUNCTION __SCHEMA__.slots_held_v1(p_workflow text, p_key text)
RETURNS integer
LANGUAGE sql STABLE SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan AS $$
    SELECT count(*)::integer FROM __SCHEMA__.runs
    WHERE workflow = p_workflow AND concurrency_key = p_key AND slot = 'held'
      AND finished_at IS NULL
$$;

-- Create a run and its first job, as start_run_v1, with flow control: `p_priority` for all
-- its jobs; its first node due `p_delay` seconds from now or at `p_start_at`; a slot of
-- its workflow's bound `p_concurrency` for key `p_concurrency_key` (taken now when the run
-- is due now, else by its `admit` job when it is); the id of the active run holding
-- singleton key `p_singleton`; with debounce key `p_debounce`, the id of the newest
-- pending run of that key, which takes this input and becomes due `p_debounce_seconds`
-- from now but no later than `p_debounce_max` seconds after its first start, unless a
-- worker holds it (its window closed as it was claimed): then a new run.
CREATE OR REPLACE FUNCTION __SCHEMA__.start_run_v2(
    p_id text, p_workflow text, p_queue text, p_input text, p_node text, p_key text,
    p_parent text, p_parent_node text, p_priority integer, p_delay float8,
    p_start_at timestamptz, p_concurrency_key text, p_concurrency integer,
    p_singleton text, p_debounce text, p_debounce_seconds float8, p_debounce_max float8
) RETURNS text
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_now timestamptz := __SCHEMA__.now_v1();
    v_id text;
    v_same boolean;
    v_not_before timestamptz := coalesce(v_now + make_interval(secs => p_delay), p_start_at);
    v_slot text;
    v_job bigint;
BEGIN
    IF p_debounce IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(
            hashtext('durable.debounce'), hashtext(p_workflow || chr(31) || p_debounce)
        );
        SELECT r.id INTO v_id FROM __SCHEMA__.runs r
        WHERE r.workflow = p_workflow AND r.debounce_key = p_debounce AND r.status = 'pending'
        ORDER BY r.created_at DESC
        LIMIT 1;
        IF v_id IS NOT NULL THEN
            -- Jobs before runs: its job (if it has one: none while queued for a slot) must
            -- be free, or a worker is starting it.
            SELECT j.id INTO v_job FROM __SCHEMA__.jobs j WHERE j.run_id = v_id
            FOR UPDATE SKIP LOCKED;
            IF v_job IS NOT NULL
               OR NOT EXISTS (SELECT 1 FROM __SCHEMA__.jobs j WHERE j.run_id = v_id) THEN
                UPDATE __SCHEMA__.runs
                SET input = p_input::jsonb, updated_at = v_now,
                    not_before = least(
                        v_now + make_interval(secs => p_debounce_seconds),
                        created_at + make_interval(secs => p_debounce_max)
                    )
                WHERE id = (
                    SELECT id FROM __SCHEMA__.runs
                    WHERE id = v_id AND status = 'pending'
                    FOR NO KEY UPDATE SKIP LOCKED
                );
                IF FOUND THEN
                    PERFORM __SCHEMA__.ensure_jobs_v1(v_id);
                    RETURN v_id;
                END IF;
            END IF;
        END IF;
        v_not_before := least(
            v_now + make_interval(secs => p_debounce_seconds),
            v_now + make_interval(secs => p_debounce_max)
        );
    END IF;
    IF p_concurrency_key IS NOT NULL AND (v_not_before IS NULL OR v_not_before <= v_now) THEN
        -- Due now: admitted now, or queued behind the runs that hold the key's slots.
        PERFORM __SCHEMA__.slot_lock_v1(p_workflow, p_concurrency_key);
        v_slot := CASE
            WHEN __SCHEMA__.slots_held_v1(p_workflow, p_concurrency_key) < p_concurrency
            THEN 'held' ELSE 'queued' END;
    END IF;
    IF p_key IS NULL AND p_singleton IS NULL THEN
        -- No key another run may hold: a plain insert (cheaper than a speculative one).
        INSERT INTO __SCHEMA__.runs
            (id, workflow, queue, version, input, current_node, parent_id, parent_node,
             priority, not_before, concurrency_key, concurrency, slot, debounce_key)
        VALUES (p_id, p_workflow, p_queue, __SCHEMA__.queue_version_v1(p_queue),
                p_input::jsonb, p_node, p_parent, p_parent_node, coalesce(p_priority, 0),
                v_not_before, p_concurrency_key, p_concurrency, v_slot, p_debounce);
        PERFORM __SCHEMA__.ensure_jobs_v1(p_id);
        RETURN p_id;
    END IF;
    -- The keys live in run_keys (see sql/schema.sql): the idempotency key first, as a run
    -- that holds it is the answer even when another holds the singleton key.
    IF p_key IS NOT NULL THEN
        v_id := __SCHEMA__.take_key_v1('idempotency', p_workflow, p_key, p_id);
        IF v_id <> p_id THEN
            SELECT input = p_input::jsonb INTO v_same FROM __SCHEMA__.runs WHERE id = v_id;
            IF NOT v_same THEN
                RAISE EXCEPTION 'durable: idempotency key % of workflow % already names run %, '
                    'started with another input; use a new key for a new request',
                    quote_literal(p_key), quote_literal(p_workflow), v_id
                    USING ERRCODE = 'DU003', DETAIL = v_id;
            END IF;
            RETURN v_id;
        END IF;
    END IF;
    IF p_singleton IS NOT NULL THEN
        v_id := __SCHEMA__.take_key_v1('singleton', p_workflow, p_singleton, p_id);
        IF v_id <> p_id THEN
            -- The active run of the key: the idempotency key taken above is then left
            -- naming no run, which take_key_v1 treats as free.
            RETURN v_id;
        END IF;
    END IF;
    INSERT INTO __SCHEMA__.runs
        (id, workflow, queue, version, input, current_node, idempotency_key, parent_id,
         parent_node, priority, not_before, concurrency_key, concurrency, slot,
         singleton_key, debounce_key)
    VALUES (p_id, p_workflow, p_queue, __SCHEMA__.queue_version_v1(p_queue),
            p_input::jsonb, p_node, p_key, p_parent, p_parent_node, coalesce(p_priority, 0),
            v_not_before, p_concurrency_key, p_concurrency, v_slot, p_singleton, p_debounce);
    PERFORM __SCHEMA__.ensure_jobs_v1(p_id);
    RETURN p_id;
END
$$;

-- Take key `p_key` of kind `p_kind` ('idempotency' or 'singleton') of workflow `p_workflow`
-- for run `p_run` (about to be created in this transaction); the run that holds it
-- afterwards: `p_run`, or the run that held it. A key whose run is gone (purged, or its
-- month of history dropped) or, for a singleton key, finished, is taken over. A start
-- that waits here for another transaction holding the key sees its run once it commits.
CREATE OR REPLACE FUNCTION __SCHEMA__.take_key_v1(
    p_kind text, p_workflow text, p_key text, p_run text
) RETURNS text
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_holder text;
BEGIN
    FOR i IN 1..10 LOOP
        INSERT INTO __SCHEMA__.run_keys (kind, workflow, key, run_id)
        VALUES (p_kind, p_workflow, p_key, p_run)
        ON CONFLICT DO NOTHING;
        IF FOUND THEN
            RETURN p_run;
        END IF;
        SELECT k.run_id INTO v_holder FROM __SCHEMA__.run_keys k
        WHERE k.kind = p_kind AND k.workflow = p_workflow AND k.key = p_key;
        CONTINUE WHEN NOT FOUND;  -- deleted meanwhile: insert again
        IF v_holder = p_run OR EXISTS (
            SELECT 1 FROM __SCHEMA__.runs r
            WHERE r.id = v_holder AND (p_kind = 'idempotency' OR r.finished_at IS NULL)
        ) THEN
            RETURN v_holder;
        END IF;
        UPDATE __SCHEMA__.run_keys SET run_id = p_run
        WHERE kind = p_kind AND workflow = p_workflow AND key = p_key AND run_id = v_holder;
        IF FOUND THEN
            RETURN p_run;
        END IF;
        -- Another start took it over first: look again.
    END LOOP;
    RAISE EXCEPTION 'durable: the % key % of workflow % could not be taken', p_kind,
        quote_literal(p_key), quote_literal(p_workflow) USING ERRCODE = 'unique_violation';
END
$$;

-- Create a run and its first job; the id of the run that holds the idempotency key when
-- it is taken with the same input (the caller compares it with `p_id`); DU003 when that
-- run was started with another input (durable.db.translate makes it IdempotencyConflict).
-- (The start of releases before flow control.)
CREATE OR REPLACE FUNCTION __SCHEMA__.start_run_v1(
    p_id text, p_workflow text, p_queue text, p_input text, p_node text, p_key text,
    p_parent text, p_parent_node text
) RETURNS text
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    RETURN __SCHEMA__.start_run_v2(
        p_id, p_workflow, p_queue, p_input, p_node, p_key, p_parent, p_parent_node,
        0, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
    );
END
$$;

-- A slot of workflow `p_workflow`'s bound for key `p_key` freed: give it to the queued
-- runs next in line (priority, then FIFO), in this transaction.
CREATE OR REPLACE FUNCTION __SCHEMA__.admit_next_v1(p_workflow text, p_key text)
RETURNS void
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_next text;
    v_bound integer;
BEGIN
    PERFORM __SCHEMA__.slot_lock_v1(p_workflow, p_key);
    LOOP
        -- Waits, rather than skips, for a queued run a client holds (a signal, a debounced
        -- start, a cancel): skipping it could leave it queued by a free slot.
        SELECT r.id, r.concurrency INTO v_next, v_bound FROM __SCHEMA__.runs r
        WHERE r.workflow = p_workflow AND r.concurrency_key = p_key AND r.slot = 'queued'
          AND r.finished_at IS NULL AND r.paused_at IS NULL
        ORDER BY r.priority DESC, r.created_at, r.id
        LIMIT 1
        FOR NO KEY UPDATE;
        EXIT WHEN NOT FOUND OR __SCHEMA__.slots_held_v1(p_workflow, p_key) >= v_bound;
        UPDATE __SCHEMA__.runs SET slot = 'held', updated_at = __SCHEMA__.now_v1()
        WHERE id = v_next;
        PERFORM __SCHEMA__.ensure_jobs_v1(v_next);
    END LOOP;
END
$$;

-- The `admit` job of run `p_run` (this transaction holds it and the run): the run takes a
-- slot of its workflow's bound, or is queued for one. Returns its advance job when due.
CREATE OR REPLACE FUNCTION __SCHEMA__.admit_v1(p_run text) RETURNS bigint
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    r record;
BEGIN
    SELECT workflow, concurrency_key, concurrency, slot, finished_at INTO r
    FROM __SCHEMA__.runs WHERE id = p_run;
    IF FOUND AND r.finished_at IS NULL AND r.concurrency_key IS NOT NULL AND r.slot IS NULL THEN
        PERFORM __SCHEMA__.slot_lock_v1(r.workflow, r.concurrency_key);
        UPDATE __SCHEMA__.runs
        SET slot = CASE
                WHEN __SCHEMA__.slots_held_v1(r.workflow, r.concurrency_key) < r.concurrency
                THEN 'held' ELSE 'queued' END,
            updated_at = __SCHEMA__.now_v1()
        WHERE id = p_run;
    END IF;
    RETURN __SCHEMA__.ensure_jobs_v1(p_run);
END
$$;

-- What a finished run's transaction owes others: its jobs go, a parent waiting for it
-- gets its job, the slot it held of its workflow's bound goes to the next queued run, and
-- whoever waits for it (Engine.wait) hears of it, with a small result riding along (a
-- notification holds at most 8000 bytes).
CREATE OR REPLACE FUNCTION __SCHEMA__.finished_v1(p_run text) RETURNS void
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_parent text;
    v_queue text;
    v_watched boolean;
    v_result text;
    v_workflow text;
    v_slot_key text;
    v_priority smallint;
    v_singleton text;
    v_paused boolean;
BEGIN
    -- The parent in a statement of its own, by id: a join would open every partition of
    -- runs to find it (sql/schema.sql).
    SELECT watched, CASE WHEN status = 'completed' THEN result::text END, workflow,
           CASE WHEN slot = 'held' THEN concurrency_key END, singleton_key, parent_id,
           paused_at IS NOT NULL
    INTO v_watched, v_result, v_workflow, v_slot_key, v_singleton, v_parent, v_paused
    FROM __SCHEMA__.runs WHERE id = p_run;
    PERFORM __SCHEMA__.drop_jobs_v1(p_run, v_paused);
    IF v_parent IS NOT NULL THEN
        SELECT p.id, p.queue, p.priority INTO v_parent, v_queue, v_priority
        FROM __SCHEMA__.runs p
        WHERE p.id = v_parent AND p.child_id = p_run AND p.finished_at IS NULL
          AND p.paused_at IS NULL;
    END IF;
    IF v_parent IS NOT NULL THEN
        -- Only adds: the parent is not locked here, and whoever holds it re-reads it.
        INSERT INTO __SCHEMA__.jobs (queue, task, run_id, priority)
        VALUES (v_queue, 'advance', v_parent, v_priority)
        ON CONFLICT (run_id, task, (coalesce(branch, ''))) WHERE run_id IS NOT NULL
        DO NOTHING;
    END IF;
    IF v_singleton IS NOT NULL THEN
        DELETE FROM __SCHEMA__.run_keys
        WHERE kind = 'singleton' AND workflow = v_workflow AND key = v_singleton
          AND run_id = p_run;
    END IF;
    IF v_slot_key IS NOT NULL THEN
        PERFORM __SCHEMA__.admit_next_v1(v_workflow, v_slot_key);
    END IF;
    IF v_watched THEN
        PERFORM pg_notify(
            '__SCHEMA_NAME___runs',
            CASE WHEN v_result IS NOT NULL AND octet_length(v_result) < 7900 - octet_length(p_run)
                 THEN p_run || E'\n' || v_result ELSE p_run END
        );
    END IF;
END
$$;

-- Journal node `p_node` as completed (unless it is replayed from the journal), consume
-- the signal it took, and move the run to node `p_cursor` (`p_next`), or finish it.
-- Returns the run's job when it is due at once (`follow`), the transaction that wrote the
-- run row (`written_by`: relock_v1 checks that nobody wrote it since) and the clock.
-- `p_job` is the advance job this transaction claimed due (not as a lease holder, whose job
-- is due when the lease lapses), if it did: a run moving to its next node then needs
-- exactly that job (one advance job per run, due now, locked by us), so the jobs are not
-- looked at again.
CREATE OR REPLACE FUNCTION __SCHEMA__.complete_node_v2(
    p_run text, p_node text, p_result text, p_attempts integer, p_started timestamptz,
    p_replay boolean, p_cursor integer, p_next text, p_consume bigint, p_job bigint,
    OUT follow bigint, OUT written_by xid, OUT clock timestamptz
)
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_now timestamptz := __SCHEMA__.now_v1();
    v_paused boolean;
    v_held boolean;
BEGIN
    clock := v_now;
    IF p_consume IS NOT NULL THEN
        UPDATE __SCHEMA__.signals SET consumed_by = p_node, consumed_at = v_now
        WHERE run_id = p_run AND id = p_consume;
    END IF;
    IF p_next IS NULL THEN
        -- The run's result reads the journal row, so that row goes in first, on its own.
        IF NOT p_replay THEN
            INSERT INTO __SCHEMA__.journal
                (run_id, key, node, status, result, attempts, started_at, finished_at)
            VALUES (p_run, p_node, p_node, 'completed', p_result::jsonb, p_attempts,
                    coalesce(p_started, v_now), v_now);
        END IF;
        UPDATE __SCHEMA__.runs
        SET status = 'completed', result = coalesce(__SCHEMA__.run_results_v1(p_run), '{}'),
            cursor = p_cursor, current_node = NULL, iteration = 0, attempt = 1,
            wake_at = NULL, waiting_for = NULL, child_id = NULL, branches = NULL,
            finished_at = v_now, updated_at = v_now
        WHERE id = p_run;
        PERFORM __SCHEMA__.finished_v1(p_run);
        RETURN;
    END IF;
    -- The journal row and the run's move in one statement: the start of a statement (its
    -- plan's locks, partition pruning, the indexes of the tables it writes) costs more
    -- than either write (docs/performance.md).
    WITH entry AS (
        INSERT INTO __SCHEMA__.journal
            (run_id, key, node, status, result, attempts, started_at, finished_at)
        SELECT p_run, p_node, p_node, 'completed', p_result::jsonb, p_attempts,
               coalesce(p_started, v_now), v_now
        WHERE NOT p_replay
    )
    UPDATE __SCHEMA__.runs
    SET cursor = p_cursor, current_node = p_next, status = 'running', iteration = 0,
        attempt = 1, wake_at = NULL, waiting_for = NULL, child_id = NULL, branches = NULL,
        updated_at = v_now
    WHERE id = p_run
    -- Whether the worker may go on with the run as written (`written_by`, see relock_v1):
    -- not when a cancel was requested, a client waits to take the run (take_run_v1), the next
    -- node has a journal row to replay (a retried run), or the workflow is paused; it then
    -- claims the job afresh, and the claim sees why. Read here, in the statement that
    -- writes the run, not in a statement of relock_v1's after the commit: something that
    -- comes later is seen at the next node's end, as if it had come while that node ran.
    RETURNING xmin, paused_at IS NOT NULL,
        p_job IS NOT NULL AND (
            NOT (pg_try_advisory_lock_shared(hashtext(p_run), 1)
                 AND pg_advisory_unlock_shared(hashtext(p_run), 1))
            OR EXISTS (SELECT 1 FROM __SCHEMA__.cancel_requests c WHERE c.run_id = p_run)
            OR EXISTS (SELECT 1 FROM __SCHEMA__.journal e
                       WHERE e.run_id = p_run AND e.key = p_next)
            OR EXISTS (SELECT 1 FROM __SCHEMA__.paused_workflows w
                       WHERE w.workflow = runs.workflow))
    INTO written_by, v_paused, v_held;
    IF v_paused THEN
        -- An operator paused the run while this node ran: it stops here, without a job.
        follow := __SCHEMA__.ensure_jobs_v1(p_run);
        written_by := NULL;
    ELSE
        follow := coalesce(p_job, __SCHEMA__.ensure_jobs_v1(p_run));
        IF v_held THEN
            written_by := NULL;
        END IF;
    END IF;
END
$$;

-- Re-lock job `p_job` and its run for the worker that just committed `p_written_by`, the
-- transaction that moved the run to its next node: the worker goes on with the run as
-- it wrote it, without reading it back. Sent in one message with that COMMIT and the next
-- BEGIN. Raises DU040 when that is not safe: another worker took the job, a client holds
-- the run, or someone wrote the run row since; the worker then rolls back and claims
-- afresh. What else stops a run there (a cancel request, a client waiting to take the
-- run, a journal row to replay, a paused workflow) complete_node_v2 read as it wrote
-- `p_written_by`.
CREATE OR REPLACE FUNCTION __SCHEMA__.relock_v1(p_job bigint, p_written_by xid) RETURNS void
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_run text;
BEGIN
    SELECT run_id INTO v_run FROM __SCHEMA__.jobs
    WHERE id = p_job AND task = 'advance' AND lease_token IS NULL
      AND run_at <= __SCHEMA__.now_v1()
    FOR UPDATE SKIP LOCKED;
    IF NOT FOUND OR NOT pg_try_advisory_xact_lock_shared(hashtextextended(v_run, 0)) THEN
        RAISE EXCEPTION 'job % is not free to continue', p_job USING ERRCODE = 'DU040';
    END IF;
    -- Locked and checked in one statement: a row version written since (the xmin test) is
    -- not returned, also when the lock waited for its writer, as a locking read re-checks
    -- its conditions on the newest version.
    PERFORM 1 FROM __SCHEMA__.runs WHERE id = v_run AND xmin = p_written_by
    FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % moved since', v_run USING ERRCODE = 'DU040';
    END IF;
END
$$;

-- Record failed attempt `p_attempt` of `p_key`, numbered in the run's current epoch.
CREATE OR REPLACE FUNCTION __SCHEMA__.record_attempt_v1(
    p_run text, p_key text, p_attempt integer, p_error text, p_started timestamptz
) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO __SCHEMA__.attempts (run_id, key, attempt, error, started_at, epoch)
    SELECT p_run, p_key, p_attempt, p_error, coalesce(p_started, __SCHEMA__.now_v1()), epoch
    FROM __SCHEMA__.runs WHERE id = p_run
$$;

-- Record failed attempt `p_attempt` of `p_key` and make the next one due after `p_delay`
-- seconds, counted from the failure. A branch (`p_job`: its job) keeps its own due time
-- on its job; anything else on the run row.
CREATE OR REPLACE FUNCTION __SCHEMA__.retry_node_v1(
    p_run text, p_key text, p_attempt integer, p_error text, p_started timestamptz,
    p_delay float8, p_job bigint
) RETURNS bigint
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    PERFORM __SCHEMA__.record_attempt_v1(p_run, p_key, p_attempt, p_error, p_started);
    IF p_job IS NOT NULL THEN
        UPDATE __SCHEMA__.jobs
        SET run_at = __SCHEMA__.now_v1() + make_interval(secs => p_delay), lease_token = NULL
        WHERE id = p_job;
        RETURN NULL;
    END IF;
    UPDATE __SCHEMA__.runs
    SET attempt = p_attempt + 1, limit_wait = NULL,
        wake_at = __SCHEMA__.now_v1() + make_interval(secs => p_delay),
        status = CASE WHEN status = 'pending' THEN 'running' ELSE status END,
        updated_at = __SCHEMA__.now_v1()
    WHERE id = p_run;
    -- A lapsed lease's job must be claimable at the backoff, not kept as a lease.
    UPDATE __SCHEMA__.jobs SET lease_token = NULL
    WHERE run_id = p_run AND task = 'advance' AND lease_token IS NOT NULL;
    RETURN __SCHEMA__.ensure_jobs_v1(p_run);
END
$$;

-- Node `p_node` failed for good (its last attempt, of key `p_key`, when there was one):
-- journal it as failed and start compensating.
CREATE OR REPLACE FUNCTION __SCHEMA__.fail_node_v1(
    p_run text, p_key text, p_node text, p_attempt integer, p_error text,
    p_started timestamptz
) RETURNS bigint
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    IF p_key IS NOT NULL THEN
        PERFORM __SCHEMA__.record_attempt_v1(p_run, p_key, p_attempt, p_error, p_started);
    END IF;
    INSERT INTO __SCHEMA__.journal (run_id, key, node, status, error, attempts, started_at)
    VALUES (p_run, p_node, p_node, 'failed', p_error, p_attempt,
            coalesce(p_started, __SCHEMA__.now_v1()))
    ON CONFLICT (run_id, key) DO UPDATE
    SET status = 'failed', result = NULL, error = EXCLUDED.error,
        attempts = EXCLUDED.attempts, finished_at = __SCHEMA__.now_v1();
    UPDATE __SCHEMA__.runs
    SET status = 'compensating', ending = 'failed', error = p_error, current_node = p_node,
        attempt = 1, wake_at = NULL, waiting_for = NULL, child_id = NULL, branches = NULL,
        limit_wait = NULL, updated_at = __SCHEMA__.now_v1()
    WHERE id = p_run;
    UPDATE __SCHEMA__.jobs SET lease_token = NULL
    WHERE run_id = p_run AND lease_token IS NOT NULL;
    RETURN __SCHEMA__.ensure_jobs_v1(p_run);
END
$$;

-- Park the run: until `p_wake_at`, for signal `p_signal`, or both (a wait with a timeout).
CREATE OR REPLACE FUNCTION __SCHEMA__.park_v1(
    p_run text, p_wake_at timestamptz, p_signal text
) RETURNS bigint
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    UPDATE __SCHEMA__.runs
    SET status = 'waiting', wake_at = p_wake_at, waiting_for = p_signal,
        updated_at = __SCHEMA__.now_v1()
    WHERE id = p_run;
    RETURN __SCHEMA__.ensure_jobs_v1(p_run);
END
$$;

-- Journal iteration `p_index` of loop `p_node` and move the run to the next one.
CREATE OR REPLACE FUNCTION __SCHEMA__.iterate_v1(
    p_run text, p_node text, p_index integer, p_result text, p_attempts integer,
    p_started timestamptz
) RETURNS bigint
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    INSERT INTO __SCHEMA__.journal (run_id, key, node, status, result, attempts, started_at)
    VALUES (p_run, p_node || '#' || p_index, p_node, 'completed', p_result::jsonb, p_attempts,
            coalesce(p_started, __SCHEMA__.now_v1()));
    UPDATE __SCHEMA__.runs
    SET iteration = p_index + 1, attempt = 1, wake_at = NULL, status = 'running',
        updated_at = __SCHEMA__.now_v1()
    WHERE id = p_run;
    RETURN __SCHEMA__.ensure_jobs_v1(p_run);
END
$$;

-- A parallel node fans out: its branches `p_branches` each get a job.
CREATE OR REPLACE FUNCTION __SCHEMA__.fan_out_v1(p_run text, p_branches text[])
RETURNS bigint
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    UPDATE __SCHEMA__.runs
    SET branches = p_branches, status = 'running', wake_at = NULL,
        updated_at = __SCHEMA__.now_v1()
    WHERE id = p_run;
    RETURN __SCHEMA__.ensure_jobs_v1(p_run);
END
$$;

-- Journal branch `p_branch` of parallel node `p_node` and drop its job; return how many of
-- the node's branches have not committed yet.
CREATE OR REPLACE FUNCTION __SCHEMA__.branch_done_v1(
    p_run text, p_node text, p_branch text, p_result text, p_attempts integer,
    p_started timestamptz, p_job bigint
) RETURNS integer
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_left integer;
BEGIN
    INSERT INTO __SCHEMA__.journal (run_id, key, node, status, result, attempts, started_at)
    VALUES (p_run, p_node || '#' || p_branch, p_node, 'completed', p_result::jsonb,
            p_attempts, coalesce(p_started, __SCHEMA__.now_v1()));
    DELETE FROM __SCHEMA__.jobs WHERE id = p_job;
    SELECT count(*) INTO v_left
    FROM __SCHEMA__.runs r, unnest(r.branches) AS b
    WHERE r.id = p_run AND NOT EXISTS (
        SELECT 1 FROM __SCHEMA__.journal e
        WHERE e.run_id = p_run AND e.key = p_node || '#' || b AND e.status = 'completed'
    );
    UPDATE __SCHEMA__.runs SET updated_at = __SCHEMA__.now_v1() WHERE id = p_run;
    RETURN v_left;
END
$$;

-- Journal the branch a route chose, in a transaction of its own, before the branch runs:
-- a crash in the branch cannot make the choice again.
CREATE OR REPLACE FUNCTION __SCHEMA__.choose_v1(
    p_run text, p_node text, p_branch text, p_attempts integer, p_started timestamptz
) RETURNS bigint
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    INSERT INTO __SCHEMA__.journal (run_id, key, node, status, result, attempts, started_at)
    VALUES (p_run, p_node || '@route', p_node, 'completed', to_jsonb(p_branch), p_attempts,
            coalesce(p_started, __SCHEMA__.now_v1()));
    UPDATE __SCHEMA__.runs
    SET status = 'running', attempt = 1, wake_at = NULL, updated_at = __SCHEMA__.now_v1()
    WHERE id = p_run;
    RETURN __SCHEMA__.ensure_jobs_v1(p_run);
END
$$;

-- Start child run `p_child` of node `p_node` (with the parent's priority, under its
-- workflow's bound `p_concurrency` for key `p_concurrency_key`), journal the marker that
-- names it, and park the parent until the child finishes (the child's final transaction
-- gives it its job).
CREATE OR REPLACE FUNCTION __SCHEMA__.start_child_v2(
    p_run text, p_node text, p_attempts integer, p_child text, p_workflow text,
    p_queue text, p_input text, p_first text, p_concurrency_key text, p_concurrency integer
) RETURNS bigint
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    PERFORM __SCHEMA__.start_run_v2(
        p_child, p_workflow, p_queue, p_input, p_first, NULL, p_run, p_node,
        (SELECT priority FROM __SCHEMA__.runs WHERE id = p_run), NULL, NULL,
        p_concurrency_key, p_concurrency, NULL, NULL, NULL, NULL
    );
    INSERT INTO __SCHEMA__.journal (run_id, key, node, status, result, attempts, started_at)
    VALUES (p_run, p_node || '@child', p_node, 'completed',
            jsonb_build_object('run_id', p_child), p_attempts, __SCHEMA__.now_v1());
    UPDATE __SCHEMA__.runs
    SET status = 'waiting', child_id = p_child, wake_at = NULL,
        updated_at = __SCHEMA__.now_v1()
    WHERE id = p_run;
    RETURN __SCHEMA__.ensure_jobs_v1(p_run);
END
$$;

-- Start child run `p_child` of node `p_node`, journal the marker that names it, and park
-- the parent until the child finishes (the child's final transaction gives it its job).
-- (The child start of releases before flow control.)
CREATE OR REPLACE FUNCTION __SCHEMA__.start_child_v1(
    p_run text, p_node text, p_attempts integer, p_child text, p_workflow text,
    p_queue text, p_input text, p_first text
) RETURNS bigint
LANGUAGE sql AS $$
    SELECT __SCHEMA__.start_child_v2(
        p_run, p_node, p_attempts, p_child, p_workflow, p_queue, p_input, p_first, NULL, NULL
    )
$$;

-- Journal the outcome of one compensator and go on to the next.
CREATE OR REPLACE FUNCTION __SCHEMA__.compensated_v1(
    p_run text, p_key text, p_node text, p_status text, p_result text, p_error text,
    p_attempts integer, p_started timestamptz
) RETURNS bigint
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    INSERT INTO __SCHEMA__.journal
        (run_id, key, node, status, result, error, attempts, started_at)
    VALUES (p_run, p_key, p_node, p_status, p_result::jsonb, p_error, p_attempts,
            coalesce(p_started, __SCHEMA__.now_v1()));
    UPDATE __SCHEMA__.runs
    SET attempt = 1, wake_at = NULL, updated_at = __SCHEMA__.now_v1()
    WHERE id = p_run;
    RETURN __SCHEMA__.ensure_jobs_v1(p_run);
END
$$;

-- End a run as failed or cancelled (its compensation is done).
CREATE OR REPLACE FUNCTION __SCHEMA__.finish_run_v1(p_run text, p_status text, p_error text)
RETURNS void
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    UPDATE __SCHEMA__.runs
    SET status = p_status, current_node = NULL, wake_at = NULL, waiting_for = NULL,
        child_id = NULL, branches = NULL, limit_wait = NULL, finished_at = __SCHEMA__.now_v1(),
        updated_at = __SCHEMA__.now_v1(), error = coalesce(error, p_error)
    WHERE id = p_run;
    PERFORM __SCHEMA__.finished_v1(p_run);
END
$$;

-- Cancel a run whose row this transaction holds: compensate what it did, or end it
-- `cancelled` at once when it did nothing. False when it had finished or was compensating.
CREATE OR REPLACE FUNCTION __SCHEMA__.cancel_run_v1(p_run text, p_reason text)
RETURNS boolean
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    r __SCHEMA__.runs%ROWTYPE;
BEGIN
    SELECT * INTO r FROM __SCHEMA__.runs WHERE id = p_run;
    DELETE FROM __SCHEMA__.cancel_requests WHERE run_id = p_run;
    IF r.id IS NULL OR r.finished_at IS NOT NULL OR r.status = 'compensating' THEN
        PERFORM __SCHEMA__.ensure_jobs_v1(p_run);
        RETURN false;
    END IF;
    IF EXISTS (
        SELECT 1 FROM __SCHEMA__.journal WHERE run_id = p_run AND status = 'completed'
    ) THEN
        UPDATE __SCHEMA__.runs
        SET status = 'compensating', ending = 'cancelled', error = p_reason, attempt = 1,
            wake_at = NULL, waiting_for = NULL, child_id = NULL, branches = NULL,
            paused_at = NULL, limit_wait = NULL, updated_at = __SCHEMA__.now_v1()
        WHERE id = p_run;
        PERFORM __SCHEMA__.ensure_jobs_v1(p_run);
    ELSE
        UPDATE __SCHEMA__.runs
        SET status = 'cancelled', error = p_reason, current_node = NULL, wake_at = NULL,
            waiting_for = NULL, child_id = NULL, branches = NULL, paused_at = NULL,
            limit_wait = NULL, finished_at = __SCHEMA__.now_v1(), updated_at = __SCHEMA__.now_v1()
        WHERE id = p_run;
        PERFORM __SCHEMA__.finished_v1(p_run);
    END IF;
    RETURN true;
END
$$;

-- Take run `p_run` for this transaction against its node in flight: wait for the worker
-- transaction that holds the run's advisory lock (shared, from its claim). While it waits,
-- it holds a session-level lock that complete_node_v2 looks at: a worker running the run's
-- steps one after the other in one transaction (a chain) then commits at the end of the
-- step in flight instead of going on, so a client's cancel, pause, signal or upgrade waits
-- for one node, as without chains. A wait cut short (a statement timeout, a cancelled
-- query) lets go of that lock; a lost session does too, and so does the pool's reset of a
-- connection.
CREATE OR REPLACE FUNCTION __SCHEMA__.take_run_v1(p_run text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF pg_try_advisory_xact_lock(hashtextextended(p_run, 0)) THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_lock(hashtext(p_run), 1);
    BEGIN
        PERFORM pg_advisory_xact_lock(hashtextextended(p_run, 0));
    EXCEPTION WHEN OTHERS OR query_canceled THEN
        PERFORM pg_advisory_unlock(hashtext(p_run), 1);
        RAISE;
    END;
    PERFORM pg_advisory_unlock(hashtext(p_run), 1);
END
$$;

-- Cancel a run and its unfinished children, grandchildren first locked after their
-- parent, all in the caller's transaction: a crash cancels all of them or none. Each run is
-- taken (take_run_v1) from the worker transaction in flight on it (claims of its jobs then
-- leave it alone), then its row is locked. Returns NULL for an unknown run.
CREATE OR REPLACE FUNCTION __SCHEMA__.cancel_tree_v1(p_run text, p_reason text)
RETURNS boolean
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_child text;
    v_done boolean;
BEGIN
    PERFORM __SCHEMA__.take_run_v1(p_run);
    PERFORM 1 FROM __SCHEMA__.runs WHERE id = p_run FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    v_done := __SCHEMA__.cancel_run_v1(p_run, p_reason);
    FOR v_child IN
        SELECT id FROM __SCHEMA__.runs
        WHERE parent_id = p_run AND finished_at IS NULL AND status <> 'compensating'
        ORDER BY id
    LOOP
        PERFORM __SCHEMA__.cancel_tree_v1(v_child, 'parent run ' || p_run || ' was cancelled');
    END LOOP;
    RETURN v_done;
END
$$;

-- Put a signal in a run's mailbox and wake the run if it waits for that name. NULL for an
-- unknown run, false when no wait can ever consume it (finished or compensating). When the
-- run's mailbox already holds a signal with key `p_dedupe` (consumed or not), nothing is
-- recorded and the answer is still true, also once the run has finished: a retried
-- request gets the answer the first one got. A NULL key always records.
CREATE OR REPLACE FUNCTION __SCHEMA__.signal_v2(
    p_run text, p_name text, p_payload text, p_dedupe text
) RETURNS boolean
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_status text;
BEGIN
    PERFORM __SCHEMA__.take_run_v1(p_run);
    SELECT status INTO v_status FROM __SCHEMA__.runs WHERE id = p_run FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF v_status IN ('completed', 'failed', 'cancelled', 'compensating') THEN
        RETURN p_dedupe IS NOT NULL AND EXISTS (
            SELECT 1 FROM __SCHEMA__.signals WHERE run_id = p_run AND dedupe_key = p_dedupe
        );
    END IF;
    INSERT INTO __SCHEMA__.signals (run_id, name, payload, dedupe_key)
    VALUES (p_run, p_name, p_payload::jsonb, p_dedupe)
    ON CONFLICT (run_id, dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING;
    IF FOUND THEN
        PERFORM __SCHEMA__.ensure_jobs_v1(p_run);
    END IF;
    RETURN true;
END
$$;

-- signal_v2 without a dedupe key, kept for workers of an older release during a rolling
-- deploy.
CREATE OR REPLACE FUNCTION __SCHEMA__.signal_v1(p_run text, p_name text, p_payload text)
RETURNS boolean
LANGUAGE sql AS $$
    SELECT __SCHEMA__.signal_v2(p_run, p_name, p_payload, NULL)
$$;

-- Delete runs `p_runs` (finished, chosen by the `purge_candidates` query) with their journal,
-- attempts, mailbox and keys (history rows have no foreign key to cascade: see
-- sql/schema.sql). Jobs before runs: a finished run whose leftover job another
-- transaction holds waits for the next purge. Returns how many runs were deleted.
CREATE OR REPLACE FUNCTION __SCHEMA__.purge_v1(p_runs text[]) RETURNS integer
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_run text;
    v_workflow text;
    v_key text;
    v_count integer := 0;
BEGIN
    FOREACH v_run IN ARRAY p_runs LOOP
        DELETE FROM __SCHEMA__.jobs WHERE id IN (
            SELECT id FROM __SCHEMA__.jobs WHERE run_id = v_run FOR UPDATE SKIP LOCKED
        );
        CONTINUE WHEN EXISTS (SELECT 1 FROM __SCHEMA__.jobs WHERE run_id = v_run);
        DELETE FROM __SCHEMA__.runs WHERE id = (
            SELECT id FROM __SCHEMA__.runs
            WHERE id = v_run AND finished_at IS NOT NULL
            FOR UPDATE SKIP LOCKED
        )
        RETURNING workflow, idempotency_key INTO v_workflow, v_key;
        CONTINUE WHEN NOT FOUND;
        v_count := v_count + 1;
        DELETE FROM __SCHEMA__.journal WHERE run_id = v_run;
        DELETE FROM __SCHEMA__.attempts WHERE run_id = v_run;
        DELETE FROM __SCHEMA__.signals WHERE run_id = v_run;
        IF v_key IS NOT NULL THEN
            DELETE FROM __SCHEMA__.run_keys
            WHERE kind = 'idempotency' AND workflow = v_workflow AND key = v_key
              AND run_id = v_run;
        END IF;
    END LOOP;
    RETURN v_count;
END
$$;

-- Count a claim of a job (outside the job's transaction, so that a worker dying mid-job
-- still leaves it counted); return how many claims the job has had.
CREATE OR REPLACE FUNCTION __SCHEMA__.count_claim_v1(p_job bigint) RETURNS integer
LANGUAGE sql AS $$
    INSERT INTO __SCHEMA__.claims AS c (job_id) VALUES (p_job)
    ON CONFLICT (job_id) DO UPDATE SET n = c.n + 1
    RETURNING n
$$;

-- Resume failed run `p_run` where the SPEC says: at the first node (in declaration order,
-- by its recorded shape) that is no longer in effect: the failed node, and every step or
-- parallel branch whose compensator ran. Those journal rows are forgotten (with their
-- compensations, a failed child's marker, and the row of a parallel node one of whose
-- branches must run again); every other completed node replays from the journal. Loops
-- resume after their committed iterations. False when the run is not failed, NULL when
-- there is no such run.
CREATE OR REPLACE FUNCTION __SCHEMA__.retry_run_v1(p_run text) RETURNS boolean
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    r __SCHEMA__.runs%ROWTYPE;
    v_shape jsonb;
    v_forget text[];
    v_position integer;
    v_node text;
    v_kind text;
    v_iteration integer := 0;
BEGIN
    SELECT * INTO r FROM __SCHEMA__.runs WHERE id = p_run FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF r.status <> 'failed' THEN
        RETURN false;
    END IF;
    SELECT shape INTO v_shape FROM __SCHEMA__.shapes WHERE queue = r.queue;
    IF v_shape IS NULL THEN
        RAISE EXCEPTION 'durable: the shape of run %''s workflow % is not recorded', p_run, r.queue
            USING ERRCODE = 'DU002',
                  HINT = 'open an Engine that registers this workflow once, then retry';
    END IF;
    -- Active again: it holds its singleton key again, unless another active run does.
    IF r.singleton_key IS NOT NULL
       AND __SCHEMA__.take_key_v1('singleton', r.workflow, r.singleton_key, p_run) <> p_run THEN
        RAISE EXCEPTION 'durable: run % cannot be retried while run % holds its singleton key %',
            p_run, (SELECT k.run_id FROM __SCHEMA__.run_keys k
                    WHERE k.kind = 'singleton' AND k.workflow = r.workflow
                      AND k.key = r.singleton_key),
            quote_literal(r.singleton_key) USING ERRCODE = 'unique_violation';
    END IF;
    WITH nodes AS (
        SELECT n.ord - 1 AS position, n.value ->> 0 AS name, n.value ->> 1 AS kind
        FROM jsonb_array_elements(v_shape) WITH ORDINALITY AS n (value, ord)
    ), undone AS (
        -- steps and branches whose compensator completed
        SELECT left(c.key, length(c.key) - length('@compensate')) AS key, c.node
        FROM __SCHEMA__.journal c
        WHERE c.run_id = p_run AND c.status = 'completed' AND c.key LIKE '%@compensate'
    ), failed AS (
        SELECT e.key, e.node FROM __SCHEMA__.journal e
        WHERE e.run_id = p_run AND e.status = 'failed'
          AND strpos(e.key, '@') = 0 AND strpos(e.key, '#') = 0
    ), again AS (
        SELECT key, node FROM undone UNION ALL SELECT key, node FROM failed
    )
    SELECT
        array_agg(DISTINCT k) FILTER (WHERE k IS NOT NULL),
        (SELECT min(n.position) FROM nodes n WHERE n.name IN (SELECT node FROM again))
    INTO v_forget, v_position
    FROM (
        SELECT key AS k FROM again
        UNION ALL SELECT key || '@compensate' FROM undone
        UNION ALL SELECT node FROM undone WHERE strpos(key, '#') > 0
        UNION ALL SELECT node || '@child' FROM failed
    ) AS keys;
    IF v_position IS NULL THEN
        v_position := least(r.cursor, jsonb_array_length(v_shape) - 1);
    END IF;
    SELECT n.value ->> 0, n.value ->> 1 INTO v_node, v_kind
    FROM jsonb_array_elements(v_shape) WITH ORDINALITY AS n (value, ord)
    WHERE n.ord - 1 = v_position;
    DELETE FROM __SCHEMA__.journal WHERE run_id = p_run AND key = ANY (coalesce(v_forget, '{}'));
    IF v_kind = 'loop' THEN
        SELECT count(*) INTO v_iteration FROM __SCHEMA__.journal
        WHERE run_id = p_run AND node = v_node AND status = 'completed'
          AND strpos(key, '#') > 0;
    END IF;
    UPDATE __SCHEMA__.runs
    SET status = 'running', error = NULL, finished_at = NULL, ending = NULL,
        cursor = v_position, current_node = v_node, iteration = v_iteration, attempt = 1,
        epoch = epoch + 1, wake_at = NULL, waiting_for = NULL, child_id = NULL,
        branches = NULL, result = NULL, paused_at = NULL, limit_wait = NULL,
        updated_at = __SCHEMA__.now_v1(),
        -- active again: a bounded run takes a slot anew (its `admit` job)
        slot = NULL
    WHERE id = p_run;
    PERFORM __SCHEMA__.ensure_jobs_v1(p_run);
    RETURN true;
END
$$;

-- Remember the shape a workflow's runs are pinned to (its queue), once.
CREATE OR REPLACE FUNCTION __SCHEMA__.record_shape_v1(p_queue text, p_workflow text, p_shape text)
RETURNS void
LANGUAGE sql AS $$
    INSERT INTO __SCHEMA__.shapes (queue, workflow, version, shape)
    VALUES (p_queue, p_workflow, __SCHEMA__.queue_version_v1(p_queue), p_shape::jsonb)
    ON CONFLICT (queue) DO NOTHING
$$;


-- Pause run `p_run`: it keeps its state and gets no job until resume_run_v1. The run's
-- advisory lock waits for a worker transaction in flight on it (claims of its next node
-- leave it alone), and its jobs' locks for claims that hold them (a branch in flight
-- commits first), so that no job of the run is left for a worker to claim. NULL for an
-- unknown run, false when it has finished or is paused already.
CREATE OR REPLACE FUNCTION __SCHEMA__.pause_run_v1(p_run text) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_done boolean;
BEGIN
    PERFORM __SCHEMA__.take_run_v1(p_run);
    PERFORM 1 FROM __SCHEMA__.jobs WHERE run_id = p_run AND lease_token IS NULL FOR UPDATE;
    UPDATE __SCHEMA__.runs SET paused_at = __SCHEMA__.now_v1(), updated_at = __SCHEMA__.now_v1()
    WHERE id = p_run AND finished_at IS NULL AND paused_at IS NULL;
    v_done := FOUND;
    IF NOT v_done AND NOT EXISTS (SELECT 1 FROM __SCHEMA__.runs WHERE id = p_run) THEN
        RETURN NULL;
    END IF;
    PERFORM __SCHEMA__.ensure_jobs_v1(p_run);
    RETURN v_done;
END
$$;

-- Resume paused run `p_run`: it gets the jobs its state needs (a signal that arrived
-- meanwhile wakes it now; a run queued for a slot of its workflow's bound, which no
-- admission gives a paused run, takes one if it is free). NULL for an unknown run, false
-- when it was not paused.
CREATE OR REPLACE FUNCTION __SCHEMA__.resume_run_v1(p_run text) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_done boolean;
    v_workflow text;
    v_queued_key text;
BEGIN
    PERFORM __SCHEMA__.take_run_v1(p_run);
    UPDATE __SCHEMA__.runs SET paused_at = NULL, updated_at = __SCHEMA__.now_v1()
    WHERE id = p_run AND paused_at IS NOT NULL AND finished_at IS NULL
    RETURNING workflow, CASE WHEN slot = 'queued' THEN concurrency_key END
    INTO v_workflow, v_queued_key;
    v_done := FOUND;
    IF NOT v_done AND NOT EXISTS (SELECT 1 FROM __SCHEMA__.runs WHERE id = p_run) THEN
        RETURN NULL;
    END IF;
    IF v_queued_key IS NOT NULL THEN
        PERFORM __SCHEMA__.admit_next_v1(v_workflow, v_queued_key);
    END IF;
    PERFORM __SCHEMA__.ensure_jobs_v1(p_run);
    RETURN v_done;
END
$$;

-- Fork run `p_run` as new run `p_id` of the same workflow and shape, with input `p_input`
-- (NULL: the original's): the original's journal before node `p_from` (NULL: the node
-- that failed, else the node an unfinished run is at) is copied, compensations and
-- failures aside, and the fork runs from `p_from`. NULL for an unknown run. DU002: the
-- shape is not recorded; DU020: no top-level node `p_from`; DU021: the original has not
-- completed every node before it (or, without `p_from`, neither failed nor is unfinished).
CREATE OR REPLACE FUNCTION __SCHEMA__.fork_run_v1(
    p_run text, p_id text, p_from text, p_input text
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    r __SCHEMA__.runs%ROWTYPE;
    v_shape jsonb;
    v_from text := p_from;
    v_position integer;
    v_before text[];
    v_missing text;
BEGIN
    SELECT * INTO r FROM __SCHEMA__.runs WHERE id = p_run;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT shape INTO v_shape FROM __SCHEMA__.shapes WHERE queue = r.queue;
    IF v_shape IS NULL THEN
        RAISE EXCEPTION 'durable: the shape of run %''s workflow % is not recorded', p_run, r.queue
            USING ERRCODE = 'DU002',
                  HINT = 'open an Engine that registers this workflow once, then fork';
    END IF;
    IF v_from IS NULL THEN
        SELECT e.node INTO v_from FROM __SCHEMA__.journal e
        WHERE e.run_id = p_run AND e.status = 'failed'
          AND strpos(e.key, '@') = 0 AND strpos(e.key, '#') = 0
        ORDER BY e.seq DESC LIMIT 1;
        IF v_from IS NULL AND r.finished_at IS NULL THEN
            v_from := r.current_node;
        END IF;
        IF v_from IS NULL THEN
            RAISE EXCEPTION 'durable: run % is % and no node of it failed: name the node to fork from',
                p_run, r.status USING ERRCODE = 'DU021';
        END IF;
    END IF;
    SELECT n.ord - 1 INTO v_position
    FROM jsonb_array_elements(v_shape) WITH ORDINALITY AS n (value, ord)
    WHERE n.value ->> 0 = v_from;
    IF v_position IS NULL THEN
        RAISE EXCEPTION 'durable: workflow % has no node %', quote_literal(r.workflow),
            quote_literal(v_from)
            USING ERRCODE = 'DU020',
                  DETAIL = (SELECT string_agg(n.value ->> 0, ', ' ORDER BY n.ord)
                            FROM jsonb_array_elements(v_shape) WITH ORDINALITY AS n (value, ord));
    END IF;
    SELECT coalesce(array_agg(n.value ->> 0), '{}') INTO v_before
    FROM jsonb_array_elements(v_shape) WITH ORDINALITY AS n (value, ord)
    WHERE n.ord - 1 < v_position;
    SELECT b INTO v_missing FROM unnest(v_before) WITH ORDINALITY AS u (b, ord)
    WHERE NOT EXISTS (
        SELECT 1 FROM __SCHEMA__.journal e
        WHERE e.run_id = p_run AND e.key = u.b AND e.status = 'completed'
    )
    ORDER BY u.ord
    LIMIT 1;
    IF v_missing IS NOT NULL THEN
        RAISE EXCEPTION 'durable: run % has not completed node % (before %): fork from a node it reached',
            p_run, quote_literal(v_missing), quote_literal(v_from) USING ERRCODE = 'DU021';
    END IF;
    INSERT INTO __SCHEMA__.runs
        (id, workflow, queue, version, input, cursor, current_node, forked_from)
    VALUES (p_id, r.workflow, r.queue, r.version, coalesce(p_input::jsonb, r.input), v_position,
            v_from, p_run);
    -- Completed work of the earlier nodes (their branches, iterations, choices and child
    -- markers too) replays; what compensation undid in the original is not part of it.
    INSERT INTO __SCHEMA__.journal
        (run_id, key, node, status, result, error, attempts, started_at, finished_at)
    SELECT p_id, e.key, e.node, e.status, e.result, e.error, e.attempts, e.started_at,
           e.finished_at
    FROM __SCHEMA__.journal e
    WHERE e.run_id = p_run AND e.node = ANY (v_before) AND e.status = 'completed'
      AND e.key NOT LIKE '%@compensate'
    ORDER BY e.seq;
    PERFORM __SCHEMA__.ensure_jobs_v1(p_id);
    RETURN p_id;
END
$$;

-- Take, for the attempt this transaction runs of the step at run `p_run`'s position, a slot
-- of limit `p_name` for key `p_key` (when it has `p_concurrency`) and a token (when it has
-- a rate of `p_rate` starts per `p_per` seconds). A transactional attempt holds its slot
-- row locked until it ends; a leased one (`p_token`, the lease of job `p_job`) as long as
-- that lease lives. `wake_at` NULL: taken; else the time to try again: when the token the
-- run is in line for frees, or (for a slot, which a holder that lets go wakes it for) a
-- fallback for holders that die, later the further back in line the run is. `grow`: the
-- key has fewer slot or token rows than the limit allows and none free: add them in a
-- transaction of their own (limit_grow_v1), then ask again.
CREATE OR REPLACE FUNCTION __SCHEMA__.limit_acquire_v1(
    p_run text, p_name text, p_key text, p_concurrency integer, p_rate integer,
    p_per float8, p_job bigint, p_token uuid, OUT wake_at timestamptz, OUT grow text
)
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_now timestamptz := __SCHEMA__.now_v1();
    v_wait text := p_name || chr(31) || p_key;
    v_per interval := make_interval(secs => p_per);
    v_slot integer;
    v_rows integer;
    v_from integer;
    v_ahead integer;
    v_next timestamptz;
    v_full text;  -- what there is none of: 'slot' or 'token'
BEGIN
    IF p_concurrency IS NOT NULL THEN
        SELECT s.slot INTO v_slot FROM __SCHEMA__.limit_slots s
        WHERE s.name = p_name AND s.key = p_key AND s.slot < p_concurrency
          AND (s.holder_job IS NULL OR NOT EXISTS (
              SELECT 1 FROM __SCHEMA__.jobs j
              WHERE j.id = s.holder_job AND j.lease_token = s.holder_token
                AND j.run_at > v_now
          ))
        ORDER BY s.slot
        LIMIT 1
        FOR NO KEY UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            SELECT count(*) INTO v_rows FROM __SCHEMA__.limit_slots
            WHERE name = p_name AND key = p_key AND slot < p_concurrency;
            IF v_rows < p_concurrency THEN
                grow := 'slot';
                RETURN;
            END IF;
            v_full := 'slot';
        END IF;
    END IF;
    IF v_full IS NULL AND p_rate IS NOT NULL THEN
        -- Token rows are numbered 0 .. v_rows - 1. Look for a free one from a random row
        -- on (then before it), so that attempts at once do not all want the same row;
        -- `used_at` is in no index, so taking a row is a HOT update.
        -- The highest row by an ordered read of one index entry: `max()` in a plan made
        -- while the table was empty aggregates every row instead (a limit of a high rate
        -- has thousands: 3-5 ms of every attempt).
        SELECT coalesce((
            SELECT t.slot + 1 FROM __SCHEMA__.limit_tokens t
            WHERE t.name = p_name AND t.key = p_key
            ORDER BY t.slot DESC
            LIMIT 1
        ), 0) INTO v_rows;
        v_rows := least(v_rows, p_rate);
        v_from := floor(random() * v_rows)::integer;
        UPDATE __SCHEMA__.limit_tokens SET used_at = v_now
        WHERE name = p_name AND key = p_key AND slot = (
            SELECT t.slot FROM __SCHEMA__.limit_tokens t
            WHERE t.name = p_name AND t.key = p_key AND t.slot >= v_from AND t.slot < v_rows
              AND t.used_at <= v_now - v_per
            ORDER BY t.slot
            LIMIT 1
            FOR UPDATE SKIP LOCKED
        );
        IF NOT FOUND AND v_from > 0 THEN
            UPDATE __SCHEMA__.limit_tokens SET used_at = v_now
            WHERE name = p_name AND key = p_key AND slot = (
                SELECT t.slot FROM __SCHEMA__.limit_tokens t
                WHERE t.name = p_name AND t.key = p_key AND t.slot < v_from
                  AND t.used_at <= v_now - v_per
                ORDER BY t.slot
                LIMIT 1
                FOR UPDATE SKIP LOCKED
            );
        END IF;
        IF NOT FOUND THEN
            IF v_rows < p_rate THEN
                grow := 'token';
                RETURN;
            END IF;
            v_full := 'token';
        END IF;
    END IF;
    IF v_full IS NOT NULL THEN
        -- In line behind the runs waiting for this limit and key that are more urgent.
        SELECT count(*) INTO v_ahead
        FROM __SCHEMA__.runs me, __SCHEMA__.runs w
        WHERE me.id = p_run AND w.limit_wait = v_wait AND w.id <> me.id
          AND (w.priority > me.priority
               OR (w.priority = me.priority AND (w.created_at, w.id) < (me.created_at, me.id)));
        IF v_full = 'slot' THEN
            wake_at := v_now + make_interval(secs => least(1.0 + 0.5 * v_ahead, 30.0));
            RETURN;
        END IF;
        -- The token this run is in line for: the (v_ahead + 1)-th to free, a window later
        -- for every `p_rate` runs ahead.
        SELECT t.used_at INTO v_next FROM __SCHEMA__.limit_tokens t
        WHERE t.name = p_name AND t.key = p_key AND t.slot < p_rate AND t.used_at > v_now - v_per
        ORDER BY t.used_at
        OFFSET v_ahead % p_rate
        LIMIT 1;
        wake_at := greatest(
            coalesce(v_next, v_now) + v_per * (1 + v_ahead / p_rate),
            v_now + interval '1 millisecond'
        );
        RETURN;
    END IF;
    IF p_token IS NOT NULL AND v_slot IS NOT NULL THEN
        UPDATE __SCHEMA__.limit_slots SET holder_job = p_job, holder_token = p_token
        WHERE name = p_name AND key = p_key AND slot = v_slot;
    END IF;
    UPDATE __SCHEMA__.runs SET limit_wait = NULL WHERE id = p_run AND limit_wait IS NOT NULL;
END
$$;

-- Add slot rows (`p_kind` 'slot': up to `p_n`) or token rows ('token': doubling, up to
-- `p_n`) for limit `p_name`, key `p_key`, in a transaction of its own, so that they are
-- there for every attempt at once. Rows are numbered from 0 without gaps; never more than
-- the limit allows below `p_n` (rows beyond it, of a larger limit before, are not used).
CREATE OR REPLACE FUNCTION __SCHEMA__.limit_grow_v1(
    p_name text, p_key text, p_kind text, p_n integer
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_rows integer;
BEGIN
    IF p_kind = 'slot' THEN
        INSERT INTO __SCHEMA__.limit_slots (name, key, slot)
        SELECT p_name, p_key, g FROM generate_series(0, p_n - 1) AS g
        ON CONFLICT DO NOTHING;
    ELSE
        SELECT count(*) INTO v_rows FROM __SCHEMA__.limit_tokens
        WHERE name = p_name AND key = p_key AND slot < p_n;
        INSERT INTO __SCHEMA__.limit_tokens (name, key, slot)
        SELECT p_name, p_key, g
        FROM generate_series(v_rows, least(p_n, greatest(2 * v_rows, 64)) - 1) AS g
        ON CONFLICT DO NOTHING;
    END IF;
END
$$;

-- The step at run `p_run`'s position waits for limit slot or token `p_wait` (limit name,
-- chr(31), key) until `p_wake_at`, without an attempt.
CREATE OR REPLACE FUNCTION __SCHEMA__.limit_park_v1(
    p_run text, p_wake_at timestamptz, p_wait text
) RETURNS bigint
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    UPDATE __SCHEMA__.runs
    SET wake_at = p_wake_at, limit_wait = p_wait, updated_at = __SCHEMA__.now_v1()
    WHERE id = p_run;
    RETURN __SCHEMA__.ensure_jobs_v1(p_run);
END
$$;

-- An attempt holding a slot of `p_wait` (limit name, chr(31), key) ends with this
-- transaction: the most urgent run waiting for one is due when it commits.
CREATE OR REPLACE FUNCTION __SCHEMA__.limit_wake_v1(p_wait text) RETURNS void
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_run text;
BEGIN
    SELECT id INTO v_run FROM __SCHEMA__.runs
    WHERE limit_wait = p_wait AND wake_at > __SCHEMA__.now_v1()
    ORDER BY priority DESC, created_at, id
    LIMIT 1
    FOR NO KEY UPDATE SKIP LOCKED;
    IF FOUND THEN
        UPDATE __SCHEMA__.runs SET wake_at = NULL WHERE id = v_run;
        PERFORM __SCHEMA__.ensure_jobs_v1(v_run);
    END IF;
END
$$;

-- Whether transaction `p_xid` (a row's xmax) is still running. (PostgreSQL 15 has no xid ->
-- xid8 cast: the epoch comes from the current snapshot, as an xmax is never in the future.)
CREATE OR REPLACE FUNCTION __SCHEMA__.xact_running_v1(p_xid xid) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_xid bigint := p_xid::text::bigint;
    v_next bigint;
BEGIN
    IF v_xid < 3 THEN
        RETURN false;
    END IF;
    v_next := pg_snapshot_xmax(pg_current_snapshot())::text::bigint;
    v_xid := (v_next & ~4294967295::bigint) | v_xid;
    IF v_xid >= v_next THEN
        v_xid := v_xid - 4294967296;
    END IF;
    RETURN v_xid > 0 AND pg_xact_status(v_xid::text::xid8) = 'in progress';
END
$$;

-- What the named limits use now, per key: slots in flight (held by a running transaction or
-- a live lease), slots and tokens there are, and the last token's time.
CREATE OR REPLACE FUNCTION __SCHEMA__.limit_usage_v1()
RETURNS TABLE (name text, key text, in_flight integer, slots integer, tokens integer,
               last_start timestamptz)
LANGUAGE sql STABLE AS $$
    WITH s AS (
        SELECT s.name, s.key, count(*)::integer AS slots,
               count(*) FILTER (
                   WHERE (s.xmax <> '0' AND __SCHEMA__.xact_running_v1(s.xmax))
                      OR EXISTS (
                          SELECT 1 FROM __SCHEMA__.jobs j
                          WHERE j.id = s.holder_job AND j.lease_token = s.holder_token
                            AND j.run_at > __SCHEMA__.now_v1()
                      )
               )::integer AS in_flight
        FROM __SCHEMA__.limit_slots s GROUP BY s.name, s.key
    ), t AS (
        SELECT t.name, t.key, count(*)::integer AS tokens,
               nullif(max(t.used_at), '-infinity') AS last_start
        FROM __SCHEMA__.limit_tokens t GROUP BY t.name, t.key
    )
    SELECT coalesce(s.name, t.name), coalesce(s.key, t.key), coalesce(s.in_flight, 0),
           coalesce(s.slots, 0), coalesce(t.tokens, 0), t.last_start
    FROM s FULL JOIN t ON t.name = s.name AND t.key = s.key
    ORDER BY 1, 2
$$;

-- Stop (`pause_workflow_v1`) or restart claiming the jobs of workflow `p_workflow`; true
-- when that changed something. A resume wakes idle workers.
CREATE OR REPLACE FUNCTION __SCHEMA__.pause_workflow_v1(p_workflow text) RETURNS boolean
LANGUAGE sql AS $$
    WITH added AS (
        INSERT INTO __SCHEMA__.paused_workflows (workflow) VALUES (p_workflow)
        ON CONFLICT DO NOTHING
        RETURNING 1
    )
    SELECT EXISTS (SELECT 1 FROM added)
$$;

CREATE OR REPLACE FUNCTION __SCHEMA__.resume_workflow_v1(p_workflow text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM __SCHEMA__.paused_workflows WHERE workflow = p_workflow;
    IF FOUND THEN
        PERFORM pg_notify('__SCHEMA_NAME___jobs', '');
        RETURN true;
    END IF;
    RETURN false;
END
$$;

-- Lock run `p_run` for an upgrade and say where it is: the run's advisory lock (which waits
-- for the worker transaction in flight on it; claims of its jobs then leave it alone), its
-- jobs (waiting for branches in flight), its row, and the row of the child it waits for
-- (whose final transaction gives the parent a job without locking the parent: it commits
-- first, or after the upgrade, and reads the new queue). Returns the run's position, its
-- recorded shape, the nodes its journal names (first journaled first) and a route choice
-- at its position; no row for an unknown run. The caller decides, then calls
-- upgrade_run_v1 in the same transaction.
CREATE OR REPLACE FUNCTION __SCHEMA__.lock_for_upgrade_v1(p_run text)
RETURNS TABLE (
    status text, queue text, version integer, "cursor" integer, current_node text,
    branches text[], leased boolean, finished boolean, shape text, journaled text[],
    chosen text
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_child text;
BEGIN
    PERFORM __SCHEMA__.take_run_v1(p_run);
    PERFORM 1 FROM __SCHEMA__.jobs j WHERE j.run_id = p_run ORDER BY j.id FOR UPDATE;
    SELECT r.child_id INTO v_child FROM __SCHEMA__.runs r WHERE r.id = p_run FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF v_child IS NOT NULL THEN
        PERFORM 1 FROM __SCHEMA__.runs c WHERE c.id = v_child FOR NO KEY UPDATE;
    END IF;
    RETURN QUERY
    SELECT r.status, r.queue, r.version, r.cursor, r.current_node, r.branches,
           EXISTS (SELECT 1 FROM __SCHEMA__.jobs j
                   WHERE j.run_id = r.id AND j.lease_token IS NOT NULL),
           r.finished_at IS NOT NULL,
           (SELECT s.shape::text FROM __SCHEMA__.shapes s WHERE s.queue = r.queue),
           ARRAY(SELECT e.node FROM __SCHEMA__.journal e WHERE e.run_id = r.id
                 GROUP BY e.node ORDER BY min(e.seq)),
           (SELECT e.result #>> '{}' FROM __SCHEMA__.journal e
             WHERE e.run_id = r.id AND e.key = r.current_node || '@route'
               AND e.status = 'completed')
    FROM __SCHEMA__.runs r
    WHERE r.id = p_run;
END
$$;

-- Move unfinished run `p_run`, locked by lock_for_upgrade_v1 in this transaction and found
-- compatible by the caller, from queue `p_from` to queue `p_to` (another version or shape
-- of its workflow) with its position at index `p_cursor` of the new shape. Its jobs move
-- with it; workers of the new queue hear of those that are due. DU010 when the run is no
-- longer where the caller saw it.
CREATE OR REPLACE FUNCTION __SCHEMA__.upgrade_run_v1(
    p_run text, p_from text, p_to text, p_cursor integer
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM __SCHEMA__.take_run_v1(p_run);
    UPDATE __SCHEMA__.runs
    SET queue = p_to, version = __SCHEMA__.queue_version_v1(p_to), cursor = p_cursor,
        updated_at = __SCHEMA__.now_v1()
    WHERE id = p_run AND queue = p_from AND finished_at IS NULL;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'durable: run % is no longer an unfinished run of queue %', p_run, p_from
            USING ERRCODE = 'DU010';
    END IF;
    UPDATE __SCHEMA__.jobs SET queue = p_to WHERE run_id = p_run AND queue <> p_to;
    IF EXISTS (
        SELECT 1 FROM __SCHEMA__.jobs
        WHERE run_id = p_run AND run_at <= __SCHEMA__.now_v1() AND lease_token IS NULL
    ) THEN
        PERFORM __SCHEMA__.notify_jobs_v1();
    END IF;
    PERFORM __SCHEMA__.ensure_jobs_v1(p_run);
END
$$;

-- History partitions (see the runs table in sql/schema.sql). Runs, journal, attempts and
-- signals are partitioned alike by run id: one partition of each per month, named
-- `<table>_yYYYYmMM`, for the ids from the ULID prefix of the month's first instant (UTC)
-- to the next month's; `<table>_legacy` holds the rows of a database partitioned by
-- migration 0009, up to the month after it ran; `<table>_default` any other id.

-- The first 10 characters of a ULID made at `p_at`: its milliseconds since 1970 in
-- Crockford's base32, which sorts as the time does.
CREATE OR REPLACE FUNCTION __SCHEMA__.ulid_prefix_v1(p_at timestamptz) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT string_agg(
        substr('0123456789ABCDEFGHJKMNPQRSTVWXYZ', ((t.ms >> (45 - 5 * i)) & 31)::integer + 1, 1),
        '' ORDER BY i
    )
    FROM (SELECT floor(extract(epoch FROM p_at) * 1000)::bigint AS ms) AS t,
         generate_series(0, 9) AS i
$$;

-- Make the month partitions of the history tables for the month of `p_from` (migrate()
-- gives the real clock, which run ids are made by) and the `p_months` after it, where
-- missing, each month's four together; return the names (`yYYYYmMM`) of those made. A month whose ids another partition covers
-- (the legacy one) or of which the DEFAULT partition already holds rows is left out: its
-- rows stay where they are. Each partition is made as a table of its own, then attached:
-- that locks the table's DEFAULT partition (to check it holds no row of the month), and
-- for runs blocks writes of it (runs.parent_id is a foreign key to runs), so it waits for
-- the transactions using them, and statements after it wait for it; at most the lock
-- timeout, after which the month is left for the next call. It happens once a month,
-- with the first call after a month begins making the next.
CREATE OR REPLACE FUNCTION __SCHEMA__.ensure_partitions_v1(p_from timestamptz, p_months integer)
RETURNS text[]
LANGUAGE plpgsql SET lock_timeout = '2s' AS $$
DECLARE
    v_month timestamp;
    v_suffix text;
    v_lo text;
    v_hi text;
    v_table text;
    v_made text[] := '{}';
BEGIN
    FOR i IN 0..p_months LOOP
        v_month := date_trunc('month', p_from AT TIME ZONE 'UTC') + make_interval(months => i);
        v_suffix := to_char(v_month, '"y"YYYY"m"MM');
        CONTINUE WHEN to_regclass(format('%I.%I', '__SCHEMA_NAME__', 'runs_' || v_suffix))
            IS NOT NULL;
        v_lo := __SCHEMA__.ulid_prefix_v1(v_month AT TIME ZONE 'UTC');
        v_hi := __SCHEMA__.ulid_prefix_v1((v_month + interval '1 month') AT TIME ZONE 'UTC');
        BEGIN
            FOREACH v_table IN ARRAY ARRAY['runs', 'journal', 'attempts', 'signals'] LOOP
                EXECUTE format(
                    'CREATE TABLE %1$I.%2$I (LIKE %1$I.%3$I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)%4$s',
                    '__SCHEMA_NAME__', v_table || '_' || v_suffix, v_table,
                    -- room for HOT updates of the cursor, as runs_default
                    CASE WHEN v_table = 'runs' THEN ' WITH (fillfactor = 80)' ELSE '' END
                );
                EXECUTE format(
                    'ALTER TABLE %1$I.%2$I ATTACH PARTITION %1$I.%3$I FOR VALUES FROM (%4$L) TO (%5$L)',
                    '__SCHEMA_NAME__', v_table, v_table || '_' || v_suffix, v_lo, v_hi
                );
            END LOOP;
            v_made := v_made || v_suffix;
        EXCEPTION
            -- 42P17: another partition covers the month; 23514: the default partition
            -- holds rows of it; 55P03: busy.
            WHEN invalid_object_definition OR check_violation OR lock_not_available THEN
                NULL;
        END;
    END LOOP;
    RETURN v_made;
END
$$;

-- The partitions of the history tables other than the default, oldest first: the name
-- (`yYYYYmMM` or `legacy`), the range of run ids (`lo` NULL: from the first id) and the
-- planner's estimate of the runs in it.
CREATE OR REPLACE FUNCTION __SCHEMA__.history_partitions_v1()
RETURNS TABLE (name text, lo text, hi text, runs bigint)
LANGUAGE sql STABLE AS $$
    SELECT substr(c.relname, length('runs_') + 1), b[1], b[2],
           greatest(c.reltuples, 0)::bigint
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid,
    LATERAL regexp_match(
        pg_get_expr(c.relpartbound, c.oid),
        $re$^FOR VALUES FROM \((?:'([^']*)'|MINVALUE)\) TO \('([^']*)'\)$re$
    ) AS b
    WHERE i.inhparent = '__SCHEMA__.runs'::regclass AND b IS NOT NULL
    ORDER BY b[2]
$$;

-- Why partition `p_name` of the history tables cannot be dropped now, or NULL when it can:
-- 'current' (its month is not over: runs may still be created in it), 'unfinished' (a run
-- in it has not finished), 'recent' (a run in it finished less than `p_older_than`
-- seconds ago), 'awaited' (a run in it is the child of an unfinished run, which purge
-- keeps too). Reads indexes only. DU080: there is no such partition.
CREATE OR REPLACE FUNCTION __SCHEMA__.history_blocker_v1(p_name text, p_older_than float8)
RETURNS text
LANGUAGE plpgsql STABLE SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_hi text;
    v_part text := format('%I.%I', '__SCHEMA_NAME__', 'runs_' || p_name);
    v_found boolean;
BEGIN
    SELECT p.hi INTO v_hi FROM __SCHEMA__.history_partitions_v1() p WHERE p.name = p_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'durable: no history partition %', quote_literal(p_name)
            USING ERRCODE = 'DU080';
    END IF;
    IF v_hi > __SCHEMA__.ulid_prefix_v1(clock_timestamp()) THEN
        RETURN 'current';
    END IF;
    EXECUTE format(
        'SELECT EXISTS (SELECT 1 FROM %s WHERE status IN '
        '(''pending'', ''running'', ''waiting'', ''compensating''))', v_part
    ) INTO v_found;
    IF v_found THEN
        RETURN 'unfinished';
    END IF;
    EXECUTE format(
        'SELECT EXISTS (SELECT 1 FROM %s WHERE finished_at >= $1)', v_part
    ) INTO v_found USING __SCHEMA__.now_v1() - make_interval(secs => p_older_than);
    IF v_found THEN
        RETURN 'recent';
    END IF;
    -- The unfinished runs are few (those in flight), each a probe of the partition.
    EXECUTE format(
        'SELECT EXISTS (SELECT 1 FROM %s.runs p WHERE p.status IN '
        '(''pending'', ''running'', ''waiting'', ''compensating'') '
        'AND EXISTS (SELECT 1 FROM %s c WHERE c.parent_id = p.id))',
        quote_ident('__SCHEMA_NAME__'), v_part
    ) INTO v_found;
    IF v_found THEN
        RETURN 'awaited';
    END IF;
    RETURN NULL;
END
$$;

-- Take partition `p_name` of every history table, with all its runs, journal, attempts
-- and signals, out of its table (detach it), if history_blocker_v1 finds nothing against
-- it once the tables are locked; its blocker otherwise, or 'busy' when another
-- transaction holds a job of its runs (a leftover of a finished run). What references its
-- runs from outside it goes first, as the foreign keys' ON DELETE would have done: the
-- jobs and cancel requests of its runs, a child run's parent_id, a schedule's
-- last_run_id. Locks the four tables (ACCESS EXCLUSIVE, in the order workers take them)
-- for the few milliseconds this takes: the caller sets lock_timeout, as statements on
-- them queue behind the wait. The detached tables are dropped afterwards, each in a
-- transaction of its own that locks only itself (drop_detached_history_v1): deleting a
-- month's files takes time in proportion to its size (about 0.4 s a GB here), which the
-- history tables must not wait for. Their run_keys rows stay, free for a start to take
-- over, until forget_keys_v1 deletes them.
CREATE OR REPLACE FUNCTION __SCHEMA__.drop_history_partition_v1(
    p_name text, p_older_than float8
) RETURNS text
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_lo text;
    v_hi text;
    v_blocker text;
    v_table text;
BEGIN
    v_blocker := __SCHEMA__.history_blocker_v1(p_name, p_older_than);
    IF v_blocker IS NOT NULL THEN
        RETURN v_blocker;  -- seen without the locks: not worth taking them
    END IF;
    LOCK TABLE __SCHEMA__.runs, __SCHEMA__.journal, __SCHEMA__.attempts, __SCHEMA__.signals
        IN ACCESS EXCLUSIVE MODE;
    v_blocker := __SCHEMA__.history_blocker_v1(p_name, p_older_than);
    IF v_blocker IS NOT NULL THEN
        RETURN v_blocker;
    END IF;
    SELECT coalesce(p.lo, ''), p.hi INTO v_lo, v_hi
    FROM __SCHEMA__.history_partitions_v1() p WHERE p.name = p_name;
    -- Jobs first, as purge_v1 does: a claim holds its job before it waits for the run.
    DELETE FROM __SCHEMA__.jobs WHERE id IN (
        SELECT j.id FROM __SCHEMA__.jobs j WHERE j.run_id >= v_lo AND j.run_id < v_hi
        FOR UPDATE SKIP LOCKED
    );
    IF EXISTS (SELECT 1 FROM __SCHEMA__.jobs j WHERE j.run_id >= v_lo AND j.run_id < v_hi) THEN
        RETURN 'busy';
    END IF;
    DELETE FROM __SCHEMA__.cancel_requests WHERE run_id >= v_lo AND run_id < v_hi;
    UPDATE __SCHEMA__.schedules SET last_run_id = NULL
    WHERE last_run_id >= v_lo AND last_run_id < v_hi;
    -- Written so that the partition being dropped is pruned from the update.
    UPDATE __SCHEMA__.runs SET parent_id = NULL
    WHERE parent_id >= v_lo AND parent_id < v_hi AND (id < v_lo OR id >= v_hi);
    FOREACH v_table IN ARRAY ARRAY['journal', 'attempts', 'signals', 'runs'] LOOP
        EXECUTE format('ALTER TABLE %1$I.%2$I DETACH PARTITION %1$I.%3$I',
                       '__SCHEMA_NAME__', v_table, v_table || '_' || p_name);
    END LOOP;
    -- Detached, runs' partition keeps its copy of the runs.parent_id foreign key, whose
    -- dropping would lock runs again: it goes now, with the lock held.
    EXECUTE format('ALTER TABLE %I.%I DROP CONSTRAINT IF EXISTS runs_parent_id_fkey',
                   '__SCHEMA_NAME__', 'runs_' || p_name);
    RETURN NULL;
END
$$;

-- The tables of history partitions that were detached (drop_history_partition_v1) and are
-- not dropped yet, by name; a crash between the two leaves them, and the next
-- drop_history drops them.
CREATE OR REPLACE FUNCTION __SCHEMA__.detached_history_v1() RETURNS SETOF text
LANGUAGE sql STABLE AS $$
    SELECT c.relname::text FROM pg_class c
    WHERE c.relnamespace = '__SCHEMA__'::regnamespace AND c.relkind = 'r'
      AND NOT c.relispartition
      AND c.relname ~ '^(runs|journal|attempts|signals)_(y[0-9]{4}m[0-9]{2}|legacy)$'
    ORDER BY 1
$$;

-- Drop table `p_table`, one of detached_history_v1's (nothing else): the data of a month
-- already out of the history tables, whose lock is the only one this takes.
CREATE OR REPLACE FUNCTION __SCHEMA__.drop_detached_history_v1(p_table text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF p_table NOT IN (SELECT __SCHEMA__.detached_history_v1()) THEN
        RETURN false;
    END IF;
    EXECUTE format('DROP TABLE %I.%I', '__SCHEMA_NAME__', p_table);
    RETURN true;
END
$$;

-- Delete up to `p_limit` run_keys rows of runs with ids from `p_lo` to `p_hi` that no
-- longer exist (their month of history was dropped); how many went.
CREATE OR REPLACE FUNCTION __SCHEMA__.forget_keys_v1(p_lo text, p_hi text, p_limit integer)
RETURNS integer
LANGUAGE sql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan AS $$
    WITH gone AS (
        DELETE FROM __SCHEMA__.run_keys k
        WHERE k.ctid = ANY (ARRAY(
            SELECT g.ctid FROM __SCHEMA__.run_keys g
            WHERE g.run_id >= p_lo AND g.run_id < p_hi
              AND NOT EXISTS (SELECT 1 FROM __SCHEMA__.runs r WHERE r.id = g.run_id)
            LIMIT p_limit
        ))
        RETURNING 1
    )
    SELECT count(*)::integer FROM gone
$$;
