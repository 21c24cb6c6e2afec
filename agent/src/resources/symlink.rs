//! `symlink`: a symbolic link to `target`, replaced atomically.

use std::path::{Path, PathBuf};

use super::{
    ApplyCtx, FieldChange, Host, IdentityKind, Kind, Observation, ParseInput, PruneOutcome,
    Resource, ResourceError,
};
use crate::fsops::{FileKind as Ft, Meta};

pub struct SymlinkKind;

impl Kind for SymlinkKind {
    fn name(&self) -> &'static str {
        "symlink"
    }
    fn doc(&self) -> &'static str {
        "a symbolic link: target (required)"
    }
    fn identity_kind(&self) -> IdentityKind {
        IdentityKind::Path
    }
    fn fields(&self) -> &'static [&'static str] {
        &["target"]
    }

    fn parse(&self, input: ParseInput<'_, '_>) -> Option<Box<dyn Resource>> {
        let ParseInput {
            identity,
            fields,
            diags,
            ..
        } = input;
        let found = fields.take("target");
        let node = fields.require("target", found, diags)?;
        let Some(target) = node.as_str() else {
            diags.push(fields.diag(
                node.line,
                format!(
                    "`target` must be a string, found {}",
                    node.value.type_name()
                ),
            ));
            return None;
        };
        // A target is shown in plans and logs like a path: same characters.
        if target.is_empty() || target.chars().any(crate::syntax::unsafe_path_char) {
            diags.push(
                fields
                    .diag(
                        node.line,
                        format!(
                            "`target: {}` is empty or holds a control or invisible character",
                            target.escape_debug()
                        ),
                    )
                    .hint(crate::syntax::UNSAFE_CHAR_HINT),
            );
            return None;
        }
        Some(Box::new(Symlink {
            path: PathBuf::from(identity),
            target: PathBuf::from(target),
        }))
    }

    fn prune(&self, identity: &str, host: &Host) -> Result<PruneOutcome, ResourceError> {
        super::prune_if(host, Path::new(identity), Ft::Symlink)
    }
}

#[derive(Debug)]
pub struct Symlink {
    path: PathBuf,
    target: PathBuf,
}

#[derive(Debug)]
struct Live {
    meta: Option<Meta>,
    target: Option<PathBuf>,
}

impl Resource for Symlink {
    fn kind(&self) -> &'static str {
        "symlink"
    }
    fn identity(&self) -> &str {
        self.path.to_str().expect("identities are UTF-8")
    }
    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }
    fn digest(&self, h: &mut blake3::Hasher) {
        h.update(self.target.as_os_str().as_encoded_bytes());
    }

    fn observe(&self, host: &Host) -> Result<Observation, ResourceError> {
        let meta = host.fs.meta(&self.path)?;
        if let Some(m) = meta.filter(|m| m.kind == Ft::Directory) {
            return Err(ResourceError::WrongType {
                path: self.path.clone(),
                found: m.kind.name(),
                wanted: "symlink",
            });
        }
        let target = match meta {
            Some(m) if m.kind == Ft::Symlink => host.fs.read_link(&self.path)?,
            _ => None,
        };
        Ok(Observation::new(meta.is_some(), Live { meta, target }))
    }

    fn diff(&self, live: &Observation, _host: &Host) -> Vec<FieldChange> {
        let live: &Live = live.get();
        let mut out = Vec::new();
        if let Some(m) = live.meta.filter(|m| m.kind != Ft::Symlink) {
            out.push(FieldChange::new(
                "type",
                Some(m.kind.name().into()),
                Some("symlink".into()),
            ));
        }
        if live.target.as_deref() != Some(self.target.as_path()) {
            out.push(FieldChange::new(
                "target",
                live.target.as_ref().map(|t| t.display().to_string()),
                Some(self.target.display().to_string()),
            ));
        }
        out
    }

    fn apply(
        &self,
        _live: &Observation,
        _changes: &[FieldChange],
        ctx: &mut ApplyCtx<'_>,
    ) -> Result<(), ResourceError> {
        ctx.host.fs.symlink(&self.path, &self.target)?;
        Ok(())
    }
}
