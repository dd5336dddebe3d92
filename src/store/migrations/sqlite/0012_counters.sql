-- Persistent counters of events an operator must see across restarts (SQLite): today
-- `hsm_logins_refused`, the logins the HSM refused (each sealed the node that saw it).
-- A counter only grows and is never deleted.
CREATE TABLE counters (
    name       TEXT PRIMARY KEY,
    value      BIGINT NOT NULL CHECK (value >= 0),
    updated_at BIGINT NOT NULL
);

CREATE TRIGGER counters_no_delete BEFORE DELETE ON counters
BEGIN
    SELECT RAISE(ABORT, 'a counter is never deleted');
END;

CREATE TRIGGER counters_only_grow BEFORE UPDATE ON counters
WHEN NEW.value < OLD.value OR NEW.name <> OLD.name
BEGIN
    SELECT RAISE(ABORT, 'a counter only grows');
END;
