//! Bearer API keys: the middleware resolves the key to its tenant or answers 401.

use crate::{GatewayState, problem::Problem};
use axum::{
    extract::{Request, State},
    http::{HeaderMap, header::AUTHORIZATION},
    middleware::Next,
    response::{IntoResponse, Response},
};
use std::{ops::Deref, sync::Arc};

/// The tenant the caller's API key belongs to (a request extension set by [`authenticate`]).
#[derive(Debug, Clone)]
pub(crate) struct Tenant(pub Arc<str>);

impl Deref for Tenant {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

pub(crate) async fn authenticate(
    State(state): State<GatewayState>,
    mut request: Request,
    next: Next,
) -> Response {
    match bearer_token(request.headers()).and_then(|key| state.keys().tenant_for(key)) {
        Some(tenant) => {
            request.extensions_mut().insert(Tenant(tenant));
            next.run(request).await
        }
        None => Problem::unauthorized().into_response(),
    }
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(value: &str) -> Option<String> {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, value.parse().expect("header value"));
        bearer_token(&headers).map(str::to_owned)
    }

    #[test]
    fn reads_bearer_tokens_only() {
        assert_eq!(token("Bearer k1").as_deref(), Some("k1"));
        assert_eq!(token("bearer  k1 ").as_deref(), Some("k1"));
        assert_eq!(token("Basic a2V5"), None);
        assert_eq!(token("Bearer"), None);
        assert_eq!(token("Bearer  "), None);
        assert_eq!(bearer_token(&HeaderMap::new()), None);
    }
}
