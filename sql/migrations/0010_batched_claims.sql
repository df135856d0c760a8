-- Batched claims and group commit: __SCHEMA__.claim_batch_v1 and locker_aborted_v1 (see
-- sql/functions.sql, applied whole after any migration); no table changes.
SELECT 1;
