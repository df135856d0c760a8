-- jobs.run_id loses its foreign key to runs.
--
-- Why: runs is partitioned (0009), and PostgreSQL checks a foreign key to a partitioned
-- table with a query on the whole partitioned table, which locks every partition and
-- prunes them at each execution. On this project's machine that check took about 75 of
-- the 100 us of a job insert (a DO loop of inserts, 26 us without it), a third of a
-- start's server time. Nothing relies on its ON DELETE CASCADE: purge_v1 and
-- drop_history_partition_v1 delete a run's jobs before the run, and a job whose run is
-- gone anyway is deleted by the claim that finds it (sql/functions.sql).
ALTER TABLE __SCHEMA__.jobs DROP CONSTRAINT IF EXISTS jobs_run_id_fkey;
