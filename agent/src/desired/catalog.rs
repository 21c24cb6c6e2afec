//! The catalog: every desired resource of one host, validated, with its
//! dependencies resolved and in apply order.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use super::diag::{Diagnostic, Diagnostics};
use super::model::DriftPolicy;
use crate::resources::{Platform, Resource};

/// One resource in the catalog.
#[derive(Debug)]
pub struct Entry {
    /// `kind:identity`, e.g. `file:/usr/local/etc/zot/config.json`.
    pub id: String,
    /// The module that declared it.
    pub module: String,
    /// Where it was declared (module.yaml and line).
    pub file: String,
    pub line: usize,
    pub resource: Box<dyn Resource>,
    /// Indices (into [`Catalog::entries`]) this entry must come after.
    pub deps: Vec<usize>,
    /// Resources to notify when this one changes (used by service kinds).
    pub notify: Vec<String>,
    /// Indices (into [`Catalog::entries`]) of the `notify` targets; each
    /// comes after this entry.
    pub notifies: Vec<usize>,
    /// The module use that produced it (`hosts/indri.yaml:12`).
    pub used_at: String,
    /// Why it cannot be applied this run (a secret that did not resolve):
    /// it is skipped, never written with a placeholder, never pruned.
    pub blocked: Option<String>,
    /// Blocked only because this resource comes after the one at this
    /// index, which is blocked (its own secrets resolved).
    pub blocked_after: Option<usize>,
    pub on_drift: DriftPolicy,
    /// Digest of the desired spec, recorded in the inventory when applied.
    pub digest: String,
}

/// The host a catalog is for.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HostInfo {
    pub name: String,
    pub platform: Platform,
    pub roots: Vec<PathBuf>,
}

/// A validated desired state, entries in dependency order (ties by id).
#[derive(Debug)]
pub struct Catalog {
    pub host: HostInfo,
    pub revision: String,
    pub entries: Vec<Entry>,
    /// The host's Kubernetes stacks (converged after the entries).
    pub stacks: Vec<crate::desired::stacks::Stack>,
}

/// An entry before ordering: explicit `after` ids are still strings.
pub struct Pending {
    pub entry: Entry,
    pub after: Vec<(String, usize)>,
    /// `notify` ids and their lines.
    pub notify: Vec<(String, usize)>,
}

/// Resources declared but not read, because their declaration (or their
/// module) has an error already reported: `build` runs on the rest, so every
/// problem is reported at once, and a `notify` or `after` that may name one
/// of these is not called dangling.
#[derive(Debug, Default)]
pub struct Unread {
    /// Their ids as written (`file:{{ params.dir }}/x.conf`).
    ids: Vec<String>,
    /// A module could not be read at all: any id may be one of its.
    anything: bool,
}

impl Unread {
    /// A resource whose declaration has an error; `raw_id` as written.
    pub fn resource(&mut self, raw_id: String) {
        self.ids.push(raw_id);
    }

    /// A module none of whose resources are known.
    pub fn module(&mut self) {
        self.anything = true;
    }

    /// Whether `id` may be one of these: the same id, or one of the same
    /// kind whose identity is a template.
    fn may_be(&self, id: &str) -> bool {
        let id = normalize_id(id);
        let kind = id.split_once(':').map_or(id.as_str(), |(k, _)| k);
        self.anything
            || self.ids.iter().any(|raw| {
                normalize_id(raw) == id
                    || (raw.contains("{{") || raw.contains("{%"))
                        && raw.split_once(':').is_some_and(|(k, _)| k == kind)
            })
    }
}

