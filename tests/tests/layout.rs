//! docs/architecture.md names every crate and module folder with what it owns (issue 18): this
//! checks that its table matches the tree, both ways. Pure file reading, no processes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_owned()
}

/// The paths in the first column of the table (`| \`path/\` | owns |`).
fn table_paths(doc: &str) -> BTreeSet<String> {
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(|p| p.trim_end_matches('/').to_owned())
        .collect()
}

/// Every directory below `dir`, relative to the workspace root.
fn folders(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            let rel = path.strip_prefix(root).expect("below the root");
            out.insert(rel.to_string_lossy().into_owned());
            folders(root, &path, out);
        }
    }
}

/// The workspace members (from the root Cargo.toml) and every module folder of their `src/`,
/// plus each crate's example folders.
fn tree(root: &Path) -> BTreeSet<String> {
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("Cargo.toml");
    let members = manifest
        .lines()
        .find_map(|l| l.strip_prefix("members = "))
        .expect("a members line in Cargo.toml");
    let mut out = BTreeSet::new();
    for member in members.split('"').skip(1).step_by(2) {
        out.insert(member.to_owned());
        folders(root, &root.join(member).join("src"), &mut out);
        folders(root, &root.join(member).join("examples"), &mut out);
    }
    // The e2e crate's own tests/ and src/ are the crate's, not module folders.
    out.retain(|p| !p.starts_with("tests/tests") && !p.starts_with("tests/src"));
    out
}

#[test]
fn the_architecture_table_matches_the_tree() {
    let root = root();
    let doc = std::fs::read_to_string(root.join("docs/architecture.md")).expect("the page");
    let named = table_paths(&doc);
    assert!(named.len() >= 10, "a table of paths: {named:?}");
    let missing: Vec<&String> = named.iter().filter(|p| !root.join(p).exists()).collect();
    assert!(missing.is_empty(), "docs/architecture.md names paths that do not exist: {missing:?}");
    let unnamed: Vec<String> = tree(&root).into_iter().filter(|p| !named.contains(p)).collect();
    assert!(
        unnamed.is_empty(),
        "crates or module folders missing from docs/architecture.md: {unnamed:?}"
    );
}
