-- Analytics aggregates, fed only by the analytics consumer (deferrable under load), so they trail
-- the profile projection by however much the throttler defers.

-- The analytics idempotency ledger: one row per counted event, written in the same transaction as
-- the aggregates it guards, so a redelivered event is never counted twice.
CREATE TABLE analytics_processed (
    tenant_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    processed_at_ns BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, event_id)
);

-- Events per type per minute of occurred_at (minute_start_s: Unix seconds, a multiple of 60).
CREATE TABLE analytics_event_counts (
    tenant_id TEXT NOT NULL,
    minute_start_s BIGINT NOT NULL,
    event_type TEXT NOT NULL,
    events BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, minute_start_s, event_type)
);

-- Ticket events by kind (opened, escalated) and severity label.
CREATE TABLE analytics_tickets (
    tenant_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    severity TEXT NOT NULL,
    events BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, kind, severity)
);

-- Consent changes by channel label and direction.
CREATE TABLE analytics_consents (
    tenant_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    granted BOOLEAN NOT NULL,
    events BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, channel, granted)
);

-- Deal registers (last writer wins by (occurred_at_ns, event_id), the amount its own register):
-- pipeline value by stage and won revenue are derived from them, whatever the arrival order.
CREATE TABLE analytics_deals (
    tenant_id TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    deal_id TEXT NOT NULL,
    stage TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('open', 'won', 'lost')),
    occurred_at_ns BIGINT NOT NULL,
    event_id TEXT NOT NULL,
    amount_minor BIGINT,
    currency TEXT,
    amount_occurred_at_ns BIGINT,
    amount_event_id TEXT,
    PRIMARY KEY (tenant_id, customer_id, deal_id)
);
CREATE INDEX analytics_deals_status ON analytics_deals (tenant_id, status, stage);
