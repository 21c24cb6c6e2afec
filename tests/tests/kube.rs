//! Kubernetes stacks end to end: the real `agent` binary, its real kube-rs
//! client, over HTTP to the Kubernetes API stand-in
//! (`homelab_agent_tests::kube_standin`, 127.0.0.1) through a kubeconfig.
//! Plan of every stack from empty, apply, nothing to do, `kubectl edit`
//! drift healed or reported, a manifest removed and pruned, an object
//! without the ownership labels never pruned, a conflict with another field
//! manager reported and then forced, an unhealthy Deployment failing the
//! run, the API down while native resources still converge, CRDs in the same
//! run, and the leak test for a Secret from 1Password.

use std::path::PathBuf;
use std::process::Output;

use homelab_agent_tests::kube_standin::KubeStandIn;
use homelab_agent_tests::{agent, stderr, stdout};
use serde_json::{json, Value};

const HOST: &str = "platform: linux
roots: [/srv]
vars: {image: \"nginx:1.25\"}
modules:
  - name: app
stacks:
  - name: web
    context: lab
";

const MODULE: &str = "resources:
  - file: /srv/app.conf
    content: \"hello\\n\"
";

const STACK: &str = "namespace: web\ntimeout: 5s\n";

const NAMESPACE: &str = "apiVersion: v1
kind: Namespace
metadata:
  name: web
";

const APP: &str = "apiVersion: v1
kind: ConfigMap
metadata:
  name: web-config
data:
  greeting: hello
  color: blue
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
        - name: web
          image: \"{{ vars.image }}\"
";

const EXTRA: &str = "apiVersion: v1
kind: ConfigMap
metadata:
  name: extra
data:
  k: v
";

/// A sandbox, a repo with host `lab` (one native file, stack `web`), the
/// Kubernetes stand-in and an agent config pointing at its kubeconfig.
struct Lab {
    tmp: tempfile::TempDir,
    kube: KubeStandIn,
}

impl Lab {
    fn new() -> Lab {
        let lab = Lab {
            tmp: tempfile::tempdir().unwrap(),
            kube: KubeStandIn::start(),
        };
        std::fs::create_dir_all(lab.root()).unwrap();
        lab.write("hosts/lab.yaml", HOST);
        lab.write("modules/app/module.yaml", MODULE);
        lab.write("k8s/web/stack.yaml", STACK);
        lab.write("k8s/web/00-namespace.yaml", NAMESPACE);
        lab.write("k8s/web/app.yaml", APP);
        let kubeconfig = lab.kube.write_kubeconfig(lab.tmp.path(), "lab");
        lab.write_config(&format!("kubeconfig: {}\n", kubeconfig.display()));
        lab
    }

    fn repo(&self) -> PathBuf {
        self.tmp.path().join("repo")
    }

    fn root(&self) -> PathBuf {
        self.tmp.path().join("root")
    }

    fn config(&self) -> PathBuf {
        self.tmp.path().join("agent.yaml")
    }

    fn write(&self, rel: &str, content: &str) {
        let p = self.repo().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    fn write_config(&self, extra: &str) {
        std::fs::write(
            self.config(),
            format!(
                "repo: {}\nhost: lab\nroot: {}\n{extra}",
                self.repo().display(),
                self.root().display()
            ),
        )
        .unwrap();
    }

    fn run(&self, cmd: &str, extra: &[&str]) -> Output {
        let config = self.config();
        let mut args = vec![cmd, "--config", config.to_str().unwrap()];
        args.extend_from_slice(extra);
        agent().args(&args).output().expect("spawn agent")
    }

    fn plan(&self) -> (Output, String) {
        let out = self.run("plan", &[]);
        let text = stdout(&out);
        (out, text)
    }

    fn plan_json(&self) -> Value {
        let out = self.run("plan", &["--json"]);
        assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn apply(&self) -> (Output, String) {
        let out = self.run("apply", &[]);
        let text = format!("{}{}", stdout(&out), stderr(&out));
        (out, text)
    }

    fn apply_ok(&self) -> String {
        let (out, text) = self.apply();
        assert!(out.status.success(), "{text}");
        text
    }

    fn deployment(&self) -> Value {
        self.kube
            .get("apps", "Deployment", Some("web"), "web")
            .expect("deployment web/web")
    }

    fn config_map(&self, name: &str) -> Option<Value> {
        self.kube.get("", "ConfigMap", Some("web"), name)
    }
}

fn objects(plan: &Value, stack: &str) -> Vec<(String, String, String)> {
    plan["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == stack)
        .unwrap()["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["id"].as_str().unwrap().to_string(),
                o["classification"].as_str().unwrap_or("").to_string(),
                o["action"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn plan_from_empty_apply_then_nothing_to_do() {
    let lab = Lab::new();
    let (out, text) = lab.plan();
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(
        text.contains("Stack web (namespace web, context lab)"),
        "{text}"
    );
    for id in [
        "+ k8s:web//Namespace/web",
        "+ k8s:web/web/ConfigMap/web-config",
        "+ k8s:web/web/Deployment.apps/web",
    ] {
        assert!(text.contains(id), "{id} missing:\n{text}");
    }
    assert!(
        text.contains("Stacks: 3 to create, 0 to change, 0 to prune, 0 drifted."),
        "{text}"
    );
    // A plan never writes, not even with dry runs against the cluster.
    assert!(lab.kube.get("", "Namespace", None, "web").is_none());
    assert!(lab
        .kube
        .requests()
        .iter()
        .any(|r| r.method == "PATCH" && r.query.contains("dryRun=All")));

    let text = lab.apply_ok();
    assert!(text.contains("+ file:/srv/app.conf created"), "{text}");
    assert!(
        text.contains("+ k8s:web/web/Deployment.apps/web created"),
        "{text}"
    );
    assert!(
        text.contains("Stacks: 3 created, 0 changed, 0 pruned"),
        "{text}"
    );
    let d = lab.deployment();
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"],
        "nginx:1.25"
    );
    assert_eq!(
        d["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "homelab-agent"
    );
    assert_eq!(d["metadata"]["labels"]["homelab-agent/stack"], "lab.web");
    let managers: Vec<&str> = d["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["manager"].as_str().unwrap())
        .collect();
    assert_eq!(managers, ["homelab-agent"]);
    assert_eq!(
        lab.config_map("web-config").unwrap()["data"]["color"],
        "blue"
    );

    let (out, text) = lab.plan();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("No changes: 3 object(s) in sync."), "{text}");
    assert!(
        text.contains("Stacks: 0 to create, 0 to change, 0 to prune, 0 drifted."),
        "{text}"
    );
    let out = lab.run("plan", &["--detailed-exitcode"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let text = lab.apply_ok();
    assert!(
        text.contains("Nothing to do: 3 object(s) in sync."),
        "{text}"
    );
}
