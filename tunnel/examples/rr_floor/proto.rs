//! The quinn-proto drivers of `rr_floor` (modes `proto-tokio`, `proto-udp`, `proto`).

use super::*;

// ------------------------------------------------------------------ proto: quinn-proto direct

pub(super) fn transport() -> TransportConfig {
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    t
}

/// The QUIC state of one side, whatever drives its socket: a quinn-proto endpoint and its
/// one connection and stream.
pub(super) struct Quic {
    endpoint: quinn_proto::Endpoint,
    server: Option<Arc<ServerConfig>>,
    conn: Option<(ConnectionHandle, quinn_proto::Connection)>,
    stream: Option<quinn_proto::StreamId>,
    tx: Vec<u8>,
}

impl Quic {
    fn new(server: Option<ServerConfig>) -> Self {
        let server = server.map(Arc::new);
        let endpoint = quinn_proto::Endpoint::new(
            Arc::new(EndpointConfig::default()),
            server.clone(),
            false,
            None,
        );
        Self { endpoint, server, conn: None, stream: None, tx: Vec::new() }
    }

    /// Feeds one received datagram in.
    fn feed(
        &mut self,
        now: Instant,
        from: SocketAddr,
        meta: (Option<IpAddr>, Option<EcnCodepoint>),
        data: &[u8],
        send: &mut impl FnMut(&[u8], &quinn_proto::Transmit) -> io::Result<()>,
    ) -> anyhow::Result<()> {
        let mut resp = Vec::new();
        let (local_ip, ecn) = meta;
        match self.endpoint.handle(now, from, local_ip, ecn, BytesMut::from(data), &mut resp) {
            Some(DatagramEvent::NewConnection(incoming)) => {
                match self.endpoint.accept(incoming, now, &mut resp, self.server.clone()) {
                    Ok(c) => self.conn = Some(c),
                    Err(e) => anyhow::bail!("accept: {}", e.cause),
                }
            }
            Some(DatagramEvent::ConnectionEvent(_, ev)) => {
                if let Some((_, conn)) = self.conn.as_mut() {
                    conn.handle_event(ev);
                }
            }
            Some(DatagramEvent::Response(t)) => send(&resp[..t.size], &t)?,
            None => {}
        }
        Ok(())
    }

    fn next_timeout(&mut self) -> Option<Instant> {
        self.conn.as_mut().and_then(|(_, c)| c.poll_timeout())
    }

    fn on_timeout(&mut self, now: Instant) {
        if let Some((_, conn)) = self.conn.as_mut()
            && conn.poll_timeout().is_some_and(|t| t <= now)
        {
            conn.handle_timeout(now);
        }
    }

    /// Sends everything the connection has to send.
    fn flush(
        &mut self,
        send: &mut impl FnMut(&[u8], &quinn_proto::Transmit) -> io::Result<()>,
    ) -> io::Result<()> {
        let Some((handle, conn)) = self.conn.as_mut() else { return Ok(()) };
        let now = Instant::now();
        loop {
            self.tx.clear();
            let Some(t) = conn.poll_transmit(now, 1, &mut self.tx) else { break };
            send(&self.tx[..t.size], &t)?;
        }
        while let Some(ev) = conn.poll_endpoint_events() {
            if let Some(ev) = self.endpoint.handle_event(*handle, ev) {
                conn.handle_event(ev);
            }
        }
        Ok(())
    }

    /// Appends what the stream has to `out`; returns how many bytes (0 when none yet).
    fn read(&mut self, out: &mut Vec<u8>) -> anyhow::Result<usize> {
        let (Some((_, conn)), Some(id)) = (self.conn.as_mut(), self.stream) else { return Ok(0) };
        let mut stream = conn.recv_stream(id);
        let mut chunks = match stream.read(true) {
            Ok(c) => c,
            Err(e) => anyhow::bail!("read: {e}"),
        };
        let mut n = 0;
        let result = loop {
            match chunks.next(usize::MAX) {
                Ok(Some(c)) => {
                    n += c.bytes.len();
                    out.extend_from_slice(&c.bytes);
                }
                Ok(None) | Err(quinn_proto::ReadError::Blocked) => break Ok(n),
                Err(e) => break Err(anyhow::anyhow!("read: {e}")),
            }
        };
        let _ = chunks.finalize();
        result
    }

