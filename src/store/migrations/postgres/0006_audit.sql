-- The audit trail (DESIGN §6), as migrations/sqlite/0006_audit.sql. Writers on several
-- nodes take the one-row head with SELECT … FOR UPDATE in their batch transaction, so
-- the chain stays one gapless sequence. Row triggers refuse UPDATE and DELETE; statement
-- triggers refuse TRUNCATE (arca_refuse() is defined in 0001_keys.sql).
CREATE TABLE audit_log (
    seq       BIGINT PRIMARY KEY CHECK (seq >= 1),
    time_ms   BIGINT NOT NULL,
    kind      TEXT NOT NULL,
    operation TEXT NOT NULL,
    result    BIGINT NOT NULL,
    dek_id    TEXT NOT NULL,
    body      TEXT NOT NULL,
    hash      TEXT NOT NULL
);
CREATE INDEX audit_log_time ON audit_log (time_ms);

CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
FOR EACH ROW EXECUTE FUNCTION arca_refuse('the audit log is append-only');
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
FOR EACH ROW EXECUTE FUNCTION arca_refuse('the audit log is append-only');
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
FOR EACH STATEMENT EXECUTE FUNCTION arca_refuse('the audit log is append-only');

CREATE TABLE audit_seals (
    seq     BIGINT PRIMARY KEY,
    head    TEXT NOT NULL,
    seal    TEXT NOT NULL,
    node    TEXT NOT NULL,
    time_ms BIGINT NOT NULL
);
CREATE TRIGGER audit_seals_no_update BEFORE UPDATE ON audit_seals
FOR EACH ROW EXECUTE FUNCTION arca_refuse('audit seals are append-only');
CREATE TRIGGER audit_seals_no_delete BEFORE DELETE ON audit_seals
FOR EACH ROW EXECUTE FUNCTION arca_refuse('audit seals are append-only');
CREATE TRIGGER audit_seals_no_truncate BEFORE TRUNCATE ON audit_seals
FOR EACH STATEMENT EXECUTE FUNCTION arca_refuse('audit seals are append-only');

CREATE TABLE audit_deks (
    id         TEXT PRIMARY KEY,
    sealed     TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TRIGGER audit_deks_no_update BEFORE UPDATE ON audit_deks
FOR EACH ROW EXECUTE FUNCTION arca_refuse('audit data keys are append-only');
CREATE TRIGGER audit_deks_no_delete BEFORE DELETE ON audit_deks
FOR EACH ROW EXECUTE FUNCTION arca_refuse('audit data keys are append-only');
CREATE TRIGGER audit_deks_no_truncate BEFORE TRUNCATE ON audit_deks
FOR EACH STATEMENT EXECUTE FUNCTION arca_refuse('audit data keys are append-only');

CREATE TABLE audit_head (
    id   BIGINT PRIMARY KEY CHECK (id = 1),
    seq  BIGINT NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_head (id, seq, hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');
CREATE TRIGGER audit_head_no_delete BEFORE DELETE ON audit_head
FOR EACH ROW EXECUTE FUNCTION arca_refuse('the audit head is never deleted');
CREATE TRIGGER audit_head_no_truncate BEFORE TRUNCATE ON audit_head
FOR EACH STATEMENT EXECUTE FUNCTION arca_refuse('the audit head is never deleted');
CREATE TRIGGER audit_head_forward BEFORE UPDATE ON audit_head
FOR EACH ROW WHEN (NEW.seq <= OLD.seq)
EXECUTE FUNCTION arca_refuse('the audit head only moves forward');
