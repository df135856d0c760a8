-- Partitioned history (issue 17): runs, journal, attempts and signals become tables
-- partitioned by the month of the run id (sql/schema.sql says why and how), and the
-- idempotency and singleton keys move to run_keys. No row is copied: each old table
-- becomes the partition `<table>_legacy` of its new table, for the ids up to the end of
-- this month (the rare id beyond, which no ULID made today has, goes to the DEFAULT
-- partition); an empty old table is dropped instead. Attaching reads each old table once
-- to check its ids, and builds the new primary keys of attempts and signals (the run id
-- first). The month partitions are made by migrate() (ensure_partitions_v1).
-- Must leave a database equal to a fresh sql/schema.sql (tests/integration/test_migrations.py).

-- 1. The old tables step aside, with every name of theirs the new ones take.
DO $$
DECLARE
    v record;
BEGIN
    ALTER TABLE __SCHEMA__.journal DROP CONSTRAINT journal_run_id_fkey;
    ALTER TABLE __SCHEMA__.attempts DROP CONSTRAINT attempts_run_id_fkey;
    ALTER TABLE __SCHEMA__.signals DROP CONSTRAINT signals_run_id_fkey;
    ALTER TABLE __SCHEMA__.cancel_requests DROP CONSTRAINT cancel_requests_run_id_fkey;
    ALTER TABLE __SCHEMA__.jobs DROP CONSTRAINT jobs_run_id_fkey;
    ALTER TABLE __SCHEMA__.schedules DROP CONSTRAINT schedules_last_run_id_fkey;
    ALTER TABLE __SCHEMA__.runs DROP CONSTRAINT runs_parent_id_fkey;
    DROP TRIGGER runs_status_guard ON __SCHEMA__.runs;
    FOR v IN
        SELECT i.relname AS name
        FROM pg_index x
        JOIN pg_class i ON i.oid = x.indexrelid
        JOIN pg_class t ON t.oid = x.indrelid
        WHERE t.relnamespace = '__SCHEMA__'::regnamespace
          AND t.relname IN ('runs', 'journal', 'attempts', 'signals')
    LOOP
        EXECUTE format('ALTER INDEX %I.%I RENAME TO %I', '__SCHEMA_NAME__', v.name,
                       'legacy_' || v.name);
    END LOOP;
    -- CHECK constraints too: the new tables' generated names must not be taken (their
    -- own names come back before they are attached, as attaching matches them by name).
    FOR v IN
        SELECT t.relname AS tbl, k.conname AS name
        FROM pg_constraint k JOIN pg_class t ON t.oid = k.conrelid
        WHERE t.relnamespace = '__SCHEMA__'::regnamespace AND k.contype = 'c'
          AND t.relname IN ('runs', 'journal', 'attempts', 'signals')
    LOOP
        EXECUTE format('ALTER TABLE %I.%I RENAME CONSTRAINT %I TO %I', '__SCHEMA_NAME__',
                       v.tbl, v.name, 'legacy_' || v.name);
    END LOOP;
    FOR v IN
        SELECT t, c, pg_get_serial_sequence(format('%I.%I', '__SCHEMA_NAME__', t), c) AS seq
        FROM (VALUES ('journal', 'seq'), ('attempts', 'id'), ('signals', 'id')) AS x (t, c)
    LOOP
        EXECUTE format('ALTER SEQUENCE %s RENAME TO %I', v.seq, 'legacy_' || v.t || '_' || v.c);
    END LOOP;
    ALTER TABLE __SCHEMA__.runs RENAME TO runs_legacy;
    ALTER TABLE __SCHEMA__.journal RENAME TO journal_legacy;
    ALTER TABLE __SCHEMA__.attempts RENAME TO attempts_legacy;
    ALTER TABLE __SCHEMA__.signals RENAME TO signals_legacy;
END
$$;

