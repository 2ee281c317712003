//! One writer per cluster (issue 19): the replicas of a cluster elect their leader with a
//! `coordination.k8s.io/v1` Lease, and only the leader's [`super::KubeWriter`] writes.
//!
//! The election is `kube-lease-manager`'s (server-side apply on the Lease, one field manager
//! per identity, so two replicas cannot both take a free Lease); this module only wires it:
//! it picks the renewal point, watches the Lease to show its holder, and adds the one rule
//! the crate leaves to its user, a **renew deadline**. The crate keeps saying "leader" while
//! its renewals fail (an API server this replica cannot reach); others take the Lease
//! `leaseDuration` after its last renewal. So this replica counts as leading only while the
//! Lease it last saw names it and was renewed less than [`LeaderSettings::renew_deadline`]
//! ago (three quarters of the duration, measured on this replica's clock, the one that wrote
//! `renewTime`): a leader cut off from the API server stops writing before anyone else can
//! start. The decision is the pure [`may_write`]; the task around it carries it out.

use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use kube_lease_manager::LeaseManagerBuilder;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::metrics::{METRIC_LEADER, METRIC_LEADER_TRANSITIONS};

/// The shortest Lease duration (whole seconds: the Lease's unit; the renewal comes halfway).
pub const MIN_LEASE_DURATION: Duration = Duration::from_secs(2);
/// How long to wait before building the election again after the API server refused it.
const RETRY: Duration = Duration::from_secs(2);
/// How long a stopping leader waits for its Lease to be released (so another replica takes
/// over at once instead of after the duration).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// Settings of the election.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderSettings {
    /// Name of the Lease.
    pub lease_name: String,
    /// Its namespace.
    pub namespace: String,
    /// How long a claim lasts without renewal (rounded down to whole seconds, at least
    /// [`MIN_LEASE_DURATION`]).
    pub duration: Duration,
    /// This replica's name in the Lease (`holderIdentity`).
    pub identity: String,
}

impl LeaderSettings {
    /// The settings of `discovery.kube.leaderElection`; an unset namespace is `default`, an
    /// unset identity `fedgate-<pid>` (`fedgate run` fills both from the pod first).
    pub fn new(
        lease_name: &str,
        namespace: Option<&str>,
        duration: Duration,
        identity: Option<&str>,
    ) -> Self {
        LeaderSettings {
            lease_name: lease_name.to_owned(),
            namespace: namespace.unwrap_or("default").to_owned(),
            duration,
            identity: identity
                .map_or_else(|| format!("fedgate-{}", std::process::id()), str::to_owned),
        }
    }

    fn duration_secs(&self) -> u64 {
        self.duration.as_secs().max(MIN_LEASE_DURATION.as_secs())
    }

    /// How long before the Lease would expire the leader renews it: half the duration
    /// (rounded up), so a renewal has the other half to get through.
    fn grace_secs(&self) -> u64 {
        let d = self.duration_secs();
        d.div_ceil(2).min(d - 1)
    }

    /// How long after the last renewal it saw a leader goes on writing: the duration less
    /// half the grace (2 s of a 3 s Lease, 11 s of 15 s). Others take over only after the
    /// whole duration.
    pub fn renew_deadline(&self) -> Duration {
        Duration::from_secs(self.duration_secs()) - Duration::from_secs(self.grace_secs()) / 2
    }

    /// `namespace/name` of the Lease.
    pub fn lease(&self) -> String {
        format!("{}/{}", self.namespace, self.lease_name)
    }
}

/// The Lease as last read: who holds it and when it was renewed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseView {
    pub holder: Option<String>,
    pub renewed: Option<SystemTime>,
}

impl From<&Lease> for LeaseView {
    fn from(lease: &Lease) -> Self {
        let spec = lease.spec.as_ref();
        LeaseView {
            holder: spec.and_then(|s| s.holder_identity.clone()).filter(|h| !h.is_empty()),
            renewed: spec.and_then(|s| s.renew_time.as_ref()).map(|t| SystemTime::from(t.0)),
        }
    }
}

/// Whether this replica may write at `now`, and until when: the election says it leads, the
/// Lease it last saw names `identity`, and that Lease was renewed less than `deadline` ago.
/// Pure: the task re-evaluates it on every change and at the instant it returns.
pub fn may_write(
    elected: bool,
    lease: Option<&LeaseView>,
    identity: &str,
    now: SystemTime,
    deadline: Duration,
) -> Option<SystemTime> {
    let lease = lease?;
    if !elected || lease.holder.as_deref() != Some(identity) {
        return None;
    }
    let until = lease.renewed? + deadline;
    (now < until).then_some(until)
}

/// This replica's role, as published to the writer and the views.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaderState {
    /// This replica holds the Lease and may write.
    pub leading: bool,
    /// The Lease's holder as last seen (this replica or another); none while it is free.
    pub holder: Option<String>,
    /// When the holder last renewed it.
    pub renewed: Option<SystemTime>,
    /// How often this replica's role changed since start.
    pub transitions: u64,
}

