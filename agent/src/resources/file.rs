//! `file`: a regular file with exact content, mode, owner and group.
//!
//! Content comes from exactly one of `content` (inline, rendered as a
//! template), `template` (a module template) or `source` (a module file,
//! copied verbatim). Replacement is atomic and never follows a symlink.
//!
//! `validate` (like Ansible's) is a command run against the staged temp file
//! (`%s` stands for its path; it already has its final owner and mode)
//! before it replaces the live file. The command is split into argv with
//! POSIX shell quoting and run without a shell through the host's runner,
//! bounded by `validate_timeout` (default 30 s). A refusal fails the
//! resource with the tool's message, removes the temp file and leaves the
//! live file untouched; for a file holding secrets the tool's output is not
//! shown (it may echo the content). Sandbox mode runs it too: it only reads
//! the temp file, and a sandbox that accepted what the host refuses would
//! mislead.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::exec::Cmd;
use super::{
    ApplyCtx, FieldChange, Host, IdentityKind, Kind, Observation, Ownership, ParseInput, Perms,
    PruneOutcome, Resource, ResourceError,
};
use crate::fsops::{FileKind as Ft, Meta};
use crate::secrets::SecretValue;

pub struct FileKind;

const DEFAULT_MODE: u32 = 0o644;
/// Unified diffs longer than this are cut in the plan.
const MAX_DIFF_LINES: usize = 200;

impl Kind for FileKind {
    fn name(&self) -> &'static str {
        "file"
    }
    fn doc(&self) -> &'static str {
        "a regular file: one of content | template | source; mode (default \"0644\"), owner, group; validate: a command checking the rendered temp file (%s) before it replaces the live one (no shell; runs in --root sandboxes too), validate_timeout (default 30s)"
    }
    fn identity_kind(&self) -> IdentityKind {
        IdentityKind::Path
    }
    fn fields(&self) -> &'static [&'static str] {
        &[
            "content",
            "template",
            "source",
            "mode",
            "owner",
            "group",
            "validate",
            "validate_timeout",
        ]
    }

    fn parse(&self, input: ParseInput<'_, '_>) -> Option<Box<dyn Resource>> {
        let ParseInput {
            identity,
            fields,
            assets,
            diags,
            ..
        } = input;
        let mode_given = fields.has("mode");
        let perms = Perms::parse(fields, diags, DEFAULT_MODE);
        let content = fields.string("content", diags);
        let template = fields.string("template", diags);
        let source = fields.string("source", diags);
        let validate = parse_validate(fields, diags);
        let given: Vec<(&str, usize)> = [
            ("content", &content),
            ("template", &template),
            ("source", &source),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|(_, line)| (k, *line)))
        .collect();
        let hint = "inline text: content; a Jinja template in templates/: template; a verbatim file in files/: source";
        match given.as_slice() {
            [_] => {}
            [] => {
                diags.push(
                    fields
                        .diag(
                            fields.line,
                            "a file needs one of `content`, `template` or `source`",
                        )
                        .hint(hint),
                );
                return None;
            }
            [first, rest @ ..] => {
                let others: Vec<String> = rest.iter().map(|(k, _)| format!("`{k}`")).collect();
                diags.push(
                    fields
                        .diag(
                            rest[0].1,
                            format!("a file takes only one of `content`, `template` or `source`, but `{}` and {} are both given", first.0, others.join(" and ")),
                        )
                        .hint(hint),
                );
                return None;
            }
        }
        let validate = validate?;
        let bytes = match (content, template, source) {
            (Some((text, _)), _, _) => text.into_bytes(),
            (_, Some((name, line)), _) => assets
                .template(&name, line)
                .map(String::into_bytes)
                .map_err(|d| diags.push(d))
                .ok()?,
            (_, _, Some((name, line))) => {
                assets.file(&name, line).map_err(|d| diags.push(d)).ok()?
            }
            _ => unreachable!("exactly one is set"),
        };
        Some(Box::new(File {
            path: PathBuf::from(identity),
            content: bytes,
            perms,
            mode_given,
            validate,
            secrets: Vec::new(),
            masked: None,
        }))
    }

    fn prune(&self, identity: &str, host: &Host) -> Result<PruneOutcome, ResourceError> {
        super::prune_if(host, Path::new(identity), Ft::File)
    }
}

/// A desired file. Its `Debug` never shows content (it may hold secrets).
pub struct File {
    path: PathBuf,
    content: Vec<u8>,
    perms: Perms,
    /// `mode` was written in the module (else a file holding secrets gets 0600).
    mode_given: bool,
    /// Checks the staged file before it replaces the live one.
    validate: Option<Validate>,
    /// Secret values rendered into `content`.
    secrets: Vec<SecretValue>,
    /// `content` rendered with every secret masked (see [`File::masked`]).
    masked: Option<Vec<u8>>,
}

