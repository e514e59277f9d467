-- Sessions: a base model plus an ordered edit log. Rows are soft-deleted so the log stays auditable.
CREATE TABLE sessions (
    id              TEXT PRIMARY KEY,
    tenant          TEXT NOT NULL,
    name            TEXT,
    created_at      TEXT NOT NULL,
    parent_id       TEXT,
    parent_version  BIGINT,
    current_version BIGINT NOT NULL DEFAULT 0,
    deleted_at      TEXT
);
CREATE INDEX sessions_by_tenant ON sessions (tenant, created_at);

-- Append-only edit log: one entry per edit or rollback, in `seq` order. An edit entry records
-- the version it produced and its delta (safetensors bytes); a rollback records its target.
CREATE TABLE edit_log (
    session_id  TEXT NOT NULL REFERENCES sessions (id),
    seq         BIGINT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('edit', 'rollback')),
    version     BIGINT NOT NULL,
    method      TEXT,
    request     TEXT,
    hparams     TEXT,
    metrics     TEXT,
    delta       BYTEA,
    duration_ms BIGINT,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
);
