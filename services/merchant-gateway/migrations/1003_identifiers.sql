-- What each merchant's tills capture, as tags: `par`, `phone`, `email`, `card:<processor>`,
-- `member:<programme>`. A merchant that never declared captures PAR, phone and e-mail.
ALTER TABLE merchants
    ADD COLUMN identifier_captures TEXT[] NOT NULL DEFAULT ARRAY['par', 'phone', 'email'];

-- Loyalty and coalition programmes an operator registered. Never updated: every key derived from
-- a member number must stay comparable.
CREATE TABLE loyalty_programmes (
    programme_id   TEXT PRIMARY KEY,
    display_name   TEXT        NOT NULL,
    alphabet       TEXT        NOT NULL CHECK (alphabet IN ('digits', 'alphanumeric')),
    min_length     INTEGER     NOT NULL,
    max_length     INTEGER     NOT NULL,
    check_digit    TEXT        NOT NULL,
    registered_at  TIMESTAMPTZ NOT NULL
);
