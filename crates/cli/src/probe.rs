//! `crm health`: ask a running role's admin endpoint whether it is live (`/healthz`) or ready
//! (`/readyz`), for container health checks in images that carry no HTTP client.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

/// Which question to ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// `/healthz`: every consumer loop makes progress.
    Live,
    /// `/readyz`: NATS connected, streams there, every role started.
    Ready,
}

impl Probe {
    pub fn path(self) -> &'static str {
        match self {
            Self::Live => "/healthz",
            Self::Ready => "/readyz",
        }
    }
}

/// Where a process listening on `listen` is reached from the same host: a wildcard address
/// (`0.0.0.0`, `::`) is asked on loopback.
pub fn local(listen: SocketAddr) -> SocketAddr {
    if listen.ip().is_unspecified() {
        let loopback = match listen.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        };
        SocketAddr::new(loopback, listen.port())
    } else {
        listen
    }
}

/// Ask `probe` of the admin endpoint on `listen`; `Ok` with the body on 200, else why not.
pub async fn check(listen: SocketAddr, probe: Probe, timeout: Duration) -> Result<String, String> {
    let url = format!("http://{}{}", local(listen), probe.path());
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|err| format!("{url}: {err}"))?;
    let response = client
        .get(&url)
        .send()
        .await
        .map_err(|err| format!("{url}: {err}"))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    if status.is_success() {
        Ok(body)
    } else {
        Err(format!("{url}: {status} {body}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_listener_is_asked_on_loopback() {
        let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
        assert_eq!(local(addr("0.0.0.0:9100")), addr("127.0.0.1:9100"));
        assert_eq!(local(addr("[::]:9100")), addr("[::1]:9100"));
        assert_eq!(local(addr("10.0.0.5:9100")), addr("10.0.0.5:9100"));
    }
}