impl std::fmt::Debug for File {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("File")
            .field("path", &self.path)
            .field("content_len", &self.content.len())
            .field("perms", &self.perms)
            .field("validate", &self.validate)
            .field("holds_secrets", &!self.secrets.is_empty())
            .finish()
    }
}

/// What is at the path now. `Debug` shows no content.
struct Live {
    meta: Option<Meta>,
    content: Option<Vec<u8>>,
    want: Ownership,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("meta", &self.meta)
            .field("content_len", &self.content.as_ref().map(Vec::len))
            .finish()
    }
}

/// Mode of a file holding secrets when the module does not say.
const SECRET_MODE: u32 = 0o600;

/// Secrets at least this long are looked for in the masked content (a
/// shorter one may be there by coincidence: `1234` in `port 1234`).
const MIN_MASKABLE: usize = 4;

impl File {
    /// The new content as rendered with every secret shown as the redaction
    /// marker (not the real content with values replaced: a filter such as
    /// `tojson` or `upper` changes a value beyond recognition). `None` when
    /// there is no such rendering, or a value is still in it after all.
    fn masked(&self) -> Option<String> {
        let text = String::from_utf8(self.masked.clone()?).ok()?;
        let clean = self
            .secrets
            .iter()
            .all(|s| s.expose().len() < MIN_MASKABLE || !text.contains(s.expose()));
        clean.then_some(text)
    }
}

impl Resource for File {
    fn kind(&self) -> &'static str {
        "file"
    }
    fn identity(&self) -> &str {
        self.path.to_str().expect("identities are UTF-8")
    }
    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }
    fn rendered(&self) -> Vec<(&Path, &[u8])> {
        vec![(&self.path, &self.content)]
    }
    fn digest(&self, h: &mut blake3::Hasher) {
        h.update(&(self.content.len() as u64).to_le_bytes());
        h.update(&self.content);
        self.perms.digest(h);
        if let Some(v) = &self.validate {
            v.digest(h);
        }
    }

    fn set_secrets(&mut self, values: Vec<SecretValue>, masked: Option<Vec<u8>>) {
        if !values.is_empty() && !self.mode_given {
            self.perms.mode = SECRET_MODE;
        }
        self.secrets = values;
        self.masked = masked;
    }

    fn holds_secrets(&self) -> bool {
        !self.secrets.is_empty()
    }

    fn observe(&self, host: &Host) -> Result<Observation, ResourceError> {
        let want = self.perms.resolve(host)?;
        let (meta, content) = match host.fs.read_file(&self.path)? {
            Some((meta, content)) => (Some(meta), content),
            None => (None, None),
        };
        // A symlink in its place is replaced (the rename swaps the link, never
        // its target); a directory or device is a conflict: refuse at plan time.
        if let Some(m) = meta.filter(|m| matches!(m.kind, Ft::Directory | Ft::Other)) {
            return Err(ResourceError::WrongType {
                path: self.path.clone(),
                found: m.kind.name(),
                wanted: "file",
            });
        }
        Ok(Observation::new(
            meta.is_some(),
            Live {
                meta,
                content,
                want,
            },
        ))
    }

    fn diff(&self, live: &Observation, _host: &Host) -> Vec<FieldChange> {
        let live: &Live = live.get();
        let mut out = Vec::new();
        if let Some(meta) = live.meta.filter(|m| m.kind != Ft::File) {
            out.push(FieldChange::new(
                "type",
                Some(meta.kind.name().into()),
                Some("file".into()),
            ));
        }
        let old = live.content.as_deref();
        // A file only its owner may read may hold a secret we cannot
        // recognise (it held secrets until this revision, or one was put
        // there by hand): its current content is never shown, not even as
        // a hash. The new content has none (else the branch below).
        let private = live
            .meta
            .is_some_and(|m| m.kind == Ft::File && m.mode & 0o044 == 0);
        if old != Some(self.content.as_slice()) {
            if self.secrets.is_empty() && private {
                out.push(FieldChange::new(
                    "content",
                    old.map(|o| format!("{} bytes (private file: not shown)", o.len())),
                    Some(describe(&self.content)),
                ));
            } else if self.secrets.is_empty() {
                let mut change =
                    FieldChange::new("content", old.map(describe), Some(describe(&self.content)));
                change.diff = unified_diff(old.unwrap_or_default(), &self.content, self.identity());
                out.push(change);
            } else {
                // No hashes (a low-entropy secret could be brute-forced from
                // one) and no old lines (they may hold an old secret we cannot
                // recognise): a new file shows its masked content, a changed
                // one only that it changed.
                let mut change = FieldChange::new(
                    "content",
                    old.map(|o| format!("{} bytes", o.len())),
                    Some("content changed (holds secrets)".to_string()),
                );
                if old.is_none() {
                    change.diff = self
                        .masked()
                        .and_then(|m| unified_diff(b"", m.as_bytes(), self.identity()));
                }
                out.push(change);
            }
        }
        let meta = live.meta.filter(|m| m.kind == Ft::File);
        self.perms.diff(meta.as_ref(), live.want, &mut out);
        out
    }

    fn as_restorable(&self) -> Option<&dyn super::Restorable> {
        Some(self)
    }

    fn apply(
        &self,
        live: &Observation,
        changes: &[FieldChange],
        ctx: &mut ApplyCtx<'_>,
    ) -> Result<(), ResourceError> {
        let live: &Live = live.get();
        let attrs = self.perms.attrs(live.want);
        if changes
            .iter()
            .any(|c| c.field == "content" || c.field == "type")
        {
            match &self.validate {
                None => ctx.stage_file(&self.path, &self.content, attrs),
                Some(v) => ctx.stage_file_checked(&self.path, &self.content, attrs, |host, tmp| {
                    v.check(host, tmp, &self.path, self.holds_secrets())
                }),
            }
        } else {
            ctx.host.fs.set_attrs(&self.path, attrs).map_err(Into::into)
        }
    }
}

