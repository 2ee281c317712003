//! The real `fedgate` binary: exit codes, `analyze` output, `certs` files.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use fedgate::certs;

fn fedgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedgate"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("the fedgate binary runs")
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited with a code, not a signal")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `fedgate certs issue` with the CA in `ca` for `cluster` into `out`, then `extra`.
fn issue(ca: &Path, cluster: &str, out: &Path, extra: &[&str]) -> Output {
    let args = ["certs", "issue", "--ca", s(ca), "--cluster", cluster, "--out", s(out)];
    fedgate(&[&args[..], extra].concat())
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("file exists").permissions().mode() & 0o777
}

#[test]
fn version_and_usage_exit_codes() {
    let out = fedgate(&["version"]);
    assert_eq!(code(&out), 0);
    assert_eq!(stdout(&out), format!("fedgate {}\n", env!("CARGO_PKG_VERSION")));

    for args in [
        &["bogus"][..],
        &["run"],
        &["analyze"],
        &["--log-format", "xml", "version"],
        &["certs", "issue", "--cluster", "east", "--out", "x"],
        &["certs", "ca", "--clusterset", "demo", "--out", "x", "--validity", "soon"],
    ] {
        let out = fedgate(args);
        assert_eq!(code(&out), 2, "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("Usage:") || stderr(&out).contains("error:"), "{args:?}");
    }
    let out = fedgate(&["--help"]);
    assert_eq!(code(&out), 0);
    assert!(stdout(&out).contains("analyze"));
    // RUST_LOG is the default of --log-level; the flag wins over it.
    let from_env = Command::new(env!("CARGO_BIN_EXE_fedgate"))
        .arg("version")
        .env("RUST_LOG", "fedgate=loud")
        .output()
        .expect("runs");
    assert_eq!(code(&from_env), 2);
    let flag_wins = Command::new(env!("CARGO_BIN_EXE_fedgate"))
        .args(["--log-level", "debug", "version"])
        .env("RUST_LOG", "fedgate=loud")
        .output()
        .expect("runs");
    assert_eq!(code(&flag_wins), 0);
    let out = fedgate(&["--log-level", "fedgate=loud", "version"]);
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("invalid log level \"fedgate=loud\""), "{}", stderr(&out));
}

#[test]
fn certs_then_analyze_then_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_dir = dir.path().join("pki");
    let east_dir = dir.path().join("east");

    let out = fedgate(&["certs", "ca", "--clusterset", "demo", "--out", s(&ca_dir)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("ca.key"));
    assert_eq!(mode(&ca_dir.join("ca.key")), 0o600);
    assert_eq!(mode(&ca_dir.join("ca.crt")), 0o644);

    // A second CA into the same place is refused: it would orphan every issued cert.
    let out = fedgate(&["certs", "ca", "--clusterset", "demo", "--out", s(&ca_dir)]);
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));

    let out = issue(&ca_dir, "east", &east_dir, &["--validity", "30d"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    for f in ["east.crt", "east.key", "ca.crt"] {
        assert!(east_dir.join(f).is_file(), "{f} written");
    }
    assert_eq!(mode(&east_dir.join("east.key")), 0o600);

    // The chain verifies, and the leaf says who it is.
    let read = |p: &Path| std::fs::read_to_string(p).expect("read pem");
    let ca = certs::inspect(&read(&east_dir.join("ca.crt"))).expect("ca parses");
    let leaf = certs::inspect(&read(&east_dir.join("east.crt"))).expect("leaf parses");
    assert!(ca.is_ca);
    assert!(certs::signed_by(&leaf, &ca), "leaf is signed by the CA");
    assert_eq!(leaf.spiffe_ids, ["spiffe://demo/cluster/east"]);
    assert_eq!(leaf.not_after.as_second() - leaf.not_before.as_second(), 30 * 86_400);
    assert!(certs::key_matches(&leaf, &read(&east_dir.join("east.key"))).expect("key parses"));

    // A bad cluster id is invalid input, not a usage error.
    let out = issue(&ca_dir, "East", &east_dir, &[]);
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("invalid cluster id \"East\""), "{}", stderr(&out));

    // A config next to the issued files needs no tls section.
    std::fs::create_dir_all(east_dir.join("clusters/east")).expect("file source dir");
    let good = east_dir.join("east.yaml");
    std::fs::write(&good, "cluster: { id: east, clusterset: demo }\npeers: []\n").expect("write");
    let bad = east_dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "cluster: { id: east, clusterset: demo }\npeers:\n  - { id: east, address: x }\ntraffic:\n  drainDuration: 5x\n",
    )
    .expect("write");

    let out = fedgate(&["analyze", s(&good)]);
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    assert_eq!(stdout(&out), format!("{}: ok\n", good.display()));

    let out = fedgate(&["analyze", s(&good), s(&bad)]);
    assert_eq!(code(&out), 1);
    let b = bad.display();
    assert_eq!(
        stdout(&out),
        format!(
            "{}: ok\n\
             {b}:3:26: peers[0].address: invalid address \"x\": expected host:port, e.g. 10.0.0.2:15443\n\
             {b}:5:18: traffic.drainDuration: invalid duration \"5x\"\n",
            good.display()
        )
    );

    // `run` refuses a bad config with exit 1, and says why on stderr, in JSON if asked.
    let out = fedgate(&["--log-format", "json", "run", "--config", s(&bad)]);
    assert_eq!(code(&out), 1);
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{b}:5:18: traffic.drainDuration: invalid duration \"5x\"")),
        "{err}"
    );
    let json_line = err.lines().find(|l| l.starts_with('{')).expect("a JSON log line");
    let v: serde_json::Value = serde_json::from_str(json_line).expect("log line is JSON");
    assert_eq!(v["level"], "ERROR");
    assert_eq!(v["message"], "invalid config, not starting");

    // A certificate for another cluster is caught by analyze.
    let out = issue(&ca_dir, "west", &east_dir, &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    std::fs::write(
        &good,
        "cluster: { id: east, clusterset: demo }\npeers: []\ntls: { cert: west.crt, key: west.key }\n",
    )
    .expect("write");
    let out = fedgate(&["analyze", s(&good)]);
    assert_eq!(code(&out), 1);
    assert!(
        stdout(&out).contains("tls.cert: certificate ")
            && stdout(&out).contains(
                "names spiffe://demo/cluster/west, expected SAN URI spiffe://demo/cluster/east"
            ),
        "{}",
        stdout(&out)
    );

    let out = fedgate(&["analyze", s(&dir.path().join("missing.yaml"))]);
    assert_eq!(code(&out), 1);
    assert!(stdout(&out).contains("missing.yaml: cannot read config file:"), "{}", stdout(&out));
}
