//! A UDP socket per data-plane thread at the tunnel port. With several threads, the tunnel
//! port is a group of sockets bound with `SO_REUSEPORT`, one per thread, each read by the quinn
//! endpoint whose task runs on that thread. A classic BPF program attached to the group
//! (`SO_ATTACH_REUSEPORT_CBPF`) picks the socket of each arriving datagram from its QUIC
//! destination connection id, so every packet of a connection is read on the thread its
//! connection runs on: no hand-off between threads per packet.
//!
//! - Connection ids this side issues carry the thread in their first byte: `cid[0] mod threads`
//!   ([`ShardCids`]). Short-header packets (1-RTT, nearly all traffic) and long-header packets
//!   to such an id go to that socket.
//! - A peer's first packets carry the id the dialer chose. A lane names itself there (`fg`,
//!   lane, group, random: [`crate::lanes`]): lane `k` goes to thread `(k - 1) mod threads`. Anything
//!   else (lane 0, a dialer that names no lane, junk) goes to the first socket.
//!
//! A datagram too short for the offsets the program reads lands on the first socket (classic
//! BPF ends a program that reads past the packet with 0). Only the tunnel port is a group: a
//! gateway dials its lanes from sockets of their own, one per thread on an ephemeral port,
//! because packets of one UDP flow (same addresses and ports) may be coalesced (GRO) before
//! the socket is picked, so lanes must not share a flow.

use std::net::SocketAddr;

use libc::sock_filter;
use quinn_proto::{ConnectionId, ConnectionIdGenerator, HashedConnectionIdGenerator, InvalidCid};

use crate::endpoint::TunnelError;

/// Length of the connection ids fedgate's endpoints issue (quinn's hashed generator: a
/// 3-byte nonce and a 5-byte signature).
pub(crate) const CID_LEN: u8 = 8;
/// Length of a lane's first destination connection id ([`crate::lanes`]).
const LANE_CID_LEN: u8 = crate::lanes::LANE_CID_LEN as u8;
/// Its first two bytes.
const MARKER: [u8; 2] = crate::lanes::MARKER;

// Classic BPF opcodes, composed from libc's class, size, mode, operation and source bits
// (linux/filter.h, linux/bpf_common.h); every one fits the 16-bit code field.
const fn code(bits: u32) -> u16 {
    bits as u16
}
const LD_B_ABS: u16 = code(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS);
const LD_H_ABS: u16 = code(libc::BPF_LD | libc::BPF_H | libc::BPF_ABS);
const JSET_K: u16 = code(libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K);
const JEQ_K: u16 = code(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K);
const SUB_K: u16 = code(libc::BPF_ALU | libc::BPF_SUB | libc::BPF_K);
const MOD_K: u16 = code(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K);
const RET_A: u16 = code(libc::BPF_RET | libc::BPF_A);
const RET_K: u16 = code(libc::BPF_RET | libc::BPF_K);

fn op(code: u16, jt: u8, jf: u8, k: u32) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// The steering program for a group of `threads` sockets; offsets are into the UDP payload.
/// Pure.
pub(crate) fn program(threads: u32) -> Vec<sock_filter> {
    let n = threads.max(1);
    vec![
        // 0: the first byte: long or short header?
        op(LD_B_ABS, 0, 0, 0),
        op(JSET_K, 3, 0, 0x80), // long header: to 5
        // 2: short header: the destination id starts at byte 1.
        op(LD_B_ABS, 0, 0, 1),
        op(MOD_K, 0, 0, n),
        op(RET_A, 0, 0, 0),
        // 5: long header: destination id length at byte 5, the id from byte 6.
        op(LD_B_ABS, 0, 0, 5),
        op(JEQ_K, 0, 3, u32::from(CID_LEN)), // not ours: to 10
        op(LD_B_ABS, 0, 0, 6),
        op(MOD_K, 0, 0, n),
        op(RET_A, 0, 0, 0),
        // 10: a lane's first id: `f`, `g`, lane.
        op(JEQ_K, 0, 7, u32::from(LANE_CID_LEN)), // to 18
        op(LD_H_ABS, 0, 0, 6),
        op(JEQ_K, 0, 5, u32::from(u16::from_be_bytes(MARKER))), // to 18
        op(LD_B_ABS, 0, 0, 8),
        op(JEQ_K, 3, 0, 0), // lane 0: to 18
        op(SUB_K, 0, 0, 1),
        op(MOD_K, 0, 0, n),
        op(RET_A, 0, 0, 0),
        // 18: anything else: the first socket.
        op(RET_K, 0, 0, 0),
    ]
}

/// What [`program`] picks for `datagram` in a group of `threads`: the same decisions, in Rust,
/// for the tests (the kernel runs the program itself). Pure.
#[cfg(test)]
fn pick(datagram: &[u8], threads: usize) -> usize {
    let byte = |i: usize| datagram.get(i).copied();
    let Some(first) = byte(0) else { return 0 };
    let pick = if first & 0x80 == 0 {
        byte(1).map(|b| usize::from(b) % threads)
    } else {
        match byte(5) {
            Some(CID_LEN) => byte(6).map(|b| usize::from(b) % threads),
            Some(LANE_CID_LEN) if datagram.get(6..8) == Some(&MARKER[..]) => match byte(8) {
                Some(0) | None => Some(0),
                Some(lane) => Some(usize::from(lane - 1) % threads),
            },
            _ => Some(0),
        }
    };
    pick.unwrap_or(0)
}

