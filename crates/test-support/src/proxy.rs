//! A TCP proxy a test can cut: while it is down, every open connection is closed and new ones
//! are accepted and dropped at once, as a database or broker that went away looks to a client.

use std::{net::SocketAddr, sync::Arc};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

/// Forwards connections on a free loopback port to `upstream`; aborted on drop.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    up: Arc<watch::Sender<bool>>,
    task: JoinHandle<()>,
}

impl TcpProxy {
    /// Start forwarding to `upstream` (up).
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (up, _) = watch::channel(true);
        let up = Arc::new(up);
        let state = up.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let mut watch = state.subscribe();
                if !*watch.borrow_and_update() {
                    drop(client);
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut client, mut server) = (client, server);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        // Cut: dropping both ends closes them.
                        _ = watch.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Self { addr, up, task }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Let connections through (`true`) or cut them all and refuse new ones (`false`).
    pub fn set_up(&self, up: bool) {
        self.up.send_replace(up);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.set_up(false);
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = socket.read(&mut buf).await {
                        if n == 0 || socket.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream) -> bool {
        if stream.write_all(b"ping").await.is_err() {
            return false;
        }
        let mut buf = [0u8; 4];
        matches!(
            tokio::time::timeout(std::time::Duration::from_secs(2), stream.read_exact(&mut buf)).await,
            Ok(Ok(_)) if &buf == b"ping"
        )
    }

    #[tokio::test]
    async fn forwards_cuts_and_recovers() {
        let proxy = TcpProxy::start(echo_server().await).await;
        let mut open = TcpStream::connect(proxy.addr()).await.expect("connect");
        assert!(round_trip(&mut open).await, "forwarded while up");

        proxy.set_up(false);
        assert!(!round_trip(&mut open).await, "an open connection is cut");
        let mut refused = TcpStream::connect(proxy.addr()).await.expect("accepted");
        assert!(
            !round_trip(&mut refused).await,
            "a new connection is dropped"
        );

        proxy.set_up(true);
        let mut again = TcpStream::connect(proxy.addr()).await.expect("connect");
        assert!(round_trip(&mut again).await, "forwarded again once up");
    }
}
