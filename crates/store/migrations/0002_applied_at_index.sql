-- Pruning deletes the marks of messages applied longer ago than the retention (see
-- docs/SECURITY.md, "Bookkeeping retention"); this index finds them without a full scan. Its key
-- only grows, so each insert appends to its right-most page.
CREATE INDEX IF NOT EXISTS applied_messages_applied_at ON applied_messages (applied_at);
