-- Partnership terms now live in the partnership's event stream (proposals, acceptances,
-- termination); this table only maps the merchant pair to its partnership.
ALTER TABLE partnerships
    DROP COLUMN terms_version,
    DROP COLUMN commission_rate_bps,
    DROP COLUMN attribution_window_days,
    DROP COLUMN effective_from;

-- What a refund needs to know about its purchase: how much is left to refund, and the customer
-- keys to publish the refund under (the same partitions as the purchase).
ALTER TABLE purchases
    ADD COLUMN amount_minor   BIGINT,
    ADD COLUMN currency       TEXT,
    ADD COLUMN customer_keys  TEXT[],
    ADD COLUMN refunded_minor BIGINT NOT NULL DEFAULT 0;

-- Referrals, so that the referrer can cancel one.
CREATE TABLE referrals (
    referral_id           TEXT PRIMARY KEY,
    referrer_merchant_id  TEXT        NOT NULL,
    acceptor_merchant_id  TEXT        NOT NULL,
    customer_keys         TEXT[]      NOT NULL,
    cancelled_at          TIMESTAMPTZ
);

-- Every refund, also those recorded before their purchase (matched by transaction id).
CREATE TABLE refunds (
    refund_id       TEXT PRIMARY KEY,
    merchant_id     TEXT        NOT NULL,
    transaction_id  TEXT        NOT NULL,
    amount_minor    BIGINT      NOT NULL CHECK (amount_minor > 0),
    currency        TEXT        NOT NULL,
    recorded_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX refunds_by_transaction ON refunds (merchant_id, transaction_id);
