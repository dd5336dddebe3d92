-- Approval requests of quorum operations (PostgreSQL). The same tables, columns and
-- constraints as migrations/sqlite/0003_approvals.sql, and the same rules as its
-- triggers (arca_refuse comes from 0001). A custodian's share rests only sealed under
-- the HSM key arca:meta and is wiped (NULL) when the request is decided; who approved
-- and when stays. Nothing here is ever deleted. Ids compare in byte order (COLLATE "C"),
-- as in SQLite: ListRequests pages by (created_at, id).
CREATE TABLE approval_requests (
    id          TEXT COLLATE "C" PRIMARY KEY,
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
FOR EACH ROW EXECUTE FUNCTION arca_refuse('approval requests are never deleted');

CREATE TRIGGER approval_requests_no_truncate BEFORE TRUNCATE ON approval_requests
FOR EACH STATEMENT EXECUTE FUNCTION arca_refuse('approval requests are never deleted');

-- Only a PENDING request changes: a decided one is final.
CREATE TRIGGER approval_requests_decided_are_final BEFORE UPDATE ON approval_requests
FOR EACH ROW WHEN (OLD.state <> 'PENDING')
EXECUTE FUNCTION arca_refuse('a decided approval request is final');

-- What was asked (and what custodians reviewed) never changes.
CREATE TRIGGER approval_requests_immutable_content BEFORE UPDATE ON approval_requests
FOR EACH ROW WHEN (NEW.id IS DISTINCT FROM OLD.id
    OR NEW.operation IS DISTINCT FROM OLD.operation
    OR NEW.parameters IS DISTINCT FROM OLD.parameters
    OR NEW.digest IS DISTINCT FROM OLD.digest
    OR NEW.requester IS DISTINCT FROM OLD.requester
    OR NEW.threshold IS DISTINCT FROM OLD.threshold
    OR NEW.generation IS DISTINCT FROM OLD.generation
    OR NEW.created_at IS DISTINCT FROM OLD.created_at
    OR NEW.expires_at IS DISTINCT FROM OLD.expires_at)
EXECUTE FUNCTION arca_refuse('an approval request''s content is immutable');

CREATE TABLE request_approvals (
    request_id   TEXT COLLATE "C" NOT NULL REFERENCES approval_requests(id),
    custodian    TEXT NOT NULL,
    approved_at  BIGINT NOT NULL,
    share_sealed TEXT,
    PRIMARY KEY (request_id, custodian)
);

-- Approvals go to pending requests only (a trigger WHEN cannot hold a subquery here).
CREATE FUNCTION arca_approval_to_pending_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT state FROM approval_requests WHERE id = NEW.request_id)
           IS DISTINCT FROM 'PENDING' THEN
        RAISE EXCEPTION 'approvals go to pending requests only'
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER request_approvals_pending_only BEFORE INSERT ON request_approvals
FOR EACH ROW EXECUTE FUNCTION arca_approval_to_pending_only();

CREATE TRIGGER request_approvals_no_delete BEFORE DELETE ON request_approvals
FOR EACH ROW EXECUTE FUNCTION arca_refuse('approvals are never deleted');

CREATE TRIGGER request_approvals_no_truncate BEFORE TRUNCATE ON request_approvals
FOR EACH STATEMENT EXECUTE FUNCTION arca_refuse('approvals are never deleted');

-- Who approved and when never changes; a sealed share can only be wiped.
CREATE TRIGGER request_approvals_wipe_only BEFORE UPDATE ON request_approvals
FOR EACH ROW WHEN (NEW.request_id IS DISTINCT FROM OLD.request_id
    OR NEW.custodian IS DISTINCT FROM OLD.custodian
    OR NEW.approved_at IS DISTINCT FROM OLD.approved_at
    OR NEW.share_sealed IS NOT NULL)
EXECUTE FUNCTION arca_refuse('an approval can only have its share wiped');
