//! Reading the projection: profiles, customer context, the conflict log and the ledger size.

use crate::{
    Conflict, Consent, CustomerContext, Deal, FieldVersion, Profile, Store, StoreError, Ticket,
    model::{rfc3339, sum_by_currency},
    with_read_pool,
    writes::{tier_from_label, tier_label},
};

/// payment_failures, events_applied, last_event_at_ns
type CustomerRow = (i64, i64, i64);
/// deal_id, stage, status, amount_minor, currency, occurred_at_ns
type DealRow = (String, String, String, Option<i64>, Option<String>, i64);
/// tier, currency and amount of one won deal (`None`s without one)
type ContextRow = (Option<String>, Option<String>, Option<i64>);
/// field, losing_value, losing_event_id, losing_occurred_at_ns, winning_event_id
type ConflictRow = (String, String, String, i64, String);

impl Store {
    /// The projected profile, or `None` when no event of this customer was applied.
    pub async fn profile(
        &self,
        tenant: &str,
        customer: &str,
    ) -> Result<Option<Profile>, StoreError> {
        let failed = self.failed("reading a profile");
        with_read_pool!(self, pool => {
            let Some((payment_failures, events_applied, last_event_at_ns)) =
                sqlx::query_as::<_, CustomerRow>(
                    "SELECT payment_failures, events_applied, last_event_at_ns \
                     FROM customers WHERE tenant_id = $1 AND customer_id = $2",
                )
                .bind(tenant).bind(customer)
                .fetch_optional(pool).await.map_err(failed)?
            else {
                return Ok(None);
            };
            let fields: Vec<(String, String, i64, String)> = sqlx::query_as(
                "SELECT field, value, occurred_at_ns, event_id FROM profile_fields \
                 WHERE tenant_id = $1 AND customer_id = $2",
            )
            .bind(tenant).bind(customer)
            .fetch_all(pool).await.map_err(failed)?;
            let consents: Vec<(String, bool, i64)> = sqlx::query_as(
                "SELECT channel, granted, occurred_at_ns FROM consents \
                 WHERE tenant_id = $1 AND customer_id = $2",
            )
            .bind(tenant).bind(customer)
            .fetch_all(pool).await.map_err(failed)?;
            let deals: Vec<DealRow> = sqlx::query_as(
                "SELECT deal_id, stage, status, amount_minor, currency, occurred_at_ns FROM deals \
                 WHERE tenant_id = $1 AND customer_id = $2 ORDER BY deal_id",
            )
            .bind(tenant).bind(customer)
            .fetch_all(pool).await.map_err(failed)?;
            let tickets: Vec<(String, String, String, i64)> = sqlx::query_as(
                "SELECT ticket_id, severity, status, occurred_at_ns FROM tickets \
                 WHERE tenant_id = $1 AND customer_id = $2 ORDER BY ticket_id",
            )
            .bind(tenant).bind(customer)
            .fetch_all(pool).await.map_err(failed)?;

            let tier = fields
                .iter()
                .find(|(field, ..)| field == "tier")
                .map_or(events::pb::CustomerTier::Unspecified, |(_, value, ..)| tier_from_label(value));
            Ok(Some(Profile {
                tenant_id: tenant.to_owned(),
                customer_id: customer.to_owned(),
                field_versions: fields
                    .iter()
                    .map(|(field, _, at, event_id)| {
                        let version = FieldVersion { occurred_at: rfc3339(*at), event_id: event_id.clone() };
                        (field.clone(), version)
                    })
                    .collect(),
                fields: fields.into_iter().map(|(field, value, ..)| (field, value)).collect(),
                tier: tier_label(tier),
                lifetime_value: sum_by_currency(deals.iter().filter_map(
                    |(_, _, status, amount, currency, _)| match (status.as_str(), amount, currency) {
                        ("won", Some(amount), Some(currency)) => Some((currency.clone(), *amount)),
                        _ => None,
                    },
                )),
                consents: consents
                    .into_iter()
                    .map(|(channel, granted, at)| (channel, Consent { granted, occurred_at: rfc3339(at) }))
                    .collect(),
                deals: deals
                    .into_iter()
                    .map(|(deal_id, stage, status, amount_minor, currency, at)| Deal {
                        deal_id, stage, status, amount_minor, currency, occurred_at: rfc3339(at),
                    })
                    .collect(),
                tickets: tickets
                    .into_iter()
                    .map(|(ticket_id, severity, status, at)| Ticket {
                        ticket_id, severity, status, occurred_at: rfc3339(at),
                    })
                    .collect(),
                payment_failures,
                events_applied,
                last_event_at: rfc3339(last_event_at_ns),
            }))
        })
    }

    /// Tier and lifetime value per currency, or `None` when no event of this customer was
    /// applied. One round trip: a row per won deal with an amount (or one without a deal).
    pub async fn customer_context(
        &self,
        tenant: &str,
        customer: &str,
    ) -> Result<Option<CustomerContext>, StoreError> {
        let failed = self.failed("reading customer context");
        let rows: Vec<ContextRow> = with_read_pool!(self, pool => {
            sqlx::query_as(
                "SELECT f.value, d.currency, d.amount_minor FROM customers c \
                 LEFT JOIN profile_fields f ON f.tenant_id = c.tenant_id \
                     AND f.customer_id = c.customer_id AND f.field = 'tier' \
                 LEFT JOIN deals d ON d.tenant_id = c.tenant_id AND d.customer_id = c.customer_id \
                     AND d.status = 'won' AND d.amount_minor IS NOT NULL AND d.currency IS NOT NULL \
                 WHERE c.tenant_id = $1 AND c.customer_id = $2",
            )
            .bind(tenant).bind(customer)
            .fetch_all(pool).await.map_err(failed)?
        });
        let Some((tier, ..)) = rows.first() else {
            return Ok(None);
        };
        Ok(Some(CustomerContext {
            tier: tier
                .as_deref()
                .map_or(events::pb::CustomerTier::Unspecified, tier_from_label),
            lifetime_value: sum_by_currency(
                rows.iter()
                    .filter_map(|(_, currency, amount)| Some((currency.clone()?, (*amount)?))),
            ),
        }))
    }

    /// The conflict log of one customer, oldest first.
    pub async fn conflicts(
        &self,
        tenant: &str,
        customer: &str,
    ) -> Result<Vec<Conflict>, StoreError> {
        let failed = self.failed("reading conflicts");
        let rows: Vec<ConflictRow> = with_read_pool!(self, pool => {
            sqlx::query_as(
                "SELECT field, losing_value, losing_event_id, losing_occurred_at_ns, winning_event_id \
                 FROM profile_conflicts WHERE tenant_id = $1 AND customer_id = $2 ORDER BY id",
            )
            .bind(tenant).bind(customer)
            .fetch_all(pool).await.map_err(failed)?
        });
        Ok(rows
            .into_iter()
            .map(
                |(field, losing_value, losing_event_id, losing_at, winning_event_id)| Conflict {
                    field,
                    losing_value,
                    losing_event_id,
                    losing_occurred_at: rfc3339(losing_at),
                    winning_event_id,
                },
            )
            .collect())
    }

    /// How many events the ledger holds (over all tenants).
    pub async fn processed_count(&self) -> Result<i64, StoreError> {
        let failed = self.failed("counting processed events");
        with_read_pool!(self, pool => {
            sqlx::query_scalar("SELECT COUNT(*) FROM processed_events")
                .fetch_one(pool).await.map_err(failed)
        })
    }
}
