//! The operator's life with one host: plan, apply, nothing to do, drift,
//! heal, report-only drift, prune, the lock, status. Drives the real binary
//! against a sandbox (`--root`).

use homelab_agent_tests::{run, stderr, stdout, tree, Lab};
use std::os::unix::fs::PermissionsExt;

const HOST: &str = "\
platform: linux
roots: [/srv]
vars:
  site: lab
modules:
  - name: app
    params:
      port: 8080
  - name: extra
";

const APP: &str = r#"
description: a small app
params:
  port:
    type: int
    required: true
    doc: listen port
  debug:
    type: bool
    default: false
resources:
  - directory: /srv/app
    mode: "0750"
  - file: /srv/app/app.conf
    template: app.conf.j2
    mode: "0640"
  - file: /srv/app/motd
    content: "welcome to {{ vars.site }}\n"
  - symlink: /srv/app/current
    target: /srv/app/app.conf
  - absent: /srv/app/old.conf
"#;

const EXTRA: &str = r#"
params: {}
resources:
  - directory: /srv/extra
  - file: /srv/extra/a.txt
    content: "a\n"
  - file: /srv/extra/preexisting.txt
    content: "managed now\n"
"#;

fn lab() -> Lab {
    let lab = Lab::empty();
    lab.write("hosts/lab.yaml", HOST);
    lab.write("modules/app/module.yaml", APP);
    lab.write(
        "modules/app/templates/app.conf.j2",
        "# {{ host.name }} ({{ host.platform }})\nport = {{ params.port }}\n{% if params.debug %}debug = true\n{% endif %}",
    );
    lab.write("modules/extra/module.yaml", EXTRA);
    lab
}

