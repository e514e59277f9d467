-- Training jobs (trained editors): `kind` also takes 'training'. SQLite cannot change a CHECK
-- constraint in place, so the table is rebuilt with its rows and indexes.
CREATE TABLE jobs_new (
    id          TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('evaluation', 'sweep', 'training')),
    spec        TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    progress    TEXT,
    result      TEXT,
    created_at  TEXT NOT NULL,
    started_at  TEXT,
    finished_at TEXT
);
INSERT INTO jobs_new (id, tenant, kind, spec, status, progress, result, created_at, started_at, finished_at)
    SELECT id, tenant, kind, spec, status, progress, result, created_at, started_at, finished_at FROM jobs;
DROP TABLE jobs;
ALTER TABLE jobs_new RENAME TO jobs;
CREATE INDEX jobs_by_tenant ON jobs (tenant, kind, created_at);
CREATE INDEX jobs_by_status ON jobs (status, created_at);