    fn write(&mut self, data: &[u8]) -> anyhow::Result<()> {
        let (Some((_, conn)), Some(id)) = (self.conn.as_mut(), self.stream) else {
            anyhow::bail!("no stream")
        };
        let n = conn.send_stream(id).write(data).map_err(|e| anyhow::anyhow!("write: {e}"))?;
        anyhow::ensure!(n == data.len(), "short write {n} of {}", data.len());
        Ok(())
    }

    /// The echo side's step: accepts the peer's stream, sends back whatever it brought.
    /// Errors only when writing back fails.
    fn echo(&mut self, buf: &mut Vec<u8>) -> anyhow::Result<()> {
        let _ = self.connected();
        buf.clear();
        if matches!(self.read(buf), Ok(n) if n > 0) {
            self.write(buf)?;
        }
        Ok(())
    }

    /// Handles application events (accepts the peer's stream); true once the handshake is done.
    fn connected(&mut self) -> bool {
        let Some((_, conn)) = self.conn.as_mut() else { return false };
        while let Some(ev) = conn.poll() {
            if let Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) = ev
                && let Some(id) = conn.streams().accept(Dir::Bi)
            {
                self.stream = Some(id);
            }
        }
        !conn.is_handshaking()
    }

    fn connect(&mut self, client: ClientConfig, to: SocketAddr) -> anyhow::Result<()> {
        let c = self.endpoint.connect(Instant::now(), client, to, "west").context("connect")?;
        self.conn = Some(c);
        Ok(())
    }

    fn open(&mut self) -> anyhow::Result<()> {
        let stream = self.conn.as_mut().and_then(|(_, c)| c.streams().open(Dir::Bi));
        self.stream = Some(stream.context("no stream credit")?);
        Ok(())
    }
}

/// `proto`: a blocking socket per side; timers are served at each 2 ms receive timeout.
pub(super) struct StdSide {
    sock: UdpSocket,
    quic: Quic,
    rx: Vec<u8>,
}

impl StdSide {
    fn new(server: Option<ServerConfig>) -> io::Result<Self> {
        let sock = UdpSocket::bind("127.0.0.1:0")?;
        sock.set_read_timeout(Some(Duration::from_millis(2)))?;
        Ok(Self { sock, quic: Quic::new(server), rx: vec![0; 65536] })
    }

    fn flush(&mut self) -> io::Result<()> {
        let sock = &self.sock;
        self.quic.flush(&mut |b, t| sock.send_to(b, t.destination).map(drop))
    }

