//! Benchmark of the Kubernetes stacks: the reference host indri (its native
//! resources and its stacks vlog-workers, vod and monitoring, 27 objects with secrets
//! from a Connect stand-in) against the Kubernetes API stand-in on loopback,
//! through the real kube-rs client. Run:
//!
//! ```sh
//! cargo run --release -p homelab-agent-tests --bin kube-bench -- [ROUNDS]
//! ```
//!
//! Reports medians (ROUNDS, default 10) of `agent plan` from empty (every
//! object a dry-run create), the first `agent apply`, and `agent plan` once
//! everything is in sync. The stand-in answers in microseconds, so this
//! measures the agent: connection, discovery, one GET and one dry-run PATCH
//! per object, diffing and reporting.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use homelab_agent_tests::connect_standin::ConnectStandIn;
use homelab_agent_tests::kube_standin::KubeStandIn;
use homelab_agent_tests::{agent, copy_dir, workspace};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    for dir in ["hosts", "modules", "k8s", "dashboards"] {
        copy_dir(&workspace().join(dir), &repo.join(dir));
    }
    let connect = ConnectStandIn::start("bench-token");
    let vault = connect.add_vault("homelab");
    for (item, field) in [
        ("vlog-worker", "api-key"),
        ("vlog-postgres", "password"),
        ("ginflix-postgres", "password"),
        ("ginflix", "django-secret-key"),
        ("borgmatic", "passphrase"),
    ] {
        connect.add_item(&vault, item, &[(field, "bench-value")]);
    }
    connect.add_item(
        &vault,
        "forgejo",
        &[
            ("secret_key", "a"),
            ("internal_token", "b"),
            ("lfs_jwt_secret", "c"),
            ("oauth2_jwt_secret", "d"),
        ],
    );
    let token = tmp.path().join("token");
    std::fs::write(&token, "bench-token").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();

    let mut from_empty = Vec::new();
    let mut apply = Vec::new();
    let mut in_sync = Vec::new();
    for round in 0..rounds {
        let kube = KubeStandIn::start();
        kube.install_prometheus_operator();
        let dir = tmp.path().join(format!("round-{round}"));
        std::fs::create_dir_all(&dir).unwrap();
        let kubeconfig = kube.write_kubeconfig(&dir, "minikube");
        let config = dir.join("agent.yaml");
        std::fs::write(
            &config,
            format!(
                "repo: {}\nhost: indri\nroot: {}\nkubeconfig: {}\nonepassword:\n  connect_url: {}\n  token_file: {}\n",
                repo.display(),
                dir.join("root").display(),
                kubeconfig.display(),
                connect.url(),
                token.display()
            ),
        )
        .unwrap();
        let run = |cmd: &str| {
            let started = Instant::now();
            let out = agent()
                .args([cmd, "--config", config.to_str().unwrap()])
                .output()
                .unwrap();
            let took = started.elapsed();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "{cmd}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            (took, text)
        };
        let (t, text) = run("plan");
        assert!(text.contains("Stacks: 27 to create"), "{text}");
        from_empty.push(t);
        let (t, text) = run("apply");
        assert!(text.contains("Stacks: 27 created"), "{text}");
        apply.push(t);
        let (t, text) = run("plan");
        assert!(
            text.contains("Stacks: 0 to create, 0 to change, 0 to prune, 0 drifted."),
            "{text}"
        );
        in_sync.push(t);
    }
    println!("kube-bench: host indri, its native resources + 3 stacks (27 objects), {rounds} rounds, medians:");
    println!(
        "  agent plan from empty (27 dry-run creates): {:?}",
        median(from_empty)
    );
    println!(
        "  agent apply (first, 27 objects, health waits): {:?}",
        median(apply)
    );
    println!(
        "  agent plan, everything in sync:              {:?}",
        median(in_sync)
    );
}
