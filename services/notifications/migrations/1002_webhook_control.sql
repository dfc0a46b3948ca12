-- Secret rotation with an overlap, enabling and disabling, failures over time, and new retry
-- rounds for redeliveries and replays.
ALTER TABLE webhook_endpoints
    ADD COLUMN previous_signing_secret TEXT,
    ADD COLUMN previous_expires_at     TIMESTAMPTZ,
    ADD COLUMN disabled_reason         TEXT NOT NULL DEFAULT '',
    ADD COLUMN failing_since           TIMESTAMPTZ;

-- A redelivery or replay starts a new round of the retry schedule: the schedule counts the
-- attempts since `round_start`.
ALTER TABLE webhook_deliveries
    ADD COLUMN round_start INTEGER NOT NULL DEFAULT 0;
