-- The step path in two round trips: complete_node_v2 reports the transaction that moved the
-- run, relock_v1 (sql/functions.sql) continues the run on the same worker from there.
DROP FUNCTION IF EXISTS __SCHEMA__.complete_node_v1(
    text, text, text, integer, timestamptz, boolean, integer, text, bigint
);
