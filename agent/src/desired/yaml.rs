//! A YAML tree that remembers where every node came from.
//!
//! serde-based YAML loaders stop at the first error and forget line numbers;
//! validation here must report *all* problems with `file:line`, so documents
//! are loaded into [`Node`]s (value + line) with yaml-rust2's event parser and
//! decoded by hand ([`MapReader`]), collecting every error on the way.

use std::collections::BTreeMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};
use yaml_rust2::Yaml;

use super::diag::{Diagnostic, Diagnostics};

/// A YAML value with the line it starts on (1-based).
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub value: Value,
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    /// Keys are strings (other key types are rejected at load); order kept.
    Map(Vec<(String, Node)>),
}

impl Value {
    /// The YAML type name used in error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a map",
        }
    }
}

impl Node {
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Converts to a template value (params, vars).
    pub fn to_template_value(&self) -> minijinja::Value {
        match &self.value {
            Value::Null => minijinja::Value::from(()),
            Value::Bool(b) => minijinja::Value::from(*b),
            Value::Int(i) => minijinja::Value::from(*i),
            Value::Float(f) => minijinja::Value::from(*f),
            Value::Str(s) => minijinja::Value::from(s.as_str()),
            Value::Seq(items) => items.iter().map(Node::to_template_value).collect(),
            Value::Map(entries) => minijinja::Value::from(
                entries
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_template_value()))
                    .collect::<BTreeMap<_, _>>(),
            ),
        }
    }
}

#[derive(Default)]
struct Builder {
    /// Open containers: (value, line, pending key for maps).
    stack: Vec<(Value, usize, Option<Node>)>,
    anchors: BTreeMap<usize, Node>,
    /// Anchor ids of the open containers, parallel to `stack`.
    anchor_ids: Vec<usize>,
    docs: Vec<Node>,
    errors: Vec<(usize, String)>,
}

impl Builder {
    fn push_node(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        let Some((container, _, pending_key)) = self.stack.last_mut() else {
            self.docs.push(node);
            return;
        };
        match container {
            Value::Seq(items) => items.push(node),
            Value::Map(entries) => match pending_key.take() {
                None => *pending_key = Some(node),
                Some(key) => {
                    let name = match &key.value {
                        Value::Str(s) => s.clone(),
                        Value::Int(i) => i.to_string(),
                        Value::Bool(b) => b.to_string(),
                        other => {
                            self.errors.push((
                                key.line,
                                format!("map keys must be strings, found {}", other.type_name()),
                            ));
                            return;
                        }
                    };
                    if entries.iter().any(|(k, _)| *k == name) {
                        self.errors
                            .push((key.line, format!("duplicate key `{name}` in this map")));
                        return;
                    }
                    entries.push((name, node));
                }
            },
            _ => unreachable!("only containers are pushed on the stack"),
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let line = mark.line();
        match ev {
            Event::Scalar(text, style, anchor, _tag) => {
                let value = if style == TScalarStyle::Plain {
                    match Yaml::from_str(&text) {
                        Yaml::Null => Value::Null,
                        Yaml::Boolean(b) => Value::Bool(b),
                        Yaml::Integer(i) => Value::Int(i),
                        Yaml::Real(r) => r.parse().map_or(Value::Str(text), Value::Float),
                        _ => Value::Str(text),
                    }
                } else {
                    Value::Str(text)
                };
                self.push_node(Node { value, line }, anchor);
            }
            Event::SequenceStart(anchor, _) => {
                self.stack.push((Value::Seq(Vec::new()), line, None));
                self.anchor_ids.push(anchor);
            }
            Event::MappingStart(anchor, _) => {
                self.stack.push((Value::Map(Vec::new()), line, None));
                self.anchor_ids.push(anchor);
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (value, line, _) = self.stack.pop().expect("balanced events");
                let anchor = self.anchor_ids.pop().expect("balanced events");
                self.push_node(Node { value, line }, anchor);
            }
            Event::Alias(id) => {
                let node = self.anchors.get(&id).cloned().unwrap_or(Node {
                    value: Value::Null,
                    line,
                });
                self.push_node(node, 0);
            }
            Event::DocumentEnd
            | Event::DocumentStart
            | Event::StreamStart
            | Event::StreamEnd
            | Event::Nothing => {}
        }
    }
}

/// Parses one YAML document. An empty document is `Null`. Syntax errors and
/// structural problems (duplicate keys, non-string keys) become diagnostics
/// against `file`.
pub fn parse(file: &str, text: &str) -> Result<Node, Diagnostics> {
    Ok(parse_docs(file, text, false)?
        .into_iter()
        .next()
        .unwrap_or(Node {
            value: Value::Null,
            line: 1,
        }))
}

/// Parses every document of a multi-document stream (`---` separated), as
/// Kubernetes manifests are written. Lines count from the start of the file.
pub fn parse_all(file: &str, text: &str) -> Result<Vec<Node>, Diagnostics> {
    parse_docs(file, text, true)
}

fn parse_docs(file: &str, text: &str, multi: bool) -> Result<Vec<Node>, Diagnostics> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut builder, multi) {
        return Err(Diagnostics::one(
            Diagnostic::new(file, format!("invalid YAML: {}", e.info()))
                .line(e.marker().line())
                .hint("fix the YAML syntax (indentation, quotes, a missing `:`)"),
        ));
    }
    if !builder.errors.is_empty() {
        let mut diags = Diagnostics::default();
        for (line, msg) in builder.errors {
            diags.push(Diagnostic::new(file, msg).line(line));
        }
        return Err(diags);
    }
    Ok(builder.docs)
}