/// Binds the tunnel port as a group of `threads` sockets (`threads` ≥ 2) with the steering
/// program attached. The port of `listen` may be 0: the first socket's port is then the
/// group's.
pub(crate) fn bind_group(
    listen: SocketAddr,
    buffer: usize,
    threads: usize,
) -> Result<Vec<std::net::UdpSocket>, TunnelError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut addr = listen;
    let mut sockets = Vec::with_capacity(threads);
    for _ in 0..threads {
        let bind = |e| TunnelError::Bind(listen, e);
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
            .map_err(bind)?;
        socket.set_reuse_port(true).map_err(bind)?;
        crate::socket::grow_buffers(&socket, buffer);
        socket.bind(&addr.into()).map_err(bind)?;
        if addr.port() == 0 {
            addr = socket
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .ok_or_else(|| bind(std::io::Error::other("no local address")))?;
        }
        sockets.push(std::net::UdpSocket::from(socket));
    }
    let mut filter = program(u32::try_from(threads).unwrap_or(u32::MAX));
    let prog = libc::sock_fprog {
        len: u16::try_from(filter.len()).unwrap_or(u16::MAX),
        filter: filter.as_mut_ptr(),
    };
    nix::sys::socket::setsockopt(
        &sockets[0],
        nix::sys::socket::sockopt::AttachReusePortCbpf,
        &prog,
    )
    .map_err(|e| {
        TunnelError::Bind(
            listen,
            std::io::Error::other(format!(
                "attaching the per-thread steering program (SO_ATTACH_REUSEPORT_CBPF): {e}"
            )),
        )
    })?;
    Ok(sockets)
}

/// quinn's hashed connection ids (checked on receipt, for stateless resets), drawn until the
/// first byte names thread `shard` of `threads`: `cid[0] mod threads == shard`. About
/// `threads` draws per id, a few per connection.
pub(crate) struct ShardCids {
    inner: HashedConnectionIdGenerator,
    shard: u8,
    threads: u8,
}

impl ShardCids {
    pub(crate) fn new(key: u64, shard: usize, threads: usize) -> Self {
        let threads = u8::try_from(threads.clamp(1, 255)).unwrap_or(255);
        let shard = u8::try_from(shard).unwrap_or(0) % threads;
        Self { inner: HashedConnectionIdGenerator::from_key(key), shard, threads }
    }
}

impl ConnectionIdGenerator for ShardCids {
    fn generate_cid(&mut self) -> ConnectionId {
        loop {
            let cid = self.inner.generate_cid();
            if cid.first().is_some_and(|b| b % self.threads == self.shard) {
                return cid;
            }
        }
    }

    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        self.inner.validate(cid)
    }

    fn cid_len(&self) -> usize {
        self.inner.cid_len()
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        self.inner.cid_lifetime()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::time::Duration;

    fn short(cid0: u8) -> Vec<u8> {
        let mut d = vec![0x40, cid0];
        d.extend_from_slice(&[7; 40]);
        d
    }

    fn long(dcid: &[u8]) -> Vec<u8> {
        let mut d = vec![0xc0, 0, 0, 0, 1, dcid.len() as u8];
        d.extend_from_slice(dcid);
        d.extend_from_slice(&[9; 40]);
        d
    }

    fn lane_id(lane: u8) -> Vec<u8> {
        crate::lanes::lane_cid(lane, &crate::lanes::new_group()).to_vec()
    }

    #[test]
    fn ids_of_a_thread_name_it_and_validate() {
        for threads in [2, 3, 7] {
            for shard in 0..threads {
                let mut g = ShardCids::new(42, shard, threads);
                for _ in 0..20 {
                    let cid = g.generate_cid();
                    assert_eq!(cid.len(), usize::from(CID_LEN));
                    assert_eq!(usize::from(cid[0]) % threads, shard);
                    assert!(g.validate(&cid).is_ok());
                    assert_eq!(pick(&short(cid[0]), threads), shard);
                    assert_eq!(pick(&long(&cid), threads), shard);
                }
                // Another key's generator does not take them.
                let other = ShardCids::new(43, shard, threads);
                let mut g = ShardCids::new(42, shard, threads);
                assert!(other.validate(&g.generate_cid()).is_err());
            }
        }
    }

    #[test]
    fn lanes_and_everything_else_are_picked_as_documented() {
        assert_eq!(pick(&long(&lane_id(1)), 2), 0);
        assert_eq!(pick(&long(&lane_id(2)), 2), 1);
        assert_eq!(pick(&long(&lane_id(3)), 2), 0);
        assert_eq!(pick(&long(&lane_id(0)), 2), 0);
        assert_eq!(pick(&long(&[5; 20]), 2), 0, "quinn's own 20-byte first ids");
        assert_eq!(pick(&[], 2), 0);
        assert_eq!(pick(&[0xc0, 0, 0], 2), 0, "too short");
    }

    /// The kernel runs the program: datagrams to a group of three sockets land where
    /// [`pick`] says.
    #[test]
    fn the_kernel_steers_datagrams_as_the_program_says() {
        let threads = 3;
        let group = bind_group("127.0.0.1:0".parse().unwrap(), 1 << 20, threads).expect("group");
        let addr = group[0].local_addr().unwrap();
        for s in &group {
            assert_eq!(s.local_addr().unwrap(), addr, "one port");
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        }
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut cases: Vec<Vec<u8>> = (0..6).map(short).collect();
        cases.extend((0..5).map(|l| long(&lane_id(l))));
        cases.push(long(&[1, 2, 3, 4, 5, 6, 7, 8]));
        cases.push(long(&[5; 20]));
        for (i, datagram) in cases.iter().enumerate() {
            let want = pick(datagram, threads);
            client.send_to(datagram, addr).unwrap();
            let mut buf = [0u8; 128];
            let (n, _) = group[want].recv_from(&mut buf).unwrap_or_else(|e| {
                panic!("case {i}: nothing on socket {want} ({e}); datagram {datagram:?}")
            });
            assert_eq!(&buf[..n], &datagram[..], "case {i}");
        }
    }
}
