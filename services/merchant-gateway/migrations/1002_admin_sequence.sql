-- A dense counter of admin events (merchants, partnership terms). Every admin event takes the
-- next value under this row's lock; every customer-activity event records the current value, so
-- consumers can wait for the admin events it may depend on. It starts at 0: events published
-- before this table existed carry no sequence, and nothing may wait for them.
CREATE TABLE admin_sequence (
    singleton  BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
    value      BIGINT  NOT NULL
);

INSERT INTO admin_sequence (singleton, value) VALUES (true, 0);
