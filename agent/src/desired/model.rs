//! The desired-state files, decoded: `hosts/<name>.yaml` and
//! `modules/<name>/module.yaml`. Decoding collects every problem; nothing
//! here renders templates or touches the host.

use std::path::{Path, PathBuf};

use super::diag::{Diagnostic, Diagnostics};
use super::yaml::{MapReader, Node, Value};
use crate::resources::Platform;

/// What to do when a resource drifted (git unchanged, live state changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DriftPolicy {
    /// Correct it (the default).
    Heal,
    /// Report it and leave it alone.
    Report,
}

impl DriftPolicy {
    pub fn name(self) -> &'static str {
        match self {
            DriftPolicy::Heal => "heal",
            DriftPolicy::Report => "report",
        }
    }
}

/// Reads an `on_drift` key.
pub fn on_drift(reader: &mut MapReader<'_>, diags: &mut Diagnostics) -> Option<DriftPolicy> {
    let (value, line) = reader.string("on_drift", diags)?;
    match value.as_str() {
        "heal" => Some(DriftPolicy::Heal),
        "report" => Some(DriftPolicy::Report),
        other => {
            diags.push(
                reader
                    .diag(
                        line,
                        format!("`on_drift` must be `heal` or `report`, found `{other}`"),
                    )
                    .hint("heal corrects drift; report only shows it"),
            );
            None
        }
    }
}

/// `hosts/<name>.yaml`.
#[derive(Debug)]
pub struct HostSpec {
    pub name: String,
    pub file: String,
    pub platform: Platform,
    pub roots: Vec<PathBuf>,
    /// The line of each root, for messages about it.
    pub root_lines: Vec<usize>,
    /// `whole_filesystem: true`: the root `/` is meant.
    pub whole_filesystem: bool,
    pub vars: Node,
    pub on_drift: Option<DriftPolicy>,
    pub modules: Vec<ModuleUse>,
    /// The Kubernetes stacks this host owns (`k8s/<name>/`).
    pub stacks: Vec<crate::desired::stacks::model::StackUse>,
}

/// One entry of a host's `modules:`.
#[derive(Debug)]
pub struct ModuleUse {
    pub name: String,
    pub line: usize,
    pub params: Vec<(String, Node)>,
    pub on_drift: Option<DriftPolicy>,
}

const HOST_KEYS: &[&str] = &[
    "platform",
    "description",
    "roots",
    "whole_filesystem",
    "vars",
    "on_drift",
    "modules",
    "stacks",
];
const MODULE_USE_KEYS: &[&str] = &["name", "params", "on_drift"];