impl super::Restorable for File {
    /// Rollback: the content, mode and owner observed before this run, or
    /// no file if there was none.
    fn restore(&self, live: &Observation, host: &Host) -> Result<(), ResourceError> {
        let live: &Live = live.get();
        match (live.meta, &live.content) {
            (Some(m), Some(old)) if m.kind == Ft::File => {
                let attrs = crate::fsops::Attrs {
                    mode: m.mode,
                    uid: Some(m.uid),
                    gid: Some(m.gid),
                };
                let staged = host.fs.stage_file(&self.path, old, attrs)?;
                for r in host.fs.commit(vec![staged]) {
                    r?;
                }
                Ok(())
            }
            (None, _) => {
                if host.fs.meta(&self.path)?.is_some() {
                    host.fs.remove_file(&self.path)?;
                }
                Ok(())
            }
            _ => Err(ResourceError::CannotPutBack {
                path: self.path.clone(),
            }),
        }
    }
}

/// Default time limit of a `validate` command.
const DEFAULT_VALIDATE_TIMEOUT: Duration = Duration::from_secs(30);
/// The tool's message in an error keeps at most its last lines and bytes
/// (the reason is usually at the end, after the tool's own log lines).
const VALIDATE_MESSAGE_LINES: usize = 20;
const VALIDATE_MESSAGE_BYTES: usize = 2000;
/// Words a shell would treat as operators; without a shell they would reach
/// the program as arguments, which is never what the author meant.
const SHELL_OPERATORS: &[&str] = &["|", "||", "&&", ";", "&", ">", ">>", "<", "2>", "2>&1"];

/// A file's `validate:` command: argv as written (with `%s`) and its limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validate {
    argv: Vec<String>,
    timeout: Duration,
}

