//! Where the tunnel's packet work runs. quinn spawns one task per endpoint (it reads the UDP
//! socket) and one per connection (it turns packets into stream data and back) with the
//! [`quinn::Runtime`] it is given; its own `TokioRuntime` spawns them on whatever runtime the
//! caller happens to be on. [`Pinned`] spawns them, and registers the UDP socket and the
//! timers, on one runtime chosen by the composition root: the gateway's data-plane thread,
//! where the proxy tasks that read and write those streams run as well. A packet then
//! travels from the socket to the proxied TCP connection without waking another thread.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use tokio::runtime::Handle;

/// A [`quinn::Runtime`] bound to one tokio runtime, whichever runtime calls it.
#[derive(Debug, Clone)]
pub struct Pinned(pub Handle);

impl quinn::Runtime for Pinned {
    fn new_timer(&self, t: Instant) -> Pin<Box<dyn quinn::AsyncTimer>> {
        // The timer registers with the time driver of the runtime entered here.
        let _in = self.0.enter();
        Box::pin(tokio::time::sleep_until(t.into()))
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        self.0.spawn(future);
    }

    fn wrap_udp_socket(
        &self,
        socket: std::net::UdpSocket,
    ) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        // quinn calls it for `Endpoint::rebind`; the endpoint's own socket is made the same way.
        let _in = self.0.enter();
        Ok(crate::socket::TunnelSocket::new(socket, None)?)
    }

    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
}

/// Spawns `future` on `runtime`, or on the caller's runtime when there is none.
pub(crate) fn spawn_on<F>(runtime: Option<&Handle>, future: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match runtime {
        Some(handle) => handle.spawn(future),
        None => tokio::spawn(future),
    }
}
