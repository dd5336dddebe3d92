-- Key lifecycle (DESIGN §3): rotation schedule, retention, retirement, destruction
-- tombstones and background-job leases (PostgreSQL).
ALTER TABLE keys ADD COLUMN rotation_period_ms BIGINT CHECK (rotation_period_ms > 0);
ALTER TABLE keys ADD COLUMN retain_until BIGINT;
ALTER TABLE keys ADD COLUMN retention_applied_at BIGINT;

-- The approval request that retired a version (NULL: retention, or dev mode).
ALTER TABLE key_versions ADD COLUMN retire_request TEXT;
-- Set by the destroyer just before C_DestroyObject: from then on the retirement cannot be
-- cancelled, and a restart finishes the destruction.
ALTER TABLE key_versions ADD COLUMN destroying_at BIGINT;

-- A version whose HSM object may already be gone never comes back.
CREATE TRIGGER key_versions_no_cancel_while_destroying BEFORE UPDATE ON key_versions
FOR EACH ROW WHEN (OLD.state = 'SCHEDULED_FOR_DESTRUCTION'
    AND NEW.state IS DISTINCT FROM OLD.state AND NEW.state <> 'DESTROYED'
    AND OLD.destroying_at IS NOT NULL)
EXECUTE FUNCTION arca_refuse('destruction in progress');

-- Tombstones: one per destroyed version, written by the database itself in the
-- transaction that marks the version DESTROYED, kept forever.
CREATE TABLE key_tombstones (
    key_id         TEXT NOT NULL REFERENCES keys(id),
    version        BIGINT NOT NULL,
    hsm_id         TEXT NOT NULL,
    destroyed_at   BIGINT NOT NULL,
    retire_request TEXT,
    PRIMARY KEY (key_id, version)
);

CREATE FUNCTION arca_tombstone() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO key_tombstones (key_id, version, hsm_id, destroyed_at, retire_request)
    VALUES (NEW.key_id, NEW.version, NEW.hsm_id, COALESCE(NEW.destroyed_at, NEW.updated_at),
            NEW.retire_request);
    RETURN NULL;
END;
$$;

CREATE TRIGGER key_versions_tombstone AFTER UPDATE ON key_versions
FOR EACH ROW WHEN (NEW.state = 'DESTROYED' AND OLD.state IS DISTINCT FROM 'DESTROYED')
EXECUTE FUNCTION arca_tombstone();

CREATE TRIGGER key_tombstones_no_update BEFORE UPDATE ON key_tombstones
FOR EACH ROW EXECUTE FUNCTION arca_refuse('tombstones are immutable');

CREATE TRIGGER key_tombstones_no_delete BEFORE DELETE ON key_tombstones
FOR EACH ROW EXECUTE FUNCTION arca_refuse('tombstones are never deleted');

CREATE TRIGGER key_tombstones_no_truncate BEFORE TRUNCATE ON key_tombstones
FOR EACH STATEMENT EXECUTE FUNCTION arca_refuse('tombstones are never deleted');

-- Leases of background jobs: one holder at a time, until expires_at.
CREATE TABLE job_leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
