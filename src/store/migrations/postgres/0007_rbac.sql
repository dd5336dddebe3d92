-- Access control: approved policy versions, time-bound role grants (elevation and
-- break-glass), break-glass reviews, and principals' TOTP enrolments with their failures.
-- No TOTP secret in clear: it rests sealed under the HSM key arca:meta.

-- Policies approved with UpdatePolicy (the newest is in force on every node).
CREATE TABLE access_policies (
    seq         BIGINT PRIMARY KEY,
    text        TEXT NOT NULL,
    request_id  TEXT,
    created_at  BIGINT NOT NULL
);

CREATE TABLE role_grants (
    id          TEXT PRIMARY KEY,
    principal   TEXT NOT NULL,
    role        TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('elevation', 'break-glass')),
    reason      TEXT NOT NULL,
    request_id  TEXT,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL CHECK (expires_at > created_at)
);
CREATE INDEX role_grants_by_expiry ON role_grants (expires_at);

-- One review per break-glass grant, open until an auditor closes it.
CREATE TABLE access_reviews (
    id          TEXT PRIMARY KEY,
    grant_id    TEXT NOT NULL UNIQUE REFERENCES role_grants (id),
    principal   TEXT NOT NULL,
    reason      TEXT NOT NULL,
    opened_at   BIGINT NOT NULL,
    closed_at   BIGINT,
    closed_by   TEXT,
    note        TEXT
);

CREATE TABLE principal_totp (
    principal     TEXT PRIMARY KEY,
    totp_sealed   TEXT NOT NULL,
    last_step     BIGINT,
    locked_until  BIGINT,
    enrolled_at   BIGINT NOT NULL
);

CREATE TABLE principal_failures (
    principal TEXT NOT NULL,
    at        BIGINT NOT NULL,
    reason    TEXT NOT NULL
);
CREATE INDEX principal_failures_by_time ON principal_failures (principal, at);
