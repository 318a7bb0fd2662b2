-- The cluster registry: clusters, their agents' tokens, users, and who may reach which cluster.
-- Written once for SQLite and PostgreSQL: only TEXT and BIGINT, no dialect features.
-- Tokens are stored as the lowercase hex SHA-256 of the token, never the token itself.

CREATE TABLE clusters (
    name TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL
);

CREATE TABLE agent_tokens (
    token_hash TEXT PRIMARY KEY,
    cluster TEXT NOT NULL REFERENCES clusters (name) ON DELETE CASCADE,
    created_at BIGINT NOT NULL
);

CREATE INDEX agent_tokens_by_cluster ON agent_tokens (cluster);

CREATE TABLE users (
    name TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

-- `groups`: the Kubernetes groups the user acts as on that cluster (Impersonate-Group),
-- newline-separated; empty for none.
CREATE TABLE grants (
    user_name TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
    cluster TEXT NOT NULL REFERENCES clusters (name) ON DELETE CASCADE,
    groups TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (user_name, cluster)
);

CREATE INDEX grants_by_cluster ON grants (cluster);
