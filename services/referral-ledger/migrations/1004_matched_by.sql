-- The kind of identifier that matched each attributed purchase (`card`, `par`, `phone`, `email`,
-- `member`; NULL for keys derived before keys named their kind). Never the value.
ALTER TABLE attributed_purchases ADD COLUMN matched_by TEXT;
