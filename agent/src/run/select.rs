//! A run limited to some of the host's resources (`agent plan --target`,
//! `agent apply --target`, as `terraform plan -target` or Ansible's
//! `--limit`).
//!
//! A selector is a resource id (`kind:identity`, [`Entry::id`]),
//! `module:NAME` (every entry of that module) or `stack:NAME` (one
//! Kubernetes stack). The run covers the selected entries and, transitively,
//! what they come after ([`Entry::deps`]) and the services they notify
//! ([`Entry::notifies`]), so a changed config file still restarts its
//! service. [`limit`] cuts the catalog and the inventory down to that set
//! once, before the plan: plan, apply and the stacks then work as for a
//! whole run and never see the rest (not observed, compared, applied or
//! pruned). The one prune a limited run does is an inventory entry named
//! exactly by id that the desired state no longer declares.

use std::collections::{BTreeMap, BTreeSet};

use homelab_agent_state::InventoryEntry;

use crate::desired::catalog::{Catalog, Entry};
use crate::desired::stacks::{ObjectRef, INVENTORY_KIND};

/// The longest `--target` value: a path's limit (PATH_MAX) with room for
/// its kind.
const MAX_SELECTOR_BYTES: usize = 4096;

/// One `--target` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// `kind:identity`, normalised as the catalog's ids are.
    Id(String),
    /// `module:NAME`.
    Module(String),
    /// `stack:NAME`.
    Stack(String),
}

impl Selector {
    /// Parses one `--target` value.
    pub fn parse(text: &str) -> Result<Selector, SelectError> {
        let malformed = |why: &'static str| SelectError::Malformed {
            given: text.to_string(),
            why,
        };
        // Bounds the suggestion search (edit distance against every id).
        if text.len() > MAX_SELECTOR_BYTES {
            return Err(malformed(
                "longer than any resource id (4096 bytes at most)",
            ));
        }
        let (kind, name) = text.split_once(':').ok_or_else(|| {
            malformed("expected a resource id (kind:identity), module:NAME or stack:NAME")
        })?;
        if name.is_empty() {
            return Err(malformed("the part after `:` is empty"));
        }
        Ok(match kind {
            "module" => Selector::Module(name.to_string()),
            "stack" => Selector::Stack(name.to_string()),
            _ => Selector::Id(crate::desired::catalog::normalize_id(text)),
        })
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Id(id) => f.write_str(id),
            Selector::Module(m) => write!(f, "module:{m}"),
            Selector::Stack(s) => write!(f, "stack:{s}"),
        }
    }
}

/// The `--target` values of a run (at least one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection(Vec<Selector>);

impl Selection {
    /// Parses every `--target` value; `None` when there is none (a whole run).
    pub fn parse(texts: &[String]) -> Result<Option<Selection>, SelectError> {
        let mut out: Vec<Selector> = Vec::new();
        for t in texts {
            let s = Selector::parse(t)?;
            if !out.contains(&s) {
                out.push(s);
            }
        }
        Ok((!out.is_empty()).then_some(Selection(out)))
    }

    /// The selectors as given (normalised), for reports and the run record.
    pub fn names(&self) -> Vec<String> {
        self.0.iter().map(ToString::to_string).collect()
    }
}

/// Why a selection cannot be run. Nothing was planned or changed.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error("--target {given}: {why}")]
    Malformed { given: String, why: &'static str },
    #[error(
        "--target matched nothing on host {host}:\n{}\nNothing was planned or changed.",
        .unmatched.iter().map(|u| format!("  {}: {}", u.selector, u.hint)).collect::<Vec<_>>().join("\n")
    )]
    NoMatch {
        host: String,
        unmatched: Vec<Unmatched>,
    },
    /// A caller bug: the catalog of a limited run is cut down in place.
    #[error("internal error: a limited run needs the desired state to itself")]
    Shared,
}

/// A selector that matched nothing, and what the host has instead.
#[derive(Debug)]
pub struct Unmatched {
    pub selector: String,
    pub hint: String,
}

/// What a limited run covers (defined with its reports, which are below
/// `run` in the layers).
pub use crate::report::Limit;

