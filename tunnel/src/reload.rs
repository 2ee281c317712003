//! Certificate hot reload: the directories holding `tls.cert`, `tls.key` and `tls.ca` are
//! watched (inotify through `notify`), and after a change the three files are read again and
//! swapped into [`Credentials`] for every new handshake. Directories rather than files are
//! watched because a Kubernetes Secret update replaces the `..data` symlink atomically: the
//! files' own inodes never change. Established connections are not touched. The new identity
//! must pass the same check as at start ([`crate::identity::check_identity`]: valid now,
//! naming this cluster, key matching, chaining to the bundle); one that does not (half
//! written, expired, wrong key, names another cluster) keeps the current identity, is logged
//! once with the file and the problem named and counted; the next change retries. A slow
//! rescan catches changes the watch missed (network file systems) and logs certificates
//! close to expiry.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::identity::{Identity, IdentityError, PartNames};
use crate::metrics::TLS_RELOADS_TOTAL;
use crate::tls::{Credentials, TlsError};

/// Quiet time after the last change event before the files are read (a Secret update or an
/// editor's save is several events).
pub const DEBOUNCE: Duration = Duration::from_millis(200);
/// Files are read again this often even without an event.
pub const RESCAN_INTERVAL: Duration = Duration::from_secs(60);

/// The PEM files of a gateway's identity (`tls.cert`, `tls.key`, `tls.ca`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl IdentityFiles {
    /// Reads the three files.
    pub fn load(&self) -> Result<Identity, IdentityError> {
        Identity::from_pem_files(&self.cert, &self.key, &self.ca)
    }

    /// The files' paths, to name them in messages.
    pub fn names(&self) -> PartNames {
        PartNames {
            cert: self.cert.display().to_string(),
            key: self.key.display().to_string(),
            ca: self.ca.display().to_string(),
        }
    }

    /// The directories to watch: each file's parent, once.
    fn directories(&self) -> BTreeSet<PathBuf> {
        [&self.cert, &self.key, &self.ca]
            .into_iter()
            .map(|p| match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
                _ => PathBuf::from("."),
            })
            .collect()
    }
}

/// Why a reload did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("watching {dir} for certificate changes: {source}")]
    Watch {
        dir: PathBuf,
        #[source]
        source: notify::Error,
    },
    #[error("reloading the tunnel identity: {0}; keeping the current certificate")]
    Read(#[from] Box<IdentityError>),
    #[error(
        "reloading the tunnel identity refused: {}; keeping the current certificate",
        refused(files, source)
    )]
    Refused {
        files: Box<IdentityFiles>,
        #[source]
        source: Box<TlsError>,
    },
}

impl ReloadError {
    /// A bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ReloadError::Watch { .. } => "watch",
            ReloadError::Read(_) => "read",
            ReloadError::Refused { .. } => "refused",
        }
    }

    /// What exactly was wrong, bounded (the log's `reason` field).
    pub fn detail_reason(&self) -> &'static str {
        match self {
            ReloadError::Refused { source, .. } => match source.as_ref() {
                TlsError::OwnIdentity(problems) => problems.reason(),
                _ => "tls",
            },
            other => other.reason(),
        }
    }
}

/// The refusal in words: the problems name their files; other errors get the files added.
fn refused(files: &IdentityFiles, source: &TlsError) -> String {
    match source {
        TlsError::OwnIdentity(_) => source.to_string(),
        other => format!(
            "certificate {} with key {} and CA bundle {}: {other}",
            files.cert.display(),
            files.key.display(),
            files.ca.display()
        ),
    }
}

/// Outcome of reloads so far (for tests, `/debug` views and logs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReloadStatus {
    /// Identities swapped in since start.
    pub reloads: u64,
    /// Reload attempts that failed since start.
    pub failures: u64,
    /// The error of the last attempt, `None` once one succeeds (or found nothing changed).
    pub last_error: Option<String>,
}

/// Watches the identity files and swaps changes into [`Credentials`].
pub struct IdentityWatcher {
    files: IdentityFiles,
    credentials: Arc<Credentials>,
    /// Kept alive for the watch; dropping it stops the events.
    _watcher: RecommendedWatcher,
    events: mpsc::UnboundedReceiver<()>,
    status: watch::Sender<ReloadStatus>,
}

