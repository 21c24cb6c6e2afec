//! Stage 2, *desired*: turns a [`Source`] revision into a validated
//! [`Catalog`] for one host.
//!
//! Reads `hosts/<host>.yaml`, expands each module use (typed params with
//! defaults, `when:` conditions, minijinja templates) into resources through
//! the kind registry, then checks the whole: ids, paths inside the host's
//! roots, `after` edges, cycles. Every problem is collected; any problem
//! rejects the whole revision ([`DesiredError::Invalid`]). Nothing here
//! touches the managed host.

pub mod catalog;
pub mod model;
pub mod render;
pub mod stacks;

pub use crate::syntax::{diag, yaml};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use catalog::{Catalog, Entry, HostInfo, Pending};
use diag::{Diagnostic, Diagnostics};
use model::{DriftPolicy, ModuleSpec};
use render::ModuleEnv;
use yaml::{MapReader, Node, Value};

use crate::resources::{self, Assets, IdentityKind, ParseInput};
use crate::source::{Source, SourceError};

/// Why a host's desired state could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DesiredError {
    #[error("no host `{name}` in {repo}: there is no hosts/{name}.yaml\n  known hosts: {}\n  pass --host with one of them", if known.is_empty() { "(none)".to_string() } else { known.join(", ") })]
    UnknownHost {
        name: String,
        repo: String,
        known: Vec<String>,
    },
    #[error("the desired state is invalid ({} problem{}); nothing was changed:\n{diags}", diags.len(), if diags.len() == 1 { "" } else { "s" })]
    Invalid { diags: Diagnostics },
    #[error(transparent)]
    Source(#[from] SourceError),
}

const WHEN_HINT: &str =
    "`when` is a Jinja expression over params.*, vars.* and host.*, e.g. when: params.auth_enabled";

/// Keys every resource may have, besides its kind's own.
const COMMON_KEYS: &[&str] = &["after", "notify", "on_drift", "when"];

pub use crate::syntax::{unsafe_path_char, UNSAFE_CHAR_HINT};

/// Host names defined in the source (`hosts/*.yaml`).
pub fn host_names(source: &dyn Source) -> Result<Vec<String>, SourceError> {
    Ok(source
        .list("hosts")?
        .into_iter()
        .filter_map(|n| n.strip_suffix(".yaml").map(str::to_string))
        .collect())
}

/// A refused repository path ([`SourceError::Refused`]: a symlink, a FIFO,
/// a file over the size limit) as a diagnostic at `at` (the file and line
/// that name the path), or at the path itself. Other errors stay errors.
pub(crate) fn refusal_diag(
    err: SourceError,
    at: Option<(&str, usize)>,
) -> Result<Diagnostic, SourceError> {
    let Some((path, why)) = err.refusal() else {
        return Err(err);
    };
    let d = match at {
        Some((file, line)) => Diagnostic::new(file, why.message(path)).line(line),
        None => Diagnostic::new(path, why.message(path)),
    };
    Ok(d.hint(why.hint()))
}

/// Reads and parses a YAML file; `at` is where it is named (a module use).
fn read_yaml(
    source: &dyn Source,
    file: &str,
    at: Option<(&str, usize)>,
    diags: &mut Diagnostics,
) -> Result<Option<Node>, SourceError> {
    let bytes = match source.read(file) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return Ok(None),
        Err(e) => {
            diags.push(refusal_diag(e, at)?);
            return Ok(None);
        }
    };
    let Ok(text) = String::from_utf8(bytes) else {
        diags.push(Diagnostic::new(file, "file is not UTF-8 text"));
        return Ok(Some(Node {
            value: Value::Null,
            line: 1,
        }));
    };
    // An empty file is never meant: it is most often one caught half-written
    // (an editor truncates, then writes), and reading it as "no resources"
    // would prune everything the file declared.
    if text.trim().is_empty() {
        diags.push(
            Diagnostic::new(file, "file is empty")
                .line(1)
                .hint("an empty host or module file is refused so it cannot prune what it declared; write its content, or remove the module use"),
        );
        return Ok(Some(Node {
            value: Value::Null,
            line: 1,
        }));
    }
    match yaml::parse(file, &text) {
        Ok(node) => Ok(Some(node)),
        Err(errors) => {
            diags.extend(errors);
            Ok(None)
        }
    }
}

