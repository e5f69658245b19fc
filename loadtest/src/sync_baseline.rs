//! The synchronous baseline, as in the paper: one HTTP request does all the work before it
//! answers — decode and validate, write the profile, count the analytics, POST a signed webhook
//! and wait for its answer — over its own SQLite store. It serves the gateway's
//! `POST /v1/events` so the same drivers drive it.

use anyhow::{Context, Result};
use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, header::CONTENT_TYPE},
    routing::post,
};
use bus::CancellationToken;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::{net::SocketAddr, sync::Arc};
use store::Store;

/// The webhook receiver's shared secret.
const WEBHOOK_SECRET: &[u8] = b"crm-load-sync-baseline";
/// The signature header: `sha256=<hex HMAC-SHA256 of the body>`.
const SIGNATURE_HEADER: &str = "X-Crm-Signature";

#[derive(Debug, Clone)]
struct SyncState {
    store: Store,
    http: reqwest::Client,
    webhook_url: String,
}

fn sign(body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let mut mac = <Hmac<Sha256>>::new_from_slice(WEBHOOK_SECRET)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn ingest(
    State(state): State<Arc<SyncState>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let encoding = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(events::Encoding::from_content_type)
        .unwrap_or(events::Encoding::Json);
    let event = match events::decode(&body, encoding) {
        Ok(event) => event,
        Err(err) => return (StatusCode::BAD_REQUEST, err.to_string()),
    };
    if let Err(err) = events::validate(&event) {
        return (StatusCode::BAD_REQUEST, err.to_string());
    }
    let batch = std::slice::from_ref(&event);
    if let Err(err) = state.store.apply_batch(batch).await {
        return (StatusCode::SERVICE_UNAVAILABLE, err.to_string());
    }
    if let Err(err) = state.store.apply_analytics(batch).await {
        return (StatusCode::SERVICE_UNAVAILABLE, err.to_string());
    }
    let payload = events::encode_json(&event);
    let signature = sign(&payload);
    let delivered = state
        .http
        .post(&state.webhook_url)
        .header(CONTENT_TYPE, "application/json")
        .header(SIGNATURE_HEADER, signature)
        .header("Idempotency-Key", event.event_id.as_str())
        .body(payload)
        .send()
        .await;
    match delivered {
        Ok(response) if response.status().is_success() => (
            StatusCode::OK,
            format!("{{\"event_id\":\"{}\"}}", event.event_id),
        ),
        Ok(response) => (
            StatusCode::BAD_GATEWAY,
            format!("webhook answered {}", response.status()),
        ),
        Err(err) => (StatusCode::BAD_GATEWAY, err.to_string()),
    }
}

/// The webhook receiver: checks the signature, answers 204.
async fn receive(headers: HeaderMap, body: Bytes) -> StatusCode {
    let expected = sign(&body);
    match headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok()) {
        Some(signature) if signature == expected => StatusCode::NO_CONTENT,
        _ => StatusCode::UNAUTHORIZED,
    }
}

async fn serve(router: Router, shutdown: CancellationToken) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    });
    Ok(addr)
}

/// A running synchronous server and its webhook receiver; stopped (and its store removed) on
/// drop.
#[derive(Debug)]
pub struct SyncServer {
    pub base_url: String,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl SyncServer {
    pub async fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("sync.db").display());
        let store = Store::connect(&url)
            .await
            .context("opening the sync baseline's store")?;
        let shutdown = CancellationToken::new();
        let receiver = serve(
            Router::new().route("/webhook", post(receive)),
            shutdown.clone(),
        )
        .await?;
        let state = Arc::new(SyncState {
            store,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(1024)
                .tcp_nodelay(true)
                .build()?,
            webhook_url: format!("http://{receiver}/webhook"),
        });
        let addr = serve(
            Router::new()
                .route("/v1/events", post(ingest))
                .with_state(state),
            shutdown.clone(),
        )
        .await?;
        Ok(Self {
            base_url: format!("http://{addr}"),
            shutdown,
            _dir: dir,
        })
    }
}

impl Drop for SyncServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_is_answered_after_the_store_and_the_webhook() {
        let server = SyncServer::start().await.expect("starts");
        let event = events::sample::event(events::EventType::DealWon, "t1", "c1");
        let client = reqwest::Client::new();
        let response = client
            .post(format!("{}/v1/events", server.base_url))
            .header(CONTENT_TYPE, "application/json")
            .body(events::encode_json(&event))
            .send()
            .await
            .expect("answered");
        assert_eq!(response.status(), StatusCode::OK);
        let bad = client
            .post(format!("{}/v1/events", server.base_url))
            .body("{}")
            .send()
            .await
            .expect("answered");
        assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
        assert_ne!(sign(b"a"), sign(b"b"));
    }
}