impl IdentityWatcher {
    /// Starts watching the files' directories at once (an error here fails start-up).
    pub fn new(files: IdentityFiles, credentials: Arc<Credentials>) -> Result<Self, ReloadError> {
        let (tx, events) = mpsc::unbounded_channel();
        let handler = move |res: notify::Result<notify::Event>| {
            let relevant = match &res {
                Ok(event) => !matches!(event.kind, EventKind::Access(_)),
                Err(_) => true,
            };
            if relevant {
                let _ = tx.send(());
            }
        };
        let first = files.directories().into_iter().next().unwrap_or_else(|| PathBuf::from("."));
        let mut watcher = notify::recommended_watcher(handler)
            .map_err(|source| ReloadError::Watch { dir: first, source })?;
        for dir in files.directories() {
            watcher
                .watch(&dir, RecursiveMode::NonRecursive)
                .map_err(|source| ReloadError::Watch { dir: dir.clone(), source })?;
        }
        let (status, _) = watch::channel(ReloadStatus::default());
        Ok(Self { files, credentials, _watcher: watcher, events, status })
    }

    /// The reload outcomes, updated after every attempt.
    pub fn status(&self) -> watch::Receiver<ReloadStatus> {
        self.status.subscribe()
    }

    /// Reloads after every burst of changes (and every [`RESCAN_INTERVAL`]) until shutdown.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut rescan = tokio::time::interval(RESCAN_INTERVAL);
        rescan.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = rescan.tick() => {}
                event = self.events.recv() => {
                    if event.is_none() {
                        return;
                    }
                    // Let the burst settle: wait until DEBOUNCE passes without an event.
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(DEBOUNCE) => break,
                            more = self.events.recv() => if more.is_none() { return },
                        }
                    }
                }
            }
            self.reload_now();
            self.credentials.log_expiry_warnings();
        }
    }

    /// Reads the files and swaps a changed, valid identity in.
    pub fn reload_now(&self) {
        let result =
            self.files.load().map_err(|e| ReloadError::Read(Box::new(e))).and_then(|identity| {
                self.credentials.update(&identity).map_err(|source| {
                    let source = match source {
                        TlsError::OwnIdentity(p) => {
                            TlsError::OwnIdentity(p.named(self.files.names()))
                        }
                        other => other,
                    };
                    ReloadError::Refused {
                        files: Box::new(self.files.clone()),
                        source: Box::new(source),
                    }
                })
            });
        match result {
            Ok(false) => self.status.send_if_modified(|s| s.last_error.take().is_some()),
            Ok(true) => {
                metrics::counter!(TLS_RELOADS_TOTAL, "result" => "ok").increment(1);
                tracing::info!(cert = %self.files.cert.display(), ca = %self.files.ca.display(), "tunnel identity reloaded; new handshakes use it");
                self.status.send_modify(|s| {
                    s.reloads += 1;
                    s.last_error = None;
                });
                true
            }
            Err(e) => {
                metrics::counter!(TLS_RELOADS_TOTAL, "result" => e.reason()).increment(1);
                let text = e.to_string();
                let repeated = self.status.borrow().last_error.as_deref() == Some(text.as_str());
                let reason = e.detail_reason();
                if repeated {
                    tracing::debug!(reason, error = %text, "tunnel identity still not loadable");
                } else {
                    tracing::error!(reason, error = %text, "tunnel identity not reloaded");
                }
                self.status.send_modify(|s| {
                    s.failures += 1;
                    s.last_error = Some(text);
                });
                true
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_are_each_files_parent_once() {
        let files = IdentityFiles {
            cert: "/etc/fedgate/tls/tls.crt".into(),
            key: "/etc/fedgate/tls/tls.key".into(),
            ca: "ca.crt".into(),
        };
        let dirs: Vec<String> =
            files.directories().iter().map(|d| d.display().to_string()).collect();
        assert_eq!(dirs, ["/etc/fedgate/tls", "."]);
    }
}
