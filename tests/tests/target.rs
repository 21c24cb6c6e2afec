//! `agent plan --target` / `agent apply --target` (as `terraform -target` or
//! Ansible's `--limit`): a run covers the selected resource ids, modules or
//! stacks, what they come after and the services they notify, and nothing
//! else; only a leftover named by id is pruned. A limited apply is recorded
//! with its targets and sets no applied revision; a selector that matches
//! nothing changes nothing. Drives the real binary in a sandbox (`--root`).

mod json_doc;

use json_doc::{schema, CONFIGMAP};
use std::collections::BTreeSet;

use homelab_agent_tests::{stderr, stdout, tree, Lab};
use serde_json::Value;

const HOST: &str = "platform: linux
roots: [/srv]
modules:
  - name: app
  - name: extra
stacks:
  - name: web
    context: lab
";

/// `service:app` comes after `file:/srv/app/env` and is notified by
/// `app.conf` (module app) and by `extra.conf` (module extra).
const APP: &str = r#"params: {}
resources:
  - directory: /srv/app
  - file: /srv/app/app.conf
    content: "port = 8080\n"
    notify: [service:app]
  - file: /srv/app/env
    content: "A=1\n"
  - service: app
    program: /usr/bin/true
    after: [file:/srv/app/env]
  - file: /srv/app/motd
    content: "welcome\n"
"#;

const EXTRA: &str = r#"params: {}
resources:
  - directory: /srv/extra
  - file: /srv/extra/a.txt
    content: "a\n"
  - file: /srv/app/extra.conf
    content: "extra = true\n"
    notify: [service:app]
"#;

fn lab() -> Lab {
    let lab = Lab::empty();
    lab.write("hosts/lab.yaml", HOST);
    lab.write("modules/app/module.yaml", APP);
    lab.write("modules/extra/module.yaml", EXTRA);
    lab.write("k8s/web/stack.yaml", "namespace: web\n");
    lab.write("k8s/web/app.yaml", CONFIGMAP);
    lab
}

/// The document of `agent CMD --json ARGS`, valid against the schema,
/// after asserting its exit code.
fn document(lab: &Lab, cmd: &str, args: &[&str], code: i32) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = lab.agent(cmd, "lab", &all);
    assert_eq!(out.status.code(), Some(code), "{}", stderr(&out));
    let doc: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let errors: Vec<String> = schema()
        .iter_errors(&doc)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}\nin {doc:#}");
    doc
}