/// Loads and validates the catalog of `host` (drift policy default: heal;
/// no secrets: resources that need them are marked blocked).
pub fn load(source: Arc<dyn Source>, host: &str) -> Result<Catalog, DesiredError> {
    load_with(source, host, &LoadOptions::default())
}

/// Settings of one load.
#[derive(Clone)]
pub struct LoadOptions {
    /// The agent config's default `on_drift`, used where neither the
    /// resource, the module use nor the host says.
    pub default_policy: DriftPolicy,
    /// Where `secret("op://...")` resolves.
    pub secrets: Arc<dyn crate::secrets::resolve::SecretSource>,
    /// The agent's state directory as a managed path (inside the sandbox
    /// with `--root`), which no root may contain and no resource may touch.
    /// `None`: the default of the host's platform.
    pub state_dir: Option<PathBuf>,
}

/// The state directory the agent uses on a host of `platform` unless its
/// config says otherwise (what `agent validate` protects without a config).
pub fn default_state_dir(platform: resources::Platform) -> PathBuf {
    match platform {
        resources::Platform::Macos => PathBuf::from("/usr/local/var/homelab-agent"),
        resources::Platform::Linux => PathBuf::from("/var/lib/homelab-agent"),
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            default_policy: DriftPolicy::Heal,
            secrets: Arc::new(crate::secrets::resolve::Offline),
            state_dir: None,
        }
    }
}

/// [`load`] with explicit options.
pub fn load_with(
    source: Arc<dyn Source>,
    host: &str,
    opts: &LoadOptions,
) -> Result<Catalog, DesiredError> {
    match load_inner(source, host, opts) {
        // A refusal no caller placed at a line (a listing through a
        // symlink): still a problem of the desired state, never a half-read.
        Err(DesiredError::Source(e)) if e.refusal().is_some() => Err(DesiredError::Invalid {
            diags: Diagnostics::one(refusal_diag(e, None)?),
        }),
        other => other,
    }
}

