//! DNS over TCP (RFC 1035 4.2.2, RFC 7766): two-byte length-prefixed messages on a stream,
//! answered in order by the same [`Handler`] as the UDP slow path.
//!
//! Why not hickory's `Server::register_listener`: it takes a listener and accepts without any
//! bound, and logs every query at INFO. 20 500 idle connections exhausted the gateway's file
//! descriptors (issue 17): accepts on the ClusterSetIPs failed and health probes failed with
//! EMFILE. Here at most `max_tcp_connections` are served at once; a connection beyond that is
//! closed at once and counted (`fedgate_dns_tcp_refused_total`), a connection idle for
//! `tcp_idle_timeout` is closed, and one connection costs its task and a read buffer that is
//! only as large as the message being read. Parsing and encoding stay hickory's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::handler::Handler;
use crate::metrics;

/// After an accept error (EMFILE and the like): pause before the next accept instead of
/// spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves DNS over TCP on `listener` until `shutdown`.
pub(crate) async fn serve(
    listener: TcpListener,
    handler: Arc<Handler>,
    max_connections: usize,
    idle_timeout: Duration,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(max_connections.max(1)));
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(error) => {
                metrics::tcp_accept_error();
                tracing::debug!(%error, "dns tcp accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Over the cap: close at once (the client retries elsewhere or later).
            metrics::tcp_refused();
            drop(stream);
            continue;
        };
        let handler = handler.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            metrics::tcp_connections(1.0);
            tokio::select! {
                () = shutdown.cancelled() => {}
                r = connection(stream, peer, &handler, idle_timeout) => {
                    if let Err(error) = r {
                        tracing::debug!(%peer, %error, "dns tcp connection ended");
                    }
                }
            }
            metrics::tcp_connections(-1.0);
            drop(permit);
        });
    }
}

/// Answers the messages of one connection in order until EOF, an idle timeout or garbage.
async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    handler: &Handler,
    idle_timeout: Duration,
) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    loop {
        let len = match tokio::time::timeout(idle_timeout, stream.read_u16()).await {
            Err(_) => return Ok(()),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(r) => r?,
        };
        let mut message = vec![0u8; usize::from(len)];
        // The rest of a message must follow promptly; a client that stalls mid-message is
        // treated like an idle one.
        tokio::time::timeout(idle_timeout, stream.read_exact(&mut message))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let Some(answer) = handler.handle_tcp(message, peer, Instant::now()).await else {
            // Not a query at all (shorter than a header, or a response): nothing sensible to
            // answer on this stream.
            return Ok(());
        };
        let Ok(answer_len) = u16::try_from(answer.len()) else {
            return Err(std::io::Error::other("answer longer than 65535 bytes"));
        };
        let mut frame = Vec::with_capacity(2 + answer.len());
        frame.extend_from_slice(&answer_len.to_be_bytes());
        frame.extend_from_slice(&answer);
        stream.write_all(&frame).await?;
    }
}
