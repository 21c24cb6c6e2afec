//! The opt-in tier against a **real** cluster: the same agent, the same
//! kube-rs client, a real API server instead of the stand-in. Compiled only
//! with `--features real-cluster`, run by hand:
//!
//! ```sh
//! KUBECONFIG=~/.kube/config cargo test -p homelab-agent-tests --features real-cluster --test kube_real
//! ```
//!
//! It uses the kubeconfig's current context and works in a namespace of its
//! own (`homelab-agent-e2e-<pid>`), which it deletes at the end by pruning
//! the whole stack. It needs no image pull (`wait: false`).
#![cfg(feature = "real-cluster")]

use std::path::PathBuf;
use std::process::Output;

use homelab_agent_tests::{agent, stderr, stdout};

struct Real {
    tmp: tempfile::TempDir,
    kubeconfig: PathBuf,
    namespace: String,
}

impl Real {
    fn new() -> Real {
        let kubeconfig = PathBuf::from(
            std::env::var_os("KUBECONFIG")
                .expect("the real-cluster tier needs KUBECONFIG pointing at a cluster"),
        );
        let r = Real {
            tmp: tempfile::tempdir().unwrap(),
            kubeconfig,
            namespace: format!("homelab-agent-e2e-{}", std::process::id()),
        };
        r.write(
            "hosts/e2e.yaml",
            "platform: linux\nroots: [/srv]\nstacks:\n  - e2e\n",
        );
        r.write(
            "k8s/e2e/stack.yaml",
            &format!("namespace: {}\nwait: false\ntimeout: 60s\n", r.namespace),
        );
        r.write(
            "k8s/e2e/00-namespace.yaml",
            &format!(
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {}\n",
                r.namespace
            ),
        );
        r.write("k8s/e2e/config.yaml", &config_map("blue"));
        std::fs::write(
            r.tmp.path().join("agent.yaml"),
            format!(
                "repo: {}\nhost: e2e\nroot: {}\nkubeconfig: {}\n",
                r.tmp.path().join("repo").display(),
                r.tmp.path().join("root").display(),
                r.kubeconfig.display()
            ),
        )
        .unwrap();
        r
    }

    fn write(&self, rel: &str, text: &str) {
        let p = self.tmp.path().join("repo").join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn run(&self, cmd: &str) -> (Output, String) {
        let config = self.tmp.path().join("agent.yaml");
        let out = agent()
            .args([cmd, "--config", config.to_str().unwrap()])
            .output()
            .unwrap();
        let text = format!("{}{}", stdout(&out), stderr(&out));
        (out, text)
    }
}

fn config_map(color: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: e2e\ndata:\n  color: {color}\n")
}

#[test]
fn plan_apply_change_and_prune_against_a_real_cluster() {
    let r = Real::new();
    let (out, text) = r.run("plan");
    assert!(out.status.success(), "{text}");
    assert!(text.contains("Stacks: 2 to create"), "{text}");
    let (out, text) = r.run("apply");
    assert!(out.status.success(), "{text}");
    let (_, text) = r.run("plan");
    assert!(
        text.contains("No changes: 2 object(s) in sync."),
        "a real server's defaults are no drift: {text}"
    );
    r.write("k8s/e2e/config.yaml", &config_map("green"));
    let (_, text) = r.run("plan");
    assert!(text.contains("data.color: \"blue\" -> \"green\""), "{text}");
    let (out, text) = r.run("apply");
    assert!(out.status.success(), "{text}");
    // Everything leaves the stack: the namespace (and the ConfigMap) are pruned.
    std::fs::remove_file(r.tmp.path().join("repo/k8s/e2e/config.yaml")).unwrap();
    std::fs::remove_file(r.tmp.path().join("repo/k8s/e2e/00-namespace.yaml")).unwrap();
    let (out, text) = r.run("apply");
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("k8s:e2e//Namespace/{} deleted", r.namespace)),
        "{text}"
    );
}