fn load_inner(
    source: Arc<dyn Source>,
    host: &str,
    opts: &LoadOptions,
) -> Result<Catalog, DesiredError> {
    let default_policy = opts.default_policy;
    let secret_usage: Arc<std::sync::Mutex<render::SecretUsage>> = Arc::default();
    let budget: Arc<render::RenderBudget> = Arc::default();
    let host_file = format!("hosts/{host}.yaml");
    let mut diags = Diagnostics::default();
    let valid_name = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !host.starts_with('.');
    let doc = if valid_name {
        read_yaml(&*source, &host_file, None, &mut diags)?
    } else {
        None
    };
    if doc.is_none() && diags.is_empty() {
        return Err(DesiredError::UnknownHost {
            name: host.to_string(),
            repo: source.describe(),
            known: host_names(&*source)?,
        });
    }
    let spec = doc.and_then(|doc| model::parse_host(host, &host_file, &doc, &mut diags));
    let Some(spec) = spec else {
        return Err(DesiredError::Invalid {
            diags: diags.sorted(),
        });
    };
    let state_dir = opts
        .state_dir
        .clone()
        .unwrap_or_else(|| default_state_dir(spec.platform));
    check_roots(&spec, &state_dir, &mut diags);
    // With broken roots every path would also be reported "outside the roots".
    let roots_ok = !diags
        .iter()
        .any(|d| d.message.contains("roots") || d.message.contains("root `"));
    let host_info = HostInfo {
        name: spec.name.clone(),
        platform: spec.platform,
        roots: spec.roots.clone(),
    };
    let host_value = map_value([
        (
            "name".to_string(),
            minijinja::Value::from(spec.name.as_str()),
        ),
        (
            "platform".to_string(),
            minijinja::Value::from(spec.platform.name()),
        ),
    ]);
    let vars_value = spec.vars.to_template_value();

    let mut modules: HashMap<String, Option<(ModuleSpec, Arc<ModuleEnv>)>> = HashMap::new();
    let mut pending = Vec::new();
    let mut refused = std::collections::HashSet::new();
    let mut unread = catalog::Unread::default();
    for usage in &spec.modules {
        if !modules.contains_key(&usage.name) {
            let before = diags.len();
            let at = (host_file.as_str(), usage.line);
            let loaded = load_module(
                &source,
                &usage.name,
                at,
                opts,
                (&secret_usage, &budget),
                &mut diags,
            )?;
            if loaded.is_none() && diags.len() > before {
                // Already explained (a refused or broken module file).
                refused.insert(usage.name.clone());
            }
            modules.insert(usage.name.clone(), loaded);
        }
        let refused = refused.contains(&usage.name);
        let Some((module, env)) = modules.get(&usage.name).and_then(Option::as_ref) else {
            unread.module();
            let mut known: Vec<String> = source
                .list("modules")?
                .into_iter()
                .filter(|m| !m.starts_with('.'))
                .collect();
            known.sort();
            if !refused
                && !diags
                    .iter()
                    .any(|d| d.file.starts_with(&format!("modules/{}/", usage.name)))
            {
                diags.push(
                    Diagnostic::new(
                        &host_file,
                        format!(
                            "unknown module `{}`: there is no modules/{}/module.yaml",
                            usage.name, usage.name
                        ),
                    )
                    .line(usage.line)
                    .hint(format!("available modules: {}", known.join(", "))),
                );
            }
            continue;
        };
        let before = diags.len();
        let params = model::bind_params(module, usage, &host_file, &mut diags);
        if diags.len() > before {
            // Rendering with broken params would only add confusing errors.
            for node in &module.resources {
                unread.resource(raw_id(node));
            }
            continue;
        }
        let ctx = map_value([
            (
                "params".to_string(),
                map_value(
                    params
                        .iter()
                        .map(|(k, v)| (k.clone(), v.to_template_value())),
                ),
            ),
            ("vars".to_string(), vars_value.clone()),
            ("host".to_string(), host_value.clone()),
        ]);
        let policy = usage.on_drift.or(spec.on_drift).unwrap_or(default_policy);
        let expander = Expander {
            source: &source,
            module,
            env,
            ctx: &ctx,
            roots: &spec.roots,
            roots_ok,
            state_dir: &state_dir,
            host_file: &host_file,
            use_line: usage.line,
            policy,
            platform: spec.platform,
            secrets: &secret_usage,
        };
        for node in &module.resources {
            let before = diags.len();
            match expander.resource(node, &mut diags) {
                Some(p) => pending.push(p),
                None if diags.len() > before => unread.resource(raw_id(node)),
                None => {}
            }
        }
    }
    let stack_cx = crate::desired::stacks::load::StackContext {
        host_file: &host_file,
        host: &spec.name,
        vars: vars_value.clone(),
        host_value: host_value.clone(),
        policy: spec.on_drift.unwrap_or(default_policy),
        secrets: opts.secrets.clone(),
        budget: budget.clone(),
    };
    let stacks =
        crate::desired::stacks::load::load_stacks(&source, &spec.stacks, &stack_cx, &mut diags)?;
    // The catalog's checks (ids, `after`, `notify`, cycles) run on what was
    // read even when something else is wrong: every problem at once.
    let revision = source.revision();
    match catalog::build(host_info, revision, pending, &unread, &mut diags) {
        Some(mut catalog) if diags.is_empty() => {
            catalog.stacks = stacks;
            Ok(catalog)
        }
        _ => Err(DesiredError::Invalid {
            diags: diags.sorted(),
        }),
    }
}

/// No root may hold the agent's state directory (its database, lock, key
/// and git cache) or lie inside it: a resource there would corrupt the
/// state. `/` with `whole_filesystem: true` is allowed; then each path is
/// still kept out of it ([`Expander::check_path`]).
fn check_roots(spec: &model::HostSpec, state_dir: &Path, diags: &mut Diagnostics) {
    for (root, &line) in spec.roots.iter().zip(&spec.root_lines) {
        let whole = spec.whole_filesystem && root.as_path() == Path::new("/");
        let what = if state_dir.starts_with(root) && !whole {
            "holds"
        } else if root.starts_with(state_dir) {
            "is inside"
        } else {
            continue;
        };
        diags.push(
            Diagnostic::new(
                &spec.file,
                format!(
                    "root `{}` {what} the agent's state directory {}",
                    root.display(),
                    state_dir.display()
                ),
            )
            .line(line)
            .hint("the agent never manages its own state: list narrower roots, or move the state directory (`state_dir:` in the agent config)"),
        );
    }
}

