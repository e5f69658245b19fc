CREATE TABLE processed_events (
    tenant_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    occurred_at_ns BIGINT NOT NULL,
    processed_at_ns BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, event_id)
);
CREATE INDEX processed_events_customer ON processed_events (tenant_id, customer_id);

-- One last-writer-wins register per profile field, ordered by (occurred_at_ns, event_id).
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

-- Two registers per deal: its state (stage, status) and its amount (only events that carry one).
CREATE TABLE deals (
    tenant_id TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    deal_id TEXT NOT NULL,
    stage TEXT NOT NULL,
    status TEXT NOT NULL,
    state_ns BIGINT NOT NULL,
    state_event_id TEXT NOT NULL,
    amount_minor BIGINT,
    currency TEXT,
    amount_ns BIGINT,
    amount_event_id TEXT,
    PRIMARY KEY (tenant_id, customer_id, deal_id)
);

CREATE TABLE tickets (
    tenant_id TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    ticket_id TEXT NOT NULL,
    severity TEXT NOT NULL,
    status TEXT NOT NULL,
    occurred_at_ns BIGINT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (tenant_id, customer_id, ticket_id)
);

-- Writes that lost to a newer one.
CREATE TABLE profile_conflicts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    field TEXT NOT NULL,
    losing_value TEXT NOT NULL,
    losing_event_id TEXT NOT NULL,
    losing_occurred_at_ns BIGINT NOT NULL,
    winning_event_id TEXT NOT NULL,
    winning_occurred_at_ns BIGINT NOT NULL
);
CREATE INDEX profile_conflicts_customer ON profile_conflicts (tenant_id, customer_id);
