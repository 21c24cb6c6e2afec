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

/// A k3s worker: its node config and the zot mirror for containerd.
#[test]
fn plan_k3s_x86_human() {
    insta::assert_snapshot!(plan("k3s-x86", false));
}

/// The k3s server: Cilium and MetalLB as HelmCharts in its auto-deploy
/// folder, then its stacks (metallb's pools, GinFlix).
#[test]
fn plan_k3s_cp_human() {
    insta::assert_snapshot!(plan("k3s-cp", false));
}

#[test]
fn every_reference_host_validates() {
    let repo = workspace();
    let out = run(&["validate", "--repo", repo.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("ok: host indri:"), "{text}");
    assert!(text.contains("ok: host sifaka:"), "{text}");
    for host in ["k3s-cp", "k3s-x86", "k3s-pi"] {
        assert!(text.contains(&format!("ok: host {host}:")), "{text}");
    }
}

/// With a Connect server holding the reference homelab's items (the
/// stand-in), every host's secrets resolve: nothing is skipped, and the
/// plan shows the k3s join token only as `[redacted]`.
#[test]
fn reference_secrets_resolve_through_connect() {
    use homelab_agent_tests::connect_standin::{reference_value, ConnectStandIn, REFERENCE_VAULT};
    let token = "reference-connect-token";
    let connect = ConnectStandIn::start(token);
    connect.add_reference_vault();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("op-token");
    std::fs::write(&token_file, token).unwrap();
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    for host in ["indri", "sifaka", "k3s-cp", "k3s-x86", "k3s-pi"] {
        let root = dir.path().join(host);
        let config = dir.path().join(format!("{host}.yaml"));
        std::fs::write(
            &config,
            format!(
                "repo: {}\nhost: {host}\nroot: {}\nonepassword:\n  connect_url: {}\n  token_file: {}\n",
                workspace().display(),
                root.display(),
                connect.url(),
                token_file.display()
            ),
        )
        .unwrap();
        let out = run(&["plan", "--config", config.to_str().unwrap()]);
        assert!(out.status.success(), "{host}: {}", stderr(&out));
        let text = stdout(&out);
        // Nothing skipped (package managers' "not checked" note in a sandbox aside).
        assert!(
            !text.contains(" skipped:") && !text.contains(" skipped."),
            "{host}: {text}"
        );
        for (item, fields) in REFERENCE_VAULT {
            for field in *fields {
                let value = reference_value(item, field);
                assert!(!text.contains(&value), "{host} plan shows {item}/{field}");
            }
        }
        if host.starts_with("k3s-") {
            assert!(text.contains("+token: \"[redacted]\""), "{text}");
            assert!(text.contains("mode: (none) -> 0600"), "{text}");
            // Each node's config.yaml as the plan shows it (token masked): the
            // server and agent roles of the k3s design.
            let config = text
                .split("\n+ ")
                .find(|block| block.starts_with("file:/etc/rancher/k3s/config.yaml"))
                .and_then(|block| block.split("\n\n").next())
                .unwrap_or_else(|| panic!("{host}: no config.yaml in {text}"));
            insta::assert_snapshot!(format!("k3s_config_{host}"), config);
        }
    }
}