/// `kind:identity` of a resource before rendering, for messages about it.
fn raw_id(node: &Node) -> String {
    match &node.value {
        Value::Map(entries) => match entries.first() {
            Some((
                kind,
                Node {
                    value: Value::Str(ident),
                    ..
                },
            )) => format!("{kind}:{ident}"),
            Some((kind, _)) => kind.clone(),
            None => String::from("(empty resource)"),
        },
        _ => String::from("(resource)"),
    }
}

fn map_value(pairs: impl IntoIterator<Item = (String, minijinja::Value)>) -> minijinja::Value {
    minijinja::Value::from(
        pairs
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>(),
    )
}

fn load_module(
    source: &Arc<dyn Source>,
    name: &str,
    at: (&str, usize),
    opts: &LoadOptions,
    (usage, budget): (
        &Arc<std::sync::Mutex<render::SecretUsage>>,
        &Arc<render::RenderBudget>,
    ),
    diags: &mut Diagnostics,
) -> Result<Option<(ModuleSpec, Arc<ModuleEnv>)>, SourceError> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Ok(None);
    }
    let file = format!("modules/{name}/module.yaml");
    let Some(doc) = read_yaml(&**source, &file, Some(at), diags)? else {
        return Ok(None);
    };
    let Some(spec) = model::parse_module(name, &file, &doc, diags) else {
        return Ok(None);
    };
    let env = ModuleEnv::with_secrets(
        source.clone(),
        name,
        opts.secrets.clone(),
        usage.clone(),
        budget.clone(),
    );
    Ok(Some((spec, Arc::new(env))))
}

/// Expands one module use's resources.
struct Expander<'a> {
    source: &'a Arc<dyn Source>,
    module: &'a ModuleSpec,
    env: &'a ModuleEnv,
    ctx: &'a minijinja::Value,
    roots: &'a [PathBuf],
    /// False when the host's `roots` were invalid: skip the roots check.
    roots_ok: bool,
    /// The agent's state directory (managed-path view).
    state_dir: &'a Path,
    host_file: &'a str,
    /// Line of this module use in the host file.
    use_line: usize,
    policy: DriftPolicy,
    platform: resources::Platform,
    /// What `secret()` calls recorded while rendering the current resource.
    secrets: &'a Arc<std::sync::Mutex<render::SecretUsage>>,
}