/// Checks ids, resolves `after` and implicit parent-directory edges, and
/// orders the entries. Reports duplicates, dangling `after` and `notify`,
/// and cycles, also when `diags` already holds other problems (then no
/// catalog is returned).
pub fn build(
    host: HostInfo,
    revision: String,
    pending: Vec<Pending>,
    unread: &Unread,
    diags: &mut Diagnostics,
) -> Option<Catalog> {
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut kept: Vec<Pending> = Vec::new();
    for p in pending {
        if let Some(&first) = index.get(&p.entry.id) {
            let f = &kept[first].entry;
            let d = if f.file == p.entry.file && f.line == p.entry.line {
                Diagnostic::new(
                    &p.entry.file,
                    format!("duplicate resource: module {} is used twice ({} and {}) and both uses declare it", f.module, f.used_at, p.entry.used_at),
                )
                .hint("give the two uses params that make their paths differ, or remove one use")
            } else {
                Diagnostic::new(
                    &p.entry.file,
                    format!("duplicate resource; first declared at {}:{} (module {}, used at {})", f.file, f.line, f.module, f.used_at),
                )
                .hint("each resource may be declared once per host; remove one of the two declarations")
            };
            diags.push(d.line(p.entry.line).resource(&p.entry.id));
            continue;
        }
        index.insert(p.entry.id.clone(), kept.len());
        kept.push(p);
    }

    check_path_claims(&kept, host.platform, diags);

    // Parent directories: a path resource comes after the nearest ancestor
    // directory declared in the catalog.
    let dirs: HashMap<&Path, usize> = kept
        .iter()
        .enumerate()
        .filter(|(_, p)| p.entry.resource.kind() == "directory")
        .filter_map(|(i, p)| p.entry.resource.path().map(|path| (path, i)))
        .collect();
    let mut edges: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); kept.len()];
    let mut notifies: Vec<Vec<usize>> = vec![Vec::new(); kept.len()];
    // A notified resource (a service) comes after what notifies it (its
    // config files), so it starts with them in place.
    for (i, p) in kept.iter().enumerate() {
        for (target, line) in &p.notify {
            match index.get(&normalize_id(target)) {
                Some(&j) if j == i => diags.push(
                    Diagnostic::new(&p.entry.file, "a resource cannot `notify` itself")
                        .line(*line)
                        .resource(&p.entry.id),
                ),
                Some(&j)
                    if !kept[j]
                        .entry
                        .resource
                        .as_startable()
                        .is_some_and(|s| s.accepts_notify()) =>
                {
                    diags.push(
                        Diagnostic::new(
                            &p.entry.file,
                            format!(
                                "`notify` names `{target}`, a {} that cannot be notified",
                                kept[j].entry.resource.kind()
                            ),
                        )
                        .line(*line)
                        .resource(&p.entry.id)
                        .hint("only services restart on a notification: notify service:NAME"),
                    )
                }
                Some(&j) => {
                    edges[j].insert(i);
                    notifies[i].push(j);
                }
                None if unread.may_be(target) => {}
                None => diags.push(
                    Diagnostic::new(
                        &p.entry.file,
                        format!("`notify` names `{target}`, which is not in this host's catalog"),
                    )
                    .line(*line)
                    .resource(&p.entry.id)
                    .hint(match closest_id(target, &index) {
                        Some(id) => format!("did you mean `{id}`? ids are kind:identity"),
                        None => "declare the service on this host, e.g. service:zot".into(),
                    }),
                ),
            }
        }
    }
    for (i, p) in kept.iter().enumerate() {
        if let Some(path) = p.entry.resource.path() {
            if let Some(parent) = path.ancestors().skip(1).find_map(|a| dirs.get(a)) {
                edges[i].insert(*parent);
            }
        }
        for (after, line) in &p.after {
            match index.get(&normalize_id(after)) {
                Some(&j) if j == i => diags.push(
                    Diagnostic::new(&p.entry.file, "a resource cannot come `after` itself")
                        .line(*line)
                        .resource(&p.entry.id),
                ),
                Some(&j) => {
                    edges[i].insert(j);
                }
                None if unread.may_be(after) => {}
                None => diags.push(
                    Diagnostic::new(
                        &p.entry.file,
                        format!("`after` names `{after}`, which is not in this host's catalog"),
                    )
                    .line(*line)
                    .resource(&p.entry.id)
                    .hint(match closest_id(after, &index) {
                        Some(id) => format!("did you mean `{id}`? ids are kind:identity"),
                        None => "ids are kind:identity, e.g. directory:/usr/local/etc/zot".into(),
                    }),
                ),
            }
        }
    }

    let order = match topo_order(&kept, &edges) {
        Ok(order) => order,
        Err(cycle) => {
            let names: Vec<&str> = cycle.iter().map(|&i| kept[i].entry.id.as_str()).collect();
            let first = &kept[cycle[0]].entry;
            diags.push(
                Diagnostic::new(
                    &first.file,
                    format!(
                        "dependency cycle: {} after {}",
                        names.join(" after "),
                        names[0]
                    ),
                )
                .line(first.line)
                .resource(&first.id)
                .hint("remove one of the `after` edges in the cycle"),
            );
            return None;
        }
    };
    if !diags.is_empty() {
        return None;
    }
    let mut position = vec![0; kept.len()];
    for (pos, &i) in order.iter().enumerate() {
        position[i] = pos;
    }
    let mut slots: Vec<Option<Entry>> = kept.into_iter().map(|p| Some(p.entry)).collect();
    let mut entries: Vec<Entry> = order
        .iter()
        .map(|&i| {
            let mut e = slots[i].take().expect("each index once");
            e.deps = edges[i].iter().map(|&d| position[d]).collect();
            e.notifies = notifies[i].iter().map(|&d| position[d]).collect();
            e
        })
        .collect();
    // What comes after a blocked resource (a service after its secret
    // config) is blocked too: it must not start without it.
    for i in 0..entries.len() {
        if entries[i].blocked.is_none() {
            if let Some(&d) = entries[i]
                .deps
                .iter()
                .find(|&&d| entries[d].blocked.is_some())
            {
                entries[i].blocked = Some(format!("{} to be applied first", entries[d].id));
                entries[i].blocked_after = Some(d);
            }
        }
    }
    Some(Catalog {
        host,
        revision,
        entries,
        stacks: Vec::new(),
    })
}

