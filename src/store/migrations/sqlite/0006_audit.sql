-- The audit trail (DESIGN §6): one row per record, chained by hash; a seal row per
-- committed batch (HMAC by the HSM key arca:audit-mac); the sealed data keys that
-- encrypt record details; and a one-row head (the last seq and hash) that writers take
-- inside their batch transaction (BEGIN IMMEDIATE serialises them on SQLite).
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
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;

CREATE TABLE audit_seals (
    seq     BIGINT PRIMARY KEY,
    head    TEXT NOT NULL,
    seal    TEXT NOT NULL,
    node    TEXT NOT NULL,
    time_ms BIGINT NOT NULL
);
CREATE TRIGGER audit_seals_no_update BEFORE UPDATE ON audit_seals
BEGIN
    SELECT RAISE(ABORT, 'audit seals are append-only');
END;
CREATE TRIGGER audit_seals_no_delete BEFORE DELETE ON audit_seals
BEGIN
    SELECT RAISE(ABORT, 'audit seals are append-only');
END;

CREATE TABLE audit_deks (
    id         TEXT PRIMARY KEY,
    sealed     TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TRIGGER audit_deks_no_update BEFORE UPDATE ON audit_deks
BEGIN
    SELECT RAISE(ABORT, 'audit data keys are append-only');
END;
CREATE TRIGGER audit_deks_no_delete BEFORE DELETE ON audit_deks
BEGIN
    SELECT RAISE(ABORT, 'audit data keys are append-only');
END;

CREATE TABLE audit_head (
    id   BIGINT PRIMARY KEY CHECK (id = 1),
    seq  BIGINT NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_head (id, seq, hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');
CREATE TRIGGER audit_head_no_delete BEFORE DELETE ON audit_head
BEGIN
    SELECT RAISE(ABORT, 'the audit head is never deleted');
END;
CREATE TRIGGER audit_head_forward BEFORE UPDATE ON audit_head
WHEN NEW.seq <= OLD.seq
BEGIN
    SELECT RAISE(ABORT, 'the audit head only moves forward');
END;