impl Expander<'_> {
    fn file(&self) -> &str {
        &self.module.file
    }

    /// Renders every string in `node` (template syntax is optional).
    fn render_node(&self, node: &Node, diags: &mut Diagnostics) -> Node {
        let value = match &node.value {
            Value::Str(s) => match self.env.render_str(s, self.ctx) {
                Ok(out) => Value::Str(out),
                Err(e) => {
                    let (_, line) = render::location(&e);
                    let at = match line {
                        Some(l) if s.lines().count() > 1 => {
                            format!(" (line {l} of the template string)")
                        }
                        _ => String::new(),
                    };
                    let snippet: String = s
                        .lines()
                        .nth(line.unwrap_or(1).saturating_sub(1))
                        .unwrap_or(s)
                        .trim()
                        .chars()
                        .take(80)
                        .collect();
                    diags.push(
                        Diagnostic::new(
                            self.file(),
                            format!(
                                "template error{at} in `{snippet}`: {}",
                                render::describe(&e)
                            ),
                        )
                        .line(node.line)
                        .hint(if render::is_limit(&e) {
                            render::LIMIT_HINT
                        } else {
                            "templates see params.*, vars.* and host.name / host.platform"
                        }),
                    );
                    Value::Str(String::new())
                }
            },
            Value::Seq(items) => {
                Value::Seq(items.iter().map(|n| self.render_node(n, diags)).collect())
            }
            Value::Map(entries) => Value::Map(
                entries
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            if k == "when" {
                                v.clone()
                            } else if k == "content" {
                                self.allowing_secrets(|| self.render_node(v, diags))
                            } else {
                                self.render_node(v, diags)
                            },
                        )
                    })
                    .collect(),
            ),
            other => other.clone(),
        };
        Node {
            value,
            line: node.line,
        }
    }

    /// Runs `f` with `secret()` allowed (rendering a file's content).
    fn allowing_secrets<T>(&self, f: impl FnOnce() -> T) -> T {
        self.secrets.lock().unwrap().allowed = true;
        let out = f();
        self.secrets.lock().unwrap().allowed = false;
        out
    }

    /// The content of `raw` (a file's `content` or `template`) rendered with
    /// every `secret()` as the redaction marker: what a plan may show of a
    /// file holding secrets. Rendering again, rather than replacing values
    /// in the real content, also hides values a filter transformed
    /// (`tojson`, `upper`, ...). `None` when it does not render that way.
    fn masked_content(&self, raw: &Node) -> Option<Vec<u8>> {
        let Value::Map(entries) = &raw.value else {
            return None;
        };
        let get = |key: &str| {
            entries
                .iter()
                .find(|(k, _)| k == key)
                .and_then(|(_, v)| v.as_str())
        };
        self.secrets.lock().unwrap().mask = true;
        let rendered = self.allowing_secrets(|| match (get("content"), get("template")) {
            (Some(text), _) => self.env.render_str(text, self.ctx).ok(),
            (None, Some(name)) => self
                .env
                .render_str(name, self.ctx)
                .and_then(|name| self.env.render_template(&name, self.ctx))
                .ok(),
            _ => None,
        });
        let mut usage = self.secrets.lock().unwrap();
        usage.mask = false;
        debug_assert!(usage.values.is_empty(), "masked rendering resolves nothing");
        rendered.map(String::into_bytes)
    }

    fn resource(&self, raw: &Node, diags: &mut Diagnostics) -> Option<Pending> {
        let file = self.file();
        if !matches!(raw.value, Value::Map(_)) {
            diags.push(
                Diagnostic::new(
                    file,
                    format!(
                        "a resource must be a map such as `- file: /path`, found {}",
                        raw.value.type_name()
                    ),
                )
                .line(raw.line),
            );
            return None;
        }
        // `when:` decides whether the resource exists at all.
        if let Value::Map(entries) = &raw.value {
            if let Some((_, cond)) = entries.iter().find(|(k, _)| k == "when") {
                let Some(expr) = cond.as_str() else {
                    diags.push(
                        Diagnostic::new(file, "`when` must be a string holding a Jinja expression")
                            .line(cond.line),
                    );
                    return None;
                };
                match self.env.eval_condition(expr, self.ctx) {
                    Ok(true) => {}
                    Ok(false) => return None,
                    Err(e) => {
                        let what = format!(
                            "`when: {expr}` cannot be evaluated: {}",
                            render::describe(&e)
                        );
                        diags.push(
                            Diagnostic::new(file, what)
                                .line(cond.line)
                                .resource(raw_id(raw))
                                .hint(if render::is_limit(&e) {
                                    render::LIMIT_HINT
                                } else {
                                    WHEN_HINT
                                }),
                        );
                        return None;
                    }
                }
            }
        }
        let before_render = diags.len();
        *self.secrets.lock().unwrap() = render::SecretUsage::default();
        let node = self.render_node(raw, diags);
        if diags.len() > before_render {
            return None;
        }
        let kind_key = match &node.value {
            Value::Map(entries) => entries.first().map(|(k, _)| k.clone()).unwrap_or_default(),
            _ => unreachable!("checked above"),
        };
        let Some(kind) = resources::kind(&kind_key) else {
            let kinds: Vec<&str> = resources::REGISTRY.iter().map(|k| k.name()).collect();
            let suggestion = yaml::closest(&kind_key, &kinds)
                .map(|k| format!("did you mean `{k}`? "))
                .unwrap_or_default();
            diags.push(
                Diagnostic::new(file, format!("unknown resource kind `{kind_key}`"))
                    .line(node.line)
                    .resource(raw_id(raw))
                    .hint(format!(
                        "{suggestion}a resource starts with its kind: {}",
                        kinds.join(", ")
                    )),
            );
            return None;
        };
        let mut fields = MapReader::new(file, format!("resource {kind_key}"), &node, diags)?;
        let identity_node = fields.take(&kind_key).expect("the first key");
        let Some(raw_identity) = identity_node.as_str() else {
            diags.push(
                Diagnostic::new(
                    file,
                    format!(
                        "`{kind_key}:` must be followed by a {}, found {}",
                        match kind.identity_kind() {
                            IdentityKind::Path => "path",
                            IdentityKind::Name => "name",
                        },
                        identity_node.value.type_name()
                    ),
                )
                .line(identity_node.line),
            );
            return None;
        };
        let identity = match kind.identity_kind() {
            IdentityKind::Path => {
                self.check_path(kind_key.as_str(), raw_identity, identity_node.line, diags)?
            }
            IdentityKind::Name => {
                if !resources::valid_name(raw_identity) {
                    diags.push(
                        Diagnostic::new(
                            file,
                            format!("`{kind_key}: {raw_identity}` is not a valid name"),
                        )
                        .line(identity_node.line)
                        .resource(format!("{kind_key}:{raw_identity}"))
                        .hint("use letters, digits and . _ @ + - (starting with a letter or digit), at most 128 characters"),
                    );
                    return None;
                }
                raw_identity.to_string()
            }
        };
        let id = format!("{kind_key}:{identity}");
        let mut fields = fields.for_resource(id.clone());
        fields = {
            let mut f = fields;
            f.line = node.line;
            f
        };
        let after = fields.string_list("after", diags).unwrap_or_default();
        let notify: Vec<(String, usize)> = fields
            .string_list("notify", diags)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(n, line)| {
                if n.split_once(':')
                    .is_some_and(|(k, i)| !k.is_empty() && !i.is_empty())
                {
                    Some((n, line))
                } else {
                    diags.push(
                        fields
                            .diag(line, format!("`notify` entry `{n}` is not a resource id"))
                            .hint("write kind:name, e.g. service:zot"),
                    );
                    None
                }
            })
            .collect();
        let on_drift = model::on_drift(&mut fields, diags).unwrap_or(self.policy);
        fields.take("when");
        let assets = ModuleAssets {
            expander: self,
            id: &id,
        };
        let before = diags.len();
        let resource = kind.parse(ParseInput {
            id: &id,
            platform: self.platform,
            identity: &identity,
            fields: &mut fields,
            assets: &assets,
            diags,
        });
        let mut known: Vec<&str> = vec![kind.name()];
        known.extend(kind.fields());
        known.extend(COMMON_KEYS);
        fields.finish(&known, diags);
        let mut resource = resource.filter(|_| diags.len() == before)?;
        let used = std::mem::take(&mut *self.secrets.lock().unwrap());
        let blocked = (!used.failures.is_empty()).then(|| {
            used.failures
                .iter()
                .map(|(r, e)| format!("{r}: {e}"))
                .collect::<Vec<_>>()
                .join("; ")
        });
        let preview = if used.values.is_empty() {
            None
        } else {
            self.masked_content(raw)
        };
        resource.set_secrets(used.values, preview);
        let mut hasher = blake3::Hasher::new();
        hasher.update(id.as_bytes());
        hasher.update(b"\0");
        resource.digest(&mut hasher);
        Some(Pending {
            entry: Entry {
                id,
                module: self.module.name.clone(),
                file: file.to_string(),
                line: node.line,
                resource,
                deps: Vec::new(),
                notify: notify.iter().map(|(n, _)| n.clone()).collect(),
                notifies: Vec::new(),
                used_at: format!("{}:{}", self.host_file, self.use_line),
                blocked,
                blocked_after: None,
                on_drift,
                digest: hasher.finalize().to_hex()[..32].to_string(),
            },
            after,
            notify,
        })
    }

    /// Absolute, normalised, inside the host's roots.
    fn check_path(
        &self,
        kind: &str,
        raw: &str,
        line: usize,
        diags: &mut Diagnostics,
    ) -> Option<String> {
        if raw.chars().any(unsafe_path_char) {
            // Escaped: the raw text would forge lines of this very message.
            let shown = raw.escape_debug().to_string();
            diags.push(
                Diagnostic::new(
                    self.file(),
                    format!("path `{shown}` holds a control or invisible character"),
                )
                .line(line)
                .resource(format!("{kind}:{shown}"))
                .hint(UNSAFE_CHAR_HINT),
            );
            return None;
        }
        let id = format!("{kind}:{raw}");
        let path = Path::new(raw);
        let Some(norm) = crate::fsops::normalize(path) else {
            diags.push(
                Diagnostic::new(self.file(), format!("path `{raw}` is relative"))
                    .line(line)
                    .resource(&id)
                    .hint("managed paths are absolute, e.g. /usr/local/etc/zot/config.json"),
            );
            return None;
        };
        let inside = !self.roots_ok || self.roots.iter().any(|r| norm.starts_with(r));
        if norm.as_path() != path || raw.ends_with('/') && raw != "/" {
            let mut d = Diagnostic::new(
                self.file(),
                format!(
                    "path `{raw}` is not normalised: it resolves to {}",
                    norm.display()
                ),
            )
            .line(line)
            .resource(&id);
            d = if inside {
                d.hint(format!("write it as {}", norm.display()))
            } else {
                d.hint(format!(
                    "`..` escapes the host's roots ({}); the agent manages only paths inside them",
                    self.roots_list()
                ))
            };
            diags.push(d);
            return None;
        }
        // Inside the state directory, or replacing one of its parents.
        if norm.starts_with(self.state_dir)
            || kind != "directory" && self.state_dir.starts_with(&norm)
        {
            diags.push(
                Diagnostic::new(
                    self.file(),
                    format!(
                        "path {raw} would change the agent's state directory {}",
                        self.state_dir.display()
                    ),
                )
                .line(line)
                .resource(&id)
                .hint("the agent never manages its own state; choose another path"),
            );
            return None;
        }
        if !inside {
            diags.push(
                Diagnostic::new(
                    self.file(),
                    format!(
                        "path {raw} is outside the host's roots ({})",
                        self.roots_list()
                    ),
                )
                .line(line)
                .resource(&id)
                .hint(
                    "add a root for it in the host file, or move the path under an existing root",
                ),
            );
            return None;
        }
        Some(norm.to_str().expect("from a str").to_string())
    }

    fn roots_list(&self) -> String {
        self.roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

struct ModuleAssets<'a> {
    expander: &'a Expander<'a>,
    id: &'a str,
}

