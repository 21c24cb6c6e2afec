//! A YAML tree that remembers where every node came from.
//!
//! serde-based YAML loaders stop at the first error and forget line numbers;
//! validation here must report *all* problems with `file:line`, so documents
//! are loaded into [`Node`]s (value + line) with yaml-rust2's event parser and
//! decoded by hand ([`MapReader`]), collecting every error on the way.

use std::collections::BTreeMap;

use yaml_rust2::parser::{Event, Parser};
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

/// The bounds every YAML document is read within. The repository and the
/// agent config are untrusted input: a document must not be able to make the
/// agent allocate or compute without bound, whatever it contains.
///
/// - [`MAX_FILE_BYTES`], 4 MiB per file: the largest real files are
///   Kubernetes CRD bundles (the biggest single CRDs are around 1 MiB);
///   host and module files are a few KiB. Checked before parsing.
/// - [`MAX_NODES`], 500,000 values per file, aliases expanded: a 4 MiB
///   manifest has fewer than that; a tree of that size takes tens of MB.
///   This is what stops a "billion laughs" document: expansion is counted
///   as it happens and refused at the limit, never carried out.
/// - [`MAX_ALIASES`], 10,000 aliases per file: far beyond any real use.
/// - [`MAX_DEPTH`], 128 nested lists and maps: deep CRD schemas reach
///   about 40; everything after parsing (decoding, rendering, dropping) walks
///   the tree recursively, so the depth bounds the stack.
pub const MAX_FILE_BYTES: usize = 4 * 1024 * 1024;
/// See [`MAX_FILE_BYTES`].
pub const MAX_NODES: usize = 500_000;
/// See [`MAX_FILE_BYTES`].
pub const MAX_ALIASES: usize = 10_000;
/// See [`MAX_FILE_BYTES`].
pub const MAX_DEPTH: usize = 128;

/// Maps with this many keys get a hash index for duplicate detection.
const INDEX_FROM: usize = 16;

/// An open list or map while its events arrive.
struct Open {
    value: Value,
    line: usize,
    anchor: usize,
    /// Nodes in this container so far, itself included (for aliases).
    nodes: usize,
    /// A map's pending key.
    key: Option<Node>,
    /// The line of each key of a map, parallel to its entries.
    key_lines: Vec<usize>,
    /// A map's keys by position, once it has [`INDEX_FROM`] of them: a
    /// duplicate is then found in constant time per key (small maps, nearly
    /// all of them, are scanned without allocating).
    index: Option<std::collections::HashMap<String, usize>>,
}

#[derive(Default)]
struct Builder {
    stack: Vec<Open>,
    /// Anchored nodes with their size in nodes.
    anchors: BTreeMap<usize, (Node, usize)>,
    docs: Vec<Node>,
    errors: Vec<Diagnostic>,
    /// Values produced so far (aliases expanded) and aliases seen.
    nodes: usize,
    aliases: usize,
}

/// A document that exceeds one of the limits: where, and the message.
struct LimitExceeded {
    line: usize,
    message: String,
    hint: &'static str,
}

impl Builder {
    /// Counts `n` more nodes; an error once over [`MAX_NODES`].
    fn count(&mut self, n: usize, line: usize) -> Result<(), LimitExceeded> {
        self.nodes = self.nodes.saturating_add(n);
        if self.nodes > MAX_NODES {
            return Err(LimitExceeded {
                line,
                message: format!(
                    "the document has more than {} values (aliases expanded), the limit for one file",
                    thousands(MAX_NODES)
                ),
                hint: "split the file into smaller ones; if aliases (`*name`) repeat a large anchored value, write it out once instead",
            });
        }
        Ok(())
    }

