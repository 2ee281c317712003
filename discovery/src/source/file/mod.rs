//! The file cluster source: a directory of Kubernetes YAML is the state of the local cluster.
//!
//! Service (`v1`), EndpointSlice (`discovery.k8s.io/v1`) and ServiceExport
//! (`multicluster.x-k8s.io/v1alpha1` or `v1beta1`) objects, several per file (`---`) or in a
//! `kind: List`, in `.yaml`/`.yml` files of the directory and its subdirectories. The
//! directory is watched (inotify through `notify`, plus a rescan every
//! [`DEFAULT_RESCAN_INTERVAL`] in case events are lost): an edit is in force well within a
//! second. A bad document is reported as a [`Problem`] (file, line, column, reason) and
//! skipped; the last good version of its object stays in force. Deleting a file removes its
//! objects. See `docs/file-source.md` for the decisions behind this.
//!
//! ```no_run
//! # async fn demo() -> Result<(), fedgate_discovery::source::file::SourceError> {
//! use fedgate_discovery::source::file::FileSource;
//! let source = FileSource::new("./clusters/east")?;
//! let mut state = source.subscribe();
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! tokio::spawn(source.run(shutdown.clone()));
//! state.changed().await.ok();
//! # Ok(()) }
//! ```

mod parse;
mod state;

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::model::ClusterState;

pub use parse::{Kind, Object, ObjectRef, ObjectValue, Problem, parse_documents};
pub use state::{MAX_DEPTH, MAX_FILE_BYTES};

/// How often the directory is listed again even without a watch event.
pub const DEFAULT_RESCAN_INTERVAL: Duration = Duration::from_secs(2);
/// How long to gather further watch events after the first one before reloading (an editor
/// saves in several steps).
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(100);

/// Why the file source cannot work.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "cannot read the cluster directory {dir}: {source} (discovery.file.dir must name a \
         readable directory)"
    )]
    Dir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} is not a directory (discovery.file.dir must name a directory of Kubernetes YAML)")]
    NotADirectory(PathBuf),
}

impl SourceError {
    /// A bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            SourceError::Dir { .. } => "dir_unreadable",
            SourceError::NotADirectory(_) => "not_a_directory",
        }
    }
}

/// The file cluster source. Build it with [`FileSource::new`], take receivers with
/// [`subscribe`](FileSource::subscribe) and [`problems`](FileSource::problems), then spawn
/// [`run`](FileSource::run).
#[derive(Debug)]
pub struct FileSource {
    loader: state::Loader,
    state: watch::Sender<Arc<ClusterState>>,
    problems: watch::Sender<Arc<Vec<Problem>>>,
    rescan_interval: Duration,
    debounce: Duration,
}

impl FileSource {
    /// Loads the directory once (sync) and starts nothing yet; fails only if the directory is
    /// unusable. Bad documents are not errors: see [`problems`](Self::problems).
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, SourceError> {
        let dir = dir.into();
        let meta = std::fs::metadata(&dir)
            .map_err(|source| SourceError::Dir { dir: dir.clone(), source })?;
        if !meta.is_dir() {
            return Err(SourceError::NotADirectory(dir));
        }
        let mut loader = state::Loader::new(dir);
        loader.scan(&BTreeSet::new())?;
        let (state, _) = watch::channel(Arc::clone(loader.state()));
        let (problems, _) = watch::channel(Arc::clone(loader.problems()));
        Ok(Self {
            loader,
            state,
            problems,
            rescan_interval: DEFAULT_RESCAN_INTERVAL,
            debounce: DEFAULT_DEBOUNCE,
        })
    }

    /// Changes the rescan interval and the debounce (tests use short ones).
    pub fn with_timing(mut self, rescan_interval: Duration, debounce: Duration) -> Self {
        self.rescan_interval = rescan_interval.max(Duration::from_millis(10));
        self.debounce = debounce;
        self
    }

