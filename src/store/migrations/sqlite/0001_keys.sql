-- Keys, key versions and bearer tokens (SQLite).
CREATE TABLE keys (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    description     TEXT NOT NULL DEFAULT '',
    primary_version BIGINT NOT NULL CHECK (primary_version >= 1),
    created_at      BIGINT NOT NULL
);

-- A key name is never reused: keys are never deleted, and names never change.
CREATE TRIGGER keys_no_delete BEFORE DELETE ON keys
BEGIN
    SELECT RAISE(ABORT, 'keys are never deleted');
END;

CREATE TRIGGER keys_immutable_identity BEFORE UPDATE OF id, name ON keys
WHEN NEW.id <> OLD.id OR NEW.name <> OLD.name
BEGIN
    SELECT RAISE(ABORT, 'key id and name are immutable');
END;

CREATE TABLE key_versions (
    key_id       TEXT NOT NULL REFERENCES keys(id),
    version      BIGINT NOT NULL CHECK (version >= 1),
    state        TEXT NOT NULL CHECK (state IN
                   ('ENABLED', 'DISABLED', 'SCHEDULED_FOR_DESTRUCTION', 'DESTROYED')),
    hsm_id       TEXT NOT NULL UNIQUE,
    wrap_count   BIGINT NOT NULL DEFAULT 0 CHECK (wrap_count >= 0),
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    destroy_at   BIGINT,
    destroyed_at BIGINT,
    PRIMARY KEY (key_id, version)
);

-- Versions are tombstoned, never deleted.
CREATE TRIGGER key_versions_no_delete BEFORE DELETE ON key_versions
BEGIN
    SELECT RAISE(ABORT, 'key versions are never deleted');
END;

-- The lifecycle (DESIGN §3): ENABLED <-> DISABLED; ENABLED/DISABLED -> SCHEDULED_FOR_DESTRUCTION;
-- SCHEDULED_FOR_DESTRUCTION -> DISABLED (cancel) or DESTROYED. DESTROYED is final.
CREATE TRIGGER key_versions_state_transition BEFORE UPDATE OF state ON key_versions
WHEN NEW.state <> OLD.state AND NOT (
       (OLD.state = 'ENABLED' AND NEW.state IN ('DISABLED', 'SCHEDULED_FOR_DESTRUCTION'))
    OR (OLD.state = 'DISABLED' AND NEW.state IN ('ENABLED', 'SCHEDULED_FOR_DESTRUCTION'))
    OR (OLD.state = 'SCHEDULED_FOR_DESTRUCTION' AND NEW.state IN ('DISABLED', 'DESTROYED')))
BEGIN
    SELECT RAISE(ABORT, 'illegal key version state transition');
END;

CREATE TRIGGER key_versions_immutable_identity
BEFORE UPDATE OF key_id, version, hsm_id ON key_versions
WHEN NEW.key_id <> OLD.key_id OR NEW.version <> OLD.version OR NEW.hsm_id <> OLD.hsm_id
BEGIN
    SELECT RAISE(ABORT, 'key version identity is immutable');
END;

CREATE TABLE tokens (
    id         TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    principal  TEXT NOT NULL,
    roles      TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    revoked_at BIGINT
);
