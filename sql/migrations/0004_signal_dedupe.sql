-- Signals with a dedupe key (`engine.signal(..., dedupe_key=...)`): a second signal with the
-- same key to the same run is recorded once (signal_v2 in sql/functions.sql).
-- Must leave a database equal to a fresh sql/schema.sql (tests/integration/test_migrations.py).

ALTER TABLE __SCHEMA__.signals ADD COLUMN dedupe_key text;
CREATE UNIQUE INDEX signals_dedupe_idx ON __SCHEMA__.signals (run_id, dedupe_key)
    WHERE dedupe_key IS NOT NULL;
