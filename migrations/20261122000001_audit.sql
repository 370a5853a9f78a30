-- The audit trail: one row per event, written in batches by the audit service.
--
-- The columns an operator filters on are columns; the rest of each event (the routed copies,
-- an attempt's error text) is kept whole in `detail`, so adding an event field needs no
-- migration.
create table audit_events (
    -- Unique per event: a batch the broker delivers twice is written once.
    event_id     uuid primary key,
    message_id   uuid        not null,
    kind         text        not null,
    at           timestamptz not null,
    service      text        not null,
    channel      text,
    client       text,
    destination  text,
    route        text,
    attempt      integer,
    status_code  integer,
    duration_ms  bigint,
    size_bytes   bigint,
    detail       jsonb       not null
);

-- `hiway trace <id>`: every event of one message, in order. Message ids are UUIDv7, so new
-- rows land at the end of this index.
create index audit_events_by_message on audit_events (message_id, at);
-- Retention and time-window searches.
create index audit_events_by_time on audit_events (at);

-- Messages that could not be processed or delivered, kept whole for an operator to inspect,
-- fix and replay.
create table dead_letters (
    -- From the x-hiway-dead-id header when a hiway service dead-lettered the message, so a
    -- redelivered dead letter is stored once; generated otherwise.
    dead_id      uuid primary key,
    message_id   uuid,
    channel      text,
    destination  text,
    routing_key  text        not null,
    reason       text        not null,
    dead_by      text,
    died_at      timestamptz not null,
    content_type text,
    headers      jsonb       not null,
    body         bytea       not null,
    state        text        not null default 'dead'
);

create index dead_letters_by_destination on dead_letters (destination, died_at);
create index dead_letters_by_message on dead_letters (message_id);
