//! Snapshots of the reference homelab's plans: what a fresh checkout shows
//! with `agent plan --host indri --root <tmp>` (human and `--json`), and a
//! check that every host in the repo validates.

use homelab_agent_tests::{run, stderr, stdout, workspace};

fn plan(host: &str, json: bool) -> String {
    let root = tempfile::tempdir().unwrap();
    let repo = workspace();
    let mut args = vec![
        "plan",
        "--repo",
        repo.to_str().unwrap(),
        "--host",
        host,
        "--root",
        root.path().to_str().unwrap(),
    ];
    if json {
        args.push("--json");
    }
    let out = run(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).replace(
        root.path().canonicalize().unwrap().to_str().unwrap(),
        "[ROOT]",
    )
}

#[test]
fn plan_indri_human() {
    insta::assert_snapshot!(plan("indri", false));
}

#[test]
fn plan_indri_json() {
    let value: serde_json::Value = serde_json::from_str(&plan("indri", true)).unwrap();
    insta::assert_json_snapshot!(value);
}

#[test]
fn plan_sifaka_human() {
    insta::assert_snapshot!(plan("sifaka", false));
}

#[test]
fn every_reference_host_validates() {
    let repo = workspace();
    let out = run(&["validate", "--repo", repo.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("ok: host indri:"), "{text}");
    assert!(text.contains("ok: host sifaka:"), "{text}");
}