    fn push_node(&mut self, node: Node, anchor: usize, size: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, (node.clone(), size));
        }
        let Some(open) = self.stack.last_mut() else {
            self.docs.push(node);
            return;
        };
        open.nodes += size;
        match &mut open.value {
            Value::Seq(items) => items.push(node),
            Value::Map(entries) => match open.key.take() {
                None => open.key = Some(node),
                Some(key) => {
                    let name = match &key.value {
                        Value::Str(s) => s.clone(),
                        Value::Int(i) => i.to_string(),
                        Value::Bool(b) => b.to_string(),
                        other => {
                            self.errors.push(
                                Diagnostic::new(
                                    "",
                                    format!(
                                        "map keys must be strings, found {}",
                                        other.type_name()
                                    ),
                                )
                                .line(key.line),
                            );
                            return;
                        }
                    };
                    let seen = match &open.index {
                        Some(index) => index.get(&name).copied(),
                        None => entries.iter().position(|(k, _)| *k == name),
                    };
                    if let Some(at) = seen {
                        let first = open.key_lines[at];
                        self.errors.push(
                            Diagnostic::new("", format!("duplicate key `{name}` in this map"))
                                .line(key.line)
                                .hint(format!("`{name}` is already set at line {first}; keep one")),
                        );
                        return;
                    }
                    if let Some(index) = &mut open.index {
                        index.insert(name.clone(), entries.len());
                    }
                    open.key_lines.push(key.line);
                    entries.push((name, node));
                    if open.index.is_none() && entries.len() == INDEX_FROM {
                        open.index = Some(
                            entries
                                .iter()
                                .enumerate()
                                .map(|(i, (k, _))| (k.clone(), i))
                                .collect(),
                        );
                    }
                }
            },
            _ => unreachable!("only containers are pushed on the stack"),
        }
    }

    fn open(&mut self, value: Value, anchor: usize, line: usize) -> Result<(), LimitExceeded> {
        self.count(1, line)?;
        if self.stack.len() >= MAX_DEPTH {
            return Err(LimitExceeded {
                line,
                message: format!(
                    "lists and maps nest deeper than {MAX_DEPTH} levels, the limit for one file"
                ),
                hint: "flatten the structure; no configuration needs this depth",
            });
        }
        self.stack.push(Open {
            value,
            line,
            anchor,
            nodes: 1,
            key: None,
            key_lines: Vec::new(),
            index: None,
        });
        Ok(())
    }

    fn on_event(&mut self, ev: Event, mark: Marker) -> Result<(), LimitExceeded> {
        let line = mark.line();
        match ev {
            Event::Scalar(text, style, anchor, _tag) => {
                self.count(1, line)?;
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
                self.push_node(Node { value, line }, anchor, 1);
            }
            Event::SequenceStart(anchor, _) => self.open(Value::Seq(Vec::new()), anchor, line)?,
            Event::MappingStart(anchor, _) => self.open(Value::Map(Vec::new()), anchor, line)?,
            Event::SequenceEnd | Event::MappingEnd => {
                let open = self.stack.pop().expect("balanced events");
                let node = Node {
                    value: open.value,
                    line: open.line,
                };
                self.push_node(node, open.anchor, open.nodes);
            }
            Event::Alias(id) => {
                self.aliases += 1;
                if self.aliases > MAX_ALIASES {
                    return Err(LimitExceeded {
                        line,
                        message: format!(
                            "the document uses more than {} aliases (`*name`), the limit for one file",
                            thousands(MAX_ALIASES)
                        ),
                        hint: "write the repeated values out, or split the file",
                    });
                }
                // Counted before the copy is made: an expansion over the
                // limit is refused, never carried out.
                let size = self.anchors.get(&id).map_or(1, |(_, size)| *size);
                self.count(size, line)?;
                let node = self.anchors.get(&id).map_or(
                    Node {
                        value: Value::Null,
                        line,
                    },
                    |(node, _)| node.clone(),
                );
                self.push_node(node, 0, size);
            }
            Event::DocumentStart => self.anchors.clear(),
            Event::DocumentEnd | Event::StreamStart | Event::StreamEnd | Event::Nothing => {}
        }
        Ok(())
    }
}

/// `500000` as `500,000`, for messages.
pub(crate) fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
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

/// The diagnostic for a file over [`MAX_FILE_BYTES`]; also used by callers
/// that refuse to read such a file at all.
pub fn too_large(file: &str, size: u64) -> Diagnostic {
    Diagnostic::new(
        file,
        format!(
            "the file is {} bytes, over the limit of {} bytes (4 MiB) for one YAML file",
            thousands(usize::try_from(size).unwrap_or(usize::MAX)),
            thousands(MAX_FILE_BYTES)
        ),
    )
    .line(1)
    .hint("split it into smaller files (a stack's manifests may be several files)")
}

