-- Attempt slots for TOTP checks (ADR 14): an attempt is reserved as a 'pending' failure
-- row before its code is checked, under the same row lock that counts failures. A failed
-- check settles the row (its reason replaces 'pending'); a passed check deletes it. So
-- the failures and the attempts in flight together never exceed the limit.
ALTER TABLE principal_failures ADD COLUMN attempt TEXT;
ALTER TABLE custodian_failures ADD COLUMN attempt TEXT;
CREATE UNIQUE INDEX principal_failures_by_attempt ON principal_failures (attempt);
CREATE UNIQUE INDEX custodian_failures_by_attempt ON custodian_failures (attempt);