-- 2. The new tables, as in sql/schema.sql.
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
    watched boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT __SCHEMA__.now_v1(),
    updated_at timestamptz NOT NULL DEFAULT __SCHEMA__.now_v1(),
    finished_at timestamptz,
    CONSTRAINT runs_finished_iff_terminal
        CHECK ((status IN ('completed', 'failed', 'cancelled')) = (finished_at IS NOT NULL)),
    queue text NOT NULL DEFAULT '',
    iteration integer NOT NULL DEFAULT 0 CHECK (iteration >= 0),
    attempt integer NOT NULL DEFAULT 1 CHECK (attempt >= 1),
    epoch integer NOT NULL DEFAULT 0 CHECK (epoch >= 0),
    branches text[],
    child_id text,
    ending text CHECK (ending IN ('failed', 'cancelled')),
    paused_at timestamptz,
    forked_from text,
    version integer NOT NULL DEFAULT 1 CHECK (version >= 1),
    priority smallint NOT NULL DEFAULT 0 CHECK (priority BETWEEN -100 AND 100),
    not_before timestamptz,
    concurrency_key text,
    concurrency integer CHECK (concurrency >= 1),
    slot text CHECK (slot IN ('held', 'queued')),
    singleton_key text,
    debounce_key text,
    limit_wait text
) PARTITION BY RANGE (id);
CREATE INDEX runs_status_idx ON __SCHEMA__.runs (status, id DESC);
CREATE INDEX runs_workflow_idx ON __SCHEMA__.runs (workflow, id DESC);
CREATE INDEX runs_finished_idx ON __SCHEMA__.runs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX runs_idempotency_lookup_idx ON __SCHEMA__.runs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX runs_parent_idx ON __SCHEMA__.runs (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX runs_slot_idx ON __SCHEMA__.runs
    (workflow, concurrency_key, slot, priority DESC, created_at, id)
    WHERE concurrency_key IS NOT NULL AND finished_at IS NULL;
CREATE INDEX runs_debounce_idx ON __SCHEMA__.runs (workflow, debounce_key, created_at)
    WHERE debounce_key IS NOT NULL AND status = 'pending';
CREATE INDEX runs_limit_wait_idx ON __SCHEMA__.runs (limit_wait, priority DESC, created_at, id)
    WHERE limit_wait IS NOT NULL;
CREATE TABLE __SCHEMA__.runs_default PARTITION OF __SCHEMA__.runs DEFAULT
    WITH (fillfactor = 80);

CREATE TABLE __SCHEMA__.run_keys (
    kind text NOT NULL CHECK (kind IN ('idempotency', 'singleton')),
    workflow text NOT NULL,
    key text NOT NULL,
    run_id text NOT NULL,
    PRIMARY KEY (kind, workflow, key)
);
CREATE INDEX run_keys_run_idx ON __SCHEMA__.run_keys (run_id);

CREATE TRIGGER runs_status_guard BEFORE UPDATE OF status ON __SCHEMA__.runs
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION __SCHEMA__.runs_status_guard_v1();

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
CREATE INDEX journal_nodes_idx ON __SCHEMA__.journal (run_id)
    WHERE status = 'completed' AND strpos(key, '@') = 0 AND strpos(key, '#') = 0;
CREATE TABLE __SCHEMA__.journal_default PARTITION OF __SCHEMA__.journal DEFAULT;

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

-- 3. The old rows join the new tables: each old table as the legacy partition, up to the
-- end of this month; or, if no table has a row, the old tables go.
DO $$
DECLARE
    v_next timestamptz := (date_trunc('month', clock_timestamp() AT TIME ZONE 'UTC')
                           + interval '1 month') AT TIME ZONE 'UTC';
    v_ms bigint := floor(extract(epoch FROM v_next) * 1000);
    -- The ULID prefix of the month's end (as ulid_prefix_v1, which is not there yet:
    -- functions come after the migrations).
    v_hi text := (
        SELECT string_agg(
            substr('0123456789ABCDEFGHJKMNPQRSTVWXYZ', ((v_ms >> (45 - 5 * i)) & 31)::integer + 1, 1),
            '' ORDER BY i)
        FROM generate_series(0, 9) AS i
    );
    v record;
    v_last bigint;
    v_called boolean;
