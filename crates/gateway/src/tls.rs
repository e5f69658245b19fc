//! HTTPS on the gateway's doors (`[gateway] tls_cert_file` and `tls_key_file`): a listener that
//! hands axum connections whose TLS handshake is done. Handshakes run in tasks of their own with a
//! deadline, so a client that opens a connection and says nothing holds up no one else.

use crate::GatewayError;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};
use tokio::{net::TcpStream, sync::mpsc};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for axum to take them.
const READY_QUEUE: usize = 1024;

/// The server certificate chain and key from PEM files, as a TLS acceptor (TLS 1.2 and 1.3).
pub fn acceptor(cert_file: &Path, key_file: &Path) -> Result<TlsAcceptor, GatewayError> {
    let invalid = |field: &'static str, path: &Path, reason: String| GatewayError::InvalidConfig {
        field,
        reason: format!("{}: {reason}", path.display()),
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|err| invalid("tls_cert_file", cert_file, err.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|err| invalid("tls_cert_file", cert_file, err.to_string()))?;
    if certs.is_empty() {
        return Err(invalid(
            "tls_cert_file",
            cert_file,
            "no certificate in it".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|err| invalid("tls_key_file", key_file, err.to_string()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .and_then(|builder| builder.with_no_client_auth().with_single_cert(certs, key))
    .map_err(|err| invalid("tls_key_file", key_file, err.to_string()))?;
    let mut config = config;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A listener whose connections are TLS streams (see the module doc).
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    addr: SocketAddr,
    _accepting: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Accept on `tcp` (already bound, `TCP_NODELAY` set by the caller's tap) and handshake with
    /// `acceptor`.
    pub fn new<L>(mut tcp: L, addr: SocketAddr, acceptor: TlsAcceptor) -> Self
    where
        L: axum::serve::Listener<Io = TcpStream, Addr = SocketAddr>,
    {
        let (done, ready) = mpsc::channel(READY_QUEUE);
        let accepting = tokio::spawn(async move {
            loop {
                let (stream, peer) = tcp.accept().await;
                let (acceptor, done) = (acceptor.clone(), done.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = done.send((tls, peer)).await;
                        }
                        Ok(Err(err)) => {
                            metrics::counter!("crm_gateway_tls_handshake_failures_total")
                                .increment(1);
                            tracing::debug!(%peer, error = %err, "TLS handshake failed");
                        }
                        Err(_) => {
                            metrics::counter!("crm_gateway_tls_handshake_failures_total")
                                .increment(1);
                            tracing::debug!(%peer, "TLS handshake timed out");
                        }
                    }
                });
            }
        });
        Self {
            ready,
            addr,
            _accepting: accepting,
        }
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self._accepting.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accepting task only ends when aborted, which is on drop.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}
