//! Certificate expiry: when our own leaf and each peer's leaf stop being valid, the warning an
//! operator gets [`EXPIRY_WARNING`] ahead (the admin views, `fedgate status` and a log line at
//! most every [`EXPIRY_LOG_INTERVAL`] per certificate), and times in RFC 3339. The decisions
//! are pure functions over unix seconds; [`crate::tls::Credentials`] holds the facts.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use fedgate_discovery::model::ClusterId;

/// A certificate this close to its `notAfter` (or past it) is warned about: 7 days.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 24 * 3600);
/// The same certificate's warning is logged again after this long: 24 hours.
pub const EXPIRY_LOG_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// Whose certificate.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CertRef {
    /// This gateway's own leaf (what new handshakes present).
    Own,
    /// The leaf a peer presented at its last handshake.
    Peer(ClusterId),
}

impl fmt::Display for CertRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertRef::Own => f.write_str("this gateway's certificate"),
            CertRef::Peer(id) => write!(f, "peer {id}'s certificate"),
        }
    }
}

/// When a certificate stops being valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertExpiry {
    pub cert: CertRef,
    /// `notAfter`, unix seconds.
    pub not_after: i64,
}

/// A certificate that expires within the warning window, or has expired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpiryWarning {
    pub cert: CertRef,
    pub not_after: i64,
    /// Seconds left until `notAfter`; negative once it passed.
    pub remaining_secs: i64,
}

impl ExpiryWarning {
    /// What to tell the operator.
    pub fn message(&self) -> String {
        let at = rfc3339(self.not_after);
        let fix = match self.cert {
            CertRef::Own => "rotate tls.cert and tls.key (`fedgate certs issue`)",
            CertRef::Peer(_) => "the peer must rotate its certificate",
        };
        if self.remaining_secs < 0 {
            format!("{} expired at {at}: {fix}", self.cert)
        } else {
            format!("{} expires at {at} (in {}): {fix}", self.cert, span(self.remaining_secs))
        }
    }
}

/// The certificates of `certs` whose `notAfter` is less than `window` after `now` (unix
/// seconds), soonest first. Pure.
pub fn expiry_warnings(certs: &[CertExpiry], now: i64, window: Duration) -> Vec<ExpiryWarning> {
    let window = i64::try_from(window.as_secs()).unwrap_or(i64::MAX);
    let mut out: Vec<ExpiryWarning> = certs
        .iter()
        .filter(|c| c.not_after.saturating_sub(now) < window)
        .map(|c| ExpiryWarning {
            cert: c.cert.clone(),
            not_after: c.not_after,
            remaining_secs: c.not_after.saturating_sub(now),
        })
        .collect();
    out.sort_by(|a, b| (a.not_after, &a.cert).cmp(&(b.not_after, &b.cert)));
    out
}

/// Logs each warning at most once per [`EXPIRY_LOG_INTERVAL`] per certificate (a renewed
/// certificate, with another `notAfter`, is a new one).
#[derive(Debug, Default)]
pub struct ExpiryLog {
    logged: Mutex<HashMap<(CertRef, i64), i64>>,
}

impl ExpiryLog {
    /// Logs what is due of `warnings` at `now` (unix seconds); returns how many it logged.
    pub fn log(&self, warnings: &[ExpiryWarning], now: i64) -> usize {
        let interval = i64::try_from(EXPIRY_LOG_INTERVAL.as_secs()).unwrap_or(i64::MAX);
        let mut logged = self.logged.lock().unwrap_or_else(PoisonError::into_inner);
        logged.retain(|_, at| now.saturating_sub(*at) < interval);
        let mut count = 0;
        for w in warnings {
            let key = (w.cert.clone(), w.not_after);
            if logged.contains_key(&key) {
                continue;
            }
            logged.insert(key, now);
            count += 1;
            let not_after = rfc3339(w.not_after);
            tracing::warn!(cert = %w.cert, %not_after, remaining_secs = w.remaining_secs, "{}", w.message());
        }
        count
    }
}

/// Unix seconds as RFC 3339 UTC (`2020-09-13T12:26:40Z`).
pub fn rfc3339(secs: i64) -> String {
    // Days to civil date: H. Hinnant's `civil_from_days`.
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A duration in the two largest units: `6d 23h`, `5h 12m`, `42m`, `30s`.
fn span(secs: i64) -> String {
    let (d, h, m) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{secs}s"),
        (0, 0, m) => format!("{m}m"),
        (0, h, m) => format!("{h}h {m}m"),
        (d, h, _) => format!("{d}d {h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_600_000_000), "2020-09-13T12:26:40Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn warnings_within_seven_days_soonest_first() {
        let now = 1_000_000;
        let day = 86_400;
        let peer = |s: &str| CertRef::Peer(ClusterId::new(s).expect("id"));
        let certs = [
            CertExpiry { cert: CertRef::Own, not_after: now + 30 * day },
            CertExpiry { cert: peer("east"), not_after: now + 6 * day + 23 * 3600 },
            CertExpiry { cert: peer("north"), not_after: now - 10 },
            CertExpiry { cert: peer("west"), not_after: now + 7 * day },
        ];
        let got = expiry_warnings(&certs, now, EXPIRY_WARNING);
        let names: Vec<(String, i64)> =
            got.iter().map(|w| (w.cert.to_string(), w.remaining_secs)).collect();
        assert_eq!(
            names,
            [
                ("peer north's certificate".to_owned(), -10),
                ("peer east's certificate".to_owned(), 6 * day + 23 * 3600),
            ]
        );
        assert_eq!(
            got[1].message(),
            "peer east's certificate expires at 1970-01-19T12:46:40Z (in 6d 23h): the peer must \
             rotate its certificate"
        );
        assert!(got[0].message().contains("expired at"), "{}", got[0].message());
        let own = expiry_warnings(&certs[..1], now + 29 * day, EXPIRY_WARNING);
        assert_eq!(own.len(), 1);
        assert!(own[0].message().starts_with("this gateway's certificate expires at"));
    }

    #[test]
    fn each_warning_is_logged_once_a_day() {
        let log = ExpiryLog::default();
        let w = |not_after| ExpiryWarning { cert: CertRef::Own, not_after, remaining_secs: 5 };
        assert_eq!(log.log(&[w(100)], 0), 1);
        assert_eq!(log.log(&[w(100)], 3600), 0, "the same certificate an hour later");
        assert_eq!(log.log(&[w(200)], 3600), 1, "a renewed certificate is new");
        assert_eq!(log.log(&[w(100)], 86_400), 1, "a day later");
    }

    #[test]
    fn spans() {
        assert_eq!(span(30), "30s");
        assert_eq!(span(42 * 60 + 5), "42m");
        assert_eq!(span(5 * 3600 + 12 * 60), "5h 12m");
        assert_eq!(span(6 * 86_400 + 23 * 3600 + 59), "6d 23h");
    }
}
