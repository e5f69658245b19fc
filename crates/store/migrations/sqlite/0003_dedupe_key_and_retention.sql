-- Both ledgers are keyed on (tenant_id, dedupe_key), where dedupe_key is the event's idempotency key,
-- else its event id (`events::dedupe_id`): a client retry with the same key but a new event id, after
-- the bus's duplicate window has passed, is recognised and has no second effect. Rows written before
-- this migration were keyed on the event id, which is what their dedupe_key becomes.
-- SQLite cannot change a primary key in place: each ledger is rebuilt under its own name.
CREATE TABLE processed_events_by_key (
    tenant_id TEXT NOT NULL,
    dedupe_key TEXT NOT NULL,
    event_id TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    processed_at_ns BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, dedupe_key)
);
INSERT INTO processed_events_by_key
    (tenant_id, dedupe_key, event_id, customer_id, event_type, processed_at_ns)
    SELECT tenant_id, event_id, event_id, customer_id, event_type, processed_at_ns
    FROM processed_events;
DROP TABLE processed_events;
ALTER TABLE processed_events_by_key RENAME TO processed_events;

CREATE TABLE analytics_processed_by_key (
    tenant_id TEXT NOT NULL,
    dedupe_key TEXT NOT NULL,
    event_id TEXT NOT NULL,
    processed_at_ns BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, dedupe_key)
);
INSERT INTO analytics_processed_by_key (tenant_id, dedupe_key, event_id, processed_at_ns)
    SELECT tenant_id, event_id, event_id, processed_at_ns FROM analytics_processed;
DROP TABLE analytics_processed;
ALTER TABLE analytics_processed_by_key RENAME TO analytics_processed;

-- Retention: the pruner deletes ledger rows older than `[store] ledger_retention`, oldest first.
CREATE INDEX processed_events_processed_at ON processed_events (processed_at_ns);
CREATE INDEX analytics_processed_processed_at ON analytics_processed (processed_at_ns);

-- Lifetime value is derived per currency from the won deal registers when it is read (amounts
-- in different currencies cannot be added, and a stored sum could overflow): the column that
-- added them across currencies goes.
ALTER TABLE customers DROP COLUMN lifetime_value_minor;
