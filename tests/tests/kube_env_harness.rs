//! The real control plane harness itself (`homelab_agent_tests::kube_env`):
//! the API server answers with TLS to both identities and to a client
//! certificate, RBAC holds the viewer to reads, the real controllers roll a
//! Deployment out through the harness's node, a held pod keeps a rollout
//! from finishing, and a Job runs to completion.

use homelab_agent_tests::kube_env::{Identity, KubeEnv, HOLD_LABEL};
use serde_json::json;
use std::time::Duration;

fn deployment(ns: &str, name: &str, hold: Option<&str>) -> serde_json::Value {
    let mut labels = json!({"app": name});
    if let Some(reason) = hold {
        labels[HOLD_LABEL] = json!(reason);
    }
    json!({"apiVersion": "apps/v1", "kind": "Deployment",
           "metadata": {"name": name, "namespace": ns},
           "spec": {"replicas": 2, "selector": {"matchLabels": {"app": name}},
                    "template": {"metadata": {"labels": labels},
                                 "spec": {"containers": [{"name": "c", "image": "nginx:1.27"}]}}}})
}

#[test]
fn controllers_and_the_node_roll_out_deployments_and_run_jobs() {
    let env = KubeEnv::shared();
    let ns = env.namespace("harness");
    env.create(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}));
    env.create(&deployment(&ns, "ok", None));
    env.create(&deployment(&ns, "held", Some("ImagePullBackOff")));
    env.create(&json!({"apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "once", "namespace": ns},
        "spec": {"template": {"spec": {"restartPolicy": "Never",
                 "containers": [{"name": "c", "image": "busybox"}]}}}}));
    env.wait_for("deployment ok ready", Duration::from_secs(60), || {
        env.get("deployment.apps", Some(&ns), "ok")
            .is_some_and(|d| d["status"]["readyReplicas"] == 2)
    });
    env.wait_for("job once complete", Duration::from_secs(60), || {
        env.get("job.batch", Some(&ns), "once")
            .is_some_and(|j| j["status"]["succeeded"] == 1)
    });
    let held = env.get("deployment.apps", Some(&ns), "held").unwrap();
    assert!(held["status"]["readyReplicas"].is_null(), "{held}");
    let pods = env.kubectl_ok(&["get", "pods", "-n", &ns, "-l", "app=held", "-o", "json"]);
    assert!(pods.contains("ImagePullBackOff"), "{pods}");
    env.delete_namespace(&ns);
}

#[test]
fn tokens_client_certificates_and_rbac() {
    let env = KubeEnv::shared();
    let dir = tempfile::tempdir().unwrap();
    for (identity, can_write) in [
        (Identity::Admin, true),
        (Identity::ClientCert, true),
        (Identity::Viewer, false),
    ] {
        let sub = dir.path().join(format!("{identity:?}"));
        std::fs::create_dir_all(&sub).unwrap();
        let kc = env.write_kubeconfig(&sub, &["lab"], identity);
        let kc = format!("--kubeconfig={}", kc.display());
        let read = env.kubectl(&[&kc, "get", "namespace", "default"]);
        assert!(read.status.success(), "{identity:?} reads");
        let write = env.kubectl(&[
            &kc,
            "auth",
            "can-i",
            "create",
            "configmaps",
            "-n",
            "default",
        ]);
        assert_eq!(
            String::from_utf8_lossy(&write.stdout).trim() == "yes",
            can_write,
            "{identity:?}"
        );
    }
}
