//! Caps on client connections (`traffic.connections`): at most `max` open on this gateway
//! and `max_per_service` for one service. A connection over a cap is reset at once and
//! counted, so a flood of idle connections (5 000 of them in issue 17's attack) cannot take
//! every descriptor and memory page of the gateway and starve the other services.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use fedgate_discovery::model::ServiceKey;

/// Which cap refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitHit {
    Gateway,
    Service,
}

impl LimitHit {
    /// Bounded label (`fedgate_connection_limit_hits_total{scope}`).
    pub fn as_str(self) -> &'static str {
        match self {
            LimitHit::Gateway => "gateway",
            LimitHit::Service => "service",
        }
    }
}

/// Open client connections, in total and per service.
#[derive(Debug)]
pub struct Limits {
    max: usize,
    max_per_service: usize,
    total: AtomicUsize,
    per_service: Mutex<HashMap<ServiceKey, usize>>,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Admitted {
    limits: Arc<Limits>,
    service: ServiceKey,
}

impl Limits {
    pub fn new(max: usize, max_per_service: usize) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            max_per_service: max_per_service.max(1),
            total: AtomicUsize::new(0),
            per_service: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a place for one connection to `service`, or says which cap is reached.
    pub fn admit(self: &Arc<Self>, service: &ServiceKey) -> Result<Admitted, LimitHit> {
        let mut per = self.per_service.lock().unwrap_or_else(PoisonError::into_inner);
        if self.total.load(Ordering::Relaxed) >= self.max {
            return Err(LimitHit::Gateway);
        }
        let open = per.entry(service.clone()).or_default();
        if *open >= self.max_per_service {
            return Err(LimitHit::Service);
        }
        *open += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(Admitted { limits: self.clone(), service: service.clone() })
    }

    /// Client connections open now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut per = self.limits.per_service.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(open) = per.get_mut(&self.service) {
            *open -= 1;
            if *open == 0 {
                per.remove(&self.service);
            }
        }
        self.limits.total.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_gateway_and_per_service_and_places_come_back() {
        let limits = Limits::new(3, 2);
        let (web, db) = (ServiceKey::new("shop", "web"), ServiceKey::new("shop", "db"));
        let a = limits.admit(&web).expect("first");
        let b = limits.admit(&web).expect("second");
        assert_eq!(limits.admit(&web).unwrap_err(), LimitHit::Service, "web is at its cap");
        let c = limits.admit(&db).expect("db has room");
        assert_eq!(limits.admit(&db).unwrap_err(), LimitHit::Gateway, "the gateway is full");
        assert_eq!(limits.open(), 3);
        drop(a);
        let _d = limits.admit(&web).expect("a place came back");
        drop((b, c));
        assert_eq!(limits.open(), 1);
        assert_eq!(limits.per_service.lock().unwrap().len(), 1, "empty services are dropped");
    }
}