/// Reads the keys of one YAML map, reporting wrong types and, on
/// [`MapReader::finish`], every key nobody asked for.
pub struct MapReader<'a> {
    file: &'a str,
    /// What this map is, for messages: `host indri`, `resource file:/x`.
    what: String,
    resource: Option<String>,
    entries: Vec<(&'a str, &'a Node, bool)>,
    pub line: usize,
}

impl<'a> MapReader<'a> {
    /// `None` (and a diagnostic) when `node` is not a map.
    pub fn new(
        file: &'a str,
        what: impl Into<String>,
        node: &'a Node,
        diags: &mut Diagnostics,
    ) -> Option<MapReader<'a>> {
        let what = what.into();
        match &node.value {
            Value::Map(entries) => Some(MapReader {
                file,
                what,
                resource: None,
                entries: entries
                    .iter()
                    .map(|(k, v)| (k.as_str(), v, false))
                    .collect(),
                line: node.line,
            }),
            Value::Null => Some(MapReader {
                file,
                what,
                resource: None,
                entries: Vec::new(),
                line: node.line,
            }),
            other => {
                diags.push(
                    Diagnostic::new(
                        file,
                        format!("{what} must be a map, found {}", other.type_name()),
                    )
                    .line(node.line),
                );
                None
            }
        }
    }

    /// Errors from this reader name `resource` (a resource id).
    pub fn for_resource(mut self, resource: impl Into<String>) -> Self {
        self.resource = Some(resource.into());
        self
    }

    pub fn file(&self) -> &'a str {
        self.file
    }

    /// A diagnostic at `line` carrying this reader's file and resource.
    pub fn diag(&self, line: usize, message: impl Into<String>) -> Diagnostic {
        let mut d = Diagnostic::new(self.file, message).line(line);
        if let Some(r) = &self.resource {
            d = d.resource(r.clone());
        }
        d
    }

    /// Takes a key (any type), marking it as known.
    pub fn take(&mut self, key: &str) -> Option<&'a Node> {
        self.entries
            .iter_mut()
            .find(|(k, _, _)| *k == key)
            .map(|e| {
                e.2 = true;
                e.1
            })
    }

    pub fn has(&self, key: &str) -> bool {
        self.entries.iter().any(|(k, _, _)| *k == key)
    }

    /// Keys in document order (used for kinds, where the first key names it).
    pub fn keys(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.entries.iter().map(|(k, _, _)| *k)
    }

    fn wrong_type(&self, key: &str, node: &Node, want: &str, diags: &mut Diagnostics) {
        diags.push(self.diag(
            node.line,
            format!(
                "`{key}` in {} must be {want}, found {}",
                self.what,
                node.value.type_name()
            ),
        ));
    }

    pub fn string(&mut self, key: &str, diags: &mut Diagnostics) -> Option<(String, usize)> {
        let node = self.take(key)?;
        match &node.value {
            Value::Str(s) => Some((s.clone(), node.line)),
            _ => {
                self.wrong_type(key, node, "a string", diags);
                None
            }
        }
    }

    pub fn bool(&mut self, key: &str, diags: &mut Diagnostics) -> Option<bool> {
        let node = self.take(key)?;
        match &node.value {
            Value::Bool(b) => Some(*b),
            _ => {
                self.wrong_type(key, node, "true or false", diags);
                None
            }
        }
    }

    /// A list of strings (a single string is not accepted: be explicit).
    pub fn string_list(
        &mut self,
        key: &str,
        diags: &mut Diagnostics,
    ) -> Option<Vec<(String, usize)>> {
        let node = self.take(key)?;
        match &node.value {
            Value::Seq(items) => {
                let mut out = Vec::new();
                for item in items {
                    match &item.value {
                        Value::Str(s) => out.push((s.clone(), item.line)),
                        _ => self.wrong_type(key, item, "a list of strings", diags),
                    }
                }
                Some(out)
            }
            _ => {
                self.wrong_type(key, node, "a list of strings", diags);
                None
            }
        }
    }

    pub fn list(&mut self, key: &str, diags: &mut Diagnostics) -> Option<&'a [Node]> {
        let node = self.take(key)?;
        match &node.value {
            Value::Seq(items) => Some(items),
            Value::Null => Some(&[]),
            _ => {
                self.wrong_type(key, node, "a list", diags);
                None
            }
        }
    }

    /// A required key: reports it missing.
    pub fn require<'b>(
        &self,
        key: &str,
        found: Option<&'b Node>,
        diags: &mut Diagnostics,
    ) -> Option<&'b Node> {
        if found.is_none() {
            diags.push(self.diag(
                self.line,
                format!("{} is missing the required key `{key}`", self.what),
            ));
        }
        found
    }

    /// Reports every key that was never taken. `known` lists the valid keys for
    /// the hint.
    pub fn finish(self, known: &[&str], diags: &mut Diagnostics) {
        for (key, node, used) in &self.entries {
            if !used {
                let suggestion = closest(key, known)
                    .map(|k| format!("did you mean `{k}`? "))
                    .unwrap_or_default();
                diags.push(
                    self.diag(node.line, format!("unknown key `{key}` in {}", self.what))
                        .hint(format!("{suggestion}valid keys: {}", known.join(", "))),
                );
            }
        }
    }
}