/// One path, one resource; and below a path only what a directory can
/// hold. Refused (each at the later declaration, with where the other is):
/// - two resources writing one path (`file:` and `absent:` on /x, `file:`
///   and `directory:`, a file on a service's unit file; on macOS, paths
///   differing only in case): every apply would undo the other, flipping
///   the host forever;
/// - a path under a `file`, `symlink` or `absent` resource: under a file
///   nothing can exist, under a symlink the agent never writes, and what an
///   `absent` removes the other would create again.
fn check_path_claims(kept: &[Pending], platform: Platform, diags: &mut Diagnostics) {
    // macOS file systems ignore case by default: `/a/X` and `/a/x` are one
    // file there. (Unicode normalisation, which APFS ignores too, is not
    // folded: that needs tables this crate does not carry.)
    let key = |path: &Path| -> PathBuf {
        match platform {
            Platform::Macos => PathBuf::from(path.to_string_lossy().to_lowercase()),
            Platform::Linux => path.to_path_buf(),
        }
    };
    let mut claims: HashMap<PathBuf, usize> = HashMap::new();
    for (i, p) in kept.iter().enumerate() {
        for path in p.entry.resource.claimed_paths() {
            match claims.get(&key(path)) {
                Some(&j) if j != i => {
                    let first = &kept[j].entry;
                    diags.push(
                        Diagnostic::new(
                            &p.entry.file,
                            format!(
                                "{} is also written by {} (declared at {}:{}); two resources cannot claim one path",
                                path.display(),
                                first.id,
                                first.file,
                                first.line
                            ),
                        )
                        .line(p.entry.line)
                        .resource(&p.entry.id)
                        .hint("keep one of the two: each apply would undo what the other did"),
                    );
                }
                Some(_) => {}
                None => {
                    claims.insert(key(path), i);
                }
            }
        }
    }
    for p in kept {
        for path in p.entry.resource.claimed_paths() {
            let Some((ancestor, j)) = path
                .ancestors()
                .skip(1)
                .find_map(|a| claims.get(&key(a)).map(|&j| (a, j)))
            else {
                continue;
            };
            let parent = &kept[j].entry;
            let why = match parent.resource.kind() {
                "directory" => continue,
                "absent" => "which removes it; this resource would create it again",
                "symlink" => "a symlink; the agent never writes through one",
                _ => "which is not a directory",
            };
            diags.push(
                Diagnostic::new(
                    &p.entry.file,
                    format!(
                        "{} is under {} (declared at {}:{}), {why}",
                        path.display(),
                        parent.id,
                        parent.file,
                        parent.line,
                    ),
                )
                .line(p.entry.line)
                .resource(&p.entry.id)
                .hint(format!(
                    "declare {} as a directory, or move this path out from under it",
                    ancestor.display()
                )),
            );
        }
    }
}

/// `file:/a/../b` and `file:/b` name the same resource.
pub(crate) fn normalize_id(id: &str) -> String {
    match id.split_once(':') {
        Some((kind, ident)) if ident.starts_with('/') => {
            let norm =
                crate::fsops::normalize(Path::new(ident)).unwrap_or_else(|| PathBuf::from(ident));
            format!("{kind}:{}", norm.display())
        }
        _ => id.to_string(),
    }
}

fn closest_id<'a>(wanted: &str, index: &'a HashMap<String, usize>) -> Option<&'a str> {
    let mut ids: Vec<&str> = index.keys().map(String::as_str).collect();
    ids.sort();
    if let Some(id) = super::yaml::closest(wanted, &ids) {
        return Some(id);
    }
    // Same path under another kind (`file:` vs `directory:`).
    let ident = wanted.split_once(':').map_or(wanted, |(_, i)| i);
    ids.into_iter()
        .find(|id| id.split_once(':').is_some_and(|(_, i)| i == ident))
}

/// Kahn's algorithm with ties broken by id, so the order is deterministic.
/// On a cycle returns one cycle's members.
fn topo_order(items: &[Pending], edges: &[BTreeSet<usize>]) -> Result<Vec<usize>, Vec<usize>> {
    let n = items.len();
    let mut indegree = vec![0usize; n];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, deps) in edges.iter().enumerate() {
        indegree[i] = deps.len();
        for &d in deps {
            dependents[d].push(i);
        }
    }
    let key = |i: usize| (items[i].entry.id.as_str(), i);
    let mut ready: BTreeMap<(&str, usize), ()> = (0..n)
        .filter(|&i| indegree[i] == 0)
        .map(|i| (key(i), ()))
        .collect();
    let mut order = Vec::with_capacity(n);
    while let Some(((_, i), ())) = ready.pop_first() {
        order.push(i);
        for &j in &dependents[i] {
            indegree[j] -= 1;
            if indegree[j] == 0 {
                ready.insert(key(j), ());
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    // Walk dependencies from any unfinished node until one repeats.
    let start = (0..n).find(|&i| indegree[i] > 0).expect("a node is left");
    let mut seen: Vec<usize> = Vec::new();
    let mut cur = start;
    loop {
        if let Some(pos) = seen.iter().position(|&s| s == cur) {
            return Err(seen[pos..].to_vec());
        }
        seen.push(cur);
        cur = *edges[cur]
            .iter()
            .find(|&&d| indegree[d] > 0)
            .expect("an unfinished dependency");
    }
}
