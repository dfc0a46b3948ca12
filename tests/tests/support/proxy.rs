//! A TCP proxy in the test, to take a dependency away and give it back: `stop` drops every
//! connection through it at once (as a Postgres restart does) and refuses new ones until
//! `start` again.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::TcpStream;
use tokio::task::JoinSet;

pub struct TcpProxy {
    pub address: SocketAddr,
    upstream: SocketAddr,
    tasks: Arc<Mutex<Option<JoinSet<()>>>>,
}

impl TcpProxy {
    /// A proxy that will listen on `address` (not yet: see [`TcpProxy::start`]) and forward to
    /// `upstream`.
    pub fn new(address: SocketAddr, upstream: SocketAddr) -> TcpProxy {
        TcpProxy {
            address,
            upstream,
            tasks: Arc::new(Mutex::new(None)),
        }
    }

    /// Listens and forwards until [`TcpProxy::stop`].
    pub async fn start(&self) {
        let listener = super::bind_again(self.address).await;
        let upstream = self.upstream;
        let mut set = JoinSet::new();
        let connections = self.tasks.clone();
        set.spawn(async move {
            let mut links = JoinSet::new();
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                links.spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                // Finished links are reaped as they go.
                while links.try_join_next().is_some() {}
            }
        });
        *connections.lock().unwrap() = Some(set);
    }

    /// Stops listening and drops every connection (dropping the join sets aborts their tasks).
    pub fn stop(&self) {
        if let Some(mut set) = self.tasks.lock().unwrap().take() {
            set.abort_all();
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `host:port` part of a Postgres URL with credentials, and its address: what a proxy in
/// front of it listens for and forwards to.
pub fn url_parts(url: &str) -> (String, SocketAddr) {
    let after_at = url.rsplit_once('@').expect("credentials in the URL").1;
    let host_port = after_at.split('/').next().unwrap().to_owned();
    let address = host_port.parse().expect("an IP address and port");
    (host_port, address)
}
