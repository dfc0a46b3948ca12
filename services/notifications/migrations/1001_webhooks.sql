-- Webhook endpoints, and the durable queue of deliveries to them with every attempt.

CREATE TABLE webhook_endpoints (
    endpoint_id      TEXT        PRIMARY KEY,
    merchant_id      TEXT        NOT NULL,
    idempotency_key  TEXT        NOT NULL,
    request_digest   TEXT        NOT NULL,
    url              TEXT        NOT NULL,
    -- Empty: every type.
    types            TEXT[]      NOT NULL,
    description      TEXT        NOT NULL,
    -- `whsec_…`; the merchant saw it once, the deliveries are signed with it.
    signing_secret   TEXT        NOT NULL,
    enabled          BOOLEAN     NOT NULL DEFAULT true,
    created_at       TIMESTAMPTZ NOT NULL,
    UNIQUE (merchant_id, idempotency_key)
);

-- One row per notification and endpoint, written in the transaction that wrote the
-- notification. A worker leases due rows (`FOR UPDATE SKIP LOCKED`, then `leased_until`), so
-- instances share the work; a lease that runs out (a crash mid-delivery) is taken again.
CREATE TABLE webhook_deliveries (
    endpoint_id      TEXT        NOT NULL REFERENCES webhook_endpoints,
    notification_id  UUID        NOT NULL,
    merchant_id      TEXT        NOT NULL,
    cursor           BIGINT      NOT NULL,
    status           TEXT        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'succeeded', 'failed')),
    attempts         INTEGER     NOT NULL DEFAULT 0,
    next_attempt_at  TIMESTAMPTZ NOT NULL,
    leased_until     TIMESTAMPTZ,
    PRIMARY KEY (endpoint_id, notification_id)
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_listed ON webhook_deliveries (endpoint_id, cursor DESC);

CREATE TABLE webhook_attempts (
    endpoint_id      TEXT        NOT NULL,
    notification_id  UUID        NOT NULL,
    attempt          INTEGER     NOT NULL,
    at               TIMESTAMPTZ NOT NULL,
    -- 0: no answer (refused, timed out).
    status_code      INTEGER     NOT NULL,
    latency_ms       INTEGER     NOT NULL,
    -- The first 512 bytes of the answer, or what went wrong.
    excerpt          TEXT        NOT NULL,
    PRIMARY KEY (endpoint_id, notification_id, attempt)
);