impl Assets for ModuleAssets<'_> {
    fn template(&self, name: &str, line: usize) -> Result<String, Diagnostic> {
        let e = self.expander;
        e.allowing_secrets(|| e.env.render_template(name, e.ctx)).map_err(|err| {
            let module = &e.module.name;
            // The template itself refused (a symlink, a FIFO, too large):
            // said at the `template:` line, in the source's own words.
            if let Err(refused) = e.source.read(&format!("modules/{module}/templates/{name}")) {
                if let Ok(d) = refusal_diag(refused, Some((e.file(), line))) {
                    return d.resource(self.id);
                }
            }
            // Not found without a line: the resource's own template is
            // missing. With a line, an include or extends in it failed, and
            // the error names the missing one.
            if err.kind() == minijinja::ErrorKind::TemplateNotFound && err.line().is_none() {
                return Diagnostic::new(e.file(), format!("template `{name}` not found in modules/{module}/templates/"))
                    .line(line)
                    .resource(self.id);
            }
            let hint = if render::is_limit(&err) {
                render::LIMIT_HINT
            } else {
                "templates see params.*, vars.* and host.name / host.platform; guard optional values with `is defined`"
            };
            let (in_template, at) = render::location(&err);
            // No line (the output limit, the budget): the resource's
            // `template:` line is where to look.
            let Some(at) = at else {
                return Diagnostic::new(e.file(), format!("template `{name}`: {}", render::describe(&err)))
                    .line(line)
                    .resource(self.id)
                    .hint(hint);
            };
            let file = format!("modules/{module}/templates/{}", in_template.unwrap_or(name));
            let quoted = e
                .source
                .read(&file)
                .ok()
                .flatten()
                .and_then(|text| {
                    let line = String::from_utf8_lossy(&text).lines().nth(at - 1)?.trim().to_string();
                    Some(format!(" in `{}`", line.chars().take(100).collect::<String>()))
                })
                .unwrap_or_default();
            // The location is the file:line already: describe the innermost error alone.
            Diagnostic::new(file, format!("template error{quoted}: {}", render::describe(render::innermost(&err))))
                .line(at)
                .resource(self.id)
                .hint(hint)
        })
    }

    fn file(&self, name: &str, line: usize) -> Result<Vec<u8>, Diagnostic> {
        let e = self.expander;
        let path = format!("modules/{}/files/{name}", e.module.name);
        let missing = || {
            Diagnostic::new(
                e.file(),
                format!("source file `{name}` not found: there is no {path}"),
            )
            .line(line)
            .resource(self.id)
        };
        if name
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(missing());
        }
        match e.source.read(&path) {
            Ok(Some(bytes)) => Ok(bytes),
            Ok(None) => Err(missing()),
            Err(err) => Err(match refusal_diag(err, Some((e.file(), line))) {
                Ok(d) => d,
                Err(err) => Diagnostic::new(e.file(), err.to_string()).line(line),
            }
            .resource(self.id)),
        }
    }
}
