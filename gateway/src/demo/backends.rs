//! The demo's backends, built in: on one loopback address each, an HTTP server answering
//! `hello from <cluster> (<backend>)` and a TCP echo that prefixes every line with
//! `<cluster> (<backend>): `. Stopping a backend closes its listeners at once, so the
//! gateways' TCP probes really fail (a closed port, not a slow answer); HTTP requests already
//! accepted are answered (within [`CLOSE_GRACE`]), echo connections are closed.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderName, HeaderValue, Request, Response, header};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::DemoError;

/// How long a stopping backend waits for its tasks before aborting them.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// How long HTTP requests accepted before a stop may take to finish.
pub const CLOSE_GRACE: Duration = Duration::from_millis(500);
/// Largest read of the TCP echo.
const ECHO_BUFFER: usize = 16 * 1024;

/// Adds `prefix` at the start of every line of `chunk`; `at_line_start` carries whether the
/// next byte starts a line across chunks (a line may arrive in pieces).
pub fn prefix_lines(chunk: &[u8], at_line_start: &mut bool, prefix: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(chunk.len() + prefix.len());
    for &byte in chunk {
        if *at_line_start {
            out.extend_from_slice(prefix);
        }
        out.push(byte);
        *at_line_start = byte == b'\n';
    }
    out
}

/// One backend: stopped or running.
pub struct Backend {
    pub cluster: String,
    pub name: String,
    pub http: SocketAddr,
    pub tcp: SocketAddr,
    running: Option<Running>,
}

struct Running {
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl Backend {
    pub fn new(cluster: &str, name: &str, http: SocketAddr, tcp: SocketAddr) -> Self {
        Self { cluster: cluster.to_owned(), name: name.to_owned(), http, tcp, running: None }
    }

    pub fn is_up(&self) -> bool {
        self.running.is_some()
    }

    /// Binds both listeners (an address in use fails at once) and serves. Starting a running
    /// backend does nothing.
    pub async fn start(&mut self) -> Result<(), DemoError> {
        if self.running.is_some() {
            return Ok(());
        }
        let http = TcpListener::bind(self.http).await.map_err(|e| DemoError::Bind(self.http, e))?;
        let tcp = TcpListener::bind(self.tcp).await.map_err(|e| DemoError::Bind(self.tcp, e))?;
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let hello = Hello {
            body: Bytes::from(format!("hello from {} ({})\n", self.cluster, self.name)),
            cluster: HeaderValue::from_str(&self.cluster).unwrap_or(HeaderValue::from_static("?")),
        };
        tasks.spawn(accept(http, stop.clone(), CLOSE_GRACE, move |stream| {
            serve_hello(stream, hello.clone())
        }));
        let prefix: Arc<[u8]> = format!("{} ({}): ", self.cluster, self.name).into_bytes().into();
        tasks.spawn(accept(tcp, stop.clone(), Duration::ZERO, move |stream| {
            let prefix = prefix.clone();
            async move { echo(stream, &prefix).await }
        }));
        tracing::debug!(cluster = %self.cluster, backend = %self.name, http = %self.http, tcp = %self.tcp, "backend up");
        self.running = Some(Running { stop, tasks });
        Ok(())
    }

    /// Closes the listeners at once (new connections are refused), lets HTTP requests
    /// already accepted finish for [`CLOSE_GRACE`], and closes every connection still open.
    /// Stopping a stopped backend does nothing.
    pub async fn stop(&mut self) {
        let Some(mut running) = self.running.take() else { return };
        running.stop.cancel();
        let drained = tokio::time::timeout(STOP_GRACE, async {
            while running.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            running.tasks.abort_all();
            while running.tasks.join_next().await.is_some() {}
        }
        tracing::debug!(cluster = %self.cluster, backend = %self.name, "backend down");
    }
}

/// What the HTTP backend answers.
#[derive(Clone)]
struct Hello {
    body: Bytes,
    cluster: HeaderValue,
}

/// One HTTP/1.1 exchange per connection (no keep-alive, so a stopped backend leaves no idle
/// connection behind).
async fn serve_hello(stream: TcpStream, hello: Hello) -> std::io::Result<()> {
    let service = service_fn(move |_req: Request<Incoming>| {
        let hello = hello.clone();
        async move {
            let mut resp = Response::new(Body::from(hello.body));
            resp.headers_mut().insert(HeaderName::from_static("x-demo-cluster"), hello.cluster);
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            Ok::<_, Infallible>(resp)
        }
    });
    http1::Builder::new()
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service)
        .await
        .map_err(std::io::Error::other)
}

/// Accepts connections until `stop`, each served by `handle`. On stop the listener closes at
/// once; connections still open get `grace` to finish, then are closed.
async fn accept<F, Fut>(listener: TcpListener, stop: CancellationToken, grace: Duration, handle: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = std::io::Result<()>> + Send + 'static,
{
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let conn = handle(stream);
                    conns.spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "demo backend connection ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "demo backend accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    // Connections the kernel completed but nobody accepted yet would be reset by the close:
    // take them (plain non-blocking accepts) and serve them like the others.
    match listener.into_std() {
        Ok(std_listener) => {
            while let Ok((stream, _)) = std_listener.accept() {
                let stream =
                    stream.set_nonblocking(true).and_then(|()| TcpStream::from_std(stream));
                if let Ok(stream) = stream {
                    let conn = handle(stream);
                    conns.spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "demo backend connection ended");
                        }
                    });
                }
            }
        }
        Err(e) => tracing::debug!(error = %e, "demo backend listener closed"),
    }
    let _ = tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

