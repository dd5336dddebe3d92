-- People, not principals (ADR 15): the person behind a request's requester, by the access
-- policy in force when the request was opened. Approvals compare it, and the requester's
-- person by the policy in force at approval, with the approver's person. Requests opened
-- before this migration have none (NULL): their requester principal stands for the person.
ALTER TABLE approval_requests ADD COLUMN requester_person TEXT;

-- Recorded once, like the rest of what was asked.
CREATE TRIGGER approval_requests_requester_person_immutable
BEFORE UPDATE OF requester_person ON approval_requests
WHEN NEW.requester_person IS NOT OLD.requester_person
BEGIN
    SELECT RAISE(ABORT, 'an approval request''s content is immutable');
END;