BEGIN
    -- The identity sequences continue where the old ones stopped (ids and seq order rows).
    FOR v IN
        SELECT * FROM (VALUES ('journal', 'seq'), ('attempts', 'id'), ('signals', 'id')) AS x (t, c)
    LOOP
        EXECUTE format('SELECT last_value, is_called FROM %I.%I', '__SCHEMA_NAME__',
                       'legacy_' || v.t || '_' || v.c)
            INTO v_last, v_called;
        IF v_called THEN
            PERFORM setval(pg_get_serial_sequence(format('%I.%I', '__SCHEMA_NAME__', v.t), v.c),
                           v_last);
        END IF;
        EXECUTE format('ALTER TABLE %I.%I ALTER COLUMN %I DROP IDENTITY', '__SCHEMA_NAME__',
                       v.t || '_legacy', v.c);
    END LOOP;
    IF NOT (EXISTS (SELECT 1 FROM __SCHEMA__.runs_legacy)
            OR EXISTS (SELECT 1 FROM __SCHEMA__.journal_legacy)
            OR EXISTS (SELECT 1 FROM __SCHEMA__.attempts_legacy)
            OR EXISTS (SELECT 1 FROM __SCHEMA__.signals_legacy)) THEN
        DROP TABLE __SCHEMA__.runs_legacy, __SCHEMA__.journal_legacy,
            __SCHEMA__.attempts_legacy, __SCHEMA__.signals_legacy;
    ELSE
        -- Indexes the new tables do not have: the keys are in run_keys now, and the run id
        -- leads the primary keys of attempts and signals.
        DROP INDEX __SCHEMA__.legacy_runs_idempotency_key, __SCHEMA__.legacy_runs_singleton_key,
            __SCHEMA__.legacy_signals_run_idx;
        ALTER TABLE __SCHEMA__.attempts_legacy DROP CONSTRAINT legacy_attempts_pkey;
        ALTER TABLE __SCHEMA__.signals_legacy DROP CONSTRAINT legacy_signals_pkey;
        FOR v IN
            SELECT t.relname AS tbl, k.conname AS name
            FROM pg_constraint k JOIN pg_class t ON t.oid = k.conrelid
            WHERE t.relnamespace = '__SCHEMA__'::regnamespace AND k.contype = 'c'
              AND t.relname LIKE '%\_legacy'
        LOOP
            EXECUTE format('ALTER TABLE %I.%I RENAME CONSTRAINT %I TO %I', '__SCHEMA_NAME__',
                           v.tbl, v.name, substr(v.name, length('legacy_') + 1));
        END LOOP;
        -- Ids beyond the legacy range wait aside (a run's parent must be there first).
        CREATE TEMPORARY TABLE durable_0009_runs ON COMMIT DROP AS
            SELECT * FROM __SCHEMA__.runs_legacy WHERE id >= v_hi;
        DELETE FROM __SCHEMA__.runs_legacy WHERE id >= v_hi;
        INSERT INTO __SCHEMA__.journal OVERRIDING SYSTEM VALUE
            SELECT * FROM __SCHEMA__.journal_legacy WHERE run_id >= v_hi;
        DELETE FROM __SCHEMA__.journal_legacy WHERE run_id >= v_hi;
        INSERT INTO __SCHEMA__.attempts OVERRIDING SYSTEM VALUE
            SELECT * FROM __SCHEMA__.attempts_legacy WHERE run_id >= v_hi;
        DELETE FROM __SCHEMA__.attempts_legacy WHERE run_id >= v_hi;
        INSERT INTO __SCHEMA__.signals OVERRIDING SYSTEM VALUE
            SELECT * FROM __SCHEMA__.signals_legacy WHERE run_id >= v_hi;
        DELETE FROM __SCHEMA__.signals_legacy WHERE run_id >= v_hi;
        EXECUTE format('ALTER TABLE __SCHEMA__.runs ATTACH PARTITION __SCHEMA__.runs_legacy '
                       'FOR VALUES FROM (MINVALUE) TO (%L)', v_hi);
        EXECUTE format('ALTER TABLE __SCHEMA__.journal ATTACH PARTITION __SCHEMA__.journal_legacy '
                       'FOR VALUES FROM (MINVALUE) TO (%L)', v_hi);
        EXECUTE format('ALTER TABLE __SCHEMA__.attempts ATTACH PARTITION __SCHEMA__.attempts_legacy '
                       'FOR VALUES FROM (MINVALUE) TO (%L)', v_hi);
        EXECUTE format('ALTER TABLE __SCHEMA__.signals ATTACH PARTITION __SCHEMA__.signals_legacy '
                       'FOR VALUES FROM (MINVALUE) TO (%L)', v_hi);
        INSERT INTO __SCHEMA__.runs SELECT * FROM durable_0009_runs;
        INSERT INTO __SCHEMA__.run_keys (kind, workflow, key, run_id)
        SELECT 'idempotency', workflow, idempotency_key, id FROM __SCHEMA__.runs
        WHERE idempotency_key IS NOT NULL;
        INSERT INTO __SCHEMA__.run_keys (kind, workflow, key, run_id)
        SELECT 'singleton', workflow, singleton_key, id FROM __SCHEMA__.runs
        WHERE singleton_key IS NOT NULL AND finished_at IS NULL;
    END IF;
END
$$;

-- 4. The foreign keys to runs, as in sql/schema.sql (the history tables have none now).
ALTER TABLE __SCHEMA__.cancel_requests ADD CONSTRAINT cancel_requests_run_id_fkey
    FOREIGN KEY (run_id) REFERENCES __SCHEMA__.runs (id) ON DELETE CASCADE;
ALTER TABLE __SCHEMA__.jobs ADD CONSTRAINT jobs_run_id_fkey
    FOREIGN KEY (run_id) REFERENCES __SCHEMA__.runs (id) ON DELETE CASCADE;
ALTER TABLE __SCHEMA__.schedules ADD CONSTRAINT schedules_last_run_id_fkey
    FOREIGN KEY (last_run_id) REFERENCES __SCHEMA__.runs (id) ON DELETE SET NULL;
