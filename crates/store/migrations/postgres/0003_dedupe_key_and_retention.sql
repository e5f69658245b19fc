-- Both ledgers are keyed on (tenant_id, dedupe_key), where dedupe_key is the event's idempotency key,
-- else its event id (`events::dedupe_id`): a client retry with the same key but a new event id, after
-- the bus's duplicate window has passed, is recognised and has no second effect. Rows written before
-- this migration were keyed on the event id, which is what their dedupe_key becomes.
ALTER TABLE processed_events ADD COLUMN dedupe_key TEXT;
UPDATE processed_events SET dedupe_key = event_id;
ALTER TABLE processed_events ALTER COLUMN dedupe_key SET NOT NULL;
ALTER TABLE processed_events DROP CONSTRAINT processed_events_pkey;
ALTER TABLE processed_events ADD PRIMARY KEY (tenant_id, dedupe_key);

ALTER TABLE analytics_processed ADD COLUMN dedupe_key TEXT;
UPDATE analytics_processed SET dedupe_key = event_id;
ALTER TABLE analytics_processed ALTER COLUMN dedupe_key SET NOT NULL;
ALTER TABLE analytics_processed DROP CONSTRAINT analytics_processed_pkey;
ALTER TABLE analytics_processed ADD PRIMARY KEY (tenant_id, dedupe_key);

-- Retention: the pruner deletes ledger rows older than `[store] ledger_retention`, oldest first.
CREATE INDEX processed_events_processed_at ON processed_events (processed_at_ns);
CREATE INDEX analytics_processed_processed_at ON analytics_processed (processed_at_ns);

-- Lifetime value is derived per currency from the won deal registers when it is read (amounts
-- in different currencies cannot be added, and a stored sum could overflow): the column that
-- added them across currencies goes.
ALTER TABLE customers DROP COLUMN lifetime_value_minor;
