-- Notifications, per merchant, numbered without gaps (`cursor`): what streams and webhooks
-- deliver. Written once from the `ledger` and `settlement` topics (deduplicated by message id in
-- the same transaction); never changed.

-- The last cursor given to each merchant. Allocating takes this row's lock until commit, so one
-- merchant's notifications commit in cursor order and a reader never sees 7 before 6.
CREATE TABLE merchant_cursors (
    merchant_id  TEXT   PRIMARY KEY,
    last_cursor  BIGINT NOT NULL
);

CREATE TABLE notifications (
    merchant_id     TEXT        NOT NULL,
    cursor          BIGINT      NOT NULL,
    notification_id UUID        NOT NULL UNIQUE,
    type            TEXT        NOT NULL,
    occurred_at     TIMESTAMPTZ NOT NULL,
    payload         TEXT        NOT NULL,
    -- The W3C trace context of the event that caused it.
    traceparent     TEXT,
    PRIMARY KEY (merchant_id, cursor)
);
