//! `fedgate demo dig|get|echo`: the three clients the demo's hints use, so that what the demo
//! tells a newcomer to type works on a machine with nothing but fedgate (a fresh Debian has
//! no `dig`, `curl` or `nc`). Each does one request and prints the answer the way the usual
//! tool would with its quiet flag (`dig +short`, `curl -s`, `nc -q1`).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use clap::Args;
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};

use super::layout;

/// How long each client waits for an answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// `fedgate demo dig NAME [TYPE]`.
#[derive(Debug, Args)]
pub struct DigArgs {
    /// The name to look up, e.g. echo.demo.svc.clusterset.local.
    pub name: String,
    /// Record type: A, AAAA, SRV, PTR, TXT, ...
    #[arg(default_value = "A")]
    pub record_type: String,
    /// DNS server; default: the demo's first gateway, `<base-ip>:<dns-port>`.
    #[arg(long)]
    pub server: Option<SocketAddr>,
    /// The `--base-ip` the demo was started with.
    #[arg(long, default_value_t = layout::DEFAULT_BASE_IP)]
    pub base_ip: Ipv4Addr,
    /// The `--dns-port` the demo was started with.
    #[arg(long, default_value_t = layout::DEFAULT_DNS_PORT)]
    pub dns_port: u16,
}

/// `fedgate demo get URL`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// An `http://` URL.
    pub url: String,
}

/// `fedgate demo echo ADDRESS TEXT`.
#[derive(Debug, Args)]
pub struct EchoArgs {
    /// `ip:port` of a TCP service.
    pub address: SocketAddr,
    /// The line to send.
    pub text: String,
}

/// What a client could not do.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("{0:?} is not a record type (try A, AAAA, SRV, PTR, TXT)")]
    RecordType(String),
    #[error("{0:?} is not a DNS name: {1}")]
    Name(String, String),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("{server}: {detail}")]
    Dns { server: SocketAddr, detail: String },
    #[error("{name}: {code} from {server}")]
    Answer { name: String, code: ResponseCode, server: SocketAddr },
    #[error("{url}: {reason}")]
    Http { url: String, reason: String },
}

/// Sends one query over UDP and prints the answers' data, one per line (`dig +short`).
pub fn dig(args: &DigArgs, out: &mut dyn Write) -> Result<(), ToolError> {
    let server = args.server.unwrap_or(SocketAddr::from((args.base_ip, args.dns_port)));
    let record_type: RecordType = args
        .record_type
        .to_ascii_uppercase()
        .parse()
        .map_err(|_| ToolError::RecordType(args.record_type.clone()))?;
    let fqdn = if args.name.ends_with('.') { args.name.clone() } else { format!("{}.", args.name) };
    let name =
        Name::from_ascii(&fqdn).map_err(|e| ToolError::Name(args.name.clone(), e.to_string()))?;
    let mut query = Message::query();
    query.metadata.id = rand::random();
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(name, record_type));
    let dns = |detail: String| ToolError::Dns { server, detail };
    let bytes = query.to_vec().map_err(|e| dns(format!("encoding the query: {e}")))?;
    let bind = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let io = |what: &str| {
        let what = what.to_owned();
        move |e| ToolError::Io(what, e)
    };
    let socket = UdpSocket::bind(bind).map_err(io("binding a UDP socket"))?;
    socket.set_read_timeout(Some(TIMEOUT)).map_err(io("setting a timeout"))?;
    socket.connect(server).map_err(io(&format!("connecting to {server}")))?;
    socket.send(&bytes).map_err(io(&format!("sending to {server}")))?;
    let mut buf = vec![0u8; 65_535];
    let answer = loop {
        let n = socket.recv(&mut buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                dns(format!("no answer within {TIMEOUT:?}"))
            }
            _ => dns(e.to_string()),
        })?;
        let answer = Message::from_vec(&buf[..n]).map_err(|e| dns(format!("bad answer: {e}")))?;
        // A late answer to someone else's query is not ours.
        if answer.metadata.id == query.metadata.id {
            break answer;
        }
    };
    if answer.metadata.response_code != ResponseCode::NoError {
        return Err(ToolError::Answer {
            name: args.name.clone(),
            code: answer.metadata.response_code,
            server,
        });
    }
    for record in &answer.answers {
        writeln!(out, "{}", record.data).map_err(io("writing the answer"))?;
    }
    Ok(())
}

/// Fetches `url` and prints the body as it came (`curl -s`).
pub fn get(args: &GetArgs, out: &mut dyn Write) -> Result<(), ToolError> {
    let http = |reason: String| ToolError::Http { url: args.url.clone(), reason };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(TIMEOUT))
        .build()
        .into();
    let mut response = agent.get(&args.url).call().map_err(|e| http(e.to_string()))?;
    let body = response.body_mut().read_to_vec().map_err(|e| http(e.to_string()))?;
    out.write_all(&body).map_err(|e| ToolError::Io("writing the body".into(), e))?;
    if !response.status().is_success() {
        return Err(http(format!("answered {}", response.status())));
    }
    Ok(())
}

/// Sends `text` and a newline over TCP, closes its side and prints what comes back until the
/// server closes (`echo TEXT | nc -q1 ADDRESS`).
pub fn echo(args: &EchoArgs, out: &mut dyn Write) -> Result<(), ToolError> {
    let addr = args.address;
    let io = |what: &'static str| move |e| ToolError::Io(format!("{what} {addr}"), e);
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(io("connecting to"))?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io("setting a timeout on"))?;
    stream.write_all(format!("{}\n", args.text).as_bytes()).map_err(io("writing to"))?;
    stream.shutdown(std::net::Shutdown::Write).map_err(io("half-closing"))?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).map_err(io("reading from"))?;
    out.write_all(&reply).map_err(|e| ToolError::Io("writing the reply".into(), e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_record_types_and_names_are_named() {
        let args = |name: &str, rtype: &str| DigArgs {
            name: name.into(),
            record_type: rtype.into(),
            server: Some("127.0.0.1:9".parse().expect("addr")),
            base_ip: layout::DEFAULT_BASE_IP,
            dns_port: layout::DEFAULT_DNS_PORT,
        };
        let err = dig(&args("a.b", "NOPE"), &mut Vec::new()).expect_err("bad type");
        assert!(err.to_string().contains("\"NOPE\" is not a record type"), "{err}");
        let err = dig(&args("a..b", "A"), &mut Vec::new()).expect_err("bad name");
        assert!(err.to_string().starts_with("\"a..b\" is not a DNS name"), "{err}");
    }

    #[test]
    fn echo_sends_a_line_half_closes_and_prints_the_reply() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut got = String::new();
            conn.read_to_string(&mut got).expect("read until the client half-closes");
            conn.write_all(format!("echo: {got}").as_bytes()).expect("reply");
        });
        let mut out = Vec::new();
        echo(&EchoArgs { address, text: "hi".into() }, &mut out).expect("echo");
        server.join().expect("server");
        assert_eq!(String::from_utf8(out).expect("utf8"), "echo: hi\n");
    }
}