fn ids(doc: &Value) -> BTreeSet<String> {
    doc["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

/// `agent status` (it takes no --repo) on the lab's state.
fn status_output(lab: &Lab, json: bool) -> std::process::Output {
    let mut c = homelab_agent_tests::agent();
    c.arg("status")
        .arg("--root")
        .arg(lab.root())
        .args(["--host", "lab"]);
    if json {
        c.arg("--json");
    }
    c.output().expect("spawn agent")
}

fn status(lab: &Lab) -> Value {
    let out = status_output(lab, true);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_str(&stdout(&out)).unwrap()
}

#[test]
fn a_plan_limited_to_a_module_covers_its_dependencies_and_notified_services_and_changes_nothing() {
    let lab = lab();
    let before = tree(&lab.root());
    let plan = document(&lab, "plan", &["--target", "module:extra"], 0);
    assert_eq!(
        ids(&plan),
        set(&[
            // The module's own resources.
            "directory:/srv/extra",
            "file:/srv/extra/a.txt",
            "file:/srv/app/extra.conf",
            // What they come after (extra.conf's directory), the service
            // extra.conf notifies, and what that service comes after: its
            // `after` and the other file that notifies it.
            "directory:/srv/app",
            "service:app",
            "file:/srv/app/env",
            "file:/srv/app/app.conf",
        ]),
        "{plan:#}"
    );
    assert_eq!(plan["targets"], serde_json::json!(["module:extra"]));
    assert_eq!(
        plan["stacks"],
        serde_json::json!([]),
        "a host-only selection plans no stack"
    );
    assert_eq!(tree(&lab.root()), before, "a plan changes nothing");

    // A whole plan has no `targets` key at all.
    let whole = document(&lab, "plan", &[], 0);
    assert!(whole.get("targets").is_none(), "{whole:#}");
    assert_eq!(ids(&whole).len(), 8);

    // The text says first that the run was limited, and how much it left out.
    let out = lab.agent("plan", "lab", &["--target", "module:extra"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let header: String = text
        .lines()
        .take_while(|l| !l.starts_with("Sandbox:"))
        .map(|l| {
            if l.starts_with("Plan for host") {
                format!("{} [REVISION]\n", l.rsplit_once(' ').unwrap().0)
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    insta::assert_snapshot!("limited_plan_header", header);
    assert!(!text.contains("motd"), "{text}");
}

#[test]
fn an_apply_limited_to_one_id_creates_only_it_and_applies_no_revision() {
    let lab = lab();
    let out = lab.agent(
        "apply",
        "lab",
        &["--target", "file:/srv/extra/a.txt", "--detailed-exitcode"],
    );
    assert_eq!(out.status.code(), Some(2), "created: {}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with("Limited to --target file:/srv/extra/a.txt: 2 of 8 host resource(s)"),
        "{text}"
    );
    assert!(
        text.contains("Warning: this apply was limited to --target file:/srv/extra/a.txt."),
        "{text}"
    );
    assert!(
        text.contains("the host's applied revision is unchanged"),
        "{text}"
    );
    assert_eq!(
        std::fs::read_to_string(lab.host_path("/srv/extra/a.txt")).unwrap(),
        "a\n"
    );
    for absent in ["/srv/app", "/srv/app/motd", "/srv/app/extra.conf"] {
        assert!(!lab.host_path(absent).exists(), "{absent} was not selected");
    }

    let st = status(&lab);
    assert_eq!(
        st["runs"][0]["targets"],
        serde_json::json!(["file:/srv/extra/a.txt"])
    );
    assert_eq!(st["runs"][0]["result"], "success");
    assert_eq!(st["applied"]["applied_revision"], Value::Null, "{st:#}");
    assert_eq!(st["applied"]["last_success_at"], Value::Null, "{st:#}");
    assert_eq!(
        st["inventory"].as_object().unwrap().len(),
        2,
        "only what the run covered is recorded: {st:#}"
    );
    let out = status_output(&lab, false);
    let text = stdout(&out);
    assert!(text.contains("Applied revision: none yet"), "{text}");
    assert!(
        text.contains("limited to --target file:/srv/extra/a.txt"),
        "the run's line names its targets: {text}"
    );

    // A whole apply converges the host and applies its revision; a limited
    // one after it leaves that revision and its time as they were.
    let out = lab.agent("apply", "lab", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let applied = status(&lab)["applied"].clone();
    assert!(applied["applied_revision"].is_string(), "{applied:#}");
    std::fs::write(lab.host_path("/srv/app/motd"), "edited\n").unwrap();
    let apply = document(&lab, "apply", &["--target", "file:/srv/app/motd"], 0);
    assert_eq!(apply["targets"], serde_json::json!(["file:/srv/app/motd"]));
    assert_eq!(apply["counts"]["drift_healed"], 1);
    let st = status(&lab);
    assert_eq!(st["applied"], applied, "a limited run moves no revision");
    assert!(st["runs"][0]["targets"].is_array());
    assert!(
        st["runs"][1].get("targets").is_none(),
        "a whole run has none"
    );
}

#[test]
fn a_selector_that_matches_nothing_is_refused_and_changes_nothing() {
    let lab = lab();
    let out = lab.agent("apply", "lab", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Drift an apply would heal, and a leftover it would prune.
    std::fs::write(lab.host_path("/srv/app/motd"), "edited\n").unwrap();
    lab.write(
        "modules/extra/module.yaml",
        &EXTRA.replace("  - file: /srv/extra/a.txt\n    content: \"a\\n\"\n", ""),
    );
    let before = tree(&lab.root());
    for cmd in ["plan", "apply"] {
        let out = lab.agent(
            cmd,
            "lab",
            &["--target", "module:ap", "--target", "file:/srv/app/motd"],
        );
        assert_eq!(out.status.code(), Some(1), "{cmd}");
        let err = stderr(&out);
        assert!(
            err.contains("error: --target matched nothing on host lab:"),
            "{err}"
        );
        assert!(
            err.contains("module:ap: no resource of this host comes from a module of that name; did you mean module:app?"),
            "{err}"
        );
        assert!(err.contains("Nothing was planned or changed."), "{err}");
        assert!(stdout(&out).is_empty(), "no plan printed: {}", stdout(&out));

        let doc = document(&lab, cmd, &["--target", "stack:wbe"], 1);
        assert_eq!(doc["error"]["stage"], "target");
        assert!(
            doc["error"]["message"].as_str().unwrap().contains(
                "stack:wbe: this host has no stack of that name; did you mean stack:web?"
            ),
            "{doc:#}"
        );
        assert_eq!(doc["targets"], serde_json::json!(["stack:wbe"]));
        // Not a selector at all: the same refusal.
        let doc = document(&lab, cmd, &["--target", "zot"], 1);
        assert_eq!(doc["error"]["stage"], "target");
    }
    assert_eq!(
        tree(&lab.root()),
        before,
        "the state dir and host are byte for byte as before"
    );
}

#[test]
fn a_leftover_named_by_id_is_pruned_and_another_is_not() {
    let lab = lab();
    let out = lab.agent("apply", "lab", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Both leave the desired state.
    lab.write(
        "modules/app/module.yaml",
        &APP.replace("  - file: /srv/app/motd\n    content: \"welcome\\n\"\n", ""),
    );
    lab.write(
        "modules/extra/module.yaml",
        &EXTRA.replace("  - file: /srv/extra/a.txt\n    content: \"a\\n\"\n", ""),
    );
    let plan = document(&lab, "plan", &["--target", "file:/srv/app/motd"], 0);
    assert_eq!(ids(&plan), set(&["file:/srv/app/motd"]), "{plan:#}");
    assert_eq!(plan["resources"][0]["classification"], "prune");
    let apply = document(&lab, "apply", &["--target", "file:/srv/app/motd"], 0);
    assert_eq!(apply["counts"]["pruned"], 1, "{apply:#}");
    assert!(!lab.host_path("/srv/app/motd").exists());
    assert!(
        lab.host_path("/srv/extra/a.txt").exists(),
        "a leftover not named is not pruned"
    );
    let st = status(&lab);
    let inventory = st["inventory"].as_object().unwrap();
    assert!(!inventory.contains_key("file:/srv/app/motd"));
    assert!(inventory.contains_key("file:/srv/extra/a.txt"));
    // A whole plan still has the other one to prune.
    let whole = document(&lab, "plan", &[], 0);
    assert_eq!(whole["summary"]["prune"], 1, "{whole:#}");
}

#[test]
fn a_stack_selection_plans_only_the_stack_and_a_host_selection_no_stack() {
    let lab = lab();
    // No cluster is reachable from a sandbox: the stack is not checked.
    let plan = document(&lab, "plan", &["--target", "stack:web"], 0);
    assert!(ids(&plan).is_empty(), "no host resource: {plan:#}");
    let stacks = plan["stacks"].as_array().unwrap();
    assert_eq!(stacks.len(), 1);
    assert_eq!(stacks[0]["name"], "web");
    assert_eq!(stacks[0]["status"], "not_checked");
    assert_eq!(stacks[0]["summary"]["not_checked"], 1);
    let out = lab.agent("plan", "lab", &["--target", "stack:web"]);
    let text = stdout(&out);
    assert!(
        text.starts_with("Limited to --target stack:web: 0 of 8 host resource(s) (with what they come after and the services they notify), 1 of 1 stack(s); the rest was not compared."),
        "{text}"
    );
    assert!(
        text.contains("? k8s:web/web/ConfigMap/web-config  not checked"),
        "{text}"
    );

    let apply = document(&lab, "apply", &["--target", "stack:web"], 0);
    assert_eq!(apply["targets"], serde_json::json!(["stack:web"]));
    assert!(
        !lab.host_path("/srv/app").exists() && !lab.host_path("/srv/extra").exists(),
        "a stack-only selection applies no host resource"
    );
    assert_eq!(
        status(&lab)["runs"][0]["targets"],
        serde_json::json!(["stack:web"])
    );

    // Both together: the module's resources and the stack.
    let plan = document(
        &lab,
        "plan",
        &["--target", "stack:web", "--target", "module:app"],
        0,
    );
    assert_eq!(plan["stacks"].as_array().unwrap().len(), 1);
    assert!(ids(&plan).contains("service:app"));
}
