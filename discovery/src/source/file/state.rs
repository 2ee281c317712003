//! The loader: which files the directory holds, what each yields, and the one
//! [`ClusterState`] they add up to. Reading is incremental (a file is re-read only when its
//! size, mtime or inode changed, or the watcher named it) and so is the result: a service
//! whose value did not change keeps its `Arc`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use crate::model::{ClusterState, LocalService, ServiceExportObject, ServiceKey};
use crate::objects::endpoint_slice::merge_endpoints;
use crate::objects::{ExportSpec, SliceEndpoints};

use super::SourceError;
use super::parse::{Object, ObjectRef, ObjectValue, ParsedFile, Problem, parse_file};

/// Files larger than this are reported and not read (a cluster's YAML is far smaller).
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;
/// How deep subdirectories are read.
pub const MAX_DEPTH: usize = 16;

/// What identifies a version of a file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Self {
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(meta);
        #[cfg(not(unix))]
        let inode = 0;
        Self { len: meta.len(), modified: meta.modified().ok(), inode }
    }
}

#[derive(Debug)]
struct FileRecord {
    stamp: Option<Stamp>,
    /// The file's mtime when read: creation time of ServiceExports that name none.
    mtime: jiff::Timestamp,
    /// Kept until the file changes: a change to another file may need them again (a
    /// Service here, its EndpointSlice there). Exactly sized: a file's objects are many.
    objects: Box<[Object]>,
    /// Last good values of objects whose document is bad now.
    held: Vec<Object>,
    problems: Vec<Problem>,
}

impl FileRecord {
    /// The services and exports this file's objects (held ones included) contribute to.
    fn service_keys(&self) -> impl Iterator<Item = ServiceKey> + '_ {
        self.objects.iter().chain(&self.held).map(|o| match &o.value {
            ObjectValue::Service(s) => s.key.clone(),
            ObjectValue::EndpointSlice(s) => s.service.clone(),
            ObjectValue::ServiceExport(e) => e.key.clone(),
        })
    }
}

#[derive(Debug)]
pub(crate) struct Loader {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileRecord>,
    /// Creation time given to ServiceExports without `creationTimestamp`, kept for as long as
    /// the export exists.
    first_seen: HashMap<ServiceKey, jiff::Timestamp>,
    state: Arc<ClusterState>,
    problems: Arc<Vec<Problem>>,
}

