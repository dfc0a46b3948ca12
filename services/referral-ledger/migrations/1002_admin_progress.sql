-- How far the ledger has applied the gateway's admin sequence (see EventEnvelope.admin_sequence):
-- a customer-activity event waits until this reaches the sequence it was recorded at.
CREATE TABLE admin_progress (
    singleton        BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
    applied_through  BIGINT  NOT NULL
);

INSERT INTO admin_progress (singleton, applied_through) VALUES (true, 0);