    /// The directory this source reads.
    pub fn dir(&self) -> &Path {
        self.loader.dir()
    }

    /// The current state; updates are published on every effective change only, and a
    /// service that did not change keeps its `Arc` (compare with `Arc::ptr_eq`).
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.state.subscribe()
    }

    /// Problems of the last load (file, line, reason), sorted by file and line; for `/debug`
    /// and `fedgate analyze`.
    pub fn problems(&self) -> watch::Receiver<Arc<Vec<Problem>>> {
        self.problems.subscribe()
    }

    /// Watches the directory and publishes changes until `shutdown` is cancelled (or the
    /// future is dropped).
    pub async fn run(self, shutdown: CancellationToken) {
        let span = tracing::info_span!("file_source", dir = %self.loader.dir().display());
        self.serve(shutdown).instrument(span).await
    }

    async fn serve(self, shutdown: CancellationToken) {
        let FileSource { mut loader, state, problems, rescan_interval, debounce } = self;
        let (tx, mut events) = mpsc::unbounded_channel();
        let mut watcher = start_watcher(loader.dir(), tx.clone());
        let mut tick = tokio::time::interval_at(Instant::now() + rescan_interval, rescan_interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_error: Option<String> = None;
        loop {
            let mut dirty = BTreeSet::new();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
                Some(paths) = events.recv() => {
                    dirty.extend(paths);
                    let deadline = Instant::now() + debounce;
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep_until(deadline) => break,
                            Some(paths) = events.recv() => dirty.extend(paths),
                        }
                    }
                    tick.reset();
                }
            }
            let task = tokio::task::spawn_blocking(move || {
                let result = loader.scan(&dirty);
                (loader, result)
            });
            let result;
            (loader, result) = match task.await {
                Ok(done) => done,
                Err(e) => {
                    tracing::error!(error = %e, "file source reload failed; the source stops");
                    return;
                }
            };
            match result {
                Ok(()) => {
                    if last_error.take().is_some() {
                        tracing::info!("cluster directory is readable again");
                        // a removed and re-created directory needs a new watch
                        drop(watcher.take());
                        watcher = start_watcher(loader.dir(), tx.clone());
                    }
                    publish(&state, loader.state());
                    publish(&problems, loader.problems());
                }
                Err(e) => {
                    let msg = e.to_string();
                    if last_error.as_ref() != Some(&msg) {
                        tracing::warn!(error = %msg, "cluster directory unreadable; keeping the last state");
                    }
                    last_error = Some(msg);
                }
            }
        }
        tracing::debug!("file source stopped");
    }
}

fn publish<T>(tx: &watch::Sender<Arc<T>>, value: &Arc<T>) {
    tx.send_if_modified(|current| {
        if Arc::ptr_eq(current, value) {
            false
        } else {
            *current = Arc::clone(value);
            true
        }
    });
}

/// Events that say nothing about content (opens and reads, ours included).
fn is_noise(kind: &EventKind) -> bool {
    matches!(kind, EventKind::Access(a) if *a != AccessKind::Close(AccessMode::Write))
}