/// The known word closest to `word` when it is a plausible typo.
pub fn closest<'k>(word: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(word, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 3))
        .min()
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_carry_lines_and_plain_scalars_are_typed() {
        let node = parse("f.yaml", "a: 1\nb:\n  - 'x'\n  - true\nc: \"2\"\n").unwrap();
        let Value::Map(entries) = &node.value else {
            panic!()
        };
        assert_eq!(entries[0].1.value, Value::Int(1));
        assert_eq!(entries[0].1.line, 1);
        let Value::Seq(items) = &entries[1].1.value else {
            panic!()
        };
        assert_eq!(items[0].value, Value::Str("x".into()));
        assert_eq!(items[1].line, 4);
        assert_eq!(entries[2].1.value, Value::Str("2".into()));
    }

    #[test]
    fn every_document_of_a_stream_with_its_line() {
        let docs = parse_all("m.yaml", "a: 1\n---\nb: 2\n---\n# nothing\n").unwrap();
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[1].line, 3);
        assert_eq!(docs[2].value, Value::Null);
    }

    #[test]
    fn duplicate_keys_and_syntax_errors_name_the_line() {
        let err = parse("f.yaml", "a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(
            err.to_string().trim(),
            "f.yaml:3: duplicate key `a` in this map"
        );
        let err = parse("f.yaml", "a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.to_string().starts_with("f.yaml:"), "{err}");
    }

    #[test]
    fn unknown_keys_suggest_the_closest() {
        let node = parse("f.yaml", "mdoe: '0644'\n").unwrap();
        let mut diags = Diagnostics::default();
        let reader = MapReader::new("f.yaml", "resource file:/x", &node, &mut diags).unwrap();
        reader.finish(&["mode", "owner"], &mut diags);
        let text = diags.to_string();
        assert!(
            text.contains("f.yaml:1: unknown key `mdoe` in resource file:/x"),
            "{text}"
        );
        assert!(text.contains("did you mean `mode`?"), "{text}");
    }
}
