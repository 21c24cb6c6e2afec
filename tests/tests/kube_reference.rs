//! The reference homelab's own stacks on a real control plane
//! (`homelab_agent_tests::kube_env`): indri's vlog-workers,
//! onepassword-connect and monitoring (context `minikube`) and k3s-cp's
//! metallb and vod (context `default`), with the PrometheusRule and MetalLB CRDs from their upstream
//! projects (`tests/fixtures/crds/`) and secrets from a 1Password Connect
//! stand-in. Planned from empty, applied, settled by the real controllers
//! and the harness's node; then nothing to do on the first try and after
//! three more runs (no perpetual diff); a hand edit through the API is
//! drift and is healed; removing a stack's manifests prunes exactly its
//! objects.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use homelab_agent_tests::connect_standin::{reference_value, ConnectStandIn, REFERENCE_VAULT};
use homelab_agent_tests::kube_env::{Identity, KubeEnv};
use homelab_agent_tests::{agent, copy_dir, stderr, stdout, workspace};

const OP_TOKEN: &str = "kube-reference-connect-token";
/// The CRDs and namespace MetalLB's and the Prometheus operator's own
/// installations leave (applied by `helm`, as k3s's HelmChart would).
fn install_upstream(kube: &KubeEnv) {
    kube.install_crds(&[
        "monitoring.coreos.com_prometheusrules.yaml",
        "metallb.io_ipaddresspools.yaml",
        "metallb.io_l2advertisements.yaml",
    ]);
    // The namespaces those installations own (the stacks put objects into
    // them but do not create them). `monitoring` comes later (see the test).
    kube.kubectl_ok(&["create", "namespace", "metallb-system"]);
}

struct Host {
    name: &'static str,
    config: PathBuf,
}

impl Host {
    fn run(&self, cmd: &str) -> (Option<i32>, String) {
        let out = agent()
            .args([cmd, "--config", self.config.to_str().unwrap()])
            .output()
            .unwrap();
        (
            out.status.code(),
            format!("{}{}", stdout(&out), stderr(&out)),
        )
    }

    /// `apply`, which must exit 0 (every object applied, none failed).
    fn apply_ok(&self) -> String {
        let (code, text) = self.run("apply");
        assert_eq!(code, Some(0), "{}: apply failed:\n{text}", self.name);
        text
    }

    fn settled(&self) {
        let (code, text) = self.run("plan");
        assert_eq!(code, Some(0), "{}: {text}", self.name);
        assert!(
            text.contains("Stacks: 0 to create, 0 to change, 0 to prune, 0 drifted.\n"),
            "{}: {text}",
            self.name
        );
    }
}

fn host(tmp: &Path, repo: &Path, kube: &KubeEnv, connect: &str, name: &'static str) -> Host {
    let dir = tmp.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = kube.write_kubeconfig(&dir, &["minikube", "default"], Identity::Admin);
    let token_file = dir.join("op-token");
    std::fs::write(&token_file, OP_TOKEN).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = dir.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "repo: {}\nhost: {name}\nroot: {}\nkubeconfig: {}\nonepassword:\n  connect_url: {connect}\n  token_file: {}\n",
            repo.display(),
            dir.join("root").display(),
            kubeconfig.display(),
            token_file.display()
        ),
    )
    .unwrap();
    Host { name, config }
}

/// Objects carrying a stack's ownership label, as `Kind namespace/name`.
fn owned_by(kube: &KubeEnv, owner: &str) -> Vec<String> {
    let label = format!("homelab-agent/stack={owner}");
    let text = kube.kubectl_ok(&[
        "get",
        "all,configmaps,secrets,networkpolicies,persistentvolumeclaims,serviceaccounts,namespaces",
        "-A",
        "-l",
        &label,
        "-o",
        "jsonpath={range .items[*]}{.kind} {.metadata.namespace}/{.metadata.name}{\"\\n\"}{end}",
    ]);
    let mut v: Vec<String> = text.lines().map(str::to_string).collect();
    v.sort();
    v
}

