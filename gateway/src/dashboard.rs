//! The live dashboard served at the admin `/`: one self-contained page (no external assets)
//! that polls the JSON debug views.

/// The dashboard page, embedded in the binary.
pub const PAGE: &str = include_str!("dashboard.html");
