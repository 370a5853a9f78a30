-- Idempotent ingress: the first message accepted for each (channel, key) within the channel's
-- window. A key is 'pending' from the moment ingress claims it until the broker confirms the
-- message ('accepted'); a pending key older than a publish could take belongs to a request
-- that died, and is taken over by the next one.
create table ingress_keys (
    channel     text        not null,
    key         text        not null,
    message_id  uuid        not null,
    state       text        not null check (state in ('pending', 'accepted')),
    created_at  timestamptz not null default now(),
    primary key (channel, key)
);

create index ingress_keys_by_age on ingress_keys (created_at);
