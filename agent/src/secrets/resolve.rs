//! Resolving references during one run: a [`SecretSource`] per run, with a
//! per-run cache so each item is fetched at most once and concurrent
//! references to one item share one request. Nothing is cached on disk.

use super::{Reference, SecretValue};

/// Why a reference did not resolve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("no 1Password Connect configured (set `onepassword:` in the agent config)")]
    NotConfigured,
    /// Connect could not be reached or failed; worth retrying later.
    #[error("{0}")]
    Unavailable(String),
    /// The reference itself is wrong (not found, ambiguous, not granted).
    #[error("{0}")]
    Failed(String),
}

/// Where secret values come from during a run.
pub trait SecretSource: Send + Sync {
    fn resolve(&self, reference: &Reference) -> Result<SecretValue, SecretError>;
}

/// No Connect configured: every reference is reported, nothing resolves.
pub struct Offline;

impl SecretSource for Offline {
    fn resolve(&self, _reference: &Reference) -> Result<SecretValue, SecretError> {
        Err(SecretError::NotConfigured)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use crate::desired::{self, LoadOptions};
    use crate::fsops::Fs;
    use crate::resources::{Host, Platform};
    use crate::source::LocalDir;

    /// A source of fixed values (the Connect path is tested against the stand-in).
    struct Static(HashMap<String, String>);

    impl SecretSource for Static {
        fn resolve(&self, reference: &Reference) -> Result<SecretValue, SecretError> {
            self.0
                .get(&reference.to_string())
                .map(SecretValue::new)
                .ok_or_else(|| SecretError::Failed(format!("{reference}: no such item")))
        }
    }

    const SECRET: &str = "correct-horse-battery";

    fn repo() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let w = |p: &str, c: &str| {
            let path = dir.path().join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, c).unwrap();
        };
        w(
            "hosts/lab.yaml",
            "platform: linux\nroots: [/srv]\nmodules: [{name: m}]\n",
        );
        w(
            "modules/m/module.yaml",
            "resources:\n  - file: /srv/pass\n    content: \"user=app\\npass={{ secret('op://homelab/db/password') }}\\n\"\n  - file: /srv/other\n    content: \"plain\\n\"\n  - file: /srv/needs\n    content: \"{{ secret('op://homelab/missing/password') }}\\n\"\n",
        );
        dir
    }

    fn load(dir: &Path) -> crate::desired::catalog::Catalog {
        let secrets: Arc<dyn SecretSource> = Arc::new(Static(HashMap::from([(
            "op://homelab/db/password".to_string(),
            SECRET.to_string(),
        )])));
        let opts = LoadOptions {
            secrets,
            ..LoadOptions::default()
        };
        desired::load_with(Arc::new(LocalDir::open(dir).unwrap()), "lab", &opts).unwrap()
    }

    #[test]
    fn secrets_render_redacted_and_unresolved_ones_block_their_resource() {
        let dir = repo();
        let catalog = load(dir.path());
        let by_id = |id: &str| catalog.entries.iter().find(|e| e.id == id).unwrap();
        assert!(by_id("file:/srv/pass").resource.holds_secrets());
        assert!(by_id("file:/srv/pass").blocked.is_none());
        assert!(!by_id("file:/srv/other").resource.holds_secrets());
        let blocked = by_id("file:/srv/needs").blocked.clone().unwrap();
        assert!(
            blocked.contains("op://homelab/missing/password"),
            "{blocked}"
        );
        // Nothing about the catalog prints the value.
        assert!(!format!("{catalog:?}").contains(SECRET));

        let root = tempfile::tempdir().unwrap();
        let host = Host::new(Fs::new(root.path()).unwrap(), true, Platform::Linux);
        let key = homelab_agent_state::DigestKey::load(root.path(), true).unwrap();
        let plan = crate::plan::plan(catalog, &host, &Default::default(), &key);
        let text = crate::report::plan_text(&plan, None, crate::report::Style { color: false });
        let json = serde_json::to_string(&crate::report::json::plan_document(
            &plan,
            None,
            vec![],
            &[],
        ))
        .unwrap();
        for out in [&text, &json, &format!("{plan:?}")] {
            assert!(!out.contains(SECRET), "leaked:\n{out}");
        }
        assert!(text.contains("+pass=[redacted]"), "{text}");
        assert!(
            text.contains(
                "? file:/srv/needs  (module m) skipped: needs op://homelab/missing/password"
            ),
            "{text}"
        );
        // A file holding secrets defaults to 0600.
        assert!(text.contains("mode: (none) -> 0600"), "{text}");
    }
}