#[test]
fn reference_stacks_apply_settle_heal_and_prune_on_a_real_cluster() {
    let kube = KubeEnv::shared();
    install_upstream(kube);
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    for dir in ["hosts", "modules", "k8s", "dashboards"] {
        copy_dir(&workspace().join(dir), &repo.join(dir));
    }
    // Every apply must exit 0; indri's Caddyfile validator is a macOS binary.
    homelab_agent_tests::without_indri_caddy(&repo);
    let connect = ConnectStandIn::start(OP_TOKEN);
    connect.add_reference_vault();
    let hosts = [
        host(tmp.path(), &repo, kube, &connect.url(), "indri"),
        host(tmp.path(), &repo, kube, &connect.url(), "k3s-cp"),
    ];
    // kube-prometheus-stack not installed yet: its namespace is missing,
    // and the plan says so per object instead of promising a create.
    let (code, text) = hosts[0].run("plan");
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("error: k8s:monitoring/monitoring/ConfigMap/homelab-agent-dashboard  (k8s/monitoring/stack.yaml:15): its namespace monitoring does not exist and this stack does not create it"),
        "{text}"
    );
    kube.kubectl_ok(&["create", "namespace", "monitoring"]);
    for (h, expected) in hosts.iter().zip([14, 16]) {
        let started = std::time::Instant::now();
        let (code, text) = h.run("plan");
        let took = started.elapsed();
        assert_eq!(code, Some(0), "{}: {text}", h.name);
        assert!(
            text.contains(&format!(
                "Stacks: {expected} to create, 0 to change, 0 to prune, 0 drifted.\n"
            )),
            "{}: {text}",
            h.name
        );
        assert!(!text.contains("? k8s:"), "{}: {text}", h.name);
        eprintln!(
            "{}: plan of {expected} objects from empty on the real API server: {took:?}",
            h.name
        );
        let started = std::time::Instant::now();
        let text = h.apply_ok();
        eprintln!(
            "{}: first apply (with rollouts): {:?}",
            h.name,
            started.elapsed()
        );
        assert!(
            text.contains(&format!("Stacks: {expected} created, 0 changed, 0 pruned")),
            "{}: {text}",
            h.name
        );
        assert!(!text.contains("failed k8s:"), "{}: {text}", h.name);
        assert!(!text.contains("Stack vod: failed"), "{}: {text}", h.name);
        // Settled on the first try, and after three more runs.
        h.settled();
        for _ in 0..3 {
            let text = h.apply_ok();
            assert!(
                text.contains(" 0 changed, 0 pruned, 0 drifted"),
                "{}: {text}",
                h.name
            );
        }
        h.settled();
        for (item, fields) in REFERENCE_VAULT {
            for field in *fields {
                let value = reference_value(item, field);
                assert!(!text.contains(&value), "{} shows a secret", h.name);
            }
        }
    }
    assert!(kube
        .get("deployment.apps", Some("vlog"), "vlog-worker")
        .is_some());
    assert_eq!(
        kube.get("statefulset.apps", Some("vod"), "postgres")
            .unwrap()["spec"]["volumeClaimTemplates"][0]["metadata"]["name"],
        "data"
    );
    assert_eq!(
        kube.names("ipaddresspools.metallb.io", Some("metallb-system")),
        ["internal", "internet-facing"]
    );
    assert!(kube
        .get(
            "prometheusrules.monitoring.coreos.com",
            Some("monitoring"),
            "homelab-agent"
        )
        .is_some());

    // A hand edit through the API is drift, and is healed. (Scaling
    // vlog-worker by hand is not: its replicas belong to its HPA.)
    let indri = &hosts[0];
    kube.kubectl_ok(&[
        "scale",
        "deployment",
        "vlog-worker",
        "-n",
        "vlog",
        "--replicas=7",
    ]);
    indri.settled();
    kube.kubectl_ok(&[
        "patch",
        "configmap",
        "vlog-worker-config",
        "-n",
        "vlog",
        "--type=merge",
        "-p",
        r#"{"data":{"VLOG_WORKER_API_URL":"http://elsewhere:1"}}"#,
    ]);
    let (code, text) = indri.run("plan");
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("! k8s:vlog-workers/vlog/ConfigMap/vlog-worker-config drifted; will be healed\n    data.VLOG_WORKER_API_URL: \"http://elsewhere:1\" ->"),
        "{text}"
    );
    let text = indri.apply_ok();
    assert!(text.contains("drift healed"), "{text}");
    assert_ne!(
        kube.get("configmap", Some("vlog"), "vlog-worker-config")
            .unwrap()["data"]["VLOG_WORKER_API_URL"],
        "http://elsewhere:1"
    );
    indri.settled();

    // Removing a stack's manifests prunes exactly its objects.
    let connect_before = owned_by(kube, "indri.onepassword-connect");
    let vlog_before = owned_by(kube, "indri.vlog-workers");
    assert!(!vlog_before.is_empty());
    for entry in std::fs::read_dir(repo.join("k8s/vlog-workers")).unwrap() {
        let p = entry.unwrap().path();
        if p.file_name().unwrap() != "stack.yaml" {
            std::fs::remove_file(p).unwrap();
        }
    }
    indri.apply_ok();
    kube.wait_for(
        "vlog-workers pruned",
        std::time::Duration::from_secs(90),
        || owned_by(kube, "indri.vlog-workers").is_empty(),
    );
    assert_eq!(
        owned_by(kube, "indri.onepassword-connect"),
        connect_before,
        "other stacks untouched"
    );
    indri.settled();
}
