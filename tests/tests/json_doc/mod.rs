//! What `json_output.rs` and `target.rs` share: the JSON schema of
//! `--json` output, and a stack object for their labs (and `daemon.rs`: the
//! schema of `agent reconcile --json`).
#![allow(dead_code)]

use homelab_agent_tests::workspace;

/// `docs/json-output.schema.json`, compiled.
pub fn schema() -> jsonschema::Validator {
    let text = std::fs::read_to_string(workspace().join("docs/json-output.schema.json")).unwrap();
    jsonschema::validator_for(&serde_json::from_str(&text).unwrap()).unwrap()
}

/// A stack's one object (`k8s/web/app.yaml`).
pub const CONFIGMAP: &str = "apiVersion: v1
kind: ConfigMap
metadata:
  name: web-config
data:
  replicas: \"2\"
";
