-- The referral ledger's projections, all rebuilt from the admin and customer-activity topics.
-- Customer keys only; never a raw identifier.

CREATE TABLE partnership_terms (
    partnership_id           TEXT        NOT NULL,
    terms_version            INTEGER     NOT NULL,
    referrer_merchant_id     TEXT        NOT NULL,
    acceptor_merchant_id     TEXT        NOT NULL,
    commission_rate_bps      INTEGER     NOT NULL,
    attribution_window_days  INTEGER     NOT NULL,
    effective_from           TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (partnership_id, terms_version)
);

CREATE TABLE referrals (
    referral_id           TEXT PRIMARY KEY,
    partnership_id        TEXT        NOT NULL,
    terms_version         INTEGER     NOT NULL,
    referrer_merchant_id  TEXT        NOT NULL,
    acceptor_merchant_id  TEXT        NOT NULL,
    referrer_reference    TEXT        NOT NULL,
    referred_at           TIMESTAMPTZ NOT NULL,
    attribution_ends_at   TIMESTAMPTZ NOT NULL,
    status                TEXT        NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'converted'))
);

-- One row per customer key a referral carries, written by the copy of the event published
-- under that key, so that matching on one key depends only on that key's partition.
CREATE TABLE referral_keys (
    customer_key          TEXT        NOT NULL,
    acceptor_merchant_id  TEXT        NOT NULL,
    referral_id           TEXT        NOT NULL REFERENCES referrals,
    referred_at           TIMESTAMPTZ NOT NULL,
    attribution_ends_at   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (customer_key, acceptor_merchant_id, referral_id)
);

CREATE TABLE purchases (
    purchase_id     TEXT PRIMARY KEY,
    merchant_id     TEXT        NOT NULL,
    transaction_id  TEXT        NOT NULL,
    amount_minor    BIGINT      NOT NULL CHECK (amount_minor > 0),
    currency        TEXT        NOT NULL,
    purchased_at    TIMESTAMPTZ NOT NULL
);

CREATE TABLE purchase_keys (
    customer_key  TEXT        NOT NULL,
    merchant_id   TEXT        NOT NULL,
    purchase_id   TEXT        NOT NULL REFERENCES purchases,
    purchased_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (customer_key, merchant_id, purchase_id)
);

-- At most one commission per purchase: whichever copy of the purchase attributes it first wins,
-- and every copy computes the same one.
CREATE TABLE commissions (
    purchase_id           TEXT PRIMARY KEY REFERENCES purchases,
    referral_id           TEXT        NOT NULL REFERENCES referrals,
    partnership_id        TEXT        NOT NULL,
    terms_version         INTEGER     NOT NULL,
    referrer_merchant_id  TEXT        NOT NULL,
    acceptor_merchant_id  TEXT        NOT NULL,
    amount_minor          BIGINT      NOT NULL,
    currency              TEXT        NOT NULL,
    commission_rate_bps   INTEGER     NOT NULL,
    commission_minor      BIGINT      NOT NULL CHECK (commission_minor >= 0),
    purchased_at          TIMESTAMPTZ NOT NULL,
    attributed_at         TIMESTAMPTZ NOT NULL
);

CREATE INDEX commissions_by_referrer ON commissions (referrer_merchant_id, purchased_at DESC, purchase_id DESC);

-- Double entry: each entry's postings sum to zero (checked in code before they are written).
CREATE TABLE ledger_entries (
    entry_id     TEXT PRIMARY KEY,
    kind         TEXT        NOT NULL,
    purchase_id  TEXT        NOT NULL,
    currency     TEXT        NOT NULL,
    recorded_at  TIMESTAMPTZ NOT NULL
);

CREATE TABLE ledger_postings (
    entry_id      TEXT   NOT NULL REFERENCES ledger_entries,
    account       TEXT   NOT NULL,
    merchant_id   TEXT   NOT NULL,
    currency      TEXT   NOT NULL,
    amount_minor  BIGINT NOT NULL,
    PRIMARY KEY (entry_id, account, merchant_id)
);

-- Messages that could not be decoded or violate the event contract. They are kept, not
-- applied, so an operator can inspect them; the consumer moves on.
CREATE TABLE rejected_messages (
    message_ref  TEXT PRIMARY KEY,
    reason       TEXT        NOT NULL,
    payload      BYTEA       NOT NULL,
    rejected_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