/// Reads `validate` and `validate_timeout`. `None`: invalid (diagnostics
/// pushed); `Some(None)`: not given.
fn parse_validate(
    fields: &mut crate::syntax::yaml::MapReader<'_>,
    diags: &mut crate::syntax::diag::Diagnostics,
) -> Option<Option<Validate>> {
    let timeout_line = fields.take("validate_timeout").map(|n| n.line);
    // `take` marked it known; read it through the shared duration parser.
    let timeout = match timeout_line {
        Some(_) => Some(crate::syntax::duration(fields, "validate_timeout", diags)?),
        None => None,
    };
    let Some((line_text, line)) = fields.string("validate", diags) else {
        if let Some(tl) = timeout_line {
            if !fields.has("validate") {
                diags.push(
                    fields
                        .diag(tl, "`validate_timeout` is given without `validate`")
                        .hint("add the `validate` command it limits, or remove `validate_timeout`"),
                );
            }
            return None;
        }
        return if fields.has("validate") {
            None
        } else {
            Some(None)
        };
    };
    let example = "e.g. validate: caddy validate --adapter caddyfile --config %s";
    let Some(argv) = shlex::split(&line_text) else {
        diags.push(
            fields
                .diag(
                    line,
                    format!(
                        "`validate: {line_text}` has an unclosed quote or a trailing backslash"
                    ),
                )
                .hint("quote arguments as in a POSIX shell: 'single' or \"double\""),
        );
        return None;
    };
    let Some(program) = argv.first() else {
        diags.push(
            fields
                .diag(line, "`validate` is empty")
                .hint(format!("give the command that checks the file, {example}")),
        );
        return None;
    };
    let mut ok = true;
    if !argv.iter().any(|a| a.contains("%s")) {
        diags.push(
            fields
                .diag(
                    line,
                    format!(
                        "`validate: {line_text}` does not say where the file goes: `%s` is missing"
                    ),
                )
                .hint(format!(
                    "%s stands for the path of the rendered temp file the command checks, {example}"
                )),
        );
        ok = false;
    }
    if program.contains("%s") {
        diags.push(
            fields
                .diag(
                    line,
                    "the program of `validate` cannot be `%s` (the file being checked)",
                )
                .hint(example),
        );
        ok = false;
    } else if program.contains('/') && !program.starts_with('/') {
        diags.push(
            fields
                .diag(
                    line,
                    format!("the program `{program}` of `validate` is a relative path"),
                )
                .hint("give a name looked up on the agent's PATH (caddy) or an absolute path (/usr/bin/caddy)"),
        );
        ok = false;
    }
    if let Some(op) = argv.iter().find(|a| SHELL_OPERATORS.contains(&a.as_str())) {
        diags.push(
            fields
                .diag(
                    line,
                    format!("`validate` runs no shell, so `{op}` would be passed to {program} as an argument"),
                )
                .hint("validate one file with one command; if you really need a shell, write: sh -c '...' validate %s"),
        );
        ok = false;
    }
    ok.then_some(Some(Validate {
        argv,
        timeout: timeout.unwrap_or(DEFAULT_VALIDATE_TIMEOUT),
    }))
}

impl Validate {
    fn digest(&self, h: &mut blake3::Hasher) {
        h.update(b"validate\0");
        for a in &self.argv {
            h.update(&(a.len() as u64).to_le_bytes());
            h.update(a.as_bytes());
        }
        h.update(&self.timeout.as_millis().to_le_bytes());
    }

    /// The command for the temp file at `tmp` (a host path).
    fn command(&self, tmp: &str) -> Cmd {
        let argv: Vec<String> = self.argv.iter().map(|a| a.replace("%s", tmp)).collect();
        Cmd::new(&argv[0], argv[1..].iter().cloned()).timeout(self.timeout)
    }

    /// Runs the command on the staged file `tmp` for the managed `path`.
    /// With `secret` the tool's output is never put in the error: a tool
    /// quoting the offending line would print a secret.
    fn check(
        &self,
        host: &Host,
        tmp: &Path,
        path: &Path,
        secret: bool,
    ) -> Result<(), ResourceError> {
        let refuse =
            |command: String, status: String, output: String, hint: &str| ResourceError::Validate {
                path: path.to_path_buf(),
                command,
                status,
                output,
                hint: hint.to_string(),
            };
        let Some(tmp) = tmp.to_str() else {
            return Err(refuse(
                self.argv.join(" "),
                "was not run".into(),
                format!(": the temp file's path {} is not UTF-8", tmp.display()),
                "use a --root whose path is UTF-8",
            ));
        };
        let cmd = self.command(tmp);
        let out = match host.runner.run(&cmd) {
            Ok(out) => out,
            Err(super::exec::ExecError::Spawn { program, source }) => {
                return Err(refuse(
                    cmd.line(),
                    format!("could not start: cannot run `{program}`: {source}"),
                    String::new(),
                    &format!("install {program}, or check that it is on the agent's PATH (or give its absolute path)"),
                ));
            }
        };
        if out.success() {
            return Ok(());
        }
        let status = if out.timed_out {
            format!(
                "timed out after {}",
                humantime::format_duration(self.timeout)
            )
        } else {
            match out.code {
                Some(c) => format!("failed (exit {c})"),
                None => "was killed by a signal".to_string(),
            }
        };
        let (output, hint) = if secret {
            (
                "; its output is not shown because the file holds secrets".to_string(),
                "run the command by hand on a copy of the rendered file to see why",
            )
        } else {
            let message = tool_message(&out.stdout, &out.stderr);
            (
                if message.is_empty() {
                    String::new()
                } else {
                    format!(":\n    {}", message.replace('\n', "\n    "))
                },
                if out.timed_out {
                    "raise `validate_timeout`, or check why the command hangs"
                } else {
                    "fix the content (template, params or file) so the command accepts it"
                },
            )
        };
        Err(refuse(cmd.line(), status, output, hint))
    }
}

