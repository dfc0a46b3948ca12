-- The ledger becomes event-sourced: each partnership's terms and commission decisions are a
-- stream in `events` ('partnership-<id>'), and the tables below are projections of those streams
-- (rebuilt by `referral_ledger::rebuild_projections`) or of the customer-activity topic (rebuilt
-- by replaying it in a new consumer group). The old projections are dropped; a deployment that
-- had data re-reads its topics with a new TANDEM_LEDGER_CONSUMER_GROUP.
DROP TABLE IF EXISTS ledger_postings, ledger_entries, commissions, purchase_keys, purchases,
    referral_keys, referrals, partnership_terms CASCADE;
TRUNCATE applied_messages;

-- From the customer-activity topic, one customer key's copy at a time. ------------------------

CREATE TABLE referrals (
    referral_id           TEXT PRIMARY KEY,
    partnership_id        TEXT        NOT NULL,
    terms_version         INTEGER     NOT NULL,
    referrer_merchant_id  TEXT        NOT NULL,
    acceptor_merchant_id  TEXT        NOT NULL,
    referrer_reference    TEXT        NOT NULL,
    referred_at           TIMESTAMPTZ NOT NULL,
    attribution_ends_at   TIMESTAMPTZ NOT NULL,
    cancelled_at          TIMESTAMPTZ,
    automatic             BOOLEAN     NOT NULL DEFAULT false,
    converted             BOOLEAN     NOT NULL DEFAULT false
);

CREATE INDEX referrals_by_referrer ON referrals (referrer_merchant_id, referred_at DESC, referral_id DESC);

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
    purchased_at    TIMESTAMPTZ NOT NULL,
    UNIQUE (merchant_id, transaction_id)
);

CREATE TABLE purchase_keys (
    customer_key  TEXT        NOT NULL,
    merchant_id   TEXT        NOT NULL,
    purchase_id   TEXT        NOT NULL REFERENCES purchases,
    purchased_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (customer_key, merchant_id, purchase_id)
);

-- Refunds; `handled` stays false while the refund waits for its purchase.
CREATE TABLE refunds (
    refund_id       TEXT PRIMARY KEY,
    merchant_id     TEXT        NOT NULL,
    transaction_id  TEXT        NOT NULL,
    amount_minor    BIGINT      NOT NULL,
    currency        TEXT        NOT NULL,
    refunded_at     TIMESTAMPTZ NOT NULL,
    handled         BOOLEAN     NOT NULL DEFAULT false
);

CREATE INDEX refunds_waiting ON refunds (merchant_id, transaction_id) WHERE NOT handled;

-- From the partnership streams in `events`. -------------------------------------------------

CREATE TABLE partnerships (
    partnership_id        TEXT PRIMARY KEY,
    referrer_merchant_id  TEXT        NOT NULL,
    acceptor_merchant_id  TEXT        NOT NULL,
    terminated_at         TIMESTAMPTZ
);

CREATE INDEX partnerships_by_referrer ON partnerships (referrer_merchant_id);

CREATE TABLE partnership_versions (
    partnership_id  TEXT        NOT NULL REFERENCES partnerships,
    version         INTEGER     NOT NULL,
    proposed_by     TEXT        NOT NULL,
    -- tandem.v1.Terms, protobuf-encoded
    terms           BYTEA       NOT NULL,
    effective_from  TIMESTAMPTZ NOT NULL,
    accepted_by     TEXT,
    PRIMARY KEY (partnership_id, version)
);

-- One line per attributed purchase, earned or not.
CREATE TABLE commissions (
    purchase_id           TEXT PRIMARY KEY,
    partnership_id        TEXT        NOT NULL REFERENCES partnerships,
    referral_id           TEXT        NOT NULL,
    referrer_merchant_id  TEXT        NOT NULL,
    acceptor_merchant_id  TEXT        NOT NULL,
    terms_version         INTEGER     NOT NULL,
    rule                  TEXT        NOT NULL,
    amount_minor          BIGINT      NOT NULL,
    currency              TEXT        NOT NULL,
    commission_minor      BIGINT      NOT NULL CHECK (commission_minor >= 0),
    refunded_minor        BIGINT      NOT NULL DEFAULT 0,
    reversed_minor        BIGINT      NOT NULL DEFAULT 0 CHECK (reversed_minor <= commission_minor),
    purchased_at          TIMESTAMPTZ NOT NULL,
    period_start          TIMESTAMPTZ,
    payable_at            TIMESTAMPTZ NOT NULL,
    not_earned_reason     TEXT,
    -- tandem.v1.Calculation, protobuf-encoded; NULL when nothing was earned
    calculation           BYTEA,
    recorded_at           TIMESTAMPTZ NOT NULL
);

CREATE INDEX commissions_by_referrer ON commissions (referrer_merchant_id, purchased_at DESC, purchase_id DESC);
CREATE INDEX commissions_by_acceptor ON commissions (acceptor_merchant_id, purchased_at DESC, purchase_id DESC);

-- Double entry: each entry's postings sum to zero (checked in code before they are written).
CREATE TABLE ledger_entries (
    entry_id        TEXT PRIMARY KEY,
    partnership_id  TEXT        NOT NULL,
    kind            TEXT        NOT NULL CHECK (kind IN ('commission_accrual', 'commission_reversal')),
    purchase_id     TEXT        NOT NULL,
    currency        TEXT        NOT NULL,
    -- From this instant the amount counts as payable rather than accrued.
    payable_at      TIMESTAMPTZ NOT NULL,
    recorded_at     TIMESTAMPTZ NOT NULL
);

CREATE TABLE ledger_postings (
    entry_id      TEXT   NOT NULL REFERENCES ledger_entries,
    account       TEXT   NOT NULL,
    merchant_id   TEXT   NOT NULL,
    currency      TEXT   NOT NULL,
    amount_minor  BIGINT NOT NULL,
    PRIMARY KEY (entry_id, account, merchant_id)
);

CREATE INDEX ledger_postings_by_merchant ON ledger_postings (merchant_id, currency);
