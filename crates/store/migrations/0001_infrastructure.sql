-- Infrastructure tables every service has in its own schema.

-- Append-only event log. (stream_id, sequence) is unique: two writers that read the same version
-- of a stream cannot both append to it (optimistic concurrency).
CREATE TABLE events (
    global_position BIGSERIAL PRIMARY KEY,
    stream_id       TEXT        NOT NULL,
    sequence        INTEGER     NOT NULL CHECK (sequence > 0),
    event_id        UUID        NOT NULL UNIQUE,
    event_type      TEXT        NOT NULL,
    payload         BYTEA       NOT NULL,
    recorded_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (stream_id, sequence)
);

CREATE FUNCTION forbid_event_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are append-only: % is not allowed', TG_OP;
END;
$$;

CREATE TRIGGER events_are_append_only
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION forbid_event_change();

-- Transactional outbox: written in the same transaction as the state change it announces,
-- published to Kafka by the relay, deleted once the broker acknowledged it.
CREATE TABLE outbox (
    id             BIGSERIAL PRIMARY KEY,
    topic          TEXT        NOT NULL,
    partition_key  BYTEA       NOT NULL,
    payload        BYTEA       NOT NULL,
    header_names   TEXT[]      NOT NULL DEFAULT '{}',
    header_values  TEXT[]      NOT NULL DEFAULT '{}',
    enqueued_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Idempotent consumption: the id of every message a consumer applied, written in the same
-- transaction as its effect.
CREATE TABLE applied_messages (
    message_id  TEXT PRIMARY KEY,
    applied_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
