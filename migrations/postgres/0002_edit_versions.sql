-- Version graph: each edit row records the version it was applied on, so after a rollback the
-- next edit branches from the rolled-back-to version (versions are never reused). Diagnostics of
-- the method (loss curves, norms) are kept beside the metrics.
ALTER TABLE edit_log ADD COLUMN parent_version BIGINT;
ALTER TABLE edit_log ADD COLUMN diagnostics TEXT;
-- A version names one overlay forever: at most one edit row per (session, version).
CREATE UNIQUE INDEX edit_log_versions ON edit_log (session_id, version) WHERE kind = 'edit';
