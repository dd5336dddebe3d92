-- Persistent counters of events an operator must see across restarts (PostgreSQL): today
-- `hsm_logins_refused`, the logins the HSM refused (each sealed the node that saw it).
-- A counter only grows and is never deleted.
CREATE TABLE counters (
    name       TEXT PRIMARY KEY,
    value      BIGINT NOT NULL CHECK (value >= 0),
    updated_at BIGINT NOT NULL
);

CREATE FUNCTION arca_counters_no_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'a counter is never deleted';
END;
$$;
CREATE TRIGGER counters_no_delete BEFORE DELETE ON counters
    FOR EACH ROW EXECUTE FUNCTION arca_counters_no_delete();
CREATE TRIGGER counters_no_truncate BEFORE TRUNCATE ON counters
    FOR EACH STATEMENT EXECUTE FUNCTION arca_counters_no_delete();

CREATE FUNCTION arca_counters_only_grow() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.value < OLD.value OR NEW.name <> OLD.name THEN
        RAISE EXCEPTION 'a counter only grows';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER counters_only_grow BEFORE UPDATE ON counters
    FOR EACH ROW EXECUTE FUNCTION arca_counters_only_grow();