    fn turn(&mut self) -> anyhow::Result<()> {
        let received = self.sock.recv_from(&mut self.rx);
        let now = Instant::now();
        match received {
            Ok((n, from)) => {
                let sock = &self.sock;
                self.quic.feed(now, from, (None, None), &self.rx[..n], &mut |b, t| {
                    sock.send_to(b, t.destination).map(drop)
                })?;
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(e.into()),
        }
        self.quic.on_timeout(now);
        Ok(())
    }
}

/// `proto-tokio`: what a hand-written driver in the gateway would be: one task per side on a
/// current-thread runtime, a tokio UDP socket and one timer reset to the connection's next
/// deadline. With `udp_state` (`proto-udp`), datagrams go through quinn-udp as quinn's do
/// (ECN, destination address and GRO control messages, `recvmmsg`); without it, plain
/// `recv_from` / `send_to`. A send that would block drops the datagram (QUIC resends it;
/// round trips of 1 KB never fill the socket buffer).
pub(super) struct TokioSide {
    sock: tokio::net::UdpSocket,
    udp_state: Option<UdpSocketState>,
    quic: Quic,
    rx: Vec<u8>,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl TokioSide {
    fn new(server: Option<ServerConfig>, quinn_udp: bool) -> io::Result<Self> {
        let std = UdpSocket::bind("127.0.0.1:0")?;
        std.set_nonblocking(true)?;
        let udp_state = quinn_udp.then(|| UdpSocketState::new((&std).into())).transpose()?;
        Ok(Self {
            sock: tokio::net::UdpSocket::from_std(std)?,
            udp_state,
            quic: Quic::new(server),
            rx: vec![0; 65536],
            timer: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
        })
    }

    fn send<'a>(
        sock: &'a tokio::net::UdpSocket,
        state: Option<&'a UdpSocketState>,
    ) -> impl FnMut(&[u8], &quinn_proto::Transmit) -> io::Result<()> + 'a {
        move |contents, t| {
            let sent = match state {
                Some(state) => sock.try_io(tokio::io::Interest::WRITABLE, || {
                    state.send(
                        sock.into(),
                        &quinn::udp::Transmit {
                            destination: t.destination,
                            ecn: t.ecn.and_then(|e| quinn::udp::EcnCodepoint::from_bits(e as u8)),
                            contents,
                            segment_size: t.segment_size,
                            src_ip: t.src_ip,
                        },
                    )
                }),
                None => sock.try_send_to(contents, t.destination).map(drop),
            };
            match sent {
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
                _ => Ok(()),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.quic.flush(&mut Self::send(&self.sock, self.udp_state.as_ref()))
    }

    async fn turn(&mut self) -> anyhow::Result<()> {
        let deadline =
            self.quic.next_timeout().unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        if self.timer.deadline().into_std() != deadline {
            self.timer.as_mut().reset(deadline.into());
        }
        let state = self.udp_state.as_ref();
        let mut meta = [RecvMeta::default(); SLOTS];
        let received = tokio::select! {
            biased;
            n = recv_datagrams(&self.sock, state, &mut self.rx, &mut meta) => n?,
            () = self.timer.as_mut() => 0,
        };
        let now = Instant::now();
        let slot = self.rx.len() / SLOTS;
        let send = &mut Self::send(&self.sock, self.udp_state.as_ref());
        for (m, data) in meta.iter().zip(self.rx.chunks(slot)).take(received) {
            let ecn = m.ecn.and_then(|e| EcnCodepoint::from_bits(e as u8));
            // With GRO one slot holds several datagrams, `stride` bytes apart.
            for datagram in data[..m.len].chunks(m.stride.max(1)) {
                self.quic.feed(now, m.addr, (m.dst_ip, ecn), datagram, send)?;
            }
        }
        self.quic.on_timeout(now);
        Ok(())
    }
}

/// Slots per receive: the data lands in the two halves of `rx`.
pub(super) const SLOTS: usize = 2;

/// Receives into the slots of `rx`; returns how many slots were filled (their metadata in
/// `meta`). With quinn-udp it does what the gateway's `TunnelSocket` does: a batch that
/// leaves a slot empty drained the socket, so its readiness is cleared at once instead of
/// after one more `recvmmsg` returning `EAGAIN`. The plain mode reads one datagram with
/// `recv_from` and pays that extra call.
pub(super) async fn recv_datagrams(
    sock: &tokio::net::UdpSocket,
    state: Option<&UdpSocketState>,
    rx: &mut [u8],
    meta: &mut [RecvMeta; SLOTS],
) -> io::Result<usize> {
    let Some(state) = state else {
        let (len, addr) = sock.recv_from(rx).await?;
        meta[0] = RecvMeta { addr, len, stride: len, ..RecvMeta::default() };
        return Ok(1);
    };
    let slot = rx.len() / SLOTS;
    loop {
        sock.readable().await?;
        let (first, second) = rx.split_at_mut(slot);
        let mut bufs = [IoSliceMut::new(first), IoSliceMut::new(&mut second[..slot])];
        let mut short = None;
        let got = sock.try_io(tokio::io::Interest::READABLE, || {
            let n = state.recv(sock.into(), &mut bufs, meta)?;
            if n < SLOTS {
                short = Some(n);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match (got, short) {
            (_, Some(n)) | (Ok(n), None) => return Ok(n),
            (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => {}
            (Err(e), None) => return Err(e),
        }
    }
}

pub(super) fn proto_configs(pki: &TestPki) -> anyhow::Result<(ServerConfig, ClientConfig)> {
    let sink = Arc::new(RejectionSink::new(true));
    let west = Credentials::new(&pki.issue("west"), pki.clusterset(), &id("west")?)?;
    let east = Credentials::new(&pki.issue("east"), pki.clusterset(), &id("east")?)?;
    let mut server = ServerConfig::with_crypto(Arc::new(tls::server_crypto(
        &west,
        vec![id("east")?],
        sink.clone(),
    )?));
    server.transport_config(Arc::new(transport()));
    let mut client = ClientConfig::new(Arc::new(tls::client_crypto(&east, id("west")?, sink)?));
    client.transport_config(Arc::new(transport()));
    Ok((server, client))
}

pub(super) struct ProtoClient {
    side: StdSide,
    request: Vec<u8>,
    got: Vec<u8>,
}

impl ProtoClient {
    pub(super) fn one(&mut self) -> anyhow::Result<()> {
        self.got.clear();
        self.side.quic.write(&self.request)?;
        self.side.flush()?;
        while self.got.len() < MSG {
            self.side.turn()?;
            self.side.quic.read(&mut self.got)?;
            self.side.flush()?;
        }
        Ok(())
    }
}

pub(super) fn proto_pair(pki: &TestPki, stop: &CancellationToken) -> anyhow::Result<ProtoClient> {
    let (server, client) = proto_configs(pki)?;
    // west: accepts, echoes whatever the stream brings, on its own thread.
    let mut west = StdSide::new(Some(server))?;
    let west_addr = west.sock.local_addr()?;
    let stop = stop.clone();
    std::thread::spawn(move || {
        let mut buf = Vec::with_capacity(MSG * 4);
        while !stop.is_cancelled() {
            if west.turn().is_err() || west.quic.echo(&mut buf).is_err() || west.flush().is_err() {
                return;
            }
        }
    });
    // east: dials, opens the stream; the round trips run on the caller's thread.
    let mut east = StdSide::new(None)?;
    east.quic.connect(client, west_addr)?;
    east.flush()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !east.quic.connected() {
        anyhow::ensure!(Instant::now() < deadline, "proto handshake did not finish");
        east.turn()?;
        east.flush()?;
    }
    east.quic.open()?;
    Ok(ProtoClient { side: east, request: vec![0x5a; MSG], got: Vec::with_capacity(MSG * 4) })
}

/// `proto-tokio`: both sides on current-thread runtimes of their own threads; east measures
/// each round there, like the `tunnel` client.
pub(super) fn proto_tokio_pair(
    pki: &TestPki,
    stop: &CancellationToken,
    quinn_udp: bool,
) -> anyhow::Result<RemoteClient> {
    let (server, client) = proto_configs(pki)?;
    let (addr_tx, addr_rx) = std_mpsc::channel::<anyhow::Result<SocketAddr>>();
    let stop_west = stop.clone();
    runtime_thread(move || async move {
        let mut west = match TokioSide::new(Some(server), quinn_udp) {
            Ok(w) => w,
            Err(e) => return drop(addr_tx.send(Err(e.into()))),
        };
        let _ = addr_tx.send(west.sock.local_addr().map_err(Into::into));
        let mut buf = Vec::with_capacity(MSG * 4);
        while !stop_west.is_cancelled() {
            if west.turn().await.is_err()
                || west.quic.echo(&mut buf).is_err()
                || west.flush().is_err()
            {
                return;
            }
        }
    })?;
    let west_addr = addr_rx.recv().context("west thread died")??;

    let (go_tx, go_rx) = std_mpsc::sync_channel::<usize>(1);
    let (done_tx, done_rx) = std_mpsc::sync_channel::<anyhow::Result<Round>>(1);
    let (ready_tx, ready_rx) = std_mpsc::channel::<anyhow::Result<()>>();
    runtime_thread(move || async move {
        let setup = async {
            let mut east = TokioSide::new(None, quinn_udp)?;
            east.quic.connect(client, west_addr)?;
            east.flush()?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while !east.quic.connected() {
                anyhow::ensure!(Instant::now() < deadline, "proto handshake did not finish");
                tokio::time::timeout(Duration::from_millis(50), east.turn()).await.ok();
                east.flush()?;
            }
            east.quic.open()?;
            Ok::<_, anyhow::Error>(east)
        };
        let mut east = match setup.await {
            Ok(e) => e,
            Err(e) => return drop(ready_tx.send(Err(e))),
        };
        let _ = ready_tx.send(Ok(()));
        let request = vec![0x5a; MSG];
        let mut got = Vec::with_capacity(MSG * 4);
        serve_rounds(go_rx, done_tx, async || {
            got.clear();
            east.quic.write(&request)?;
            east.flush()?;
            while got.len() < MSG {
                east.turn().await?;
                east.quic.read(&mut got)?;
                east.flush()?;
            }
            Ok(())
        })
        .await;
    })?;
    ready_rx.recv().context("east thread died")??;
    Ok(RemoteClient { go: go_tx, done: done_rx })
}

// ------------------------------------------------------------------ udp: datagrams only
