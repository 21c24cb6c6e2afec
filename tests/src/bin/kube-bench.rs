//! Benchmark of the Kubernetes stacks: the reference host indri (its native
//! resources and its stacks vlog-workers, onepassword-connect and monitoring, 14 objects with secrets
//! from a Connect stand-in) against the real control plane of the tests
//! (`kube_env`: etcd, kube-apiserver, kube-controller-manager on loopback),
//! through the real kube-rs client. Run:
//!
//! ```sh
//! cargo run --release -p homelab-agent-tests --bin kube-bench -- [ROUNDS] [--standin]
//! ```
//!
//! Reports medians (ROUNDS, default 10) of `agent plan` from empty (every
//! object a dry-run create), the first `agent apply` (with the rollouts the
//! real controllers and the harness's node make), `agent plan` once
//! everything is in sync, and a no-op `agent apply`. `--standin` runs the
//! same against the HTTP stand-in (which answers in microseconds, so it
//! measures the agent alone).

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use homelab_agent_tests::connect_standin::ConnectStandIn;
use homelab_agent_tests::kube_env::{Identity, KubeEnv};
use homelab_agent_tests::kube_standin::KubeStandIn;
use homelab_agent_tests::{agent, copy_dir, workspace};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10);
    let standin = std::env::args().any(|a| a == "--standin");
    let real = (!standin).then(|| {
        let env = KubeEnv::start();
        env.install_crds(&["monitoring.coreos.com_prometheusrules.yaml"]);
        env.kubectl_ok(&["create", "namespace", "monitoring"]);
        env
    });
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    for dir in ["hosts", "modules", "k8s", "dashboards"] {
        copy_dir(&workspace().join(dir), &repo.join(dir));
    }
    // The bench measures the stacks: indri goes without its proxy, whose
    // validator is a macOS binary.
    homelab_agent_tests::without_indri_caddy(&repo);
    let connect = ConnectStandIn::start("bench-token");
    connect.add_reference_vault();
    let token = tmp.path().join("token");
    std::fs::write(&token, "bench-token").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();

    let mut from_empty = Vec::new();
    let mut apply = Vec::new();
    let mut in_sync = Vec::new();
    let mut noop = Vec::new();
    for round in 0..rounds {
        let dir = tmp.path().join(format!("round-{round}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut standin = None;
        let kubeconfig = match &real {
            Some(env) => {
                // A clean slate: the stacks' namespaces (and so their
                // objects) from the previous round are gone.
                for ns in ["vlog", "onepassword"] {
                    env.delete_namespace(ns);
                }
                env.kubectl_ok(&[
                    "delete",
                    "prometheusrules.monitoring.coreos.com,configmaps,secrets",
                    "-n",
                    "monitoring",
                    "-l",
                    "app.kubernetes.io/managed-by=homelab-agent",
                    "--ignore-not-found",
                ]);
                env.wait_for("namespaces gone", Duration::from_secs(120), || {
                    ["vlog", "onepassword"]
                        .iter()
                        .all(|ns| env.get("namespace", None, ns).is_none())
                });
                env.write_kubeconfig(&dir, &["minikube"], Identity::Admin)
            }
            None => {
                let kube = KubeStandIn::start();
                kube.install_prometheus_operator();
                let path = kube.write_kubeconfig(&dir, "minikube");
                standin = Some(kube);
                path
            }
        };
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
            // The native part may fail on a machine without the reference
            // modules' validators (borgmatic): only the stacks are asserted.
            assert!(
                !text.contains("failed k8s:") && !text.contains(": failed:"),
                "{cmd}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            (took, text)
        };
        let (t, text) = run("plan");
        assert!(text.contains("Stacks: 14 to create"), "{text}");
        from_empty.push(t);
        let (t, text) = run("apply");
        assert!(text.contains("Stacks: 14 created"), "{text}");
        apply.push(t);
        let (t, text) = run("plan");
        assert!(
            text.contains("Stacks: 0 to create, 0 to change, 0 to prune, 0 drifted."),
            "{text}"
        );
        in_sync.push(t);
        let (t, text) = run("apply");
        assert!(
            text.contains("Nothing to do: 8 object(s) in sync."),
            "{text}"
        );
        noop.push(t);
        drop(standin);
    }
    println!(
        "kube-bench: host indri, its native resources + 3 stacks (14 objects), against {}, {rounds} rounds, medians:",
        if real.is_some() { "the real control plane" } else { "the stand-in" }
    );
    println!(
        "  agent plan from empty (14 dry-run creates): {:?}",
        median(from_empty)
    );
    println!(
        "  agent apply (first, 14 objects, health waits): {:?}",
        median(apply)
    );
    println!(
        "  agent plan, everything in sync:              {:?}",
        median(in_sync)
    );
    println!(
        "  agent apply, nothing to do:                  {:?}",
        median(noop)
    );
}
