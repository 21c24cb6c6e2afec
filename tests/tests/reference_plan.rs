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

/// The k3s x86 worker also runs the GinFlix reverse proxy (modules/caddy).
#[test]
fn plan_k3s_x86_human() {
    insta::assert_snapshot!(plan("k3s-x86", false));
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
    use homelab_agent_tests::connect_standin::ConnectStandIn;
    let token = "reference-connect-token";
    let connect = ConnectStandIn::start(token);
    let vault = connect.add_vault("homelab");
    let values = [
        ("borgmatic", "passphrase", "borg-passphrase-value-1"),
        ("postgres-backup", "password", "pg-backup-password-value-2"),
        ("k3s", "cluster-token", "k3s-cluster-token-value-3"),
    ];
    for (item, field, value) in values {
        connect.add_item(&vault, item, &[(field, value)]);
    }
    connect.add_item(
        &vault,
        "forgejo",
        &[
            ("secret_key", "forgejo-secret-key-value-4"),
            ("internal_token", "forgejo-internal-token-value-5"),
            ("lfs_jwt_secret", "forgejo-lfs-jwt-value-6"),
            ("oauth2_jwt_secret", "forgejo-oauth2-jwt-value-7"),
        ],
    );
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
        for value in [
            "borg-passphrase-value-1",
            "pg-backup-password-value-2",
            "k3s-cluster-token-value-3",
            "forgejo-secret-key-value-4",
        ] {
            assert!(!text.contains(value), "{host} plan shows a secret");
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
