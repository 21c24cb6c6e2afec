//! `directory`: a directory with mode, owner and group. Missing parents are
//! created (0755). Pruning removes it only when empty: the agent never
//! deletes data it did not write.

use std::path::{Path, PathBuf};

use super::{
    ApplyCtx, FieldChange, Host, IdentityKind, Kind, Observation, Ownership, ParseInput, Perms,
    PruneOutcome, Resource, ResourceError,
};
use crate::fsops::{FileKind as Ft, Meta};

pub struct DirectoryKind;

const DEFAULT_MODE: u32 = 0o755;

impl Kind for DirectoryKind {
    fn name(&self) -> &'static str {
        "directory"
    }
    fn doc(&self) -> &'static str {
        "a directory: mode (default \"0755\"), owner, group; pruned only when empty"
    }
    fn identity_kind(&self) -> IdentityKind {
        IdentityKind::Path
    }
    fn fields(&self) -> &'static [&'static str] {
        &["mode", "owner", "group"]
    }

    fn parse(&self, input: ParseInput<'_, '_>) -> Option<Box<dyn Resource>> {
        let ParseInput {
            identity,
            fields,
            diags,
            ..
        } = input;
        let perms = Perms::parse(fields, diags, DEFAULT_MODE);
        Some(Box::new(Directory {
            path: PathBuf::from(identity),
            perms,
        }))
    }

    fn prune(&self, identity: &str, host: &Host) -> Result<PruneOutcome, ResourceError> {
        let path = Path::new(identity);
        match host.fs.meta(path)? {
            None => Ok(PruneOutcome::AlreadyGone),
            Some(m) if m.kind == Ft::Directory => {
                if host.fs.remove_empty_dir(path)? {
                    Ok(PruneOutcome::Removed)
                } else {
                    Ok(PruneOutcome::LeftInPlace("it is not empty".into()))
                }
            }
            Some(m) => Ok(PruneOutcome::LeftInPlace(format!(
                "it is now a {}",
                m.kind.name()
            ))),
        }
    }
}

#[derive(Debug)]
pub struct Directory {
    path: PathBuf,
    perms: Perms,
}

#[derive(Debug)]
struct Live {
    meta: Option<Meta>,
    want: Ownership,
}

impl Resource for Directory {
    fn kind(&self) -> &'static str {
        "directory"
    }
    fn identity(&self) -> &str {
        self.path.to_str().expect("identities are UTF-8")
    }
    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }
    fn digest(&self, h: &mut blake3::Hasher) {
        self.perms.digest(h);
    }

    fn observe(&self, host: &Host) -> Result<Observation, ResourceError> {
        let want = self.perms.resolve(host)?;
        let meta = host.fs.meta(&self.path)?;
        // Something else in its place is not a diff to apply but a conflict
        // to resolve by hand: refuse at plan time, before anything is touched.
        if let Some(m) = meta.filter(|m| m.kind != Ft::Directory) {
            return Err(ResourceError::WrongType {
                path: self.path.clone(),
                found: m.kind.name(),
                wanted: "directory",
            });
        }
        Ok(Observation::new(meta.is_some(), Live { meta, want }))
    }

    fn diff(&self, live: &Observation, _host: &Host) -> Vec<FieldChange> {
        let live: &Live = live.get();
        let mut out = Vec::new();
        if live.meta.is_none() {
            out.push(FieldChange::new("type", None, Some("directory".into())));
        }
        let meta = live.meta.filter(|m| m.kind == Ft::Directory);
        self.perms.diff(meta.as_ref(), live.want, &mut out);
        out
    }

    fn apply(
        &self,
        live: &Observation,
        _changes: &[FieldChange],
        ctx: &mut ApplyCtx<'_>,
    ) -> Result<(), ResourceError> {
        let live: &Live = live.get();
        let attrs = self.perms.attrs(live.want);
        ctx.host.fs.create_dir_all(&self.path, attrs)?;
        Ok(())
    }
}
