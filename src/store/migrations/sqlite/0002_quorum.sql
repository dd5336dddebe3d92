-- Dual control (SQLite): the sealed HSM PIN, the verifier of the quorum secret, and the
-- custodians' commitments and share-sealed TOTP secrets. No share, PIN or secret in clear.
CREATE TABLE quorum_config (
    id          BIGINT PRIMARY KEY CHECK (id = 1),
    generation  BIGINT NOT NULL CHECK (generation >= 1),
    threshold   BIGINT NOT NULL CHECK (threshold >= 1),
    shares      BIGINT NOT NULL CHECK (shares >= threshold AND shares <= 16),
    sealed_pin  TEXT NOT NULL,
    verifier    TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);

CREATE TRIGGER quorum_config_no_delete BEFORE DELETE ON quorum_config
BEGIN
    SELECT RAISE(ABORT, 'the quorum configuration is never deleted');
END;

CREATE TABLE custodians (
    name           TEXT NOT NULL,
    generation     BIGINT NOT NULL,
    share_index    BIGINT NOT NULL CHECK (share_index >= 1 AND share_index <= 16),
    commitment     TEXT NOT NULL,
    totp_sealed    TEXT NOT NULL,
    totp_last_step BIGINT,
    locked_until   BIGINT,
    created_at     BIGINT NOT NULL,
    PRIMARY KEY (name, generation),
    UNIQUE (generation, share_index)
);

CREATE TABLE custodian_failures (
    custodian TEXT NOT NULL,
    at        BIGINT NOT NULL,
    reason    TEXT NOT NULL
);
CREATE INDEX custodian_failures_by_time ON custodian_failures (custodian, at);
