//! A UDP relay that holds every datagram for a fixed time in each direction
//! ([`fedgate_tunnel::testing::DelayRelay`]): a long path between two gateways on one machine,
//! for `bench/tunnel/rr-compare.sh` (`DELAY_MS`). This machine's kernel has no netem. The
//! relay copies datagrams one by one on one thread and tops out near 1.6 Gb/s of 1452-byte
//! datagrams here, so it is the path's bottleneck as well as its delay.
//!
//! ```text
//! cargo run --release -p fedgate-tunnel --features test-util --example udp_delay -- 127.0.0.70:7000 127.0.0.22:4433 10
//! ```
//! Arguments: the address to listen on, the address to relay to, milliseconds of delay each way.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use fedgate_tunnel::testing::DelayRelay;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream, millis] = &args[..] else {
        anyhow::bail!("usage: udp_delay LISTEN UPSTREAM MILLISECONDS");
    };
    let listen: SocketAddr = listen.parse().context("LISTEN: address:port")?;
    let upstream: SocketAddr = upstream.parse().context("UPSTREAM: address:port")?;
    let delay = Duration::from_millis(millis.parse().context("MILLISECONDS: a whole number")?);
    let relay =
        DelayRelay::start(listen, upstream, delay).with_context(|| format!("bind {listen}"))?;
    relay.run().await.context("relaying")
}
