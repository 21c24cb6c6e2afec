//! `--json` is a contract (docs/json-output.md): `agent plan --json` and
//! `agent apply --json` of the same run validate against
//! docs/json-output.schema.json, list the same entries under the same
//! keys, give every entry its kind and module and every skipped or
//! unchecked one its reason, never call something not looked at
//! `in_sync`; an invalid desired state prints a JSON document with its
//! diagnostics (exit code unchanged). Snapshots of all three.

mod json_doc;

use json_doc::{schema, CONFIGMAP};
use std::collections::BTreeSet;

use homelab_agent_tests::{stderr, stdout, workspace, Lab};
use serde_json::Value;

const HOST: &str = "platform: linux
roots: [/srv]
modules:
  - name: app
stacks:
  - name: web
    context: lab
";

const MODULE: &str = r#"resources:
  - directory: /srv/app
  - file: /srv/app/app.conf
    content: "port = 8080\n"
    mode: "0640"
  - file: /srv/app/db.conf
    content: "password={{ secret('op://homelab/db/password') }}\n"
  - package: jq
"#;

fn lab() -> Lab {
    let lab = Lab::empty();
    lab.write("hosts/lab.yaml", HOST);
    lab.write("modules/app/module.yaml", MODULE);
    lab.write("k8s/web/stack.yaml", "namespace: web\n");
    lab.write("k8s/web/app.yaml", CONFIGMAP);
    lab
}

/// Fails with every schema violation of `doc`.
fn assert_valid(doc: &Value) {
    let errors: Vec<String> = schema()
        .iter_errors(doc)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}\nin {doc:#}");
}

/// The document an agent command printed, with the lab's paths and the
/// local revision replaced.
fn document(lab: &Lab, cmd: &str, code: i32) -> Value {
    let out = lab.agent(cmd, "lab", &["--json"]);
    assert_eq!(out.status.code(), Some(code), "{}", stderr(&out));
    let mut doc: Value = serde_json::from_str(&lab.redact(&stdout(&out))).unwrap();
    if doc["revision"].is_string() {
        doc["revision"] = "[REVISION]".into();
    }
    doc
}

/// Every entry, host resources then stack objects.
fn entries(doc: &Value) -> Vec<&Value> {
    let mut out: Vec<&Value> = doc["resources"].as_array().unwrap().iter().collect();
    for s in doc["stacks"].as_array().unwrap() {
        out.extend(s["objects"].as_array().unwrap());
    }
    out
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

#[test]
fn plan_and_apply_of_one_run_share_the_schema() {
    let lab = lab();
    let plan = document(&lab, "plan", 0);
    let apply = document(&lab, "apply", 0);
    assert_valid(&plan);
    assert_valid(&apply);
    insta::assert_json_snapshot!("plan", plan);
    insta::assert_json_snapshot!("apply", apply);

    // The same keys at the top, in each stack and in every entry.
    assert_eq!(keys(&plan), keys(&apply));
    assert_eq!(keys(&plan["stacks"][0]), keys(&apply["stacks"][0]));
    let (p, a) = (entries(&plan), entries(&apply));
    let ids = |e: &[&Value]| e.iter().map(|e| e["id"].clone()).collect::<Vec<_>>();
    assert_eq!(ids(&p), ids(&a), "the same entries, in the same order");
    for (p, a) in p.iter().zip(&a) {
        assert_eq!(keys(p), keys(a), "{p} / {a}");
        assert_eq!(p["kind"], a["kind"]);
        assert_eq!(p["module"], a["module"]);
    }

    for doc in [&plan, &apply] {
        for e in entries(doc) {
            assert!(!e["kind"].as_str().unwrap().is_empty(), "{e}");
            assert!(!e["module"].as_str().unwrap().is_empty(), "{e}");
            if matches!(
                e["classification"].as_str(),
                Some("skipped" | "not_checked")
            ) {
                assert!(e["reason"]["type"].is_string(), "no reason: {e}");
            }
        }
        let class = |id: &str| {
            entries(doc)
                .into_iter()
                .find(|e| e["id"] == id)
                .unwrap_or_else(|| panic!("{id} not in {doc:#}"))["classification"]
                .clone()
        };
        // Not looked at: a package in a sandbox, a stack without a cluster.
        assert_eq!(class("package:jq"), "not_checked");
        assert_eq!(class("k8s:web/web/ConfigMap/web-config"), "not_checked");
        assert_eq!(class("file:/srv/app/db.conf"), "skipped");
    }
    // The summary counts the entries it sums up.
    assert_eq!(plan["summary"], apply["summary"]);
    assert_eq!(plan["summary"]["not_checked"], 1);
    assert_eq!(plan["summary"]["skipped"], 1);
    assert_eq!(plan["stacks"][0]["summary"]["not_checked"], 1);
    assert!(plan["counts"].is_null());
    assert_eq!(apply["counts"]["created"], 2);

    // Typed values: a mode stays the octal string people write.
    let conf = entries(&plan)
        .into_iter()
        .find(|e| e["id"] == "file:/srv/app/app.conf")
        .unwrap()
        .clone();
    let mode = conf["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["field"] == "mode")
        .unwrap();
    assert_eq!(mode["old"], Value::Null);
    assert_eq!(mode["new"], "0640");

    // The text plan marks the unchecked stack objects `?` with the reason.
    let out = lab.agent("plan", "lab", &[]);
    let text = stdout(&out);
    assert!(
        text.contains("? k8s:web/web/ConfigMap/web-config  not checked"),
        "{text}"
    );
    assert!(!text.contains("  = k8s:"), "{text}");
}

#[test]
fn an_invalid_desired_state_is_a_json_document_too() {
    let lab = lab();
    lab.write(
        "modules/app/module.yaml",
        &MODULE.replace("mode: \"0640\"", "mdoe: \"0640\""),
    );
    let plan = document(&lab, "plan", 1);
    assert_valid(&plan);
    insta::assert_json_snapshot!("invalid_plan", plan);
    let d = &plan["error"]["diagnostics"][0];
    assert_eq!(d["file"], "modules/app/module.yaml");
    assert_eq!(d["line"], 5);
    assert!(d["message"].as_str().unwrap().contains("mdoe"), "{d}");
    let apply = document(&lab, "apply", 1);
    assert_valid(&apply);
    assert_eq!(apply["command"], "apply");
    assert_eq!(apply["error"], plan["error"]);
    assert!(
        !lab.host_path("/srv/app").exists(),
        "an invalid desired state changes nothing"
    );
}

/// The reference homelab's plan (the snapshot in reference_plan.rs) is
/// valid against the schema too.
#[test]
fn the_reference_plan_validates() {
    for host in ["indri", "k3s-cp"] {
        let root = tempfile::tempdir().unwrap();
        let out = homelab_agent_tests::run(&[
            "plan",
            "--repo",
            workspace().to_str().unwrap(),
            "--host",
            host,
            "--root",
            root.path().to_str().unwrap(),
            "--json",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_valid(&serde_json::from_str(&stdout(&out)).unwrap());
    }
}
