-- Keys, key versions and bearer tokens (PostgreSQL). The same tables, columns and
-- constraints as migrations/sqlite/0001_keys.sql, and the same rules as its triggers, as
-- PL/pgSQL trigger functions. Row triggers do not see TRUNCATE: statement triggers
-- refuse it.
--
-- Names compare in byte order (COLLATE "C"), as in SQLite, whatever the database's
-- default collation: ListKeys pages by `name > $after ORDER BY name`.
CREATE TABLE keys (
    id              TEXT PRIMARY KEY,
    name            TEXT COLLATE "C" NOT NULL UNIQUE,
    description     TEXT NOT NULL DEFAULT '',
    primary_version BIGINT NOT NULL CHECK (primary_version >= 1),
    created_at      BIGINT NOT NULL
);

CREATE FUNCTION arca_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%', TG_ARGV[0] USING ERRCODE = 'integrity_constraint_violation';
END;
$$;

-- A key name is never reused: keys are never deleted, and names never change.
CREATE TRIGGER keys_no_delete BEFORE DELETE ON keys
FOR EACH ROW EXECUTE FUNCTION arca_refuse('keys are never deleted');

CREATE TRIGGER keys_no_truncate BEFORE TRUNCATE ON keys
FOR EACH STATEMENT EXECUTE FUNCTION arca_refuse('keys are never deleted');

CREATE TRIGGER keys_immutable_identity BEFORE UPDATE ON keys
FOR EACH ROW WHEN (NEW.id IS DISTINCT FROM OLD.id OR NEW.name IS DISTINCT FROM OLD.name)
EXECUTE FUNCTION arca_refuse('key id and name are immutable');

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
FOR EACH ROW EXECUTE FUNCTION arca_refuse('key versions are never deleted');

CREATE TRIGGER key_versions_no_truncate BEFORE TRUNCATE ON key_versions
FOR EACH STATEMENT EXECUTE FUNCTION arca_refuse('key versions are never deleted');

-- The lifecycle (DESIGN §3): ENABLED <-> DISABLED; ENABLED/DISABLED -> SCHEDULED_FOR_DESTRUCTION;
-- SCHEDULED_FOR_DESTRUCTION -> DISABLED (cancel) or DESTROYED. DESTROYED is final.
CREATE TRIGGER key_versions_state_transition BEFORE UPDATE ON key_versions
FOR EACH ROW WHEN (NEW.state IS DISTINCT FROM OLD.state AND NOT (
       (OLD.state = 'ENABLED' AND NEW.state IN ('DISABLED', 'SCHEDULED_FOR_DESTRUCTION'))
    OR (OLD.state = 'DISABLED' AND NEW.state IN ('ENABLED', 'SCHEDULED_FOR_DESTRUCTION'))
    OR (OLD.state = 'SCHEDULED_FOR_DESTRUCTION' AND NEW.state IN ('DISABLED', 'DESTROYED'))))
EXECUTE FUNCTION arca_refuse('illegal key version state transition');

CREATE TRIGGER key_versions_immutable_identity BEFORE UPDATE ON key_versions
FOR EACH ROW WHEN (NEW.key_id IS DISTINCT FROM OLD.key_id
    OR NEW.version IS DISTINCT FROM OLD.version
    OR NEW.hsm_id IS DISTINCT FROM OLD.hsm_id)
EXECUTE FUNCTION arca_refuse('key version identity is immutable');

CREATE TABLE tokens (
    id         TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    principal  TEXT NOT NULL,
    roles      TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    revoked_at BIGINT
);
