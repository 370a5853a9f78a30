-- Dead letters carry every delivery attempt and their replay history, so an operator can
-- search them by status code and error text and replay them more than once.
alter table dead_letters
    add column attempts         jsonb       not null default '[]',
    add column last_status_code integer,
    add column replays          integer     not null default 0,
    add column settled_at       timestamptz;

-- `state` is one of: dead (waiting for an operator), replayed, discarded.
alter table dead_letters
    add constraint dead_letters_state check (state in ('dead', 'replayed', 'discarded'));

create index dead_letters_by_state on dead_letters (state, died_at);
