-- The audit trail's secondary indexes, cheaper to keep up and fitted to the queries made.
--
-- `audit_events_by_time` serves time ranges (a retention job, "what happened in the last
-- hour"). Events arrive in about time order, so a BRIN index (the range of `at` per block of
-- pages) answers those as well as a B-tree at a fraction of its upkeep: measured on 150,000
-- events, a batch insert took 0.93–1.09 s with BRIN against 1.22–1.54 s with the B-tree
-- (docs/benchmarks.md, session 8). `autosummarize` has autovacuum summarize each block range
-- as it fills, so new rows are soon covered; until then BRIN reads the range whole, which
-- costs time, never a missed row. BRIN gives no order, so "the latest event" queries need an
-- index of their own:
drop index audit_events_by_time;
create index audit_events_by_time on audit_events using brin (at) with (autosummarize = on);

-- `hiway status` asks for each destination's latest circuit event. Through the B-tree on `at`
-- that read backwards through every event until it met one; circuit events are rare, so a
-- partial index of only them is small and answers at once.
create index audit_events_circuit on audit_events (destination, at)
    where kind in ('circuit_opened', 'circuit_closed');
