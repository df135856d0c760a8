-- The twelve CHECK constraints of `runs` become one, which calls run_row_ok_v1.
--
-- Why: PostgreSQL reads every CHECK expression of a table back from its stored text in
-- each statement that writes the table, and `runs` is updated by every step. Its twelve
-- checks cost about 60 µs of each such UPDATE on this machine (pgbench, generic plan,
-- 0.13 ms with them, 0.07 ms without); one function call costs about 20 µs, as PL/pgSQL
-- compiles the body once per session. docs/performance.md has the measurement.
--
-- NOT VALID: every row already there passed the twelve checks, which say the same as the
-- function; validating would read all of history under this migration's lock. New and
-- updated rows are checked either way.
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

ALTER TABLE __SCHEMA__.runs ADD CONSTRAINT runs_row_check CHECK (__SCHEMA__.run_row_ok_v1(
    workflow, status, cursor, finished_at, iteration, attempt, epoch, ending, version,
    priority, concurrency, slot
)) NOT VALID;

ALTER TABLE __SCHEMA__.runs
    DROP CONSTRAINT runs_workflow_check,
    DROP CONSTRAINT runs_status_check,
    DROP CONSTRAINT runs_cursor_check,
    DROP CONSTRAINT runs_finished_iff_terminal,
    DROP CONSTRAINT runs_iteration_check,
    DROP CONSTRAINT runs_attempt_check,
    DROP CONSTRAINT runs_epoch_check,
    DROP CONSTRAINT runs_ending_check,
    DROP CONSTRAINT runs_version_check,
    DROP CONSTRAINT runs_priority_check,
    DROP CONSTRAINT runs_concurrency_check,
    DROP CONSTRAINT runs_slot_check;