fn parse_docs(file: &str, text: &str, multi: bool) -> Result<Vec<Node>, Diagnostics> {
    if text.len() > MAX_FILE_BYTES {
        return Err(Diagnostics::one(too_large(file, text.len() as u64)));
    }
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    // Events are pulled here rather than through `Parser::load`, which
    // recurses once per nesting level (a deep document would overflow the
    // stack before any limit is seen) and cannot be stopped at a limit.
    loop {
        let (ev, mark) = match parser.next_token() {
            Ok(x) => x,
            Err(e) => {
                return Err(Diagnostics::one(
                    Diagnostic::new(file, format!("invalid YAML: {}", e.info()))
                        .line(e.marker().line())
                        .hint("fix the YAML syntax (indentation, quotes, a missing `:`)"),
                ));
            }
        };
        let end = match ev {
            Event::StreamEnd => true,
            Event::DocumentEnd => !multi,
            _ => false,
        };
        if let Err(limit) = builder.on_event(ev, mark) {
            return Err(Diagnostics::one(
                Diagnostic::new(file, limit.message)
                    .line(limit.line)
                    .hint(limit.hint),
            ));
        }
        if end {
            break;
        }
    }
    if !builder.errors.is_empty() {
        let mut diags = Diagnostics::default();
        for mut d in builder.errors {
            d.file = file.to_string();
            diags.push(d);
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
            "f.yaml:3: duplicate key `a` in this map\n  hint: `a` is already set at line 1; keep one"
        );
        let err = parse("f.yaml", "a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.to_string().starts_with("f.yaml:"), "{err}");
    }

    /// One diagnostic naming `file:line` and the limit, with a hint.
    fn refused(text: &str, at: &str, what: &str) {
        let err = parse_all("f.yaml", text).unwrap_err();
        let d: Vec<_> = err.iter().collect();
        assert_eq!(d.len(), 1, "{err}");
        let shown = d[0].to_string();
        assert!(shown.starts_with(at), "{shown}");
        assert!(shown.contains(what), "{shown}");
        assert!(d[0].hint.is_some(), "{shown}");
    }

    #[test]
    fn a_billion_laughs_is_refused_before_it_is_expanded() {
        // Nine levels of ten aliases each: 10^9 strings if expanded.
        let mut doc = String::from("a0: &a0 [\"lol\"]\n");
        for i in 1..=9 {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            doc.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        refused(
            &doc,
            "f.yaml:7: ",
            "more than 500,000 values (aliases expanded)",
        );
    }

    #[test]
    fn too_many_aliases_are_refused() {
        let mut doc = String::from("a: &a 1\nb:\n");
        doc.push_str(&"  - *a\n".repeat(MAX_ALIASES + 1));
        refused(
            &doc,
            &format!("f.yaml:{}: ", MAX_ALIASES + 3),
            "more than 10,000 aliases",
        );
    }

    #[test]
    fn a_file_over_the_size_limit_is_refused_unparsed() {
        let doc = format!("a: \"{}\"\n", "x".repeat(MAX_FILE_BYTES));
        refused(
            &doc,
            "f.yaml:1: ",
            "over the limit of 4,194,304 bytes (4 MiB)",
        );
    }

    #[test]
    fn nesting_is_limited_in_block_and_flow_style() {
        // Block style nests without any bracket: `- - - ...` is one list in
        // another, 2 bytes a level (yaml-rust2's own loader recurses on it).
        let block = format!("{}x\n", "- ".repeat(1_000_000));
        refused(&block, "f.yaml:1: ", "nest deeper than 128 levels");
        let flow = format!("a:\n  b: {}{}\n", "[".repeat(200), "]".repeat(200));
        refused(&flow, "f.yaml:2: ", "nest deeper than 128 levels");
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(parse("f.yaml", &ok).is_ok());
    }

    #[test]
    fn duplicate_keys_are_found_in_small_and_large_maps() {
        for n in [2, INDEX_FROM - 1, INDEX_FROM, INDEX_FROM + 1, 100] {
            let mut doc: String = (0..n).map(|i| format!("k{i}: {i}\n")).collect();
            doc.push_str("k0: again\n");
            let err = parse("f.yaml", &doc).unwrap_err().to_string();
            assert!(
                err.contains(&format!("f.yaml:{}: duplicate key `k0`", n + 1)),
                "{n}: {err}"
            );
            assert!(err.contains("already set at line 1"), "{n}: {err}");
        }
    }

    #[test]
    fn duplicate_keys_are_found_in_linear_time() {
        // 200,000 keys: a pairwise check would take 2 * 10^10 comparisons.
        let mut doc = String::new();
        for i in 0..200_000 {
            doc.push_str(&format!("k{i}: {i}\n"));
        }
        let node = parse("f.yaml", &doc).unwrap();
        assert!(matches!(&node.value, Value::Map(e) if e.len() == 200_000));
        doc.push_str("k17: again\n");
        refused(&doc, "f.yaml:200001: ", "duplicate key `k17`");
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
