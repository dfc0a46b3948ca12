-- The ledger's engine in two stages (see docs/ARCHITECTURE.md, "The ledger engine").
--
-- Attribution (consumes admin and customer-activity, keyed by customer): owns referrals,
-- purchases, refunds, the terms projection (partnerships, partnership_versions) and the record of
-- which purchase it attributed to whom; hands commands to the commission stage through the
-- outbox (topic `attributions`, keyed by partnership).
--
-- Commissions (consumes `attributions`, one writer per partnership): owns the partnership
-- streams in `events`, their core snapshots, the keyed decision state (tallies, refunds seen,
-- parked refunds, the purchase records in `commissions`), the double-entry ledger, the payable
-- timers, and announces its decisions on the `ledger` topic through the outbox.
--
-- Existing data is re-derived by replaying the topics into a new consumer group, as for 1001.
TRUNCATE ledger_postings, ledger_entries, commissions, partnership_versions, partnerships,
    purchase_keys, purchases, referral_keys, referrals, refunds, applied_messages CASCADE;
DELETE FROM events WHERE stream_id LIKE 'partnership-%';
DROP TABLE admin_progress;

-- Attribution -----------------------------------------------------------------------------------

CREATE TABLE admin_progress (
    singleton        BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
    applied_through  BIGINT  NOT NULL
);
INSERT INTO admin_progress (singleton, applied_through) VALUES (true, 0);

-- Which purchase attribution gave to which partnership: at most one, whichever customer key's
-- copy got there first.
CREATE TABLE attributed_purchases (
    purchase_id     TEXT PRIMARY KEY REFERENCES purchases,
    partnership_id  TEXT        NOT NULL,
    referral_id     TEXT        NOT NULL REFERENCES referrals
);

-- A cancellation that arrived before its referral: applied when the referral arrives.
CREATE TABLE pending_cancellations (
    referral_id   TEXT PRIMARY KEY,
    cancelled_at  TIMESTAMPTZ NOT NULL
);

-- Commissions -----------------------------------------------------------------------------------

-- The head of each partnership stream (the optimistic-concurrency fence is the unique
-- (stream_id, sequence) of `events`) and a snapshot of its core: tandem.v1.CoreSnapshot.
CREATE TABLE partnership_books (
    partnership_id        TEXT PRIMARY KEY,
    sequence              INTEGER     NOT NULL,
    referrer_merchant_id  TEXT,
    acceptor_merchant_id  TEXT,
    core                  BYTEA       NOT NULL
);

CREATE TABLE customer_tallies (
    partnership_id     TEXT        NOT NULL,
    referral_id        TEXT        NOT NULL,
    purchases          INTEGER     NOT NULL,
    first_purchase_at  TIMESTAMPTZ,
    commission_minor   BIGINT      NOT NULL,
    PRIMARY KEY (partnership_id, referral_id)
);

CREATE TABLE period_tallies (
    partnership_id    TEXT        NOT NULL,
    period_start      TIMESTAMPTZ NOT NULL,
    spend_minor       BIGINT      NOT NULL,
    commission_minor  BIGINT      NOT NULL,
    PRIMARY KEY (partnership_id, period_start)
);

CREATE TABLE partnership_refunds (
    partnership_id  TEXT NOT NULL,
    refund_id       TEXT NOT NULL,
    PRIMARY KEY (partnership_id, refund_id)
);

CREATE TABLE parked_refunds (
    partnership_id  TEXT        NOT NULL,
    purchase_id     TEXT        NOT NULL,
    position        INTEGER     NOT NULL,
    refund_id       TEXT        NOT NULL,
    amount_minor    BIGINT      NOT NULL,
    currency        TEXT        NOT NULL,
    refunded_at     TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (partnership_id, purchase_id, position)
);

-- Commission lines no longer reference the attribution stage's tables; they point at the
-- decision in the partnership stream instead, so Explain reads one event.
ALTER TABLE commissions DROP CONSTRAINT IF EXISTS commissions_partnership_id_fkey;
ALTER TABLE commissions ADD COLUMN decision_sequence INTEGER NOT NULL;
CREATE INDEX commissions_by_partnership ON commissions (partnership_id, purchase_id);

-- Commissions whose holding period has not ended yet: the timer survives restarts.
CREATE TABLE payable_timers (
    purchase_id     TEXT PRIMARY KEY,
    partnership_id  TEXT        NOT NULL,
    payable_at      TIMESTAMPTZ NOT NULL,
    -- The trace context of the purchase, carried to the announcement.
    header_names    TEXT[]      NOT NULL,
    header_values   TEXT[]      NOT NULL
);
CREATE INDEX payable_timers_due ON payable_timers (payable_at);

-- Messages that could not be decoded or that the domain refused: kept with their reason and
-- position, skipped, and replayable by an operator (`referral-ledger --list-rejected`,
-- `--replay-rejected <message_ref>`).
ALTER TABLE rejected_messages ADD COLUMN topic TEXT NOT NULL DEFAULT '';
ALTER TABLE rejected_messages ADD COLUMN partition INTEGER NOT NULL DEFAULT 0;
ALTER TABLE rejected_messages ADD COLUMN "offset" BIGINT NOT NULL DEFAULT 0;
ALTER TABLE rejected_messages ADD COLUMN key BYTEA NOT NULL DEFAULT '';
