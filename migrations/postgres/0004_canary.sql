-- The damage guard: a session's canary setting (mode and budget, JSON) and, per edit, the
-- canary reading of the version it made (JSON; NULL when the probes did not run).
ALTER TABLE sessions ADD COLUMN canary TEXT;
ALTER TABLE edit_log ADD COLUMN canary TEXT;
