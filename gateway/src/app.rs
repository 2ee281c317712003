//! Composition root. Placeholder created by the config/CLI part so `fedgate run` links; the
//! lead replaces this file with the real wiring.

use crate::config::Config;

/// Builds and runs the gateway from a validated config until it is shut down.
pub fn run_from_config(cfg: Config) -> anyhow::Result<()> {
    anyhow::bail!(
        "not wired yet: the gateway for cluster {} cannot start in this build",
        cfg.cluster.id
    )
}