pub fn parse_host(name: &str, file: &str, doc: &Node, diags: &mut Diagnostics) -> Option<HostSpec> {
    let mut r = MapReader::new(file, format!("host {name}"), doc, diags)?;
    let platform = match r.take("platform") {
        None => {
            diags.push(
                Diagnostic::new(file, "the host has no `platform`")
                    .line(r.line)
                    .hint("add `platform: macos` or `platform: linux`"),
            );
            None
        }
        Some(node) => match node.as_str() {
            Some("macos") => Some(Platform::Macos),
            Some("linux") => Some(Platform::Linux),
            other => {
                let found =
                    other.map_or_else(|| node.value.type_name().to_string(), |s| format!("`{s}`"));
                diags.push(
                    Diagnostic::new(
                        file,
                        format!("`platform` must be `macos` or `linux`, found {found}"),
                    )
                    .line(node.line)
                    .hint("macos selects launchd and Homebrew; linux selects systemd and apt"),
                );
                None
            }
        },
    };
    r.string("description", diags);
    let mut roots = Vec::new();
    let mut root_lines = Vec::new();
    match r.string_list("roots", diags) {
        None if !r.has("roots") => diags.push(
            Diagnostic::new(file, "the host has no `roots`")
                .line(r.line)
                .hint("list the path prefixes the agent may manage, e.g. roots: [/usr/local/etc]"),
        ),
        None => {}
        Some(list) => {
            for (root, line) in list {
                let path = PathBuf::from(&root);
                if root.chars().any(super::unsafe_path_char) {
                    diags.push(
                        Diagnostic::new(
                            file,
                            format!(
                                "root `{}` holds a control or invisible character",
                                root.escape_debug()
                            ),
                        )
                        .line(line)
                        .hint(super::UNSAFE_CHAR_HINT),
                    );
                } else if crate::fsops::normalize(&path).as_deref() != Some(path.as_path())
                    || root.ends_with('/') && root != "/"
                {
                    diags.push(
                        Diagnostic::new(
                            file,
                            format!("root `{root}` must be an absolute, normalised path"),
                        )
                        .line(line)
                        .hint("write it like /usr/local/etc (no `..`, `.`, or trailing slash)"),
                    );
                } else {
                    roots.push(path);
                    root_lines.push(line);
                }
            }
        }
    }
    // `/` makes every path of the machine manageable: only on purpose.
    let whole_filesystem = r.bool("whole_filesystem", diags).unwrap_or(false);
    if !whole_filesystem {
        if let Some(i) = roots.iter().position(|r| r.as_path() == Path::new("/")) {
            diags.push(
                Diagnostic::new(file, "root `/` lets the agent manage every path of the machine")
                    .line(root_lines[i])
                    .hint("list the directories the agent manages instead, or add `whole_filesystem: true` to the host file to mean it"),
            );
            roots.remove(i);
            root_lines.remove(i);
        }
    }
    let vars = match r.take("vars") {
        Some(node) if matches!(node.value, Value::Map(_) | Value::Null) => node.clone(),
        Some(node) => {
            diags.push(
                Diagnostic::new(
                    file,
                    format!("`vars` must be a map, found {}", node.value.type_name()),
                )
                .line(node.line),
            );
            Node {
                value: Value::Map(Vec::new()),
                line: node.line,
            }
        }
        None => Node {
            value: Value::Map(Vec::new()),
            line: 1,
        },
    };
    let host_policy = on_drift(&mut r, diags);
    let mut modules = Vec::new();
    for item in r.list("modules", diags).unwrap_or_default() {
        let Some(mut m) = MapReader::new(file, "a `modules` entry", item, diags) else {
            continue;
        };
        let found = m.take("name");
        let Some(name_node) = m.require("name", found, diags) else {
            m.finish(MODULE_USE_KEYS, diags);
            continue;
        };
        let Some(module_name) = name_node.as_str().map(str::to_string) else {
            diags.push(
                Diagnostic::new(file, "a module `name` must be a string").line(name_node.line),
            );
            continue;
        };
        let params = match m.take("params") {
            None => Vec::new(),
            Some(Node {
                value: Value::Map(entries),
                ..
            }) => entries.clone(),
            Some(Node {
                value: Value::Null, ..
            }) => Vec::new(),
            Some(node) => {
                diags.push(
                    Diagnostic::new(
                        file,
                        format!(
                            "`params` of module {module_name} must be a map, found {}",
                            node.value.type_name()
                        ),
                    )
                    .line(node.line),
                );
                Vec::new()
            }
        };
        let policy = on_drift(&mut m, diags);
        m.finish(MODULE_USE_KEYS, diags);
        modules.push(ModuleUse {
            name: module_name,
            line: item.line,
            params,
            on_drift: policy,
        });
    }
    let stacks = crate::desired::stacks::model::parse_stack_uses(&mut r, file, diags);
    r.finish(HOST_KEYS, diags);
    Some(HostSpec {
        name: name.to_string(),
        file: file.to_string(),
        platform: platform?,
        roots,
        root_lines,
        whole_filesystem,
        vars,
        on_drift: host_policy,
        modules,
        stacks,
    })
}

/// A declared module parameter.
#[derive(Debug, Clone)]
pub struct ParamDecl {
    pub name: String,
    pub ty: ParamType,
    pub default: Option<Node>,
    pub required: bool,
    pub line: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    String,
    Int,
    Bool,
    List,
    Map,
}

impl ParamType {
    fn parse(s: &str) -> Option<ParamType> {
        Some(match s {
            "string" => ParamType::String,
            "int" => ParamType::Int,
            "bool" => ParamType::Bool,
            "list" => ParamType::List,
            "map" => ParamType::Map,
            _ => return None,
        })
    }
    /// `an int`, `a string`: for messages.
    pub fn with_article(self) -> &'static str {
        match self {
            ParamType::String => "a string",
            ParamType::Int => "an int",
            ParamType::Bool => "a bool",
            ParamType::List => "a list",
            ParamType::Map => "a map",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ParamType::String => "string",
            ParamType::Int => "int",
            ParamType::Bool => "bool",
            ParamType::List => "list",
            ParamType::Map => "map",
        }
    }

    pub fn accepts(self, v: &Value) -> bool {
        matches!(
            (self, v),
            (ParamType::String, Value::Str(_))
                | (ParamType::Int, Value::Int(_))
                | (ParamType::Bool, Value::Bool(_))
                | (ParamType::List, Value::Seq(_))
                | (ParamType::Map, Value::Map(_))
        )
    }
}

/// `modules/<name>/module.yaml`.
#[derive(Debug)]
pub struct ModuleSpec {
    pub name: String,
    pub file: String,
    pub params: Vec<ParamDecl>,
    /// Raw resource entries: rendered per use (they may use params).
    pub resources: Vec<Node>,
}

