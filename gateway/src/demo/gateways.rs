//! The demo's gateways: one child process of this same binary per cluster
//! (`fedgate demo gateway --config <dir>/<id>/gateway.yaml --parent-pid <demo>`), each with
//! its own metrics registry and a log file in its directory.
//!
//! Children run in a process group of their own, so a Ctrl-C in the terminal reaches only
//! the demo, which then stops them in order (SIGTERM, a bounded wait, SIGKILL). Should the
//! demo itself die (SIGKILL), each child notices its parent is gone and exits
//! ([`watch_parent`]); `kill_on_drop` covers the demo's own error paths.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use rustix::process::{Pid, Signal};
use tokio::process::{Child, Command};

use super::DemoError;

/// How often a child checks that the demo is still its parent.
pub const PARENT_POLL: Duration = Duration::from_millis(250);

/// One cluster's gateway process.
pub struct GatewayProc {
    pub id: String,
    pub admin: SocketAddr,
    pub config: PathBuf,
    pub log: PathBuf,
    exe: PathBuf,
    child: Option<Child>,
}

impl GatewayProc {
    pub fn new(id: &str, admin: SocketAddr, dir: &Path, exe: PathBuf) -> Self {
        Self {
            id: id.to_owned(),
            admin,
            config: dir.join("gateway.yaml"),
            log: dir.join("gateway.log"),
            exe,
            child: None,
        }
    }

    /// The child's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// True while the child has not exited (reaps it if it has).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(status))) => {
                tracing::warn!(cluster = %self.id, %status, log = %self.log.display(), "gateway exited");
                self.child = None;
                false
            }
            Some(Err(_)) | None => false,
        }
    }

    /// Starts the child (appending to its log). Starting a running gateway does nothing.
    pub fn start(&mut self) -> Result<(), DemoError> {
        if self.is_running() {
            return Ok(());
        }
        let open_log = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .map_err(|e| DemoError::Io(self.log.clone(), e))
        };
        let (out, err) = (open_log()?, open_log()?);
        let child = Command::new(&self.exe)
            .args(["demo", "gateway", "--config"])
            .arg(&self.config)
            .arg("--parent-pid")
            .arg(std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| DemoError::Spawn(self.exe.clone(), e))?;
        tracing::debug!(cluster = %self.id, pid = ?child.id(), "gateway started");
        self.child = Some(child);
        Ok(())
    }

    /// SIGTERM (the gateway drains), then SIGKILL if it has not exited within `grace`.
    pub async fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else { return };
        if let Some(pid) = child.id().and_then(|p| Pid::from_raw(p as i32)) {
            // Fails only if it already exited; the wait below reaps it either way.
            let _ = rustix::process::kill_process(pid, Signal::TERM);
        }
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(cluster = %self.id, ?grace, "gateway did not stop in time; killing it");
                let _ = child.kill().await;
            }
        }
    }

    /// SIGKILL: a crash, no drain, peers are not told.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// The last `lines` lines of the log (for error messages).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Runs in a gateway child: exits the process when `parent` is no longer its parent (the
/// demo died; the child was re-parented). Polls [`std::os::unix::process::parent_id`] from a
/// thread of its own, so it works whatever the gateway's runtime is doing.
pub fn watch_parent(parent: u32) -> Result<(), DemoError> {
    if std::os::unix::process::parent_id() != parent {
        return Err(DemoError::ParentGone(parent));
    }
    std::thread::Builder::new()
        .name("demo-parent-watch".to_owned())
        .spawn(move || {
            loop {
                std::thread::sleep(PARENT_POLL);
                if std::os::unix::process::parent_id() != parent {
                    tracing::warn!(parent, "the demo process is gone; exiting");
                    std::process::exit(1);
                }
            }
        })
        .map_err(|e| DemoError::Io(PathBuf::from("<thread>"), e))?;
    Ok(())
}