/// Cuts `catalog` and `inventory` down to what `selection` covers (see the
/// module docs), with every entry's dependency indices renumbered. Every
/// selector must match something, else nothing is returned.
pub fn limit(
    catalog: Catalog,
    mut inventory: BTreeMap<String, InventoryEntry>,
    selection: &Selection,
) -> Result<(Catalog, BTreeMap<String, InventoryEntry>, Limit), SelectError> {
    let mut seeds: Vec<usize> = Vec::new();
    let mut leftovers: BTreeSet<String> = BTreeSet::new();
    let mut stacks: BTreeSet<&str> = BTreeSet::new();
    let mut unmatched = Vec::new();
    for s in &selection.0 {
        let found = match s {
            Selector::Id(id) => match catalog.entries.iter().position(|e| &e.id == id) {
                Some(i) => {
                    seeds.push(i);
                    true
                }
                None if inventory.get(id).is_some_and(|e| e.kind != INVENTORY_KIND) => {
                    leftovers.insert(id.clone());
                    true
                }
                None => false,
            },
            Selector::Module(m) => {
                let before = seeds.len();
                seeds.extend(
                    catalog
                        .entries
                        .iter()
                        .enumerate()
                        .filter(|(_, e)| &e.module == m)
                        .map(|(i, _)| i),
                );
                seeds.len() > before
            }
            Selector::Stack(name) => match catalog.stacks.iter().find(|st| st.name() == name) {
                Some(st) => {
                    stacks.insert(st.name());
                    true
                }
                None => false,
            },
        };
        if !found {
            unmatched.push(Unmatched {
                selector: s.to_string(),
                hint: suggest(s, &catalog, &inventory),
            });
        }
    }
    if !unmatched.is_empty() {
        return Err(SelectError::NoMatch {
            host: catalog.host.name.clone(),
            unmatched,
        });
    }
    let deps: Vec<Vec<usize>> = catalog.entries.iter().map(|e| e.deps.clone()).collect();
    let notifies: Vec<Vec<usize>> = catalog.entries.iter().map(|e| e.notifies.clone()).collect();
    let keep = closure(&seeds, &deps, &notifies);
    let stacks: BTreeSet<String> = stacks.into_iter().map(String::from).collect();
    let limit = Limit {
        targets: selection.names(),
        resources: keep.iter().filter(|k| **k).count(),
        of_resources: catalog.entries.len(),
        stacks: stacks.len(),
        of_stacks: catalog.stacks.len(),
        leftovers: leftovers.len(),
    };
    let Catalog {
        host,
        revision,
        entries,
        stacks: all_stacks,
    } = catalog;
    let entries = keep_entries(entries, &keep);
    inventory.retain(|id, e| {
        if e.kind == INVENTORY_KIND {
            ObjectRef::parse_id(id).is_some_and(|(stack, _)| stacks.contains(&stack))
        } else {
            leftovers.contains(id) || entries.iter().any(|en| &en.id == id)
        }
    });
    let catalog = Catalog {
        host,
        revision,
        entries,
        stacks: all_stacks
            .into_iter()
            .filter(|s| stacks.contains(s.name()))
            .collect(),
    };
    Ok((catalog, inventory, limit))
}

/// The entries reachable from `seeds` over `deps` and `notifies` (by
/// index), seeds included.
fn closure(seeds: &[usize], deps: &[Vec<usize>], notifies: &[Vec<usize>]) -> Vec<bool> {
    let mut keep = vec![false; deps.len()];
    let mut todo: Vec<usize> = seeds.to_vec();
    while let Some(i) = todo.pop() {
        if std::mem::replace(&mut keep[i], true) {
            continue;
        }
        todo.extend(deps[i].iter().chain(&notifies[i]).filter(|&&j| !keep[j]));
    }
    keep
}

/// Each kept index's new index (`None`: left out), in the old order.
fn renumber(keep: &[bool]) -> Vec<Option<usize>> {
    let mut next = 0;
    keep.iter()
        .map(|&k| {
            k.then(|| {
                next += 1;
                next - 1
            })
        })
        .collect()
}

