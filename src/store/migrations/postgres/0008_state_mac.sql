-- State the database cannot forge (DESIGN §2b, ADR 12): every row that grants, limits or
-- records authority carries `mac`, HMAC-SHA256 by the HSM key arca:state-mac over the
-- row's canonical encoding (table, identity, fields, state_seq), hex. NULL: not stamped
-- yet (written before this migration); such a row grants nothing until the one-time
-- re-stamp (docs/operations.md). `state_seq` starts at 1 and grows by one with every
-- authenticated change of the row: the seam for rollback detection (issue 17, item 3).
-- access_policies rows never change: their `seq` (the version) is their sequence.
ALTER TABLE tokens ADD COLUMN state_seq BIGINT NOT NULL DEFAULT 1;
ALTER TABLE tokens ADD COLUMN mac TEXT;
ALTER TABLE role_grants ADD COLUMN state_seq BIGINT NOT NULL DEFAULT 1;
ALTER TABLE role_grants ADD COLUMN mac TEXT;
ALTER TABLE access_policies ADD COLUMN mac TEXT;
ALTER TABLE key_versions ADD COLUMN state_seq BIGINT NOT NULL DEFAULT 1;
ALTER TABLE key_versions ADD COLUMN mac TEXT;
-- A key's retention date is authority to destroy it: its MAC covers (key id, date).
ALTER TABLE keys ADD COLUMN retention_mac TEXT;

-- principal_totp needs no MAC: its secret is sealed under the HSM key arca:meta with the
-- principal as AAD, so only the HSM makes a valid row. Its deletion is caught through
-- the roster below.
-- Authenticated sets, so that a deleted row is told apart from one that never existed:
-- 'totp' lists every principal ever enrolled in TOTP (sorted, comma-separated). The row
-- is made here, unstamped; a missing row fails every check that needs it (closed).
-- Members are hex-encoded UTF-8 names.
CREATE TABLE state_rosters (
    name      TEXT PRIMARY KEY,
    members   TEXT NOT NULL,
    state_seq BIGINT NOT NULL DEFAULT 1,
    mac       TEXT
);
INSERT INTO state_rosters (name, members) VALUES ('totp', '');
