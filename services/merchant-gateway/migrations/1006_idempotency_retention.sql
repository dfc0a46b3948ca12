-- Pruning deletes merchants' idempotency records older than the retention (see
-- docs/SECURITY.md, "Bookkeeping retention"); operators' records are kept.
CREATE INDEX IF NOT EXISTS idempotency_records_recorded_at ON idempotency_records (recorded_at);
