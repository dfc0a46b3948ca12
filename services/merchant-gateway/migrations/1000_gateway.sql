-- The merchant gateway's own state. Raw customer identifiers never appear here: only customer
-- keys, and only inside event payloads and the outbox.

CREATE TABLE merchants (
    merchant_id          TEXT PRIMARY KEY,
    display_name         TEXT        NOT NULL,
    settlement_currency  TEXT        NOT NULL,
    time_zone            TEXT        NOT NULL,
    -- SHA-256 of the API key. Keys are 256 random bits, so a plain hash is enough.
    api_key_sha256       BYTEA       NOT NULL UNIQUE,
    registered_at        TIMESTAMPTZ NOT NULL
);

CREATE TABLE partnerships (
    partnership_id           TEXT PRIMARY KEY,
    referrer_merchant_id     TEXT        NOT NULL REFERENCES merchants,
    acceptor_merchant_id     TEXT        NOT NULL REFERENCES merchants,
    terms_version            INTEGER     NOT NULL,
    commission_rate_bps      INTEGER     NOT NULL CHECK (commission_rate_bps BETWEEN 1 AND 10000),
    attribution_window_days  INTEGER     NOT NULL CHECK (attribution_window_days BETWEEN 1 AND 365),
    effective_from           TIMESTAMPTZ NOT NULL,
    UNIQUE (referrer_merchant_id, acceptor_merchant_id),
    CHECK (referrer_merchant_id <> acceptor_merchant_id)
);

-- A merchant's transaction ids are unique: the same sale is never recorded twice.
CREATE TABLE purchases (
    merchant_id     TEXT NOT NULL REFERENCES merchants,
    transaction_id  TEXT NOT NULL,
    purchase_id     TEXT NOT NULL UNIQUE,
    PRIMARY KEY (merchant_id, transaction_id)
);

-- The first answer to every idempotency key. The fingerprint is a SHA-256 of the request after
-- pseudonymisation, so it cannot be reversed into raw identifiers.
CREATE TABLE idempotency_records (
    merchant_id          TEXT        NOT NULL,
    idempotency_key      TEXT        NOT NULL,
    operation            TEXT        NOT NULL,
    request_fingerprint  BYTEA       NOT NULL,
    response             BYTEA       NOT NULL,
    recorded_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (merchant_id, idempotency_key)
);
