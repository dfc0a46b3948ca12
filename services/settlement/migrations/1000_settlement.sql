-- Settlement. Two kinds of tables:
--
-- * What settlement received and decided (its facts): the admin facts it needs (merchants,
--   terms, payout accounts), the commission lines it took from the `ledger` topic (`lines`, in
--   the order received: `seq`), and the cycles it closed (`cycle_closures`: the cycle, when it
--   closed, and the last line it could see).
-- * Projections of those facts: what each closure carried forward, statements and payout
--   instructions. Which closure settled a line is not stored on the line: a closure of a cycle
--   kind and zone covers the lines of that kind and zone payable before its cut-off and numbered
--   up to its watermark; a line belongs to the first closure that covers it and does not carry
--   it forward. `settlement --rebuild-projections` drops and rebuilds
--   them, closure by closure, with the same code that closes a cycle; the statements come out
--   byte for byte the same.

CREATE TABLE merchants (
    merchant_id          TEXT PRIMARY KEY,
    display_name         TEXT NOT NULL,
    settlement_currency  TEXT NOT NULL,
    time_zone            TEXT NOT NULL
);

-- Every payout account a merchant registered, numbered in the order received. A payout
-- instruction pays to and from the latest account received before its cycle closed (the closure's
-- `account_watermark`), or, for a merchant that had none then, the first received after: once
-- chosen, an instruction's accounts never change, so a payout file is the same every time.
CREATE TABLE payout_accounts (
    received        BIGSERIAL   PRIMARY KEY,
    merchant_id     TEXT        NOT NULL,
    registered_at   TIMESTAMPTZ NOT NULL,
    iban            TEXT        NOT NULL,
    bic             TEXT        NOT NULL,
    account_holder  TEXT        NOT NULL
);

CREATE INDEX payout_accounts_merchant ON payout_accounts (merchant_id, received);