/// The election task. Build with [`Election::new`], spawn [`Election::run`].
pub struct Election {
    client: Client,
    settings: LeaderSettings,
    state: watch::Sender<LeaderState>,
}

impl Election {
    pub fn new(client: Client, settings: LeaderSettings) -> Self {
        let (state, _) = watch::channel(LeaderState::default());
        metrics::gauge!(METRIC_LEADER).set(0.0);
        Self { client, settings, state }
    }

    /// The Lease's namespace.
    pub fn namespace(&self) -> &str {
        &self.settings.namespace
    }

    /// The role of this replica (the writer writes only while `leading`).
    pub fn subscribe(&self) -> watch::Receiver<LeaderState> {
        self.state.subscribe()
    }

    /// `/debug/leader`: the role, the Lease and its holder.
    pub fn view(&self) -> impl Fn() -> Value + Send + Sync + 'static {
        let rx = self.state.subscribe();
        let settings = self.settings.clone();
        move || view_json(&settings, &rx.borrow(), SystemTime::now())
    }

    /// Takes part in the election until `shutdown`; then stops writing and hands the Lease
    /// back (a leader that stops cleanly is succeeded at once).
    pub async fn run(self, shutdown: CancellationToken) {
        let span = tracing::info_span!(
            "leader_election",
            lease = %self.settings.lease(),
            identity = %self.settings.identity,
        );
        self.serve(shutdown).instrument(span).await
    }

    async fn serve(self, shutdown: CancellationToken) {
        let s = &self.settings;
        tracing::info!(
            duration_s = s.duration_secs(),
            renew_before_expiry_s = s.grace_secs(),
            renew_deadline_ms = s.renew_deadline().as_millis() as u64,
            "joining the leader election"
        );
        let mut lease: Option<LeaseView> = None;
        let lease_api: Api<Lease> = Api::namespaced(self.client.clone(), &s.namespace);
        let mut leases = watcher::watcher(
            lease_api,
            watcher::Config::default().fields(&format!("metadata.name={}", s.lease_name)),
        )
        .backoff(super::source::watch_backoff())
        .boxed();
        let mut watch_failing = false;
        'build: loop {
            let built = LeaseManagerBuilder::new(self.client.clone(), &s.lease_name)
                .with_namespace(&s.namespace)
                .with_identity(&s.identity)
                .with_duration(s.duration_secs())
                .with_grace(s.grace_secs())
                .build()
                .await;
            let manager = match built {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot join the leader election (is the Lease namespace there, may the gateway get/create/patch Leases?); retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break 'build,
                        _ = tokio::time::sleep(RETRY) => continue 'build,
                    }
                }
            };
            let (mut elected, task) = manager.watch().await;
            loop {
                let now = SystemTime::now();
                let until = may_write(
                    *elected.borrow(),
                    lease.as_ref(),
                    &s.identity,
                    now,
                    s.renew_deadline(),
                );
                self.publish(until.is_some(), lease.as_ref());
                let recheck = until.map(|u| {
                    tokio::time::Instant::now() + u.duration_since(now).unwrap_or_default()
                });
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        // stop writing first, then release the Lease
                        self.publish(false, lease.as_ref());
                        drop(elected);
                        match tokio::time::timeout(RELEASE_TIMEOUT, task).await {
                            Ok(Ok(Ok(_))) => tracing::debug!("lease released"),
                            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "releasing the lease failed; it expires by itself"),
                            Ok(Err(e)) => tracing::warn!(error = %e, "the election task failed"),
                            Err(_) => tracing::warn!("releasing the lease timed out; it expires by itself"),
                        }
                        break 'build;
                    }
                    r = elected.changed() => {
                        if r.is_err() {
                            let result = task.await;
                            tracing::warn!(?result, "the election task ended; joining again");
                            self.publish(false, lease.as_ref());
                            continue 'build;
                        }
                    }
                    ev = leases.next() => match ev {
                        Some(Ok(Event::Apply(l) | Event::InitApply(l))) => {
                            if std::mem::take(&mut watch_failing) {
                                tracing::info!("lease watch recovered");
                            }
                            lease = Some(LeaseView::from(&l));
                        }
                        Some(Ok(Event::Delete(_))) => lease = None,
                        Some(Ok(Event::Init | Event::InitDone)) => {}
                        Some(Err(e)) => {
                            if !std::mem::replace(&mut watch_failing, true) {
                                tracing::warn!(error = %e, "lease watch failed; retrying with backoff");
                            }
                        }
                        None => break 'build,
                    },
                    _ = tokio::time::sleep_until(recheck.unwrap_or_else(tokio::time::Instant::now)), if recheck.is_some() => {}
                }
            }
        }
        self.publish(false, lease.as_ref());
        tracing::debug!("left the leader election");
    }

    /// Publishes the role (and counts a change of it).
    fn publish(&self, leading: bool, lease: Option<&LeaseView>) {
        let holder = lease.and_then(|l| l.holder.clone());
        let renewed = lease.and_then(|l| l.renewed);
        self.state.send_if_modified(|st| {
            let changed = st.leading != leading;
            if changed {
                st.transitions += 1;
                metrics::counter!(METRIC_LEADER_TRANSITIONS).increment(1);
                metrics::gauge!(METRIC_LEADER).set(if leading { 1.0 } else { 0.0 });
                if leading {
                    tracing::info!("leading: this replica writes the cluster's MCS objects");
                } else {
                    tracing::info!(holder = ?holder, "following: this replica writes nothing");
                }
            }
            let seen = st.holder != holder || st.renewed != renewed;
            st.leading = leading;
            st.holder = holder;
            st.renewed = renewed;
            changed || seen
        });
    }
}

