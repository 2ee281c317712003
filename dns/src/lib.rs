//! fedgate-dns serves `clusterset.local` (per the MCS DNS specification 1.0.0) and
//! `cluster.local` (this cluster only) from discovery snapshots, and forwards every other name
//! upstream. It reads `fedgate_discovery::model` snapshots and depends on nothing else of
//! fedgate.
