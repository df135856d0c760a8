-- Versions: a run is pinned to (workflow, version, shape). Its `queue` holds all three
-- (`order@<digest>` for version 1, as before versions existed, `order@v2@<digest>` after),
-- so the claim still filters on that one column; `version` says it again, for reading and
-- filtering runs, and so does each recorded shape.
-- Must leave a database equal to a fresh sql/schema.sql (tests/integration/test_migrations.py).

ALTER TABLE __SCHEMA__.runs ADD COLUMN version integer NOT NULL DEFAULT 1 CHECK (version >= 1);
ALTER TABLE __SCHEMA__.shapes
    ADD COLUMN version integer NOT NULL DEFAULT 1 CHECK (version >= 1);
