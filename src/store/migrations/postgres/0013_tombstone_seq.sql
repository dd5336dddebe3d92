-- Tombstones read by a database sequence (issue 18, item 13): each node applies the
-- tombstones after the last `seq` it applied, so a clock running ahead or behind on any
-- node cannot make it skip one. `seq` is MAX + 1, taken under a transaction-scoped
-- advisory lock in the transaction that marks the version DESTROYED, so numbers are
-- given in commit order without gaps (a reader never sees seq n+1 before seq n), and
-- UNIQUE backs that up. Tombstones written before this migration keep seq NULL: no
-- process running this version can hold a copy of them (it started after they were
-- destroyed).
ALTER TABLE key_tombstones ADD COLUMN seq BIGINT;
CREATE UNIQUE INDEX key_tombstones_by_seq ON key_tombstones (seq);

CREATE OR REPLACE FUNCTION arca_tombstone() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(7013);
    INSERT INTO key_tombstones (key_id, version, hsm_id, destroyed_at, retire_request, seq)
    VALUES (NEW.key_id, NEW.version, NEW.hsm_id, COALESCE(NEW.destroyed_at, NEW.updated_at),
            NEW.retire_request,
            (SELECT COALESCE(MAX(seq), 0) + 1 FROM key_tombstones));
    RETURN NULL;
END;
$$;