/// The kept entries, in their order (still a dependency order), their
/// indices renumbered. `keep` is closed over deps and notifies, so no
/// index points outside it.
fn keep_entries(entries: Vec<Entry>, keep: &[bool]) -> Vec<Entry> {
    let new = renumber(keep);
    let map = |v: &[usize]| -> Vec<usize> { v.iter().filter_map(|&i| new[i]).collect() };
    entries
        .into_iter()
        .zip(keep)
        .filter(|(_, k)| **k)
        .map(|(mut e, _)| {
            e.deps = map(&e.deps);
            e.notifies = map(&e.notifies);
            e.blocked_after = e.blocked_after.and_then(|i| new[i]);
            e
        })
        .collect()
}

/// What to offer for a selector that matched nothing: the nearest names
/// of its sort on this host.
fn suggest(
    s: &Selector,
    catalog: &Catalog,
    inventory: &BTreeMap<String, InventoryEntry>,
) -> String {
    let (what, wanted, known): (&str, &str, Vec<String>) = match s {
        Selector::Id(id) => {
            if id.starts_with(&format!("{INVENTORY_KIND}:")) {
                return "stack objects are selected by their stack: stack:NAME".to_string();
            }
            let (kind, name) = id.split_once(':').unwrap_or((id, ""));
            let kinds: Vec<&str> = crate::resources::REGISTRY
                .iter()
                .map(|k| k.name())
                .collect();
            if !kinds.contains(&kind) {
                let mut words = kinds.clone();
                words.extend(["module", "stack"]);
                return match crate::syntax::yaml::closest(kind, &words) {
                    Some(w) => format!("`{kind}` is not a resource kind; did you mean {w}:{name}?"),
                    None => format!(
                        "`{kind}` is not a resource kind ({}), nor module or stack",
                        kinds.join(", ")
                    ),
                };
            }
            let mut ids: Vec<String> = catalog.entries.iter().map(|e| e.id.clone()).collect();
            ids.extend(
                inventory
                    .iter()
                    .filter(|(_, e)| e.kind != INVENTORY_KIND)
                    .map(|(id, _)| id.clone()),
            );
            ("no resource with that id", id, ids)
        }
        Selector::Module(m) => (
            "no resource of this host comes from a module of that name",
            m,
            catalog
                .entries
                .iter()
                .map(|e| e.module.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
        ),
        Selector::Stack(st) => (
            "this host has no stack of that name",
            st,
            catalog
                .stacks
                .iter()
                .map(|s| s.name().to_string())
                .collect(),
        ),
    };
    let mut known = known;
    known.sort();
    known.dedup();
    let prefix = match s {
        Selector::Id(_) => "",
        Selector::Module(_) => "module:",
        Selector::Stack(_) => "stack:",
    };
    let refs: Vec<&str> = known.iter().map(String::as_str).collect();
    let near: Vec<&str> = match crate::syntax::yaml::closest(wanted, &refs) {
        Some(k) => vec![k],
        None => {
            // Hand-written on purpose: a substring of the identity (`zot`
            // for `file:/usr/local/etc/zot/config.json`) finds what edit
            // distance misses.
            let ident = wanted.split_once(':').map_or(wanted, |(_, i)| i);
            let ident = ident.trim_matches('/');
            refs.iter()
                .copied()
                .filter(|k| !ident.is_empty() && k.contains(ident))
                .collect()
        }
    };
    let shown = |list: &[&str]| -> String {
        let mut items: Vec<String> = list
            .iter()
            .take(8)
            .map(|k| format!("{prefix}{k}"))
            .collect();
        if list.len() > 8 {
            items.push(format!("and {} more", list.len() - 8));
        }
        items.join(", ")
    };
    if !near.is_empty() {
        format!("{what}; did you mean {}?", shown(&near))
    } else if known.is_empty() {
        format!(
            "{what}; this host has none{}",
            match s {
                Selector::Id(_) => " (ids are kind:identity; `agent plan` lists them)",
                _ => "",
            }
        )
    } else {
        match s {
            Selector::Id(_) => format!(
                "{what}; ids are kind:identity as `agent plan` shows them, e.g. {}",
                shown(&refs[..refs.len().min(3)])
            ),
            _ => format!("{what}; this host has {}", shown(&refs)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// 0 ← 1 ← 2 (deps: 1 after 0, 2 after 1), 3 notifies 4, 4 after 5,
    /// 6 alone.
    fn graph() -> (Vec<Vec<usize>>, Vec<Vec<usize>>) {
        let deps = vec![vec![], vec![0], vec![1], vec![], vec![3, 5], vec![], vec![]];
        let notifies = vec![vec![], vec![], vec![], vec![4], vec![], vec![], vec![]];
        (deps, notifies)
    }

    fn kept(keep: &[bool]) -> Vec<usize> {
        keep.iter()
            .enumerate()
            .filter(|(_, k)| **k)
            .map(|(i, _)| i)
            .collect()
    }

    #[test]
    fn the_closure_follows_deps_and_notifies_transitively() {
        let (deps, notifies) = graph();
        // What 2 comes after, and after that.
        assert_eq!(kept(&closure(&[2], &deps, &notifies)), [0, 1, 2]);
        // The service 3 notifies, and what that service comes after.
        assert_eq!(kept(&closure(&[3], &deps, &notifies)), [3, 4, 5]);
        // Not the other way: what comes after 0 is not in.
        assert_eq!(kept(&closure(&[0], &deps, &notifies)), [0]);
        assert_eq!(kept(&closure(&[6, 0], &deps, &notifies)), [0, 6]);
        assert_eq!(kept(&closure(&[], &deps, &notifies)), Vec::<usize>::new());
    }

    #[test]
    fn renumbering_keeps_the_order() {
        assert_eq!(
            renumber(&[false, true, true, false, true]),
            [None, Some(0), Some(1), None, Some(2)]
        );
    }

    fn catalog(host: &str, modules: &[(&str, &str)]) -> Catalog {
        let tmp = tempfile::tempdir().unwrap();
        let write = |rel: &str, text: &str| {
            let p = tmp.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        write("hosts/lab.yaml", host);
        for (name, text) in modules {
            write(&format!("modules/{name}/module.yaml"), text);
        }
        let source = crate::source::LocalDir::open(tmp.path()).unwrap();
        crate::desired::load(Arc::new(source), "lab").unwrap()
    }

    const HOST: &str = "platform: linux\nroots: [/srv]\nmodules:\n  - name: app\n  - name: other\n";
    const APP: &str = r#"params: {}
resources:
  - directory: /srv/app
  - file: /srv/app/app.conf
    content: "port = 1\n"
    notify: [service:app]
  - service: app
    program: /usr/bin/app
    after: [file:/srv/app/unit-helper]
  - file: /srv/app/unit-helper
    content: "x\n"
  - file: /srv/app/unrelated
    content: "y\n"
"#;
    const OTHER: &str = r#"params: {}
resources:
  - directory: /srv/other
  - file: /srv/other/a
    content: "a\n"
"#;

    fn ids(c: &Catalog) -> Vec<&str> {
        c.entries.iter().map(|e| e.id.as_str()).collect()
    }

    fn sel(texts: &[&str]) -> Selection {
        Selection::parse(&texts.iter().map(|t| t.to_string()).collect::<Vec<_>>())
            .unwrap()
            .unwrap()
    }

    /// A config file brings its directory, the service it notifies and
    /// what that service comes after; every index still points at the same
    /// entry as before.
    #[test]
    fn a_limited_catalog_keeps_its_dependency_indices_right() {
        let full = catalog(HOST, &[("app", APP), ("other", OTHER)]);
        let before: BTreeMap<String, (Vec<String>, Vec<String>)> = full
            .entries
            .iter()
            .map(|e| {
                let names = |v: &[usize]| v.iter().map(|&i| full.entries[i].id.clone()).collect();
                (e.id.clone(), (names(&e.deps), names(&e.notifies)))
            })
            .collect();
        let (c, _, limit) =
            limit(full, BTreeMap::new(), &sel(&["file:/srv/app/./app.conf"])).unwrap();
        let mut got = ids(&c);
        got.sort();
        assert_eq!(
            got,
            [
                "directory:/srv/app",
                "file:/srv/app/app.conf",
                "file:/srv/app/unit-helper",
                "service:app",
            ]
        );
        for e in &c.entries {
            let names: Vec<String> = e.deps.iter().map(|&i| c.entries[i].id.clone()).collect();
            let notified: Vec<String> = e
                .notifies
                .iter()
                .map(|&i| c.entries[i].id.clone())
                .collect();
            assert_eq!((names, notified), before[&e.id], "{}", e.id);
            // Still a dependency order.
            assert!(e.deps.iter().all(|&d| ids(&c)[d] != e.id));
            let me = c.entries.iter().position(|x| x.id == e.id).unwrap();
            assert!(e.deps.iter().all(|&d| d < me), "{}", e.id);
        }
        assert_eq!((limit.resources, limit.of_resources), (4, 7));
        assert_eq!(limit.targets, ["file:/srv/app/app.conf"]);
    }

    #[test]
    fn a_module_selects_all_its_entries_and_only_a_named_leftover_stays_in_the_inventory() {
        let full = catalog(HOST, &[("app", APP), ("other", OTHER)]);
        let entry = |kind: &str| InventoryEntry {
            kind: kind.into(),
            module: "other".into(),
            digest: Some("d".into()),
            origin: homelab_agent_state::Origin::Created,
            held_secrets: false,
            rolled_back: None,
        };
        let inventory: BTreeMap<String, InventoryEntry> = [
            ("file:/srv/other/a".to_string(), entry("file")),
            ("file:/srv/app/app.conf".to_string(), entry("file")),
            ("file:/srv/gone-1".to_string(), entry("file")),
            ("file:/srv/gone-2".to_string(), entry("file")),
            ("k8s:web/web/ConfigMap/x".to_string(), entry("k8s")),
        ]
        .into();
        let (c, inv, limit) =
            limit(full, inventory, &sel(&["module:other", "file:/srv/gone-1"])).unwrap();
        assert_eq!(ids(&c), ["directory:/srv/other", "file:/srv/other/a"]);
        assert_eq!(
            inv.keys().map(String::as_str).collect::<Vec<_>>(),
            ["file:/srv/gone-1", "file:/srv/other/a"]
        );
        assert_eq!(limit.leftovers, 1);
        assert_eq!((limit.stacks, limit.of_stacks), (0, 0));
    }

    #[test]
    fn a_selector_that_matches_nothing_names_the_nearest() {
        let full = catalog(HOST, &[("app", APP), ("other", OTHER)]);
        let err = limit(
            full,
            BTreeMap::new(),
            &sel(&[
                "module:ap",
                "file:/srv/app/app.cnf",
                "stack:web",
                "file:/srv/nothing-like-it",
                "modul:app",
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("module:ap: no resource of this host comes from a module of that name; did you mean module:app?"), "{err}");
        assert!(err.contains("file:/srv/app/app.cnf: no resource with that id; did you mean file:/srv/app/app.conf?"), "{err}");
        assert!(
            err.contains("stack:web: this host has no stack of that name; this host has none"),
            "{err}"
        );
        assert!(
            err.contains(
                "file:/srv/nothing-like-it: no resource with that id; ids are kind:identity"
            ),
            "{err}"
        );
        assert!(
            err.contains("modul:app: `modul` is not a resource kind; did you mean module:app?"),
            "{err}"
        );
        assert!(err.ends_with("Nothing was planned or changed."), "{err}");
    }

    #[test]
    fn selectors_parse() {
        assert_eq!(
            Selector::parse("module:zot").unwrap(),
            Selector::Module("zot".into())
        );
        assert_eq!(
            Selector::parse("stack:web").unwrap(),
            Selector::Stack("web".into())
        );
        assert_eq!(
            Selector::parse("file:/a/../b").unwrap(),
            Selector::Id("file:/b".into())
        );
        assert!(Selector::parse("zot").is_err());
        assert!(Selector::parse("module:").is_err());
        let long = format!("file:/{}", "a".repeat(MAX_SELECTOR_BYTES));
        assert!(Selector::parse(&long)
            .unwrap_err()
            .to_string()
            .contains("longer than any resource id"));
        assert_eq!(Selection::parse(&[]).unwrap(), None);
    }
}
