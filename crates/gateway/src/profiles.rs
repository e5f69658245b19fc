//! `GET /v1/customers/{id}`: the projected profile, read through a [`ProfileSource`].

use crate::{GatewayState, auth::Tenant, problem::Problem};
use axum::{
    Extension, Json,
    extract::{Path, State, rejection::PathRejection},
    http::StatusCode,
};
use futures::future::BoxFuture;

/// Where customer profiles come from (the store's projection). `Ok(None)` means unknown.
pub trait ProfileSource: Send + Sync + 'static {
    fn profile(
        &self,
        tenant: &str,
        customer: &str,
    ) -> BoxFuture<'_, Result<Option<serde_json::Value>, String>>;
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
    let source = state.profiles().ok_or_else(|| {
        Problem::new(
            StatusCode::NOT_IMPLEMENTED,
            "not-implemented",
            "Profiles not available",
            "this gateway runs without a profile store",
        )
    })?;
    match source.profile(&tenant, &id).await {
        Ok(Some(profile)) => Ok(Json(profile)),
        Ok(None) => Err(Problem::not_found(format!("customer {id:?} is unknown"))),
        Err(err) => {
            tracing::error!(error = %err, "profile lookup failed");
            Err(Problem::internal("the profile lookup failed"))
        }
    }
}
