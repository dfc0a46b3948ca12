-- API keys of their own: a merchant may hold several valid keys at once (rotation: issue a new
-- key, move the tills, revoke the old one), and a revoked key stays listed. Keys are 256 random
-- bits, so a plain SHA-256 is enough; the hint is the key's first eight characters.
CREATE TABLE api_keys (
    key_id       TEXT        PRIMARY KEY,
    merchant_id  TEXT        NOT NULL REFERENCES merchants,
    sha256       BYTEA       NOT NULL UNIQUE,
    hint         TEXT        NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL,
    revoked_at   TIMESTAMPTZ
);
CREATE INDEX api_keys_by_merchant ON api_keys (merchant_id, created_at);

-- Every merchant's existing key becomes its first listed key.
INSERT INTO api_keys (key_id, merchant_id, sha256, hint, created_at)
SELECT 'key_' || md5(merchant_id), merchant_id, api_key_sha256, 'tdm_', registered_at
FROM merchants;

ALTER TABLE merchants DROP COLUMN api_key_sha256;

-- The operator audit log: append-only, enforced by the database (no update, delete or
-- truncate, whoever asks).
CREATE TABLE operator_audit (
    sequence     BIGSERIAL   PRIMARY KEY,
    recorded_at  TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    action       TEXT        NOT NULL,
    target       TEXT        NOT NULL,
    outcome      TEXT        NOT NULL,
    detail       JSONB       NOT NULL,
    trace_id     TEXT        NOT NULL
);

CREATE FUNCTION operator_audit_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'operator_audit is append-only: % refused', TG_OP;
END;
$$;

CREATE TRIGGER operator_audit_append_only
    BEFORE UPDATE OR DELETE ON operator_audit
    FOR EACH ROW EXECUTE FUNCTION operator_audit_is_append_only();
CREATE TRIGGER operator_audit_no_truncate
    BEFORE TRUNCATE ON operator_audit
    FOR EACH STATEMENT EXECUTE FUNCTION operator_audit_is_append_only();