/// The tool's own words: stdout then stderr, trimmed, the last
/// [`VALIDATE_MESSAGE_LINES`] lines and [`VALIDATE_MESSAGE_BYTES`] bytes.
fn tool_message(stdout: &str, stderr: &str) -> String {
    let text = [stdout.trim(), stderr.trim()]
        .into_iter()
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    let lines: Vec<&str> = text.lines().collect();
    let mut cut = false;
    let mut kept = if lines.len() > VALIDATE_MESSAGE_LINES {
        cut = true;
        lines[lines.len() - VALIDATE_MESSAGE_LINES..].join("\n")
    } else {
        text.clone()
    };
    if kept.len() > VALIDATE_MESSAGE_BYTES {
        cut = true;
        let mut start = kept.len() - VALIDATE_MESSAGE_BYTES;
        while !kept.is_char_boundary(start) {
            start += 1;
        }
        kept = kept[start..].to_string();
    }
    if cut {
        format!("[... earlier output cut]\n{kept}")
    } else {
        kept
    }
}

/// `123 bytes, blake3 1a2b3c4d`: identifies content without printing it.
pub(crate) fn describe(content: &[u8]) -> String {
    let hash = blake3::hash(content).to_hex();
    format!("{} bytes, blake3 {}", content.len(), &hash[..12])
}

