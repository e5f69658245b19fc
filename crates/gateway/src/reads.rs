//! Reads: `GET /v1/customers/{id}` (the projected profile) and `GET /v1/analytics/…` (the
//! analytics aggregates), both through a [`ReadModel`].

use crate::{GatewayState, auth::Tenant, problem::Problem};
use axum::{
    Extension, Json,
    extract::{Path, Query, State, rejection::PathRejection, rejection::QueryRejection},
    http::StatusCode,
};
use events::{EventType, FieldError};
use futures::future::BoxFuture;

/// What `GET /v1/analytics/…` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnalyticsQuery {
    /// Everything counted for the tenant: events by type, tickets by severity, consent changes,
    /// pipeline value by stage, won revenue.
    Summary,
    /// Events per type per minute with `from_s <= minute < to_s` (Unix seconds).
    EventsPerMinute {
        from_s: i64,
        to_s: i64,
        event_type: Option<EventType>,
    },
}

/// Where reads come from (the store). `Ok(None)` means unknown (a profile) or not kept by this
/// source (analytics).
pub trait ReadModel: Send + Sync + 'static {
    fn profile(
        &self,
        tenant: &str,
        customer: &str,
    ) -> BoxFuture<'_, Result<Option<serde_json::Value>, String>>;

    fn analytics(
        &self,
        _tenant: &str,
        _query: AnalyticsQuery,
    ) -> BoxFuture<'_, Result<Option<serde_json::Value>, String>> {
        Box::pin(async { Ok(None) })
    }
}

fn unavailable(what: &str) -> Problem {
    Problem::new(
        StatusCode::NOT_IMPLEMENTED,
        "not-implemented",
        "Reads not available",
        format!("this gateway runs without a store for {what}"),
    )
}

pub(crate) async fn customer(
    State(state): State<GatewayState>,
    Extension(tenant): Extension<Tenant>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, Problem> {
    let Path(id) = id.map_err(|rejection| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-path",
            "Invalid customer id",
            rejection.body_text(),
        )
    })?;
    let source = state.reads().ok_or_else(|| unavailable("profiles"))?;
    match source.profile(&tenant, &id).await {
        Ok(Some(profile)) => Ok(Json(profile)),
        Ok(None) => Err(Problem::not_found(format!("customer {id:?} is unknown"))),
        Err(err) => {
            tracing::error!(error = %err, "profile lookup failed");
            Err(Problem::internal("the profile lookup failed"))
        }
    }
}

async fn answer(
    state: &GatewayState,
    tenant: &str,
    query: AnalyticsQuery,
) -> Result<Json<serde_json::Value>, Problem> {
    let source = state.reads().ok_or_else(|| unavailable("analytics"))?;
    match source.analytics(tenant, query).await {
        Ok(Some(value)) => Ok(Json(value)),
        Ok(None) => Err(unavailable("analytics")),
        Err(err) => {
            tracing::error!(error = %err, "analytics read failed");
            Err(Problem::internal("the analytics read failed"))
        }
    }
}

pub(crate) async fn analytics_summary(
    State(state): State<GatewayState>,
    Extension(tenant): Extension<Tenant>,
) -> Result<Json<serde_json::Value>, Problem> {
    answer(&state, &tenant, AnalyticsQuery::Summary).await
}

/// `?from=&to=` (RFC 3339; default the last hour) and `?type=` (an event type name).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MinuteParams {
    from: Option<String>,
    to: Option<String>,
    r#type: Option<String>,
}

/// The longest range one request may cover.
const MAX_RANGE_S: i64 = 31 * 24 * 3600;

