//! `file`: a regular file with exact content, mode, owner and group.
//!
//! Content comes from exactly one of `content` (inline, rendered as a
//! template), `template` (a module template) or `source` (a module file,
//! copied verbatim). Replacement is atomic and never follows a symlink.

use std::path::{Path, PathBuf};

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
        "a regular file: one of content | template | source; mode (default \"0644\"), owner, group"
    }
    fn identity_kind(&self) -> IdentityKind {
        IdentityKind::Path
    }
    fn fields(&self) -> &'static [&'static str] {
        &["content", "template", "source", "mode", "owner", "group"]
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
    fn digest(&self, h: &mut blake3::Hasher) {
        h.update(&(self.content.len() as u64).to_le_bytes());
        h.update(&self.content);
        self.perms.digest(h);
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
            _ => Err(ResourceError::Unsupported(format!(
                "{} was not a regular file before; it cannot be put back",
                self.path.display()
            ))),
        }
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
            ctx.stage_file(&self.path, &self.content, attrs)
        } else {
            ctx.host.fs.set_attrs(&self.path, attrs).map_err(Into::into)
        }
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
}