-- Ledger events settlement could not place (a payable commission or a reversal of a purchase it
-- never saw attributed: the ledger's order broken). Kept for an operator; an error is logged.
CREATE TABLE parked_messages (
    message_id   TEXT        PRIMARY KEY,
    purchase_id  TEXT        NOT NULL,
    reason       TEXT        NOT NULL,
    parked_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The settlement-relevant part of each proposed terms version (a version that is never accepted
-- earns nothing, so no line refers to it).
CREATE TABLE partnership_terms (
    partnership_id        TEXT    NOT NULL,
    terms_version         INTEGER NOT NULL,
    referrer_merchant_id  TEXT    NOT NULL,
    acceptor_merchant_id  TEXT    NOT NULL,
    currency              TEXT    NOT NULL,
    cycle_kind            TEXT    NOT NULL CHECK (cycle_kind IN ('daily', 'weekly', 'monthly')),
    minimum_payout_minor  BIGINT  NOT NULL CHECK (minimum_payout_minor >= 0),
    rule                  TEXT    NOT NULL,
    PRIMARY KEY (partnership_id, terms_version)
);

-- Attributed purchases that earned a commission, and what was reversed before the commission
-- became payable (it reduces the commission line; a reversal after it is a claw-back line).
CREATE TABLE attributions (
    purchase_id             TEXT    PRIMARY KEY,
    partnership_id          TEXT    NOT NULL,
    terms_version           INTEGER NOT NULL,
    referral_id             TEXT    NOT NULL,
    referrer_reference      TEXT    NOT NULL,
    transaction_id          TEXT    NOT NULL,
    purchase_amount_minor   BIGINT  NOT NULL,
    currency                TEXT    NOT NULL,
    commission_minor        BIGINT  NOT NULL CHECK (commission_minor > 0),
    reversed_before_minor   BIGINT  NOT NULL DEFAULT 0,
    payable                 BOOLEAN NOT NULL DEFAULT false
);

-- One line per commission that became payable and per claw-back after that; never changed.
-- `amount_minor` is owed by the acceptor to the referrer (negative: the referrer owes it back).
CREATE TABLE lines (
    line_id               TEXT        PRIMARY KEY,
    seq                   BIGSERIAL   NOT NULL UNIQUE,
    kind                  TEXT        NOT NULL CHECK (kind IN ('commission', 'clawback', 'adjustment')),
    partnership_id        TEXT        NOT NULL,
    terms_version         INTEGER     NOT NULL,
    referrer_merchant_id  TEXT        NOT NULL,
    acceptor_merchant_id  TEXT        NOT NULL,
    purchase_id           TEXT        NOT NULL,
    refund_id             TEXT,
    -- Copied from the attribution: what the statement line shows.
    transaction_id        TEXT        NOT NULL,
    referral_id           TEXT        NOT NULL,
    referrer_reference    TEXT        NOT NULL,
    base_amount_minor     BIGINT      NOT NULL,
    amount_minor          BIGINT      NOT NULL CHECK (amount_minor <> 0),
    currency              TEXT        NOT NULL,
    payable_at            TIMESTAMPTZ NOT NULL,
    -- An adjustment's reason.
    note                  TEXT
);

CREATE INDEX lines_payable_at ON lines (payable_at);
CREATE INDEX lines_referrer ON lines (referrer_merchant_id, payable_at);
CREATE INDEX lines_acceptor ON lines (acceptor_merchant_id, payable_at);

-- The cycles closed, in the order closed (`closure`): the facts a rebuild replays.
CREATE TABLE cycle_closures (
    closure         BIGINT      PRIMARY KEY,
    cycle           TEXT        NOT NULL UNIQUE,
    kind            TEXT        NOT NULL,
    time_zone       TEXT        NOT NULL,
    first_day       DATE        NOT NULL,
    start_at        TIMESTAMPTZ NOT NULL,
    cut_off         TIMESTAMPTZ NOT NULL,
    closed_at       TIMESTAMPTZ NOT NULL,
    -- The highest line `seq` the closure could see: lines received later wait for the next cycle.
    line_watermark  BIGINT      NOT NULL,
    -- The highest payout account number received when it closed.
    account_watermark  BIGINT   NOT NULL,
    -- The closure of the same kind and zone before it, if any: the lines it covered are not
    -- this one's, except those it carried forward.
    previous_cycle       TEXT,
    previous_cut_off     TIMESTAMPTZ,
    previous_watermark   BIGINT
);

-- Operators' corrections, numbered with the closures (a rebuild replays both in that order).
-- Each added one adjustment line to `lines`, settled by the next closure that covers it.
CREATE TABLE corrections (
    closure           BIGINT      PRIMARY KEY,
    idempotency_key   TEXT        NOT NULL UNIQUE,
    -- SHA-256 of the request, to tell a retry from another request under the same key.
    request_digest    TEXT        NOT NULL,
    cycle             TEXT        NOT NULL REFERENCES cycle_closures (cycle),
    merchant_id       TEXT        NOT NULL,
    statement_number  INTEGER     NOT NULL,
    line_id           TEXT        NOT NULL,
    issued_at         TIMESTAMPTZ NOT NULL
);

-- Projections of the closures.
CREATE TABLE cycles (
    cycle                  TEXT    PRIMARY KEY REFERENCES cycle_closures (cycle),
    statements             INTEGER NOT NULL,
    settled_lines          BIGINT  NOT NULL,
    carried_forward_lines  BIGINT  NOT NULL,
    payout_instructions    INTEGER NOT NULL
);

CREATE TABLE carried_lines (
    cycle         TEXT NOT NULL,
    line_id       TEXT NOT NULL,
    -- The merchant whose net amount was below its minimum payout.
    held_by       TEXT NOT NULL,
    PRIMARY KEY (cycle, line_id)
);

CREATE TABLE statements (
    merchant_id            TEXT        NOT NULL,
    number                 INTEGER     NOT NULL CHECK (number > 0),
    cycle                  TEXT        NOT NULL,
    cut_off                TIMESTAMPTZ NOT NULL,
    issued_at              TIMESTAMPTZ NOT NULL,
    corrects_number        INTEGER,
    content_hash           TEXT        NOT NULL,
    line_count             INTEGER     NOT NULL,
    -- The correction that issued it, for a correction statement.
    correction             BIGINT,
    -- [{currency, receivable_minor, payable_minor, net_minor, carried_forward_minor}]
    totals                 JSONB       NOT NULL,
    PRIMARY KEY (merchant_id, number)
);

-- One original statement per merchant and cycle; corrections reference it.
CREATE UNIQUE INDEX statements_one_per_cycle ON statements (cycle, merchant_id) WHERE corrects_number IS NULL;

CREATE TABLE payout_instructions (
    cycle             TEXT    NOT NULL,
    currency          TEXT    NOT NULL,
    sequence          INTEGER NOT NULL,
    from_merchant_id  TEXT    NOT NULL,
    to_merchant_id    TEXT    NOT NULL,
    amount_minor      BIGINT  NOT NULL CHECK (amount_minor > 0),
    PRIMARY KEY (cycle, currency, sequence)
);
