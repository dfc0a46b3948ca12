-- Test deliveries (`SendTestWebhook`): a `webhook.test` message for one endpoint. Not a
-- notification (no cursor of its own, never streamed or replayed); its delivery goes through
-- the same queue, with the cursor the merchant had reached when it was sent, for ordering.
CREATE TABLE webhook_test_messages (
    notification_id  UUID        PRIMARY KEY,
    endpoint_id      TEXT        NOT NULL REFERENCES webhook_endpoints,
    merchant_id      TEXT        NOT NULL,
    idempotency_key  TEXT        NOT NULL,
    payload          TEXT        NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL,
    UNIQUE (endpoint_id, idempotency_key)
);

-- The worker leases per endpoint (each at most its room), oldest first: one index probe per
-- enabled endpoint instead of a scan of every due delivery, so a dead endpoint's backlog costs
-- the others nothing.
DROP INDEX webhook_deliveries_due;
CREATE INDEX webhook_deliveries_due_per_endpoint ON webhook_deliveries (endpoint_id, next_attempt_at)
    WHERE status = 'pending';

-- When the notification was written (its transaction's start): `written_at - occurred_at` is
-- how far notifications trailed the event, and a delivery's first attempt minus `written_at`
-- is the delivery worker's share.
ALTER TABLE notifications ADD COLUMN written_at TIMESTAMPTZ NOT NULL DEFAULT now();
