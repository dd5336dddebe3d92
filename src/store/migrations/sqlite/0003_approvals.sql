-- Approval requests of quorum operations (SQLite). A custodian's share rests only sealed
-- under the HSM key arca:meta (hex of version ‖ IV ‖ ciphertext ‖ tag, AAD binding the
-- request and the custodian) and is wiped (NULL) when the request is decided; who
-- approved and when stays. Nothing here is ever deleted.
CREATE TABLE approval_requests (
    id          TEXT PRIMARY KEY,
    operation   TEXT NOT NULL,
    parameters  TEXT NOT NULL,
    digest      TEXT NOT NULL,
    requester   TEXT NOT NULL,
    threshold   BIGINT NOT NULL CHECK (threshold >= 1 AND threshold <= 16),
    generation  BIGINT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN
                  ('PENDING', 'EXECUTED', 'REJECTED', 'EXPIRED', 'FAILED')),
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    decided_at  BIGINT,
    decided_by  TEXT,
    reason      TEXT,
    result      TEXT,
    CHECK ((state = 'PENDING') = (decided_at IS NULL)),
    CHECK (state = 'EXECUTED' OR result IS NULL)
);
CREATE INDEX approval_requests_by_time ON approval_requests (created_at, id);
CREATE INDEX approval_requests_by_state ON approval_requests (state, expires_at);

CREATE TRIGGER approval_requests_no_delete BEFORE DELETE ON approval_requests
BEGIN
    SELECT RAISE(ABORT, 'approval requests are never deleted');
END;

-- Only a PENDING request changes: a decided one is final.
CREATE TRIGGER approval_requests_decided_are_final BEFORE UPDATE ON approval_requests
WHEN OLD.state <> 'PENDING'
BEGIN
    SELECT RAISE(ABORT, 'a decided approval request is final');
END;

-- What was asked (and what custodians reviewed) never changes.
CREATE TRIGGER approval_requests_immutable_content
BEFORE UPDATE OF id, operation, parameters, digest, requester, threshold, generation,
    created_at, expires_at ON approval_requests
WHEN NEW.id <> OLD.id OR NEW.operation <> OLD.operation OR NEW.parameters <> OLD.parameters
    OR NEW.digest <> OLD.digest OR NEW.requester <> OLD.requester
    OR NEW.threshold <> OLD.threshold OR NEW.generation <> OLD.generation
    OR NEW.created_at <> OLD.created_at OR NEW.expires_at <> OLD.expires_at
BEGIN
    SELECT RAISE(ABORT, 'an approval request''s content is immutable');
END;

CREATE TABLE request_approvals (
    request_id   TEXT NOT NULL REFERENCES approval_requests(id),
    custodian    TEXT NOT NULL,
    approved_at  BIGINT NOT NULL,
    share_sealed TEXT,
    PRIMARY KEY (request_id, custodian)
);

-- Approvals go to pending requests only.
CREATE TRIGGER request_approvals_pending_only BEFORE INSERT ON request_approvals
WHEN (SELECT state FROM approval_requests WHERE id = NEW.request_id) IS NOT 'PENDING'
BEGIN
    SELECT RAISE(ABORT, 'approvals go to pending requests only');
END;

CREATE TRIGGER request_approvals_no_delete BEFORE DELETE ON request_approvals
BEGIN
    SELECT RAISE(ABORT, 'approvals are never deleted');
END;

-- Who approved and when never changes; a sealed share can only be wiped.
CREATE TRIGGER request_approvals_wipe_only BEFORE UPDATE ON request_approvals
WHEN NEW.request_id <> OLD.request_id OR NEW.custodian <> OLD.custodian
    OR NEW.approved_at <> OLD.approved_at OR NEW.share_sealed IS NOT NULL
BEGIN
    SELECT RAISE(ABORT, 'an approval can only have its share wiped');
END;