/// A recursive watch that sends the paths of every change; `None` (with a warning) when the
/// platform refuses one, and the periodic rescan carries on alone.
fn start_watcher(
    dir: &Path,
    tx: mpsc::UnboundedSender<Vec<PathBuf>>,
) -> Option<RecommendedWatcher> {
    let handler = move |res: notify::Result<notify::Event>| match res {
        Ok(event) if is_noise(&event.kind) => {}
        // Attribute changes (atime included, which our own reads may cause) rescan by stamp
        // without forcing a re-read, so reading can never feed itself.
        Ok(event) if matches!(event.kind, EventKind::Modify(ModifyKind::Metadata(_))) => {
            let _ = tx.send(Vec::new());
        }
        Ok(event) => {
            let _ = tx.send(event.paths);
        }
        Err(e) => {
            tracing::debug!(error = %e, "file watch error; rescanning");
            let _ = tx.send(Vec::new());
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the cluster directory; rescanning periodically only");
            return None;
        }
    };
    if let Err(e) = watcher.watch(dir, RecursiveMode::Recursive) {
        tracing::warn!(error = %e, "cannot watch the cluster directory; rescanning periodically only");
        return None;
    }
    Some(watcher)
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::time::Instant as StdInstant;

    use super::*;
    use crate::model::ServiceKey;

    const DEADLINE: Duration = Duration::from_secs(1);

    fn svc(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  clusterIP: {ip}\n"
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn ip_of(state: &ClusterState, name: &str) -> Option<IpAddr> {
        state
            .services
            .get(&ServiceKey::new("default", name))
            .and_then(|s| s.cluster_ips.first().copied())
    }

    /// Waits (at most `DEADLINE`) for a published value that satisfies `pred`; returns how
    /// long it took.
    async fn wait_for<T>(rx: &mut watch::Receiver<Arc<T>>, pred: impl Fn(&T) -> bool) -> Duration {
        let start = StdInstant::now();
        tokio::time::timeout(DEADLINE, rx.wait_for(|v| pred(v)))
            .await
            .expect("update within 1 s")
            .expect("source alive");
        start.elapsed()
    }

    /// Writes a probe file until the running source reports it, so that later edits are
    /// known to happen while the watch is in place (a 60 s rescan cannot be what saw it).
    async fn wait_until_watching(dir: &Path, state: &mut watch::Receiver<Arc<ClusterState>>) {
        for attempt in 1..=20 {
            let probe = svc("probe", &format!("10.255.0.{attempt}"));
            std::fs::write(dir.join("probe.yaml"), probe).expect("write probe");
            let seen = tokio::time::timeout(
                Duration::from_millis(300),
                state.wait_for(|s| ip_of(s, "probe").is_some()),
            )
            .await
            .is_ok_and(|r| r.is_ok());
            if seen {
                std::fs::remove_file(dir.join("probe.yaml")).expect("remove probe");
                let gone = state.wait_for(|s| ip_of(s, "probe").is_none());
                tokio::time::timeout(DEADLINE, gone).await.expect("probe removed").expect("alive");
                return;
            }
        }
        panic!("the file source never reported the probe file");
    }

    #[test]
    fn new_rejects_unusable_directories() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let file = tmp.path().join("f.yaml");
        std::fs::write(&file, "").expect("write");
        let err = FileSource::new(&file).expect_err("a file is not a directory");
        assert_eq!(err.reason(), "not_a_directory");
        let err = FileSource::new(tmp.path().join("missing")).expect_err("missing");
        assert_eq!(err.reason(), "dir_unreadable");
        assert!(err.to_string().contains("discovery.file.dir"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn edits_breakage_and_deletion_are_seen_within_a_second() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("web.yaml");
        std::fs::write(&path, svc("web", "10.0.0.1")).expect("write");
        std::fs::write(tmp.path().join("other.yaml"), svc("other", "10.0.0.9")).expect("write");

        // a long rescan interval: the watcher alone must deliver the updates
        let source = FileSource::new(tmp.path())
            .expect("source")
            .with_timing(Duration::from_secs(60), DEFAULT_DEBOUNCE);
        let mut state = source.subscribe();
        let mut problems = source.problems();
        assert_eq!(ip_of(&state.borrow(), "web"), Some(ip("10.0.0.1")), "loaded by new()");
        let other = Arc::clone(&state.borrow().services[&ServiceKey::new("default", "other")]);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(source.run(shutdown.clone()));
        wait_until_watching(tmp.path(), &mut state).await;

        // an edit in place
        std::fs::write(&path, svc("web", "10.0.0.2")).expect("write");
        let took = wait_for(&mut state, |s| ip_of(s, "web") == Some(ip("10.0.0.2"))).await;
        eprintln!("edit seen after {took:?}");
        assert!(Arc::ptr_eq(
            &other,
            &state.borrow().services[&ServiceKey::new("default", "other")]
        ));

        // a broken document: the old value stays and a problem appears
        std::fs::write(&path, svc("web", "10.0.0.999")).expect("write");
        let took = wait_for(&mut problems, |p| p.len() == 1).await;
        eprintln!("problem seen after {took:?}");
        assert_eq!(ip_of(&state.borrow(), "web"), Some(ip("10.0.0.2")));
        let p = problems.borrow().first().cloned().expect("one problem");
        assert_eq!((p.line, p.column), (5, 14));
        assert_eq!(p.file, path);

        // deleted: its objects and problems go
        std::fs::remove_file(&path).expect("remove");
        let took = wait_for(&mut state, |s| ip_of(s, "web").is_none()).await;
        eprintln!("deletion seen after {took:?}");
        wait_for(&mut problems, |p| p.is_empty()).await;

        // a new file in a new subdirectory
        std::fs::create_dir(tmp.path().join("sub")).expect("mkdir");
        tokio::time::sleep(Duration::from_millis(50)).await;
        std::fs::write(tmp.path().join("sub/new.yml"), svc("new", "10.0.0.5")).expect("write");
        let took = wait_for(&mut state, |s| ip_of(s, "new").is_some()).await;
        eprintln!("new file in new subdirectory seen after {took:?}");

        shutdown.cancel();
        tokio::time::timeout(DEADLINE, task).await.expect("run stops").expect("no panic");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn periodic_rescan_catches_what_the_watcher_misses() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let source = FileSource::new(tmp.path())
            .expect("source")
            .with_timing(Duration::from_millis(200), DEFAULT_DEBOUNCE);
        let mut state = source.subscribe();
        // No watcher can see this: the write happens before run() starts watching.
        std::fs::write(tmp.path().join("a.yaml"), svc("a", "10.0.0.1")).expect("write");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(source.run(shutdown.clone()));
        wait_for(&mut state, |s| ip_of(s, "a").is_some()).await;
        drop(shutdown.drop_guard());
        tokio::time::timeout(DEADLINE, task).await.expect("run stops").expect("no panic");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn vanished_directory_keeps_the_last_state_and_recovers() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("cluster");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::write(dir.join("a.yaml"), svc("a", "10.0.0.1")).expect("write");
        let source = FileSource::new(&dir)
            .expect("source")
            .with_timing(Duration::from_millis(200), DEFAULT_DEBOUNCE);
        let mut state = source.subscribe();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(source.run(shutdown.clone()));

        std::fs::remove_dir_all(&dir).expect("rm -r");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(ip_of(&state.borrow(), "a"), Some(ip("10.0.0.1")), "kept while missing");

        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::write(dir.join("a.yaml"), svc("a", "10.0.0.2")).expect("write");
        wait_for(&mut state, |s| ip_of(s, "a") == Some(ip("10.0.0.2"))).await;
        shutdown.cancel();
        tokio::time::timeout(DEADLINE, task).await.expect("run stops").expect("no panic");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_change_publishes_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(tmp.path().join("a.yaml"), svc("a", "10.0.0.1")).expect("write");
        let source = FileSource::new(tmp.path())
            .expect("source")
            .with_timing(Duration::from_millis(50), Duration::from_millis(10));
        let mut state = source.subscribe();
        state.mark_unchanged();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(source.run(shutdown.clone()));
        // several rescans and a touch that changes nothing
        std::fs::write(tmp.path().join("a.yaml"), svc("a", "10.0.0.1")).expect("write");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!state.has_changed().expect("source alive"), "nothing changed, nothing sent");
        shutdown.cancel();
        tokio::time::timeout(DEADLINE, task).await.expect("run stops").expect("no panic");
    }
}