fn plan_json(lab: &Lab) -> serde_json::Value {
    let out = lab.agent("plan", "lab", &["--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn class_of<'a>(plan: &'a serde_json::Value, id: &str) -> (&'a str, &'a str) {
    let r = plan["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("{id} not in plan: {plan:#}"));
    (
        r["classification"].as_str().unwrap(),
        r["action"].as_str().unwrap(),
    )
}

#[test]
fn apply_then_nothing_to_do_then_drift_is_detected_and_healed() {
    let lab = lab();
    let out = lab.agent("apply", "lab", &[]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let conf = lab.host_path("/srv/app/app.conf");
    assert_eq!(
        std::fs::read_to_string(&conf).unwrap(),
        "# lab (linux)\nport = 8080\n"
    );
    assert_eq!(
        std::fs::metadata(&conf).unwrap().permissions().mode() & 0o777,
        0o640
    );
    assert_eq!(
        std::fs::read_link(lab.host_path("/srv/app/current"))
            .unwrap()
            .to_str(),
        Some("/srv/app/app.conf")
    );

    // Nothing to do: exit 0 with --detailed-exitcode.
    let out = lab.agent("plan", "lab", &["--detailed-exitcode"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(stdout(&out).contains("Plan: 0 to create, 0 to change, 0 to prune, 0 drifted."));

    // A hand edit is drift (git did not move), not change; exit 2.
    std::fs::write(&conf, "port = 9999\n").unwrap();
    std::fs::set_permissions(
        lab.host_path("/srv/app/motd"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    let out = lab.agent("plan", "lab", &["--detailed-exitcode"]);
    assert_eq!(out.status.code(), Some(2));
    let text = stdout(&out);
    assert!(
        text.contains("! file:/srv/app/app.conf  (module app) drifted; will be healed"),
        "{text}"
    );
    assert!(text.contains("-port = 9999\n"), "{text}");
    assert!(text.contains("mode: 0666 -> 0644"), "{text}");
    assert!(
        text.contains("Plan: 0 to create, 0 to change, 0 to prune, 2 drifted."),
        "{text}"
    );
    let plan = plan_json(&lab);
    assert_eq!(
        class_of(&plan, "file:/srv/app/app.conf"),
        ("drift", "update")
    );
    assert_eq!(class_of(&plan, "directory:/srv/app"), ("in_sync", "none"));

    // Apply heals both; the plan is clean again.
    let out = lab.agent("apply", "lab", &["--detailed-exitcode"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stdout(&out).contains("file:/srv/app/app.conf drift healed (content)"));
    assert_eq!(
        std::fs::read_to_string(&conf).unwrap(),
        "# lab (linux)\nport = 8080\n"
    );
    let out = lab.agent("plan", "lab", &["--detailed-exitcode"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));

    // A deleted managed file is drift too, and is recreated.
    std::fs::remove_file(&conf).unwrap();
    assert_eq!(
        class_of(&plan_json(&lab), "file:/srv/app/app.conf"),
        ("drift", "create")
    );

    // A git change (param edited) is *change*, not drift.
    lab.write("hosts/lab.yaml", &HOST.replace("port: 8080", "port: 8081"));
    lab.agent("apply", "lab", &[]);
    lab.write("hosts/lab.yaml", &HOST.replace("port: 8080", "port: 8082"));
    let plan = plan_json(&lab);
    assert_eq!(
        class_of(&plan, "file:/srv/app/app.conf"),
        ("change", "update")
    );
    assert_eq!(plan["summary"]["change"], 1);
}

#[test]
fn on_drift_report_detects_but_never_corrects() {
    let lab = lab();
    lab.write(
        "hosts/lab.yaml",
        &HOST.replace("  - name: app\n", "  - name: app\n    on_drift: report\n"),
    );
    assert!(lab.agent("apply", "lab", &[]).status.success());
    let conf = lab.host_path("/srv/app/app.conf");
    std::fs::write(&conf, "hand edited\n").unwrap();

    let out = lab.agent("plan", "lab", &["--detailed-exitcode"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stdout(&out)
        .contains("! file:/srv/app/app.conf  (module app) drifted; on_drift: report, left alone"));
    assert_eq!(
        class_of(&plan_json(&lab), "file:/srv/app/app.conf"),
        ("drift", "report")
    );

    let out = lab.agent("apply", "lab", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("file:/srv/app/app.conf drift reported, left alone"),
        "{}",
        stdout(&out)
    );
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "hand edited\n");
    // Still reported on the next run: it stays drifted until someone acts.
    assert_eq!(
        class_of(&plan_json(&lab), "file:/srv/app/app.conf"),
        ("drift", "report")
    );

    // A resource-level override beats the module's policy.
    lab.write(
        "modules/app/module.yaml",
        &APP.replace(
            "    template: app.conf.j2\n",
            "    template: app.conf.j2\n    on_drift: heal\n",
        ),
    );
    assert!(lab.agent("apply", "lab", &[]).status.success());
    assert_eq!(
        std::fs::read_to_string(&conf).unwrap(),
        "# lab (linux)\nport = 8080\n"
    );
}

#[test]
fn removing_a_module_prunes_exactly_what_the_agent_created() {
    let lab = lab();
    // Present before the agent ever ran: adopted, never deleted.
    std::fs::create_dir_all(lab.host_path("/srv/extra")).unwrap();
    std::fs::write(lab.host_path("/srv/extra/preexisting.txt"), "old\n").unwrap();
    // Never managed at all.
    std::fs::write(lab.host_path("/srv/extra/bystander.txt"), "mine\n").unwrap();
    std::fs::write(lab.host_path("/srv/unrelated.txt"), "mine too\n").unwrap();
    assert!(lab.agent("apply", "lab", &[]).status.success());
    assert_eq!(
        std::fs::read_to_string(lab.host_path("/srv/extra/preexisting.txt")).unwrap(),
        "managed now\n"
    );

    lab.write("hosts/lab.yaml", &HOST.replace("  - name: extra\n", ""));
    let out = lab.agent("plan", "lab", &["--detailed-exitcode"]);
    assert_eq!(out.status.code(), Some(2));
    let text = stdout(&out);
    assert!(
        text.contains("- file:/srv/extra/a.txt  (module extra) will be removed"),
        "{text}"
    );
    assert!(
        text.contains("- file:/srv/extra/preexisting.txt  (module extra) will be forgotten"),
        "{text}"
    );
    assert!(
        text.contains("- directory:/srv/extra  (module extra) will be forgotten"),
        "{text}"
    );
    assert!(
        text.contains("Plan: 0 to create, 0 to change, 3 to prune, 0 drifted."),
        "{text}"
    );
    let plan = plan_json(&lab);
    let pruned: Vec<&str> = plan["resources"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["classification"] == "prune")
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        pruned,
        [
            "file:/srv/extra/preexisting.txt",
            "file:/srv/extra/a.txt",
            "directory:/srv/extra"
        ]
    );

    let before = tree(&lab.root());
    let out = lab.agent("apply", "lab", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!lab.host_path("/srv/extra/a.txt").exists());
    assert_eq!(
        std::fs::read_to_string(lab.host_path("/srv/extra/preexisting.txt")).unwrap(),
        "managed now\n"
    );
    assert_eq!(
        std::fs::read_to_string(lab.host_path("/srv/extra/bystander.txt")).unwrap(),
        "mine\n"
    );
    assert_eq!(
        std::fs::read_to_string(lab.host_path("/srv/unrelated.txt")).unwrap(),
        "mine too\n"
    );
    // Only a.txt went away (and the state dir changed).
    let after = tree(&lab.root());
    let gone: Vec<_> = before.keys().filter(|k| !after.contains_key(*k)).collect();
    assert_eq!(gone, [std::path::Path::new("srv/extra/a.txt")]);
    // Nothing left to prune.
    let out = lab.agent("plan", "lab", &["--detailed-exitcode"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
}

#[test]
fn a_directory_the_agent_created_is_removed_only_once_empty() {
    let lab = lab();
    assert!(lab.agent("apply", "lab", &[]).status.success());
    lab.write("hosts/lab.yaml", &HOST.replace("  - name: extra\n", ""));
    std::fs::write(lab.host_path("/srv/extra/user-data"), "keep\n").unwrap();
    let out = lab.agent("apply", "lab", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("directory:/srv/extra removed; left in place: it is not empty"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        std::fs::read_to_string(lab.host_path("/srv/extra/user-data")).unwrap(),
        "keep\n"
    );

    // Without stray files the created directory goes with its files.
    let lab = lab_fresh_without_preexisting();
    assert!(lab.agent("apply", "lab", &[]).status.success());
    lab.write("hosts/lab.yaml", &HOST.replace("  - name: extra\n", ""));
    assert!(lab.agent("apply", "lab", &[]).status.success());
    assert!(!lab.host_path("/srv/extra").exists());
}

fn lab_fresh_without_preexisting() -> Lab {
    lab()
}

#[test]
fn a_second_apply_is_refused_while_the_lock_is_held() {
    let lab = lab();
    let state = lab.root().join("var/lib/homelab-agent");
    let _held =
        homelab_agent_state::Lock::acquire(&state, "agent apply --host lab (test holder)").unwrap();
    let out = lab.agent("apply", "lab", &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("another agent holds the lock"), "{err}");
    assert!(
        err.contains(&format!(
            "pid {} (agent apply --host lab (test holder))",
            std::process::id()
        )),
        "{err}"
    );
    assert!(!lab.host_path("/srv/app").exists(), "nothing applied");
}

#[test]
fn status_shows_revision_inventory_and_runs() {
    let lab = lab();
    assert!(lab.agent("apply", "lab", &[]).status.success());
    assert!(lab.agent("apply", "lab", &[]).status.success());
    let root = lab.root();
    let out = run(&[
        "status",
        "--host",
        "lab",
        "--root",
        root.to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(status["applied"]["applied_revision"]
        .as_str()
        .unwrap()
        .starts_with("local-"));
    assert_eq!(status["inventory"].as_object().unwrap().len(), 8);
    assert_eq!(
        status["inventory"]["file:/srv/app/app.conf"]["origin"],
        "created"
    );
    let runs = status["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0]["counts"]["created"], 0);
    assert_eq!(runs[1]["counts"]["created"], 7);
    let out = run(&["status", "--host", "lab", "--root", root.to_str().unwrap()]);
    assert!(
        stdout(&out).contains("Inventory: 8 resource(s)"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn an_unknown_host_lists_the_known_ones() {
    let lab = lab();
    lab.write("hosts/other.yaml", HOST);
    let out = lab.agent("plan", "nosuchhost", &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("no host `nosuchhost`"), "{err}");
    assert!(err.contains("known hosts: lab, other"), "{err}");
}

#[test]
fn plan_never_writes() {
    let lab = lab();
    let before = tree(&lab.root());
    let out = lab.agent("plan", "lab", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        tree(&lab.root()),
        before,
        "a plan on a fresh root created nothing, not even state"
    );
    assert!(lab.agent("apply", "lab", &[]).status.success());
    std::fs::write(lab.host_path("/srv/app/app.conf"), "drifted\n").unwrap();
    let before = tree(&lab.root());
    lab.agent("plan", "lab", &["--json"]);
    assert_eq!(tree(&lab.root()), before);
}
