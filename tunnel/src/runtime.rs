//! Where the tunnel's packet work runs. quinn spawns one task per endpoint (it reads the UDP
//! socket) and one per connection (it turns packets into stream data and back) with the
//! [`quinn::Runtime`] it is given; its own `TokioRuntime` spawns them on whatever runtime the
//! caller happens to be on. [`Pinned`] spawns them on the runtimes chosen by the composition
//! root: the gateway's data-plane threads, where the proxy tasks that read and write those
//! streams run as well. Each endpoint's task (its UDP socket, `crate::steer`) runs on its
//! thread; each connection's task on the thread [`place`] names when it is created. With several threads a
//! peer has one connection per thread (lanes, `crate::lanes`), so a proxied connection's
//! packets are turned into stream data on the thread that copies them to TCP.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use tokio::runtime::Handle;

thread_local! {
    /// The data-plane thread (shard) this thread is, set once by the thread itself.
    static SHARD: Cell<Option<usize>> = const { Cell::new(None) };
    /// Where the next task quinn spawns from this thread goes ([`place`]).
    static PLACE: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Marks the calling thread as data-plane thread `shard` (its index in
/// [`TunnelSettings::shards`](crate::TunnelSettings)). Called once, at the thread's start.
pub fn set_current_shard(shard: usize) {
    SHARD.with(|s| s.set(Some(shard)));
}

/// The data-plane thread the caller runs on, if it is one.
pub fn current_shard() -> Option<usize> {
    SHARD.with(Cell::get)
}

/// Runs `f` (a call that makes quinn create a connection: `Endpoint::connect_with`,
/// `Incoming::accept`) with the connection's driver task placed on data-plane thread `shard`.
/// quinn spawns the driver synchronously inside such calls, through [`Pinned::spawn`].
pub(crate) fn place<T>(shard: usize, f: impl FnOnce() -> T) -> T {
    let before = PLACE.with(|p| p.replace(Some(shard)));
    let out = f();
    PLACE.with(|p| p.set(before));
    out
}

/// A [`quinn::Runtime`] over the gateway's data-plane threads, one tokio runtime each
/// (`shards[0]` reads the UDP socket). Tasks quinn spawns go to the thread chosen by
/// [`place`] around the call that spawns them, else to the first: the endpoint's driver
/// there, each connection's driver on the thread that carries its streams. Timers register
/// with the runtime of the thread that polls them.
#[derive(Debug, Clone)]
pub struct Pinned(pub Arc<[Handle]>);

impl Pinned {
    fn first(&self) -> &Handle {
        &self.0[0]
    }
}

impl quinn::Runtime for Pinned {
    fn new_timer(&self, t: Instant) -> Pin<Box<dyn quinn::AsyncTimer>> {
        // quinn creates a connection's timer while polling its driver: on the driver's thread,
        // whose runtime's time driver then wakes it without a hop. Elsewhere, the first's.
        let _in = match Handle::try_current() {
            Ok(_) => None,
            Err(_) => Some(self.first().enter()),
        };
        Box::pin(tokio::time::sleep_until(t.into()))
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        let shard = PLACE.with(Cell::get).unwrap_or(0);
        self.0[shard % self.0.len()].spawn(future);
    }

    fn wrap_udp_socket(
        &self,
        socket: std::net::UdpSocket,
    ) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        // quinn calls it for `Endpoint::rebind`; the endpoint's own socket is made the same way.
        let _in = self.first().enter();
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