impl Loader {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            files: BTreeMap::new(),
            first_seen: HashMap::new(),
            state: Arc::new(ClusterState::default()),
            problems: Arc::new(Vec::new()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn state(&self) -> &Arc<ClusterState> {
        &self.state
    }

    pub fn problems(&self) -> &Arc<Vec<Problem>> {
        &self.problems
    }

    /// Lists the directory, re-reads files that changed (or are in `dirty`) and rebuilds the
    /// state if anything did. `state()` and `problems()` keep their `Arc` when unchanged.
    pub fn scan(&mut self, dirty: &BTreeSet<PathBuf>) -> Result<(), SourceError> {
        let listed = list_files(&self.dir)
            .map_err(|source| SourceError::Dir { dir: self.dir.clone(), source })?;
        let mut changed = false;
        // Services and exports whose value may differ: those named by an object of a file
        // that changed (before or after). The others keep their Arc without a look.
        let mut affected: HashSet<ServiceKey> = HashSet::new();
        let mut next = BTreeMap::new();
        for path in listed {
            let old = self.files.remove(&path);
            let meta = fs::metadata(&path);
            let stamp = meta.as_ref().ok().map(Stamp::of);
            match old {
                Some(old) if stamp.is_some() && old.stamp == stamp && !dirty.contains(&path) => {
                    next.insert(path, old);
                }
                old => {
                    changed = true;
                    if let Some(old) = &old {
                        affected.extend(old.service_keys());
                    }
                    if let Some(record) = load_file(&path, meta, old) {
                        affected.extend(record.service_keys());
                        next.insert(path, record);
                    }
                }
            }
        }
        // Whatever is left was deleted.
        for old in self.files.values() {
            changed = true;
            affected.extend(old.service_keys());
        }
        self.files = next;
        if changed {
            self.rebuild(&affected);
        }
        Ok(())
    }

    fn rebuild(&mut self, affected: &HashSet<ServiceKey>) {
        let mut problems: Vec<Problem> =
            self.files.values().flat_map(|r| r.problems.iter().cloned()).collect();
        let mut seen: HashMap<&ObjectRef, (&Path, usize)> = HashMap::new();
        let mut services: BTreeMap<&ServiceKey, &LocalService> = BTreeMap::new();
        let mut slices: BTreeMap<&ServiceKey, Vec<(&str, &SliceEndpoints)>> = BTreeMap::new();
        let mut exports: BTreeMap<&ServiceKey, (&ExportSpec, jiff::Timestamp)> = BTreeMap::new();

        for (path, record) in &self.files {
            let objects = record.objects.iter().map(|o| (o, false));
            for (obj, held) in objects.chain(record.held.iter().map(|o| (o, true))) {
                if let Some((file, line)) = seen.get(&obj.id) {
                    if !held {
                        problems.push(Problem {
                            file: path.clone(),
                            line: obj.line,
                            column: 0,
                            object: Some(obj.id.to_string()),
                            reason: format!(
                                "duplicate object, ignored: the one in {}:{} is in force \
                                 (files are read in name order)",
                                file.display(),
                                line
                            ),
                        });
                    }
                    continue;
                }
                seen.insert(&obj.id, (path, obj.line));
                match &obj.value {
                    ObjectValue::Service(s) => {
                        services.insert(&s.key, s);
                    }
                    ObjectValue::EndpointSlice(s) => {
                        slices.entry(&s.service).or_default().push((&obj.id.name, s));
                    }
                    ObjectValue::ServiceExport(e) => {
                        exports.insert(&e.key, (e, record.mtime));
                    }
                }
            }
        }

        let old = &self.state;
        let mut state = ClusterState::default();
        for (key, svc) in services {
            if !affected.contains(key)
                && let Some(prev) = old.services.get(key)
            {
                state.services.insert(key.clone(), Arc::clone(prev));
                continue;
            }
            let mut svc = svc.clone();
            if let Some(mut parts) = slices.remove(key) {
                parts.sort_by_key(|(name, _)| *name);
                svc.endpoints = merge_endpoints(parts.iter().map(|(_, s)| *s));
            }
            let svc = match old.services.get(key) {
                Some(prev) if **prev == svc => Arc::clone(prev),
                _ => Arc::new(svc),
            };
            state.services.insert(key.clone(), svc);
        }
        let mut stamped = HashSet::new();
        for (key, (spec, mtime)) in exports {
            if spec.created.is_none() {
                stamped.insert(key.clone());
            }
            if !affected.contains(key)
                && let Some(prev) = old.exports.get(key)
            {
                state.exports.insert(key.clone(), Arc::clone(prev));
                continue;
            }
            let first_seen = *self.first_seen.entry(key.clone()).or_insert(mtime);
            let export: ServiceExportObject = spec.clone().into_object(first_seen);
            let export = match old.exports.get(key) {
                Some(prev) if **prev == export => Arc::clone(prev),
                _ => Arc::new(export),
            };
            state.exports.insert(key.clone(), export);
        }
        self.first_seen.retain(|k, _| stamped.contains(k));

        if state != *self.state {
            self.state = Arc::new(state);
        }
        problems.sort();
        if problems != *self.problems {
            let before: HashSet<&Problem> = self.problems.iter().collect();
            for p in problems.iter().filter(|p| !before.contains(p)) {
                tracing::warn!(problem = %p, "file source problem");
            }
            self.problems = Arc::new(problems);
        }
    }
}

/// Reads and parses one file. `old` is the file's previous record: objects it yielded stay
/// in force while their document is bad. `None` when the file vanished meanwhile.
fn load_file(
    path: &Path,
    meta: io::Result<fs::Metadata>,
    old: Option<FileRecord>,
) -> Option<FileRecord> {
    let previous: Vec<Object> =
        old.map(|o| o.objects.into_vec().into_iter().chain(o.held).collect()).unwrap_or_default();
    let whole_file = |reason: String| ParsedFile {
        problems: vec![Problem {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            object: None,
            reason,
        }],
        unidentified_bad: true,
        ..ParsedFile::default()
    };
    let meta = match meta {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            return Some(record(
                None,
                None,
                whole_file(format!("cannot read file: {e}")),
                previous,
            ));
        }
    };
    let stamp = Some(Stamp::of(&meta));
    let mtime = meta.modified().ok();
    if meta.len() > MAX_FILE_BYTES {
        let reason = format!("file is larger than {MAX_FILE_BYTES} bytes; not read");
        return Some(record(stamp, mtime, whole_file(reason), previous));
    }
    let parsed = match fs::read(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => whole_file(format!("cannot read file: {e}")),
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(text) => parse_file(path, &text),
            Err(e) => {
                let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
                let line = valid.iter().filter(|b| **b == b'\n').count() + 1;
                let column = valid.iter().rev().take_while(|b| **b != b'\n').count() + 1;
                let mut parsed = whole_file("file is not valid UTF-8".to_owned());
                parsed.problems[0].line = line;
                parsed.problems[0].column = column;
                parsed
            }
        },
    };
    Some(record(stamp, mtime, parsed, previous))
}

