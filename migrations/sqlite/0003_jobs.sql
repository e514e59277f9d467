-- Jobs (evaluations; sweeps later): queued, run one at a time, resumable. `spec` is what was
-- asked (JSON), `progress` the last reported count of requests, `result` what finished so far
-- (per-task results are written as each task ends, so a resumed job skips them).
CREATE TABLE jobs (
    id          TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('evaluation', 'sweep')),
    spec        TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    progress    TEXT,
    result      TEXT,
    created_at  TEXT NOT NULL,
    started_at  TEXT,
    finished_at TEXT
);
CREATE INDEX jobs_by_tenant ON jobs (tenant, kind, created_at);
CREATE INDEX jobs_by_status ON jobs (status, created_at);