fn parse_minute_params(
    params: MinuteParams,
    now_s: i64,
) -> Result<AnalyticsQuery, Vec<FieldError>> {
    let mut errors = Vec::new();
    let mut time = |field: &str, value: Option<String>, default: i64| match value {
        None => default,
        Some(text) => match chrono::DateTime::parse_from_rfc3339(&text) {
            Ok(t) => t.timestamp(),
            Err(err) => {
                errors.push(FieldError {
                    field: format!("query.{field}"),
                    message: format!("{text:?} is not an RFC 3339 time: {err}"),
                });
                default
            }
        },
    };
    let to_s = time("to", params.to, now_s + 60);
    let from_s = time("from", params.from, to_s - 3600);
    let event_type = params.r#type.and_then(|name| {
        let kind = EventType::from_name(&name);
        if kind.is_none() {
            errors.push(FieldError {
                field: "query.type".into(),
                message: format!("{name:?} is not an event type"),
            });
        }
        kind
    });
    if errors.is_empty() && from_s >= to_s {
        errors.push(FieldError {
            field: "query.from".into(),
            message: "must be before `to`".into(),
        });
    }
    if errors.is_empty() && to_s - from_s > MAX_RANGE_S {
        errors.push(FieldError {
            field: "query.from".into(),
            message: "the range may cover at most 31 days".into(),
        });
    }
    if errors.is_empty() {
        Ok(AnalyticsQuery::EventsPerMinute {
            from_s,
            to_s,
            event_type,
        })
    } else {
        Err(errors)
    }
}

pub(crate) async fn analytics_events_per_minute(
    State(state): State<GatewayState>,
    Extension(tenant): Extension<Tenant>,
    params: Result<Query<MinuteParams>, QueryRejection>,
) -> Result<Json<serde_json::Value>, Problem> {
    let invalid = |errors: Vec<FieldError>| {
        let mut problem = Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-query",
            "Invalid query parameters",
            format!("{} parameter(s) are invalid", errors.len().max(1)),
        );
        problem.errors = errors;
        problem
    };
    let Query(params) = params.map_err(|rejection| {
        invalid(vec![FieldError {
            field: "query".into(),
            message: rejection.body_text(),
        }])
    })?;
    let now_s = chrono::Utc::now().timestamp();
    let query = parse_minute_params(params, now_s).map_err(invalid)?;
    answer(&state, &tenant, query).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(from: Option<&str>, to: Option<&str>, kind: Option<&str>) -> MinuteParams {
        MinuteParams {
            from: from.map(str::to_owned),
            to: to.map(str::to_owned),
            r#type: kind.map(str::to_owned),
        }
    }

    #[test]
    fn minute_params_default_to_the_last_hour() {
        assert_eq!(
            parse_minute_params(params(None, None, None), 1_000_000),
            Ok(AnalyticsQuery::EventsPerMinute {
                from_s: 1_000_060 - 3600,
                to_s: 1_000_060,
                event_type: None
            })
        );
        assert_eq!(
            parse_minute_params(
                params(
                    Some("2026-01-01T00:00:00Z"),
                    Some("2026-01-01T02:00:00+01:00"),
                    Some("deal_won")
                ),
                0
            ),
            Ok(AnalyticsQuery::EventsPerMinute {
                from_s: 1_767_225_600,
                to_s: 1_767_225_600 + 3600,
                event_type: Some(EventType::DealWon)
            })
        );
    }

    #[test]
    fn bad_params_name_their_field() {
        let fields = |p| match parse_minute_params(p, 0) {
            Err(errors) => errors.into_iter().map(|e| e.field).collect::<Vec<_>>(),
            Ok(query) => panic!("accepted {query:?}"),
        };
        assert_eq!(
            fields(params(Some("yesterday"), None, Some("shoe_bought"))),
            ["query.from", "query.type"]
        );
        assert_eq!(
            fields(params(
                Some("2026-01-02T00:00:00Z"),
                Some("2026-01-01T00:00:00Z"),
                None
            )),
            ["query.from"]
        );
        assert_eq!(
            fields(params(
                Some("2025-01-01T00:00:00Z"),
                Some("2026-01-01T00:00:00Z"),
                None
            )),
            ["query.from"]
        );
    }
}