/// The `/debug/leader` JSON (also read by `fedgate status` and the dashboard).
pub fn view_json(settings: &LeaderSettings, st: &LeaderState, now: SystemTime) -> Value {
    let renewed_ago = st
        .renewed
        .and_then(|r| now.duration_since(r).ok())
        .map(|d| (d.as_millis() as f64 / 1000.0 * 10.0).round() / 10.0);
    json!({
        "role": if st.leading { "leader" } else { "follower" },
        "identity": settings.identity,
        "lease": settings.lease(),
        "holder": st.holder,
        "renewedSecondsAgo": renewed_ago,
        "leaseDurationSeconds": settings.duration_secs(),
        "renewDeadlineSeconds": settings.renew_deadline().as_secs_f64(),
        "transitions": st.transitions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(secs: u64) -> LeaderSettings {
        LeaderSettings {
            lease_name: "fedgate-leader".into(),
            namespace: "fedgate-system".into(),
            duration: Duration::from_secs(secs),
            identity: "gw-0".into(),
        }
    }

    #[test]
    fn renewal_comes_halfway_and_writing_stops_before_anyone_can_take_over() {
        for (secs, grace, deadline_ms) in
            [(2, 1, 1500), (3, 2, 2000), (15, 8, 11000), (1, 1, 1500), (60, 30, 45000)]
        {
            let s = settings(secs);
            assert_eq!(s.grace_secs(), grace, "{secs} s");
            assert_eq!(s.renew_deadline(), Duration::from_millis(deadline_ms), "{secs} s");
            // the renewal is due before the deadline, the deadline before the expiry
            let d = s.duration_secs();
            assert!(Duration::from_secs(d - s.grace_secs()) < s.renew_deadline());
            assert!(s.renew_deadline() < Duration::from_secs(d));
        }
        assert_eq!(settings(3).lease(), "fedgate-system/fedgate-leader");
    }

    #[test]
    fn writes_only_while_elected_named_in_the_lease_and_within_the_deadline() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let dl = Duration::from_secs(2);
        let mine = LeaseView { holder: Some("gw-0".into()), renewed: Some(t0) };
        let theirs = LeaseView { holder: Some("gw-1".into()), renewed: Some(t0) };
        let free = LeaseView::default();
        let unrenewed = LeaseView { holder: Some("gw-0".into()), renewed: None };
        let s = Duration::from_secs;
        let rows = [
            ("elected, renewed just now", true, Some(&mine), t0, Some(t0 + dl)),
            ("elected, 1 s after the renewal", true, Some(&mine), t0 + s(1), Some(t0 + dl)),
            ("past the renew deadline", true, Some(&mine), t0 + dl, None),
            ("the crate says follower", false, Some(&mine), t0, None),
            ("the lease names another replica", true, Some(&theirs), t0, None),
            ("the lease is free", true, Some(&free), t0, None),
            ("no renewal time", true, Some(&unrenewed), t0, None),
            ("the lease not seen yet", true, None, t0, None),
        ];
        for (what, elected, lease, now, want) in rows {
            assert_eq!(may_write(elected, lease, "gw-0", now, dl), want, "{what}");
        }
    }

    #[test]
    fn the_view_names_role_holder_and_lease() {
        let s = settings(3);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let st = LeaderState {
            leading: true,
            holder: Some("gw-0".into()),
            renewed: Some(t0),
            transitions: 1,
        };
        let v = view_json(&s, &st, t0 + Duration::from_millis(1234));
        assert_eq!(v["role"], "leader");
        assert_eq!(v["holder"], "gw-0");
        assert_eq!(v["identity"], "gw-0");
        assert_eq!(v["lease"], "fedgate-system/fedgate-leader");
        assert_eq!(v["renewedSecondsAgo"], 1.2);
        assert_eq!(v["leaseDurationSeconds"], 3);
        assert_eq!(v["renewDeadlineSeconds"], 2.0);
        assert_eq!(v["transitions"], 1);
        let v = view_json(&s, &LeaderState::default(), t0);
        assert_eq!(v["role"], "follower");
        assert_eq!(v["holder"], Value::Null);
    }
}
