-- The idempotency ledger: one row per applied event, written in the same transaction as its effects.
CREATE TABLE processed_events (
    tenant_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    processed_at_ns BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, event_id)
);

-- Per-customer aggregates, updated once per applied event (the ledger guards them).
CREATE TABLE customers (
    tenant_id TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    lifetime_value_minor BIGINT NOT NULL DEFAULT 0,
    payment_failures BIGINT NOT NULL DEFAULT 0,
    events_applied BIGINT NOT NULL DEFAULT 0,
    last_event_at_ns BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, customer_id)
);

-- Below, every row is a last-writer-wins register ordered by (occurred_at_ns, event_id).
CREATE TABLE profile_fields (
    tenant_id TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    field TEXT NOT NULL,
    value TEXT NOT NULL,
    occurred_at_ns BIGINT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (tenant_id, customer_id, field)
);

CREATE TABLE consents (
    tenant_id TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    granted BOOLEAN NOT NULL,
    occurred_at_ns BIGINT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (tenant_id, customer_id, channel)
);

-- Two registers per deal: its state (stage, status) and its amount, which only some events carry
-- (a deal lost after a stage change keeps the amount it had, whatever the arrival order).
CREATE TABLE deals (
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

CREATE TABLE tickets (
    tenant_id TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    ticket_id TEXT NOT NULL,
    severity TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('open', 'escalated')),
    occurred_at_ns BIGINT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (tenant_id, customer_id, ticket_id)
);

-- Profile field writes that lost to a newer one (only when the value differed).
CREATE TABLE profile_conflicts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    field TEXT NOT NULL,
    losing_value TEXT NOT NULL,
    losing_event_id TEXT NOT NULL,
    losing_occurred_at_ns BIGINT NOT NULL,
    winning_event_id TEXT NOT NULL,
    winning_occurred_at_ns BIGINT NOT NULL,
    recorded_at_ns BIGINT NOT NULL
);
CREATE INDEX profile_conflicts_customer ON profile_conflicts (tenant_id, customer_id);