const MODULE_KEYS: &[&str] = &["description", "params", "resources"];
const PARAM_KEYS: &[&str] = &["type", "default", "required", "doc"];

pub fn parse_module(
    name: &str,
    file: &str,
    doc: &Node,
    diags: &mut Diagnostics,
) -> Option<ModuleSpec> {
    let mut r = MapReader::new(file, format!("module {name}"), doc, diags)?;
    r.string("description", diags);
    let mut params = Vec::new();
    match r.take("params") {
        None => {}
        Some(Node {
            value: Value::Map(entries),
            ..
        }) => {
            for (pname, node) in entries {
                let Some(mut p) = MapReader::new(file, format!("param `{pname}`"), node, diags)
                else {
                    continue;
                };
                let ty = match p.string("type", diags) {
                    Some((t, line)) => match ParamType::parse(&t) {
                        Some(ty) => Some(ty),
                        None => {
                            diags.push(
                                Diagnostic::new(
                                    file,
                                    format!("param `{pname}` has unknown type `{t}`"),
                                )
                                .line(line)
                                .hint("types are string, int, bool, list, map"),
                            );
                            None
                        }
                    },
                    None => {
                        diags.push(
                            Diagnostic::new(file, format!("param `{pname}` has no `type`"))
                                .line(node.line)
                                .hint("add type: string | int | bool | list | map"),
                        );
                        None
                    }
                };
                let default = p.take("default").cloned();
                let required = p.bool("required", diags).unwrap_or(false);
                p.string("doc", diags);
                p.finish(PARAM_KEYS, diags);
                let Some(ty) = ty else { continue };
                if let Some(d) = &default {
                    if !ty.accepts(&d.value) {
                        diags.push(
                            Diagnostic::new(
                                file,
                                format!(
                                    "default of param `{pname}` must be {}, found {}",
                                    ty.with_article(),
                                    d.value.type_name()
                                ),
                            )
                            .line(d.line),
                        );
                    }
                }
                params.push(ParamDecl {
                    name: pname.clone(),
                    ty,
                    default,
                    required,
                    line: node.line,
                });
            }
        }
        Some(node) => diags.push(
            Diagnostic::new(
                file,
                format!("`params` must be a map, found {}", node.value.type_name()),
            )
            .line(node.line),
        ),
    }
    let resources = r.list("resources", diags).unwrap_or_default().to_vec();
    r.finish(MODULE_KEYS, diags);
    Some(ModuleSpec {
        name: name.to_string(),
        file: file.to_string(),
        params,
        resources,
    })
}

/// Checks a use's params against the module's declarations and returns the
/// final values (defaults filled in; optional params without a default are
/// null). Problems are reported against the host file.
pub fn bind_params(
    module: &ModuleSpec,
    usage: &ModuleUse,
    host_file: &str,
    diags: &mut Diagnostics,
) -> Vec<(String, Node)> {
    let mut out = Vec::new();
    for (given, node) in &usage.params {
        if !module.params.iter().any(|p| &p.name == given) {
            let known: Vec<&str> = module.params.iter().map(|p| p.name.as_str()).collect();
            diags.push(
                Diagnostic::new(
                    host_file,
                    format!("module {} has no param `{given}`", module.name),
                )
                .line(node.line)
                .hint(if known.is_empty() {
                    "this module takes no params".to_string()
                } else {
                    format!("its params are: {}", known.join(", "))
                }),
            );
        }
    }
    for decl in &module.params {
        let given = usage
            .params
            .iter()
            .find(|(n, _)| *n == decl.name)
            .map(|(_, v)| v);
        let value = match (given, &decl.default) {
            (Some(v), _) => {
                if !decl.ty.accepts(&v.value) {
                    diags.push(
                        Diagnostic::new(
                            host_file,
                            format!(
                                "param `{}` of module {} must be {}, found {}",
                                decl.name,
                                module.name,
                                decl.ty.with_article(),
                                v.value.type_name()
                            ),
                        )
                        .line(v.line)
                        .hint(format!("see {} line {}", module.file, decl.line)),
                    );
                }
                v.clone()
            }
            (None, Some(d)) => d.clone(),
            (None, None) if decl.required => {
                diags.push(
                    Diagnostic::new(
                        host_file,
                        format!(
                            "module {} needs param `{}` ({})",
                            module.name,
                            decl.name,
                            decl.ty.name()
                        ),
                    )
                    .line(usage.line)
                    .hint(format!(
                        "add it under params:, see {} line {}",
                        module.file, decl.line
                    )),
                );
                Node {
                    value: Value::Null,
                    line: usage.line,
                }
            }
            (None, None) => Node {
                value: Value::Null,
                line: decl.line,
            },
        };
        out.push((decl.name.clone(), value));
    }
    out
}
