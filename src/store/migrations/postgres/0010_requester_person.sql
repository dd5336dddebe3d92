-- People, not principals (ADR 15): the person behind a request's requester, by the access
-- policy in force when the request was opened. The same column and rule as
-- migrations/sqlite/0010_requester_person.sql (arca_refuse comes from 0001). Requests
-- opened before this migration have none (NULL): their requester principal stands for
-- the person.
ALTER TABLE approval_requests ADD COLUMN requester_person TEXT;

-- Recorded once, like the rest of what was asked.
CREATE TRIGGER approval_requests_requester_person_immutable BEFORE UPDATE ON approval_requests
FOR EACH ROW WHEN (NEW.requester_person IS DISTINCT FROM OLD.requester_person)
EXECUTE FUNCTION arca_refuse('an approval request''s content is immutable');