async fn echo(mut stream: TcpStream, prefix: &[u8]) -> std::io::Result<()> {
    let mut buf = vec![0u8; ECHO_BUFFER];
    let mut at_line_start = true;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return stream.shutdown().await;
        }
        let out = prefix_lines(&buf[..n], &mut at_line_start, prefix);
        stream.write_all(&out).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_lines_marks_each_line_across_chunks() {
        // (chunks, expected output)
        let cases: &[(&[&str], &str)] = &[
            (&["a\n"], "P: a\n"),
            (&["a\nb\n"], "P: a\nP: b\n"),
            (&["hel", "lo\nwor", "ld\n"], "P: hello\nP: world\n"),
            (&["\n\n"], "P: \nP: \n"),
            (&["no newline"], "P: no newline"),
            (&[""], ""),
        ];
        for (chunks, want) in cases {
            let mut start = true;
            let got: Vec<u8> = chunks
                .iter()
                .flat_map(|c| prefix_lines(c.as_bytes(), &mut start, b"P: "))
                .collect();
            assert_eq!(String::from_utf8_lossy(&got), *want, "{chunks:?}");
        }
    }

    async fn free_addr() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr")
    }

    async fn http_get(addr: SocketAddr) -> std::io::Result<String> {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn a_backend_answers_then_refuses_when_stopped_then_answers_again() {
        let (http, tcp) = (free_addr().await, free_addr().await);
        let mut b = Backend::new("east", "east-1", http, tcp);
        b.start().await.expect("start");
        assert!(b.is_up());
        let reply = http_get(http).await.expect("http");
        assert!(reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.ends_with("hello from east (east-1)\n"), "{reply}");
        assert!(reply.to_ascii_lowercase().contains("x-demo-cluster: east"), "{reply}");

        let mut echo = TcpStream::connect(tcp).await.expect("echo");
        echo.write_all(b"ping\n").await.expect("write");
        let mut buf = vec![0u8; 64];
        let n = echo.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"east (east-1): ping\n");

        // Stopping closes the open echo connection and both listeners.
        b.stop().await;
        assert!(!b.is_up());
        let n = tokio::time::timeout(Duration::from_secs(2), echo.read(&mut buf))
            .await
            .expect("the open connection is closed, not left hanging")
            .unwrap_or(0);
        assert_eq!(n, 0);
        for addr in [http, tcp] {
            let err = TcpStream::connect(addr).await.expect_err("closed port");
            assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{addr}");
        }

        b.start().await.expect("restart on the same addresses");
        assert!(http_get(http).await.expect("http again").ends_with("hello from east (east-1)\n"));
        b.stop().await;
    }

    #[tokio::test]
    async fn a_request_already_connected_when_the_backend_stops_is_still_answered() {
        let (http, tcp) = (free_addr().await, free_addr().await);
        let mut b = Backend::new("west", "west-1", http, tcp);
        // Whether the accept loop took the connection before the stop or not, it is answered.
        for round in 0..20 {
            b.start().await.expect("start");
            let mut s = TcpStream::connect(http).await.expect("connect");
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
            b.stop().await;
            let mut out = String::new();
            tokio::time::timeout(Duration::from_secs(3), s.read_to_string(&mut out))
                .await
                .expect("answered in time")
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert!(out.ends_with("hello from west (west-1)\n"), "round {round}: {out:?}");
        }
    }

    #[tokio::test]
    async fn an_address_in_use_fails_start_with_the_address() {
        let taken = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = taken.local_addr().expect("addr");
        let mut b = Backend::new("east", "east-1", free_addr().await, addr);
        let err = b.start().await.expect_err("in use");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
        assert!(!b.is_up());
    }
}
