//! `absent`: nothing may exist at the path (a file, a link or an empty
//! directory is removed; a non-empty directory is an error, never a
//! recursive delete).

use std::path::{Path, PathBuf};

use super::{
    ApplyCtx, FieldChange, Host, IdentityKind, Kind, Observation, ParseInput, PruneOutcome,
    Resource, ResourceError,
};
use crate::fsops::{FileKind as Ft, Meta};

pub struct AbsentKind;

impl Kind for AbsentKind {
    fn name(&self) -> &'static str {
        "absent"
    }
    fn doc(&self) -> &'static str {
        "nothing at the path: removes a file, a symlink or an empty directory"
    }
    fn identity_kind(&self) -> IdentityKind {
        IdentityKind::Path
    }
    fn fields(&self) -> &'static [&'static str] {
        &[]
    }

    fn parse(&self, input: ParseInput<'_, '_>) -> Option<Box<dyn Resource>> {
        Some(Box::new(Absent {
            path: PathBuf::from(input.identity),
        }))
    }

    /// An `absent` resource that leaves the catalog leaves nothing behind.
    fn prune(&self, _identity: &str, _host: &Host) -> Result<PruneOutcome, ResourceError> {
        Ok(PruneOutcome::AlreadyGone)
    }
}

#[derive(Debug)]
pub struct Absent {
    path: PathBuf,
}

impl Resource for Absent {
    fn kind(&self) -> &'static str {
        "absent"
    }
    fn identity(&self) -> &str {
        self.path.to_str().expect("identities are UTF-8")
    }
    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }
    fn digest(&self, _h: &mut blake3::Hasher) {}

    fn observe(&self, host: &Host) -> Result<Observation, ResourceError> {
        // `exists: false`: an absent resource is never "created".
        Ok(Observation::new(false, host.fs.meta(&self.path)?))
    }

    fn diff(&self, live: &Observation, _host: &Host) -> Vec<FieldChange> {
        match live.get::<Option<Meta>>() {
            Some(m) => vec![FieldChange::new(
                "present",
                Some(m.kind.name().into()),
                Some("absent".into()),
            )],
            None => Vec::new(),
        }
    }

    fn apply(
        &self,
        live: &Observation,
        _changes: &[FieldChange],
        ctx: &mut ApplyCtx<'_>,
    ) -> Result<(), ResourceError> {
        match live.get::<Option<Meta>>() {
            None => Ok(()),
            Some(m) if m.kind == Ft::Directory => {
                if ctx.host.fs.remove_empty_dir(&self.path)? {
                    Ok(())
                } else {
                    Err(ResourceError::DirectoryNotEmpty {
                        path: self.path.clone(),
                    })
                }
            }
            Some(_) => Ok(ctx.host.fs.remove_file(&self.path)?),
        }
    }
}