fn record(
    stamp: Option<Stamp>,
    mtime: Option<SystemTime>,
    mut parsed: ParsedFile,
    previous: Vec<Object>,
) -> FileRecord {
    let present: HashSet<&ObjectRef> = parsed.objects.iter().map(|o| &o.id).collect();
    let mut held_ids = HashSet::new();
    let held: Vec<Object> = previous
        .into_iter()
        .filter(|o| {
            !present.contains(&o.id)
                && (parsed.unidentified_bad || parsed.bad.contains(&o.id))
                && held_ids.insert(o.id.clone())
        })
        .collect();
    let held_names: HashSet<String> = held.iter().map(|o| o.id.to_string()).collect();
    for p in &mut parsed.problems {
        match &p.object {
            Some(o) if held_names.contains(o) => {
                p.reason.push_str("; the last good version stays in force");
            }
            None if !held.is_empty() => p.reason.push_str(
                "; the objects this file held before stay in force until it parses again",
            ),
            _ => {}
        }
    }
    let mtime =
        mtime.and_then(|m| jiff::Timestamp::try_from(m).ok()).unwrap_or_else(jiff::Timestamp::now);
    let objects = parsed.objects.into_boxed_slice();
    FileRecord { stamp, mtime, objects, held, problems: parsed.problems }
}

fn is_yaml(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.ends_with(".yaml") || lower.ends_with(".yml")
}

/// `.yaml`/`.yml` files under `dir`, subdirectories included, in path order. Names starting
/// with `.` are skipped (editor temporaries, the `..data` links of a mounted ConfigMap);
/// symlinks to files are followed, symlinks to directories are not (no cycles).
fn list_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    walk(dir, 0, &mut out)?;
    out.sort();
    Ok(out)
}

fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if depth > 0 => {
            tracing::debug!(dir = %dir.display(), error = %e, "file source skips unreadable directory");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    for entry in entries {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') {
            continue;
        }
        let Ok(file_type) = entry.file_type() else { continue };
        if file_type.is_dir() {
            if depth < MAX_DEPTH {
                walk(&entry.path(), depth + 1, out)?;
            }
        } else if is_yaml(name) && (file_type.is_file() || file_type.is_symlink()) {
            let path = entry.path();
            if file_type.is_file() || fs::metadata(&path).is_ok_and(|m| m.is_file()) {
                out.push(path);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::model::ServiceKey;

    /// Writes like an editor that saves atomically (temp file + rename).
    fn write(dir: &Path, name: &str, text: &str) {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("create dir");
        }
        let tmp = dir.join(format!(".{}.tmp", name.replace('/', "_")));
        fs::write(&tmp, text).expect("write temp file");
        fs::rename(&tmp, &path).expect("rename");
    }

    fn svc(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  clusterIP: {ip}\n  \
             ports: [{{port: 80}}]\n"
        )
    }

    fn loaded(dir: &Path) -> Loader {
        let mut loader = Loader::new(dir.to_path_buf());
        loader.scan(&BTreeSet::new()).expect("scan");
        loader
    }

    fn key(name: &str) -> ServiceKey {
        ServiceKey::new("default", name)
    }

    fn ip_of(loader: &Loader, name: &str) -> Option<IpAddr> {
        loader.state().services.get(&key(name)).and_then(|s| s.cluster_ips.first().copied())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn testdata_directory() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/file-source");
        let loader = loaded(&dir);
        let state = loader.state();
        let web = &state.services[&ServiceKey::new("shop", "web")];
        assert_eq!(web.cluster_ips, vec![ip("10.96.0.10")]);
        assert_eq!(web.ports.len(), 2);
        // slices in name order (web-a, web-b); 10.1.0.2 is in both and counts once
        let addrs: Vec<(IpAddr, bool)> =
            web.endpoints.iter().map(|e| (e.address, e.ready)).collect();
        assert_eq!(addrs, vec![(ip("10.1.0.1"), true), (ip("10.1.0.2"), false)]);
        assert_eq!(web.endpoints[0].hostname.as_deref(), Some("web-0"));
        assert_eq!(web.endpoints[0].zone.as_deref(), Some("east-a"));
        assert_eq!(web.endpoints[0].ports[0].port, 8080);
        let db = &state.services[&ServiceKey::new("shop", "db")];
        assert!(db.is_headless());
        assert_eq!(state.services.len(), 2, "broken service skipped, cache has no Service");
        let exports: Vec<&str> = state.exports.keys().map(|k| k.name.as_str()).collect();
        assert_eq!(exports, vec!["db", "web"]);
        let web_export = &state.exports[&ServiceKey::new("shop", "web")];
        assert_eq!(web_export.created.to_string(), "2026-01-01T00:00:00Z");
        assert_eq!(web_export.exported_labels.get("tier").map(String::as_str), Some("gold"));

        let problems = loader.problems();
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(problems[0].file.ends_with("03-broken.yaml"));
        assert_eq!((problems[0].line, problems[0].column), (19, 15));
        assert_eq!(problems[0].object.as_deref(), Some("Service shop/broken"));
    }

    #[test]
    fn bad_document_keeps_last_good_version() {
        let tmp = tempfile::tempdir().expect("tempdir");
        write(
            tmp.path(),
            "a.yaml",
            &format!("{}---\n{}", svc("a", "10.0.0.1"), svc("b", "10.0.0.2")),
        );
        let mut loader = loaded(tmp.path());
        let a_before = Arc::clone(&loader.state().services[&key("a")]);

        write(
            tmp.path(),
            "a.yaml",
            &format!("{}---\n{}", svc("a", "10.0.0.300"), svc("b", "10.0.0.3")),
        );
        loader.scan(&BTreeSet::new()).expect("scan");
        assert!(Arc::ptr_eq(&a_before, &loader.state().services[&key("a")]));
        assert_eq!(ip_of(&loader, "b"), Some(ip("10.0.0.3")), "the good document still applies");
        let p = &loader.problems()[0];
        assert_eq!((p.line, p.column), (5, 14));
        assert!(p.reason.ends_with("the last good version stays in force"), "{}", p.reason);

        // still bad on the next edit: still held
        write(tmp.path(), "a.yaml", &format!("\n{}---\n{}", svc("a", "bad"), svc("b", "10.0.0.3")));
        loader.scan(&BTreeSet::new()).expect("scan");
        assert_eq!(ip_of(&loader, "a"), Some(ip("10.0.0.1")));

        write(
            tmp.path(),
            "a.yaml",
            &format!("{}---\n{}", svc("a", "10.0.0.4"), svc("b", "10.0.0.3")),
        );
        loader.scan(&BTreeSet::new()).expect("scan");
        assert_eq!(ip_of(&loader, "a"), Some(ip("10.0.0.4")));
        assert!(loader.problems().is_empty());
    }

    #[test]
    fn unparseable_file_keeps_its_objects_until_fixed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        write(tmp.path(), "a.yaml", &svc("a", "10.0.0.1"));
        let mut loader = loaded(tmp.path());
        write(tmp.path(), "a.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: a\n");
        loader.scan(&BTreeSet::new()).expect("scan");
        assert_eq!(ip_of(&loader, "a"), Some(ip("10.0.0.1")));
        assert_eq!(loader.problems().len(), 1);
        assert!(loader.problems()[0].reason.starts_with("invalid YAML"));
        assert!(loader.problems()[0].reason.ends_with("stay in force until it parses again"));

        write(tmp.path(), "a.yaml", "# emptied on purpose\n");
        loader.scan(&BTreeSet::new()).expect("scan");
        assert!(loader.state().services.is_empty());
        assert!(loader.problems().is_empty());
    }

    #[test]
    fn deleted_file_takes_its_objects() {
        let tmp = tempfile::tempdir().expect("tempdir");
        write(tmp.path(), "a.yaml", &svc("a", "10.0.0.1"));
        write(tmp.path(), "b.yml", &svc("b", "10.0.0.2"));
        let mut loader = loaded(tmp.path());
        assert_eq!(loader.state().services.len(), 2);
        fs::remove_file(tmp.path().join("a.yaml")).expect("remove");
        loader.scan(&BTreeSet::new()).expect("scan");
        let names: Vec<&str> = loader.state().services.keys().map(|k| k.name.as_str()).collect();
        assert_eq!(names, vec!["b"]);
    }

    #[test]
    fn duplicates_first_file_wins() {
        let tmp = tempfile::tempdir().expect("tempdir");
        write(tmp.path(), "b.yaml", &format!("# dup\n{}", svc("x", "10.0.0.2")));
        write(tmp.path(), "a.yaml", &svc("x", "10.0.0.1"));
        let mut loader = loaded(tmp.path());
        assert_eq!(ip_of(&loader, "x"), Some(ip("10.0.0.1")));
        let p = &loader.problems()[0];
        assert!(p.file.ends_with("b.yaml"));
        assert_eq!(p.line, 2);
        assert!(p.reason.contains("duplicate object"), "{}", p.reason);
        assert!(p.reason.contains("a.yaml:1"), "{}", p.reason);

        fs::remove_file(tmp.path().join("a.yaml")).expect("remove");
        loader.scan(&BTreeSet::new()).expect("scan");
        assert_eq!(ip_of(&loader, "x"), Some(ip("10.0.0.2")));
        assert!(loader.problems().is_empty());
    }

    #[test]
    fn unchanged_values_keep_their_arc() {
        let tmp = tempfile::tempdir().expect("tempdir");
        write(tmp.path(), "a.yaml", &svc("a", "10.0.0.1"));
        write(tmp.path(), "b.yaml", &svc("b", "10.0.0.2"));
        let mut loader = loaded(tmp.path());
        let state0 = Arc::clone(loader.state());
        let problems0 = Arc::clone(loader.problems());

        // nothing changed: same state, same problems
        loader.scan(&BTreeSet::new()).expect("scan");
        assert!(Arc::ptr_eq(&state0, loader.state()));
        assert!(Arc::ptr_eq(&problems0, loader.problems()));

        // b rewritten with the same meaning (a comment): re-read, nothing published
        write(tmp.path(), "b.yaml", &format!("# comment\n{}", svc("b", "10.0.0.2")));
        loader.scan(&BTreeSet::new()).expect("scan");
        assert!(Arc::ptr_eq(&state0, loader.state()));

        // b changed: a keeps its Arc
        write(tmp.path(), "b.yaml", &svc("b", "10.0.0.3"));
        loader.scan(&BTreeSet::new()).expect("scan");
        assert!(!Arc::ptr_eq(&state0, loader.state()));
        assert!(Arc::ptr_eq(&state0.services[&key("a")], &loader.state().services[&key("a")]));
        assert!(!Arc::ptr_eq(&state0.services[&key("b")], &loader.state().services[&key("b")]));
    }

    #[test]
    fn slice_waits_for_its_service() {
        let tmp = tempfile::tempdir().expect("tempdir");
        write(
            tmp.path(),
            "slice.yaml",
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: a-1\n  \
             labels: {kubernetes.io/service-name: a}\naddressType: IPv4\nendpoints:\n- addresses: [10.2.0.1]\n",
        );
        let mut loader = loaded(tmp.path());
        assert!(loader.state().services.is_empty());
        write(tmp.path(), "svc.yaml", &svc("a", "10.0.0.1"));
        loader.scan(&BTreeSet::new()).expect("scan");
        let a = &loader.state().services[&key("a")];
        assert_eq!(a.endpoints.len(), 1);
        assert_eq!(a.endpoints[0].address, ip("10.2.0.1"));
    }

    #[test]
    fn export_without_timestamp_uses_mtime_at_first_sight() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let export = "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: a}\n";
        write(tmp.path(), "e.yaml", export);
        let old = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        fs::File::options()
            .write(true)
            .open(tmp.path().join("e.yaml"))
            .and_then(|f| f.set_modified(old))
            .expect("set mtime");
        let mut loader = loaded(tmp.path());
        let created = loader.state().exports[&key("a")].created;
        assert_eq!(created, jiff::Timestamp::from_second(1_700_000_000).expect("ts"));

        // edited later (new mtime): the creation time stays
        write(tmp.path(), "e.yaml", &format!("{export}spec: {{exportedLabels: {{a: b}}}}\n"));
        loader.scan(&BTreeSet::new()).expect("scan");
        assert_eq!(loader.state().exports[&key("a")].created, created);
        assert_eq!(loader.state().exports[&key("a")].exported_labels.len(), 1);

        // gone, then back: a new object, a new creation time
        fs::remove_file(tmp.path().join("e.yaml")).expect("remove");
        loader.scan(&BTreeSet::new()).expect("scan");
        assert!(loader.state().exports.is_empty());
        write(tmp.path(), "e.yaml", export);
        loader.scan(&BTreeSet::new()).expect("scan");
        assert!(loader.state().exports[&key("a")].created > created);
    }

    #[test]
    fn which_files_are_read() {
        let tmp = tempfile::tempdir().expect("tempdir");
        write(tmp.path(), "a.YAML", &svc("upper", "10.0.0.1"));
        write(tmp.path(), "sub/dir/b.yml", &svc("nested", "10.0.0.2"));
        write(tmp.path(), "notes.txt", &svc("txt", "10.0.0.3"));
        write(tmp.path(), ".hidden.yaml", &svc("hidden", "10.0.0.4"));
        write(tmp.path(), ".git/c.yaml", &svc("git", "10.0.0.5"));
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(
                tmp.path().join("sub/dir/b.yml"),
                tmp.path().join("link.yaml"),
            )
            .expect("symlink");
            std::os::unix::fs::symlink(
                tmp.path().join("missing"),
                tmp.path().join("dangling.yaml"),
            )
            .expect("symlink");
        }
        let loader = loaded(tmp.path());
        let names: Vec<&str> = loader.state().services.keys().map(|k| k.name.as_str()).collect();
        assert_eq!(names, vec!["nested", "upper"]);
        #[cfg(unix)]
        assert!(loader.problems()[0].reason.contains("duplicate"), "link.yaml repeats b.yml");
    }

    #[test]
    fn unreadable_content_is_a_problem_not_an_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        fs::write(tmp.path().join("bin.yaml"), b"apiVersion: v1\nkind: \xff\xfe\n").expect("write");
        let loader = loaded(tmp.path());
        let p = &loader.problems()[0];
        assert_eq!((p.line, p.column, p.reason.as_str()), (2, 7, "file is not valid UTF-8"));
    }

    /// Figures for docs/file-source.md; slow in debug builds, hence ignored by default:
    /// `cargo test -p fedgate-discovery --lib perf_ -- --ignored --nocapture`.
    #[test]
    #[ignore = "measurement"]
    fn perf_ten_thousand_services() {
        let tmp = tempfile::tempdir().expect("tempdir");
        for f in 0..1000 {
            let mut text = String::new();
            for i in 0..10 {
                let n = f * 10 + i;
                text.push_str(&format!("{}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s{n}\n  labels: {{kubernetes.io/service-name: s{n}}}\naddressType: IPv4\nports: [{{port: 80}}]\nendpoints:\n- addresses: [10.1.{}.{}]\n- addresses: [10.2.{}.{}]\n---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: s{n}}}\n---\n", svc(&format!("s{n}"), "10.0.0.1"), n / 256, n % 256, n / 256, n % 256));
            }
            fs::write(tmp.path().join(format!("f{f:04}.yaml")), text).expect("write");
        }
        let t = std::time::Instant::now();
        let mut loader = loaded(tmp.path());
        eprintln!("PERF full load of 10k services / 30k objects in 1000 files: {:?}", t.elapsed());
        assert_eq!(loader.state().services.len(), 10_000);
        let t = std::time::Instant::now();
        loader.scan(&BTreeSet::new()).expect("scan");
        eprintln!("PERF rescan, nothing changed: {:?}", t.elapsed());
        write(tmp.path(), "f0007.yaml", &svc("s70", "10.0.0.2"));
        let t = std::time::Instant::now();
        loader.scan(&BTreeSet::new()).expect("scan");
        eprintln!("PERF rescan, one file changed: {:?}", t.elapsed());
        assert_eq!(loader.state().services[&key("s70")].cluster_ips, vec![ip("10.0.0.2")]);
        // its slices and the other services of that file went with the old content
        assert!(loader.state().services[&key("s70")].endpoints.is_empty());
        assert_eq!(loader.state().services.len(), 9_991);
    }

    #[test]
    fn missing_directory_is_an_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut loader = Loader::new(tmp.path().join("nope"));
        assert!(matches!(loader.scan(&BTreeSet::new()), Err(SourceError::Dir { .. })));
    }
}