/// A unified diff of two texts, `None` when either is not UTF-8.
pub(crate) fn unified_diff(old: &[u8], new: &[u8], name: &str) -> Option<String> {
    let old = std::str::from_utf8(old).ok()?;
    let new = std::str::from_utf8(new).ok()?;
    let diff = similar::TextDiff::from_lines(old, new);
    let text = diff
        .unified_diff()
        .context_radius(3)
        .header(name, name)
        .to_string();
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() <= MAX_DIFF_LINES {
        return Some(text);
    }
    let mut cut = lines[..MAX_DIFF_LINES].join("\n");
    cut.push_str(&format!(
        "\n... {} more diff lines\n",
        lines.len() - MAX_DIFF_LINES
    ));
    Some(cut)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsops::{Fs, Meta};
    use crate::resources::Platform;

    fn host() -> Host {
        Host::new(Fs::new(Path::new("/")).unwrap(), true, Platform::Linux)
    }

    fn meta(kind: Ft, mode: u32) -> Option<Meta> {
        Some(Meta {
            kind,
            mode,
            uid: 0,
            gid: 0,
        })
    }

    /// One row: live state -> the fields that differ from
    /// `content "a\n", mode 0640`.
    fn check(meta: Option<Meta>, content: Option<&str>, want: &Ownership, expect: &[&str]) {
        let file = File {
            path: "/etc/x".into(),
            content: b"a\n".to_vec(),
            perms: Perms {
                mode: 0o640,
                owner: Some("zot".into()),
                group: None,
            },
            mode_given: true,
            validate: None,
            secrets: Vec::new(),
            masked: None,
        };
        let live = Observation::new(
            meta.is_some(),
            Live {
                meta,
                content: content.map(|c| c.as_bytes().to_vec()),
                want: *want,
            },
        );
        let fields: Vec<&str> = file.diff(&live, &host()).iter().map(|c| c.field).collect();
        assert_eq!(fields, expect);
    }

    const ANY: Ownership = Ownership {
        uid: None,
        gid: None,
    };

    #[test]
    fn in_sync_file_has_no_changes() {
        check(meta(Ft::File, 0o640), Some("a\n"), &ANY, &[]);
    }
    #[test]
    fn missing_file_needs_content_and_mode() {
        check(None, None, &ANY, &["content", "mode"]);
    }
    #[test]
    fn edited_content_only() {
        check(meta(Ft::File, 0o640), Some("b\n"), &ANY, &["content"]);
    }
    #[test]
    fn mode_only() {
        check(meta(Ft::File, 0o644), Some("a\n"), &ANY, &["mode"]);
    }
    #[test]
    fn owner_differs_when_enforced() {
        check(
            meta(Ft::File, 0o640),
            Some("a\n"),
            &Ownership {
                uid: Some(501),
                gid: None,
            },
            &["owner"],
        );
    }
    #[test]
    fn a_symlink_in_its_place_is_a_type_change() {
        check(
            meta(Ft::Symlink, 0o777),
            None,
            &ANY,
            &["type", "content", "mode"],
        );
    }
    #[test]
    fn content_change_carries_a_unified_diff() {
        let d = unified_diff(b"a\nb\n", b"a\nc\n", "/etc/x").unwrap();
        assert!(d.contains("-b\n+c\n"), "{d}");
        assert!(
            unified_diff(&[0xff, 0xfe], b"x", "/etc/x").is_none(),
            "binary: no text diff"
        );
    }

    // --- validate ---

    use crate::resources::exec::{Output, Runner};
    use crate::resources::{ApplyCtx, Assets};
    use crate::syntax::diag::Diagnostics;
    use crate::syntax::yaml::{self, MapReader};

    struct NoAssets;
    impl Assets for NoAssets {
        fn template(&self, _: &str, _: usize) -> Result<String, crate::syntax::diag::Diagnostic> {
            unreachable!("inline content only")
        }
        fn file(&self, _: &str, _: usize) -> Result<Vec<u8>, crate::syntax::diag::Diagnostic> {
            unreachable!("inline content only")
        }
    }

    /// Parses a `file:` resource's fields (YAML, `file: /srv/app.conf`
    /// first); the resource or every diagnostic as text.
    fn parse(yaml_text: &str) -> Result<Box<dyn Resource>, String> {
        let node = yaml::parse("modules/app/module.yaml", yaml_text).unwrap();
        let mut diags = Diagnostics::default();
        let mut fields = MapReader::new(
            "modules/app/module.yaml",
            "resource file",
            &node,
            &mut diags,
        )
        .unwrap()
        .for_resource("file:/srv/app.conf");
        fields.take("file");
        let r = FileKind.parse(ParseInput {
            id: "file:/srv/app.conf",
            platform: Platform::Linux,
            identity: "/srv/app.conf",
            fields: &mut fields,
            assets: &NoAssets,
            diags: &mut diags,
        });
        match r {
            Some(r) if diags.is_empty() => Ok(r),
            _ => Err(diags.to_string()),
        }
    }

    fn parse_err(yaml_text: &str) -> String {
        parse(yaml_text).expect_err("should be refused")
    }

    #[test]
    fn validate_without_percent_s_is_refused_with_line_and_hint() {
        let err = parse_err("file: /srv/app.conf\ncontent: x\nvalidate: caddy validate --config\n");
        assert!(
            err.contains("modules/app/module.yaml:3: file:/srv/app.conf: `validate: caddy validate --config` does not say where the file goes: `%s` is missing"),
            "{err}"
        );
        assert!(
            err.contains("hint: %s stands for the path of the rendered temp file"),
            "{err}"
        );
    }

    #[test]
    fn validate_parse_errors() {
        for (text, expect) in [
            ("validate: \"\"", "`validate` is empty"),
            ("validate: \"  \"", "`validate` is empty"),
            ("validate: \"check 'x %s\"", "unclosed quote"),
            (
                "validate: bin/check %s",
                "the program `bin/check` of `validate` is a relative path",
            ),
            ("validate: \"%s --check\"", "cannot be `%s`"),
            (
                "validate: check %s | grep ok",
                "runs no shell, so `|` would be passed to check",
            ),
            (
                "validate: [check, \"%s\"]",
                "`validate` in resource file must be a string",
            ),
            (
                "validate_timeout: 10s",
                "`validate_timeout` is given without `validate`",
            ),
            (
                "validate_timeout: soon\nvalidate: check %s",
                "`validate_timeout` must be a duration",
            ),
            (
                "validate_timeout: 0\nvalidate: check %s",
                "`validate_timeout` must be a duration",
            ),
        ] {
            let err = parse_err(&format!("file: /srv/app.conf\ncontent: x\n{text}\n"));
            assert!(err.contains(expect), "{text}: {err}");
            assert!(err.contains("modules/app/module.yaml:3:"), "{text}: {err}");
        }
    }

    #[test]
    fn validate_accepts_quoting_and_percent_s_inside_an_argument() {
        let r = parse("file: /srv/app.conf\ncontent: x\nvalidate: \"/usr/bin/tool --config=%s --name 'a b'\"\nvalidate_timeout: 5s\n")
            .unwrap();
        let dbg = format!("{r:?}");
        assert!(
            dbg.contains(r#"argv: ["/usr/bin/tool", "--config=%s", "--name", "a b"]"#),
            "{dbg}"
        );
        assert!(dbg.contains("timeout: 5s"), "{dbg}");
        // The command is part of the digest: changing it is a change.
        let digest = |r: &dyn Resource| {
            let mut h = blake3::Hasher::new();
            r.digest(&mut h);
            h.finalize()
        };
        let plain = parse("file: /srv/app.conf\ncontent: x\n").unwrap();
        let other = parse("file: /srv/app.conf\ncontent: x\nvalidate: /usr/bin/tool %s\n").unwrap();
        assert_ne!(digest(r.as_ref()), digest(plain.as_ref()));
        assert_ne!(digest(other.as_ref()), digest(plain.as_ref()));
        assert_ne!(digest(other.as_ref()), digest(r.as_ref()));
    }

    /// A sandbox with `/srv/app.conf` holding `old\n` (when `existing`).
    fn sandbox(existing: bool) -> (tempfile::TempDir, Host) {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("srv")).unwrap();
        if existing {
            std::fs::write(tmp.path().join("srv/app.conf"), b"old\n").unwrap();
        }
        let host = Host::new(Fs::new(tmp.path()).unwrap(), true, Platform::Linux);
        (tmp, host)
    }

    /// Plans and applies `resource`, committing what it staged as the
    /// engine does.
    fn apply_one(resource: &dyn Resource, host: &Host) -> Result<(), ResourceError> {
        let live = resource.observe(host)?;
        let changes = resource.diff(&live, host);
        let mut ctx = ApplyCtx::new(host);
        resource.apply(&live, &changes, &mut ctx)?;
        for r in host.fs.commit(ctx.take_staged()) {
            r?;
        }
        Ok(())
    }

    fn dir_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_failing_validator_leaves_the_live_file_byte_identical_and_no_temp_file() {
        let (tmp, host) = sandbox(true);
        let before = std::fs::metadata(tmp.path().join("srv/app.conf")).unwrap();
        let r = parse("file: /srv/app.conf\ncontent: \"broken\\n\"\nvalidate: \"sh -c 'echo \\\"line 1: unknown directive $(cat $1)\\\" >&2; exit 3' check %s\"\n")
            .unwrap();
        let err = apply_one(r.as_ref(), &host).unwrap_err().to_string();
        assert_eq!(
            std::fs::read(tmp.path().join("srv/app.conf")).unwrap(),
            b"old\n"
        );
        let after = std::fs::metadata(tmp.path().join("srv/app.conf")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            (before.ino(), before.mtime_nsec()),
            (after.ino(), after.mtime_nsec())
        );
        assert_eq!(dir_names(&tmp.path().join("srv")), ["app.conf"]);
        assert!(err.starts_with("validate: `sh -c "), "{err}");
        assert!(
            err.contains("/srv/.app.conf.hla-tmp."),
            "the command line names the temp file: {err}"
        );
        assert!(
            err.contains("failed (exit 3):\n    line 1: unknown directive broken"),
            "{err}"
        );
        assert!(err.contains("/srv/app.conf was left untouched"), "{err}");
        assert!(err.contains("fix the content"), "{err}");
    }

    #[test]
    fn a_passing_validator_lets_the_file_replace_the_live_one() {
        let (tmp, host) = sandbox(true);
        let r = parse("file: /srv/app.conf\ncontent: \"good\\n\"\nmode: \"0640\"\nvalidate: grep -qx good %s\n")
            .unwrap();
        apply_one(r.as_ref(), &host).unwrap();
        assert_eq!(
            std::fs::read(tmp.path().join("srv/app.conf")).unwrap(),
            b"good\n"
        );
        assert_eq!(dir_names(&tmp.path().join("srv")), ["app.conf"]);
        // The same validator refuses other content: it really ran.
        let bad = parse("file: /srv/app.conf\ncontent: \"bad\\n\"\nvalidate: grep -qx good %s\n")
            .unwrap();
        let err = apply_one(bad.as_ref(), &host).unwrap_err().to_string();
        assert!(err.contains("failed (exit 1)"), "{err}");
        assert_eq!(
            std::fs::read(tmp.path().join("srv/app.conf")).unwrap(),
            b"good\n"
        );
    }

    #[test]
    fn a_new_file_refused_by_its_validator_is_never_created() {
        let (tmp, host) = sandbox(false);
        let r = parse("file: /srv/app.conf\ncontent: x\nvalidate: \"false %s\"\n").unwrap();
        assert!(apply_one(r.as_ref(), &host).is_err());
        assert!(dir_names(&tmp.path().join("srv")).is_empty());
    }

    /// Records each command and what the file at its last argument held
    /// (content and mode) while the command ran.
    #[derive(Default)]
    struct Inspect {
        seen: std::sync::Mutex<Vec<(String, Vec<u8>, u32)>>,
    }
    impl Runner for Inspect {
        fn run(&self, cmd: &Cmd) -> Result<Output, crate::resources::exec::ExecError> {
            use std::os::unix::fs::PermissionsExt;
            let path = cmd.args.last().unwrap().trim_start_matches("--config=");
            let content = std::fs::read(path).unwrap();
            let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o7777;
            self.seen.lock().unwrap().push((cmd.line(), content, mode));
            Ok(Output {
                code: Some(0),
                ..Output::default()
            })
        }
    }

    #[test]
    fn percent_s_is_the_staged_temp_file_with_its_final_content_and_mode() {
        let (tmp, host) = sandbox(true);
        let inspect = std::sync::Arc::new(Inspect::default());
        let host = host.with_runner(inspect.clone());
        let r = parse("file: /srv/app.conf\ncontent: \"new\\n\"\nmode: \"0640\"\nvalidate: \"/usr/bin/tool check --config=%s %s\"\nvalidate_timeout: 7s\n")
            .unwrap();
        apply_one(r.as_ref(), &host).unwrap();
        let seen = inspect.seen.lock().unwrap();
        let [(line, content, mode)] = seen.as_slice() else {
            panic!("one command: {seen:?}")
        };
        let dir = tmp.path().join("srv");
        let tmp_prefix = format!(
            "{}/.app.conf.hla-tmp.{}.",
            dir.display(),
            std::process::id()
        );
        let words: Vec<&str> = line.split(' ').collect();
        assert_eq!(words[..2], ["/usr/bin/tool", "check"]);
        assert!(
            words[2].starts_with(&format!("--config={tmp_prefix}")),
            "{line}"
        );
        assert_eq!(
            words[2].trim_start_matches("--config="),
            words[3],
            "every %s is the same file"
        );
        assert!(words[3].starts_with(&tmp_prefix), "{line}");
        assert_eq!((content.as_slice(), *mode), (b"new\n".as_slice(), 0o640));
        assert_eq!(std::fs::read(dir.join("app.conf")).unwrap(), b"new\n");
    }

    #[test]
    fn an_unchanged_file_is_not_validated_again() {
        let (_tmp, host) = sandbox(true);
        let inspect = std::sync::Arc::new(Inspect::default());
        let host = host.with_runner(inspect.clone());
        let r =
            parse("file: /srv/app.conf\ncontent: \"old\\n\"\nmode: \"0600\"\nvalidate: tool %s\n")
                .unwrap();
        apply_one(r.as_ref(), &host).unwrap();
        assert!(
            inspect.seen.lock().unwrap().is_empty(),
            "only the mode changed"
        );
    }

    #[test]
    fn a_file_holding_secrets_never_shows_the_tools_output() {
        let (tmp, host) = sandbox(true);
        let secret = "hunter2-very-secret";
        let mut r = parse(&format!("file: /srv/app.conf\ncontent: \"password = {secret}\\n\"\nvalidate: \"sh -c 'echo \\\"bad line: $(cat $1)\\\"; echo \\\"stderr: $(cat $1)\\\" >&2; exit 2' check %s\"\n"))
            .unwrap();
        r.set_secrets(vec![SecretValue::new(secret.to_string())], None);
        let err = apply_one(r.as_ref(), &host).unwrap_err();
        let text = format!("{err} {err:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(
            !text.contains("password ="),
            "no tool output at all: {text}"
        );
        assert!(
            text.contains(
                "failed (exit 2); its output is not shown because the file holds secrets"
            ),
            "{text}"
        );
        assert!(text.contains("run the command by hand on a copy"), "{text}");
        assert_eq!(
            std::fs::read(tmp.path().join("srv/app.conf")).unwrap(),
            b"old\n"
        );
        assert_eq!(dir_names(&tmp.path().join("srv")), ["app.conf"]);
    }

    #[test]
    fn a_missing_program_is_named() {
        let (tmp, host) = sandbox(true);
        let r =
            parse("file: /srv/app.conf\ncontent: x\nvalidate: no-such-validator-hla %s\n").unwrap();
        let err = apply_one(r.as_ref(), &host).unwrap_err().to_string();
        assert!(
            err.contains("could not start: cannot run `no-such-validator-hla`"),
            "{err}"
        );
        assert!(err.contains("install no-such-validator-hla"), "{err}");
        assert_eq!(dir_names(&tmp.path().join("srv")), ["app.conf"]);
    }

    #[test]
    fn a_validator_over_its_time_limit_is_killed() {
        let (tmp, host) = sandbox(true);
        let r = parse("file: /srv/app.conf\ncontent: x\nvalidate: \"sh -c 'sleep 10; echo late' check %s\"\nvalidate_timeout: 1s\n").unwrap();
        let err = apply_one(r.as_ref(), &host).unwrap_err().to_string();
        assert!(err.contains("timed out after 1s"), "{err}");
        assert!(err.contains("raise `validate_timeout`"), "{err}");
        assert_eq!(
            std::fs::read(tmp.path().join("srv/app.conf")).unwrap(),
            b"old\n"
        );
    }

    #[test]
    fn long_tool_output_keeps_its_end() {
        let out: String = (1..=100).map(|i| format!("line {i}\n")).collect();
        let msg = tool_message("", &out);
        assert!(
            msg.starts_with("[... earlier output cut]\nline 81\n"),
            "{msg}"
        );
        assert!(msg.ends_with("line 100"), "{msg}");
        let long = "x".repeat(10_000);
        assert!(tool_message(&long, "").len() < VALIDATE_MESSAGE_BYTES + 40);
        assert_eq!(tool_message(" out \n", "\nerr\n"), "out\nerr");
    }
}
