-- A dense counter of admin events (merchants, partnership terms). Every admin event takes the
-- next value under this row's lock; every customer-activity event records the current value, so
-- consumers can wait for the admin events it may depend on.
CREATE TABLE admin_sequence (
    singleton  BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
    value      BIGINT  NOT NULL
);

INSERT INTO admin_sequence (singleton, value)
SELECT true, count(*) FROM events
WHERE event_type IN ('MerchantRegistered', 'PartnershipCreated', 'PartnershipTermsProposed', 'PartnershipTermsAccepted', 'PartnershipTerminated');
