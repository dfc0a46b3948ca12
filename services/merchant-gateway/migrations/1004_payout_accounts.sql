-- Each merchant's current payout account (the admin topic carries every registration, which
-- settlement keeps in full).
CREATE TABLE payout_accounts (
    merchant_id     TEXT        PRIMARY KEY REFERENCES merchants,
    iban            TEXT        NOT NULL,
    bic             TEXT        NOT NULL,
    account_holder  TEXT        NOT NULL,
    registered_at   TIMESTAMPTZ NOT NULL
);
