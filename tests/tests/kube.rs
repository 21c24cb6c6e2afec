//! Kubernetes stacks end to end: the real `agent` binary, its real kube-rs
//! client, over TLS to a real API server and controllers
//! (`homelab_agent_tests::kube_env`, 127.0.0.1) through a kubeconfig. Each
//! test works in a namespace of its own (`@NS` in the texts below).
//! Plan of every stack from empty, apply, nothing to do, `kubectl edit`
//! drift healed or reported, a manifest removed and pruned, an object
//! without the ownership labels never pruned, a conflict with another field
//! manager reported and then forced, an unhealthy Deployment failing the
//! run, the API down while native resources still converge, CRDs in the same
//! run, and the leak test for a Secret from 1Password.

use std::process::Output;

use homelab_agent_tests::kube_env::{Fault, FaultProxy, Identity, KubeEnv};
use homelab_agent_tests::local_daemon::{get, Daemon};
use homelab_agent_tests::{agent, run_agent_bounded, stderr, stdout};
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

const STACK: &str = "namespace: @NS\ntimeout: 30s\n";

const NAMESPACE: &str = "apiVersion: v1
kind: Namespace
metadata:
  name: @NS
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

/// A sandbox, a repo with host `lab` (one native file, stack `web` in a
/// namespace of this test's own), the real control plane and an agent
/// config pointing at a kubeconfig for it: the suite's
/// [`homelab_agent_tests::Lab`] plus the cluster.
struct Lab {
    lab: homelab_agent_tests::Lab,
    kube: &'static KubeEnv,
    ns: String,
}

impl std::ops::Deref for Lab {
    type Target = homelab_agent_tests::Lab;
    fn deref(&self) -> &homelab_agent_tests::Lab {
        &self.lab
    }
}

impl Lab {
    fn new() -> Lab {
        let kube = KubeEnv::shared();
        let lab = Lab {
            lab: homelab_agent_tests::Lab::empty(),
            kube,
            ns: kube.namespace("web"),
        };
        lab.write("hosts/lab.yaml", HOST);
        lab.write("modules/app/module.yaml", MODULE);
        lab.write("k8s/web/stack.yaml", STACK);
        lab.write("k8s/web/00-namespace.yaml", NAMESPACE);
        lab.write("k8s/web/app.yaml", APP);
        let kubeconfig = lab
            .kube
            .write_kubeconfig(lab.tmp.path(), &["lab"], Identity::Admin);
        lab.write_config(&format!("kubeconfig: {}\n", kubeconfig.display()));
        lab
    }

    /// `text` with `@NS` replaced by this test's namespace.
    fn t(&self, text: &str) -> String {
        text.replace("@NS", &self.ns)
    }

    /// Writes a repository file (`@NS` replaced by the namespace).
    fn write(&self, rel: &str, content: &str) {
        self.lab.write(rel, &self.t(content));
    }

    /// Asserts that `text` contains `expected` (`@NS` replaced).
    #[track_caller]
    fn has(&self, text: &str, expected: &str) {
        let e = self.t(expected);
        assert!(text.contains(&e), "missing {e:?} in:\n{text}");
    }

    fn write_config(&self, extra: &str) {
        self.lab.write_config("lab", extra);
    }

    /// `agent CMD --config agent.yaml EXTRA`; a run still going after
    /// [`homelab_agent_tests::HANG_LIMIT`] fails the test.
    fn run(&self, cmd: &str, extra: &[&str]) -> Output {
        run_agent_bounded(
            agent()
                .arg(cmd)
                .arg("--config")
                .arg(self.config())
                .args(extra),
        )
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

    /// Apply; a failed object is fine (the test looks at the plan after).
    fn apply_ok_or_partial(&self) -> String {
        self.apply().1
    }

    fn run_both(&self, cmd: &str) -> (Output, String) {
        let out = self.run(cmd, &[]);
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
            .get("deployment.apps", Some(&self.ns), "web")
            .expect("deployment web")
    }

    fn config_map(&self, name: &str) -> Option<Value> {
        self.kube.get("configmap", Some(&self.ns), name)
    }
}

/// `agent run` with the lab's config (its `listen:` from the shared
/// allocator, another port if that one was taken), up once `/healthz`
/// answers; stderr to `daemon.log`.
fn start_daemon(lab: &Lab) -> Daemon {
    Daemon::start(
        agent,
        &lab.config(),
        &lab.tmp.path().join("daemon.log"),
        &[],
        |listen| matches!(get(listen, "/healthz", None), Ok((200, _, _))),
    )
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.kube.delete_namespace(&self.ns);
    }
}

/// Managers of the object itself (not of its status or scale subresource).
fn managers(o: &Value) -> Vec<String> {
    o["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m.get("subresource").is_none())
        .map(|m| m["manager"].as_str().unwrap().to_string())
        .collect()
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
        text.contains(&lab.t("Stack web (namespace @NS, context lab)")),
        "{text}"
    );
    for id in [
        &lab.t("+ k8s:web//Namespace/@NS"),
        &lab.t("+ k8s:web/@NS/ConfigMap/web-config"),
        &lab.t("+ k8s:web/@NS/Deployment.apps/web"),
    ] {
        assert!(text.contains(id), "{id} missing:\n{text}");
    }
    assert!(
        text.contains("Stacks: 3 to create, 0 to change, 0 to prune, 0 drifted."),
        "{text}"
    );
    let json = lab.plan_json();
    assert_eq!(
        objects(&json, "web"),
        [
            (
                lab.t("k8s:web//Namespace/@NS"),
                "create".to_string(),
                "create".to_string()
            ),
            (
                lab.t("k8s:web/@NS/ConfigMap/web-config"),
                "create".to_string(),
                "create".to_string()
            ),
            (
                lab.t("k8s:web/@NS/Deployment.apps/web"),
                "create".to_string(),
                "create".to_string()
            ),
        ]
    );
    assert_eq!(json["stacks"][0]["status"], "planned");
    // A plan never writes, not even with dry runs against the cluster.
    assert!(lab.kube.get("namespace", None, &lab.ns).is_none());

    let text = lab.apply_ok();
    assert!(text.contains("+ file:/srv/app.conf created"), "{text}");
    assert!(
        text.contains(&lab.t("+ k8s:web/@NS/Deployment.apps/web created")),
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
    // The real controllers roll it out (the harness's node starts the pods).
    lab.kube
        .wait_for("web rolled out", std::time::Duration::from_secs(60), || {
            lab.deployment()["status"]["readyReplicas"] == 2
        });
    assert_eq!(managers(&d), ["homelab-agent"]);
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

/// A hand edit: `kubectl patch` (field manager `kubectl-patch`).
fn edit_replicas(lab: &Lab, replicas: i64) {
    let patch = json!({"spec": {"replicas": replicas}}).to_string();
    lab.kube.kubectl_ok(&[
        "patch",
        "deployment",
        "web",
        "-n",
        &lab.ns,
        "--type=merge",
        "-p",
        &patch,
    ]);
}

fn owners_of_replicas(d: &Value) -> Vec<String> {
    d["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m.get("subresource").is_none())
        .filter(|m| m["fieldsV1"]["f:spec"].get("f:replicas").is_some())
        .map(|m| m["manager"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn kubectl_edit_is_drift_healed_or_reported_per_policy() {
    let lab = Lab::new();
    lab.apply_ok();
    edit_replicas(&lab, 5);
    assert_eq!(owners_of_replicas(&lab.deployment()), ["kubectl-patch"]);
    let (out, text) = lab.plan();
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&lab.t("! k8s:web/@NS/Deployment.apps/web drifted; will be healed\n    spec.replicas: 5 -> 2\n")),
        "{text}"
    );
    assert!(
        text.contains("Stacks: 0 to create, 0 to change, 0 to prune, 1 drifted."),
        "{text}"
    );
    let out = lab.run("plan", &["--detailed-exitcode"]);
    assert_eq!(out.status.code(), Some(2));
    let text = lab.apply_ok();
    assert!(
        text.contains(&lab.t("! k8s:web/@NS/Deployment.apps/web drift healed (spec.replicas)")),
        "{text}"
    );
    let d = lab.deployment();
    assert_eq!(d["spec"]["replicas"], 2);
    // Healing takes the field back from the editor.
    assert_eq!(owners_of_replicas(&d), ["homelab-agent"]);
    assert!(lab.plan().1.contains("No changes: 3 object(s) in sync."));

    // The same stack reported only.
    lab.write(
        "hosts/lab.yaml",
        &HOST.replace(
            "    context: lab\n",
            "    context: lab\n    on_drift: report\n",
        ),
    );
    edit_replicas(&lab, 7);
    let (_, text) = lab.plan();
    assert!(
        text.contains(
            &lab.t("! k8s:web/@NS/Deployment.apps/web drifted; on_drift: report, left alone")
        ),
        "{text}"
    );
    let text = lab.apply_ok();
    assert!(
        text.contains("drift reported, left alone (on_drift: report)"),
        "{text}"
    );
    assert_eq!(lab.deployment()["spec"]["replicas"], 7);
    assert!(text.contains("1 drifted (0 healed, 1 reported)"), "{text}");

    // Per object: the annotation wins over the stack's policy. (Heal
    // first: a manifest change while kubectl-edit owns replicas would be a
    // conflict.)
    lab.write("hosts/lab.yaml", HOST);
    lab.apply_ok();
    assert_eq!(lab.deployment()["spec"]["replicas"], 2);
    lab.write(
        "k8s/web/app.yaml",
        &APP.replace(
            "metadata:\n  name: web\n",
            "metadata:\n  name: web\n  annotations:\n    homelab-agent/on-drift: report\n",
        ),
    );
    lab.apply_ok();
    edit_replicas(&lab, 9);
    let text = lab.apply_ok();
    assert!(text.contains("drift reported, left alone"), "{text}");
    assert_eq!(lab.deployment()["spec"]["replicas"], 9);
}

#[test]
fn a_removed_manifest_is_pruned_and_an_object_without_ownership_labels_never() {
    let lab = Lab::new();
    lab.write("k8s/web/extra.yaml", EXTRA);
    lab.write(
        "k8s/web/kept.yaml",
        &EXTRA.replace("name: extra", "name: kept"),
    );
    lab.apply_ok();
    assert!(lab.config_map("extra").is_some() && lab.config_map("kept").is_some());
    // Someone takes `kept` over: it no longer carries the ownership labels.
    lab.kube.kubectl_ok(&[
        "label",
        "configmap",
        "kept",
        "-n",
        &lab.ns,
        "app.kubernetes.io/managed-by-",
        "homelab-agent/stack-",
    ]);
    // An object the agent never created, in the same namespace.
    lab.kube
        .apply_as(
            "helm",
            &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "theirs", "namespace": lab.ns}, "data": {"a": "b"}}),
            false,
        )
        .unwrap();
    std::fs::remove_file(lab.repo().join("k8s/web/extra.yaml")).unwrap();
    std::fs::remove_file(lab.repo().join("k8s/web/kept.yaml")).unwrap();
    let (out, text) = lab.plan();
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&lab.t("- k8s:web/@NS/ConfigMap/extra  will be deleted: it left the stack")),
        "{text}"
    );
    assert!(
        text.contains(&lab.t("- k8s:web/@NS/ConfigMap/kept  will be forgotten: left in place: it does not carry both ownership labels")),
        "{text}"
    );
    assert!(
        text.contains("Stacks: 0 to create, 0 to change, 1 to prune, 0 drifted."),
        "{text}"
    );
    // Plan deleted nothing.
    assert!(lab.config_map("extra").is_some());
    let text = lab.apply_ok();
    assert!(
        text.contains(&lab.t("- k8s:web/@NS/ConfigMap/extra deleted")),
        "{text}"
    );
    assert!(lab.config_map("extra").is_none());
    assert!(
        lab.config_map("kept").is_some(),
        "an object without the labels is never pruned"
    );
    assert!(lab.config_map("theirs").is_some());
    // Both left the inventory: the next plan has nothing to prune.
    let (_, text) = lab.plan();
    assert!(text.contains("No changes: 3 object(s) in sync."), "{text}");
    let status = lab.run("status", &["--json"]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    let ids: Vec<&String> = status["inventory"].as_object().unwrap().keys().collect();
    assert!(
        !ids.iter()
            .any(|id| id.contains("extra") || id.contains("kept")),
        "{ids:?}"
    );
}

#[test]
fn a_conflict_with_another_manager_is_reported_then_forced_when_configured() {
    let lab = Lab::new();
    lab.kube
        .apply_as(
            "helm",
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": lab.ns}}),
            false,
        )
        .unwrap();
    lab.kube
        .apply_as(
            "helm",
            &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "web-config", "namespace": lab.ns},
                    "data": {"color": "red", "greeting": "hello"}}),
            false,
        )
        .unwrap();
    let (out, text) = lab.plan();
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(
            &lab.t("~ k8s:web/@NS/ConfigMap/web-config\n    data.color: \"red\" -> \"blue\"\n")
        ),
        "{text}"
    );
    assert!(text.contains("    conflict: field manager \"helm\" owns .data.color; apply will fail unless the stack says force_conflicts: true\n"), "{text}");
    assert!(text.contains("1 conflict(s)."), "{text}");
    let (out, text) = lab.apply();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&lab.t("failed k8s:web/@NS/ConfigMap/web-config: conflict: field manager \"helm\" owns .data.color; set `force_conflicts: true` in k8s/web/stack.yaml")),
        "{text}"
    );
    // The rest of the stack (and the host) converged.
    assert!(
        text.contains(&lab.t("+ k8s:web/@NS/Deployment.apps/web created")),
        "{text}"
    );
    assert!(text.contains("+ file:/srv/app.conf created"), "{text}");
    assert_eq!(
        lab.config_map("web-config").unwrap()["data"]["color"],
        "red"
    );

    lab.write(
        "k8s/web/stack.yaml",
        &format!("{STACK}force_conflicts: true\n"),
    );
    let (_, text) = lab.plan();
    assert!(text.contains("will be taken over (force)"), "{text}");
    let text = lab.apply_ok();
    assert!(
        text.contains(&lab.t("k8s:web/@NS/ConfigMap/web-config")),
        "{text}"
    );
    let cm = lab.config_map("web-config").unwrap();
    assert_eq!(cm["data"]["color"], "blue");
    let helm_fields = cm["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["manager"] == "helm")
        .map(|m| m["fieldsV1"].to_string())
        .unwrap_or_default();
    assert!(!helm_fields.contains("f:color"), "{helm_fields}");
}

#[test]
fn an_unhealthy_deployment_fails_the_run_with_the_pods_own_reason() {
    let lab = Lab::new();
    lab.write("k8s/web/stack.yaml", "namespace: @NS\ntimeout: 60s\n");
    lab.apply_ok();
    // The new version's pods cannot start (the harness's node holds them
    // back as a kubelet would an image it cannot pull).
    lab.write(
        "k8s/web/app.yaml",
        &APP.replace("nginx:1.25", "nginx:1.27").replace(
            "      labels: {app: web}\n    spec:",
            "      labels: {app: web, kube-env.test/hold: ImagePullBackOff}\n    spec:",
        ),
    );
    let metrics = lab.tmp.path().join("apply.prom");
    let out = lab.run("apply", &["--metrics-file", metrics.to_str().unwrap()]);
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(1), "{text}");
    lab.has(
        &text,
        "failed k8s:web/@NS/Deployment.apps/web: unhealthy: pod @NS/web-",
    );
    // The wait for the rollout is the run's health phase.
    let prom = std::fs::read_to_string(&metrics).unwrap();
    let health = prom
        .lines()
        .find(|l| {
            l.starts_with("homelab_agent_last_run_phase_duration_seconds{")
                && l.contains("phase=\"health\"")
        })
        .unwrap_or_else(|| panic!("no health phase in:\n{prom}"));
    let secs: f64 = health.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(secs > 0.0, "{health}");
    assert!(
        text.contains("container web is waiting: ImagePullBackOff"),
        "{text}"
    );
    // Failed with the pod's reason, not after the whole timeout.
    assert!(!text.contains("not healthy after"), "{text}");
    // The rest of the host converged.
    assert!(
        text.contains("file:/srv/app.conf") || !text.contains("failed file:"),
        "{text}"
    );
    let status = lab.run("status", &[]);
    assert!(
        stdout(&status).contains("partial") || stdout(&status).contains("failed"),
        "{}",
        stdout(&status)
    );
}

#[test]
fn api_down_or_a_bad_kubeconfig_fails_the_stack_only() {
    let lab = Lab::new();
    // The API server behind a proxy that drops every connection (a server
    // restarting), then hangs them (a server or network that never answers).
    let proxy = FaultProxy::start(lab.kube.server());
    let kubeconfig =
        lab.kube
            .write_kubeconfig_for(lab.tmp.path(), &["lab"], Identity::Admin, &proxy.url());
    lab.write_config(&format!("kubeconfig: {}\n", kubeconfig.display()));
    proxy.set(Fault::Close);
    let (out, text) = lab.plan();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("+ file:/srv/app.conf"), "{text}");
    lab.has(
        &text,
        &format!(
            "Stack web (namespace @NS, context lab): error: cannot reach the Kubernetes API at {}",
            proxy.url()
        ),
    );
    let (out, text) = lab.apply();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("+ file:/srv/app.conf created"), "{text}");
    assert!(
        text.contains("Stack web: failed: cannot reach the Kubernetes API"),
        "{text}"
    );
    assert_eq!(
        std::fs::read_to_string(lab.root().join("srv/app.conf")).unwrap(),
        "hello\n"
    );
    // A server that accepts and never answers: every call is bounded
    // (20 s a call, retries included), so the stack fails (a call without
    // a bound would hang the apply past HANG_LIMIT and fail the test) and
    // the host still converged.
    proxy.set(Fault::Hang);
    let (out, text) = lab.apply();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("Stack web: failed: cannot reach the Kubernetes API"),
        "{text}"
    );
    // Back up: the stack converges.
    proxy.set(Fault::Pass);
    let text = lab.apply_ok();
    assert!(text.contains("Stacks: 3 created"), "{text}");

    // A context the kubeconfig does not have.
    lab.write(
        "hosts/lab.yaml",
        &HOST.replace("context: lab", "context: elsewhere"),
    );
    let (out, text) = lab.plan();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("it has no context `elsewhere` (contexts: lab)"),
        "{text}"
    );

    // In-cluster config asked for, but the agent does not run in a pod.
    lab.write(
        "hosts/lab.yaml",
        &HOST.replace("context: lab", "in_cluster: true"),
    );
    let (out, text) = lab.plan();
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&lab.t("Stack web (namespace @NS, in-cluster config): not checked: not running inside a cluster")),
        "{text}"
    );

    // A sandbox (`root:`) without `kubeconfig:` never uses the user's own
    // kubeconfig: not checked.
    lab.write("hosts/lab.yaml", HOST);
    lab.write_config("");
    let (out, text) = lab.plan();
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&lab.t("Stack web (namespace @NS, context lab): not checked: sandbox run (--root): stacks reach a cluster only through `kubeconfig:` in the agent config")),
        "{text}"
    );
    // No kubeconfig and no in-cluster config at all (no sandbox; a plan
    // only reads): not checked, not an error.
    std::fs::write(
        lab.config(),
        format!(
            "repo: {}
host: lab
state_dir: {}
",
            lab.repo().display(),
            lab.tmp.path().join("state").display()
        ),
    )
    .unwrap();
    let (out, text) = lab.plan();
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&lab.t("Stack web (namespace @NS, context lab): not checked: no kubeconfig: nothing at $KUBECONFIG")),
        "{text}"
    );
    assert!(
        text.contains(&lab.t("  ? k8s:web/@NS/Deployment.apps/web  not checked")),
        "{text}"
    );
    assert!(text.contains("1 not checked (no cluster)."), "{text}");
    let json = lab.plan_json();
    assert_eq!(json["stacks"][0]["status"], "not_checked");
}

#[test]
fn crds_and_their_custom_resources_in_one_run() {
    let lab = Lab::new();
    lab.write(
        "k8s/web/crd.yaml",
        "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
---
apiVersion: example.com/v1
kind: Widget
metadata:
  name: gear
spec:
  teeth: 12
",
    );
    let (out, text) = lab.plan();
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&lab.t("+ k8s:web/@NS/Widget.example.com/gear (its CRD is created first)")),
        "{text}"
    );
    let text = lab.apply_ok();
    assert!(
        text.contains(&lab.t("+ k8s:web/@NS/Widget.example.com/gear created")),
        "{text}"
    );
    assert_eq!(
        lab.kube
            .get("widgets.example.com", Some(&lab.ns), "gear")
            .unwrap()["spec"]["teeth"],
        12
    );
    let (_, text) = lab.plan();
    assert!(text.contains("No changes: 5 object(s) in sync."), "{text}");
}

#[test]
fn config_maps_generated_from_repository_files() {
    let lab = Lab::new();
    lab.write("dashboards/agent.json", "{\"title\": \"homelab-agent\"}\n");
    lab.write(
        "k8s/web/stack.yaml",
        &format!("{STACK}config_maps:\n  - name: dashboards\n    labels: {{grafana_dashboard: \"1\"}}\n    files: [dashboards/agent.json]\n"),
    );
    lab.apply_ok();
    let cm = lab.config_map("dashboards").unwrap();
    assert_eq!(cm["data"]["agent.json"], "{\"title\": \"homelab-agent\"}\n");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(cm["metadata"]["labels"]["homelab-agent/stack"], "lab.web");
    // The file changes: so does the ConfigMap (a change, not drift).
    lab.write("dashboards/agent.json", "{\"title\": \"v2\"}\n");
    let (_, text) = lab.plan();
    assert!(
        text.contains(&lab.t("~ k8s:web/@NS/ConfigMap/dashboards\n    data.agent.json:")),
        "{text}"
    );
    lab.apply_ok();
    assert_eq!(
        lab.config_map("dashboards").unwrap()["data"]["agent.json"],
        "{\"title\": \"v2\"}\n"
    );
    // A missing file is a validation error with file:line; nothing is touched.
    lab.write(
        "k8s/web/stack.yaml",
        &format!(
            "{STACK}config_maps:\n  - name: dashboards\n    files: [dashboards/missing.json]\n"
        ),
    );
    let (out, _) = lab.plan();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("k8s/web/stack.yaml:5: file `dashboards/missing.json` of ConfigMap dashboards does not exist"), "{}", stderr(&out));
}

#[test]
fn invalid_stacks_are_rejected_with_file_and_line() {
    let lab = Lab::new();
    lab.write(
        "k8s/web/bad.yaml",
        "apiVersion: v1
kind: ConfigMap
metadata:
  name: leaky
data:
  password: \"{{ secret('op://homelab/db/password') }}\"
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: Not_Valid
",
    );
    lab.write("hosts/lab.yaml", &format!("{HOST}  - name: nosuch\n"));
    let proxy = FaultProxy::start(lab.kube.server());
    let kubeconfig =
        lab.kube
            .write_kubeconfig_for(lab.tmp.path(), &["lab"], Identity::Admin, &proxy.url());
    lab.write_config(&format!("kubeconfig: {}\n", kubeconfig.display()));
    let (out, _) = lab.run_both("apply");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("hosts/lab.yaml:9: unknown stack `nosuch`: there is no k8s/nosuch/stack.yaml"),
        "{err}"
    );
    assert!(err.contains("k8s/web/bad.yaml:6: template error"), "{err}");
    assert!(err.contains("in stacks, secret(\"op://...\") may only be used in the values of a Secret's `stringData`"), "{err}");
    assert!(
        err.contains("k8s/web/bad.yaml:8: `Not_Valid` is not a valid object name"),
        "{err}"
    );
    assert_eq!(proxy.accepted(), 0, "nothing reached the cluster");
    assert!(
        !lab.root().join("srv/app.conf").exists(),
        "nothing was applied"
    );
}

const OP_TOKEN: &str = "kube-leak-test-connect-token";
/// Distinctive, with characters whose base64, JSON and URL forms differ.
const API_KEY: &str = "Vk9-kube-CANARY-p@ss/w0rd+Zq8=&x<y>";
const ROTATED: &str = "Rot8-kube-CANARY-44zz";

const SECRET: &str = "apiVersion: v1
kind: Secret
metadata:
  name: api
type: Opaque
stringData:
  API_KEY: \"{{ secret('op://homelab/vlog/api-key') }}\"
  URL: http://vlog.example:9002
";

fn encodings(value: &str) -> Vec<String> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(value);
    let json = serde_json::to_string(value).unwrap();
    vec![
        value.to_string(),
        b64.trim_end_matches('=').to_string(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value),
        json.trim_matches('"').to_string(),
        value.replace('/', "%2F").replace('@', "%40"),
    ]
}

fn assert_no_secret(what: &str, text: &str) {
    for value in [API_KEY, ROTATED] {
        for enc in encodings(value) {
            assert!(
                !text.contains(&enc),
                "{what} holds a secret value ({enc}):\n{text}"
            );
        }
    }
}

/// Every byte under `dir`, for the leak check of the state directory.
fn all_bytes(dir: &std::path::Path) -> String {
    let mut out = String::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.push_str(&all_bytes(&p));
        } else {
            out.push_str(&String::from_utf8_lossy(&std::fs::read(&p).unwrap()));
        }
    }
    out
}

#[test]
fn secret_values_from_connect_never_leak_and_a_failed_secret_blocks_its_object() {
    use base64::Engine;
    use homelab_agent_tests::connect_standin::ConnectStandIn;
    use std::os::unix::fs::PermissionsExt;

    let lab = Lab::new();
    let mut connect = ConnectStandIn::start(OP_TOKEN);
    let vault = connect.add_vault("homelab");
    let item = connect.add_item(&vault, "vlog", &[("api-key", API_KEY)]);
    let token_file = lab.tmp.path().join("op-token");
    std::fs::write(&token_file, OP_TOKEN).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let kubeconfig = lab.tmp.path().join("kubeconfig");
    let listen = format!("127.0.0.1:{}", homelab_agent_tests::ports::reserve());
    lab.write_config(&format!(
        "kubeconfig: {}\nonepassword:\n  connect_url: {}\n  token_file: {}\nlisten: {listen}\npoll_interval: 1h\n",
        kubeconfig.display(),
        connect.url(),
        token_file.display()
    ));
    lab.write("k8s/web/secret.yaml", SECRET);
    let mut seen = String::new();

    let (out, text) = lab.plan();
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(
        text.contains(&lab.t("+ k8s:web/@NS/Secret/api\n")),
        "{text}"
    );
    seen += &text;
    let out = lab.run("plan", &["--json"]);
    seen += &String::from_utf8_lossy(&out.stdout);
    let text = lab.apply_ok();
    seen += &text;
    let stored = lab.kube.get("secret", Some(&lab.ns), "api").unwrap();
    assert_eq!(
        stored["data"]["API_KEY"],
        base64::engine::general_purpose::STANDARD.encode(API_KEY),
        "the value reached the cluster"
    );
    assert!(lab.plan().1.contains("No changes: 4 object(s) in sync."));

    // Rotated in 1Password: a change, shown without values.
    connect.set_field(&item, "api-key", ROTATED);
    let (_, text) = lab.plan();
    assert!(
        text.contains(&lab.t("~ k8s:web/@NS/Secret/api\n    data.API_KEY: (secret value) -> (secret value, changed)\n")),
        "{text}"
    );
    seen += &text;
    let out = lab.run("plan", &["--json"]);
    seen += &String::from_utf8_lossy(&out.stdout);
    let out = lab.run("apply", &["--json"]);
    assert!(out.status.success());
    seen += &String::from_utf8_lossy(&out.stdout);
    seen += &stderr(&out);
    assert_eq!(
        lab.kube.get("secret", Some(&lab.ns), "api").unwrap()["data"]["API_KEY"],
        base64::engine::general_purpose::STANDARD.encode(ROTATED)
    );

    // The daemon converges the same; its logs hold no value either.
    connect.set_field(&item, "api-key", API_KEY);
    let daemon = start_daemon(&lab);
    let listen = daemon.listen.clone();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let stored = lab.kube.get("secret", Some(&lab.ns), "api").unwrap();
        if stored["data"]["API_KEY"] == base64::engine::general_purpose::STANDARD.encode(API_KEY) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon did not apply the stack"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let status = loop {
        if let Ok((200, body)) =
            homelab_agent_tests::git_server::http_request("GET", &listen, "/api/status", &[], &[])
        {
            let v: Value = serde_json::from_str(&body).unwrap();
            if v["last_run"].is_object() && v["running"] == false {
                break body;
            }
        }
        assert!(std::time::Instant::now() < deadline, "no run recorded");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    seen += &status;
    let logs = daemon.log_text();
    assert!(daemon.terminate().success());
    assert!(logs.contains(&lab.t("k8s:web/@NS/Secret/api")), "{logs}");
    seen += &logs;

    // Connect down: the Secret is skipped, never applied with a placeholder.
    connect.stop();
    lab.write(
        "k8s/web/secret.yaml",
        &SECRET.replace(
            "URL: http://vlog.example:9002",
            "URL: http://vlog.example:9003",
        ),
    );
    let (out, text) = lab.plan();
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&lab.t("? k8s:web/@NS/Secret/api skipped: needs op://homelab/vlog/api-key")),
        "{text}"
    );
    let (out, text) = lab.apply();
    seen += &text;
    assert!(out.status.success(), "skipped is not failed: {text}");
    assert!(
        text.contains(&lab.t("? k8s:web/@NS/Secret/api skipped: needs op://homelab/vlog/api-key")),
        "{text}"
    );
    let stored = lab.kube.get("secret", Some(&lab.ns), "api").unwrap();
    assert_eq!(
        stored["data"]["API_KEY"],
        base64::engine::general_purpose::STANDARD.encode(API_KEY)
    );
    assert_eq!(
        stored["data"]["URL"],
        base64::engine::general_purpose::STANDARD.encode("http://vlog.example:9002")
    );
    assert!(!stored.to_string().contains("unresolved"));
    let status = lab.run("status", &["--json"]);
    seen += &String::from_utf8_lossy(&status.stdout);

    assert_no_secret("plans, applies, status and daemon logs", &seen);
    assert_no_secret(
        "the state directory",
        &all_bytes(&lab.root().join("var/lib/homelab-agent")),
    );
}

#[test]
fn a_stack_the_host_stops_listing_is_reported_never_silently_dropped() {
    let lab = Lab::new();
    lab.apply_ok();
    lab.write("hosts/lab.yaml", &HOST[..HOST.find("stacks:").unwrap()]);
    let (out, text) = lab.plan();
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("Stack web is no longer listed by this host: its 3 object(s) stay in the cluster and in the inventory."),
        "{text}"
    );
    lab.apply_ok();
    assert!(lab.config_map("web-config").is_some());
    // Listed again with its manifests removed: everything is pruned.
    lab.write("hosts/lab.yaml", HOST);
    for f in ["00-namespace.yaml", "app.yaml"] {
        std::fs::remove_file(lab.repo().join("k8s/web").join(f)).unwrap();
    }
    let text = lab.apply_ok();
    assert!(
        text.contains(&lab.t("- k8s:web//Namespace/@NS deleted")),
        "{text}"
    );
    lab.kube
        .wait_for("namespace gone", std::time::Duration::from_secs(60), || {
            lab.kube.get("namespace", None, &lab.ns).is_none()
        });
    assert!(lab.config_map("web-config").is_none());
    assert!(!lab.plan().1.contains("no longer listed"));
}

#[test]
fn a_field_left_out_is_removed_and_a_rejected_object_fails_alone() {
    let lab = Lab::new();
    lab.apply_ok();
    // Server-side apply removes what the manager stops applying.
    lab.write("k8s/web/app.yaml", &APP.replace("  color: blue\n", ""));
    let (_, text) = lab.plan();
    assert!(
        text.contains(
            &lab.t("~ k8s:web/@NS/ConfigMap/web-config\n    data.color: \"blue\" -> (none)\n")
        ),
        "{text}"
    );
    lab.apply_ok();
    assert!(lab.config_map("web-config").unwrap()["data"]
        .get("color")
        .is_none());
    // The API server rejects an object (422): that object fails, with the
    // server's reason; the rest of the stack and the host converge.
    lab.write(
        "k8s/web/app.yaml",
        &APP.replace("replicas: 2", "replicas: -1")
            .replace("greeting: hello", "greeting: hi"),
    );
    let (out, text) = lab.plan();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&lab.t("error: k8s:web/@NS/Deployment.apps/web  (k8s/web/app.yaml:9): dry-run apply rejected: 422 Invalid: Deployment.apps \"web\" is invalid: spec.replicas: Invalid value: -1: must be greater than or equal to 0")),
        "{text}"
    );
    let (out, text) = lab.apply();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(
            &lab.t("failed k8s:web/@NS/Deployment.apps/web: dry-run apply rejected: 422 Invalid")
        ),
        "{text}"
    );
    assert!(
        text.contains(
            &lab.t("~ k8s:web/@NS/ConfigMap/web-config updated (data.color, data.greeting)")
        ),
        "{text}"
    );
    assert_eq!(
        lab.config_map("web-config").unwrap()["data"]["greeting"],
        "hi"
    );
    assert_eq!(lab.deployment()["spec"]["replicas"], 2);
}

// ---------------------------------------------------------------------------
// What a real cluster demands (each of these failed, or could not be shown,
// against the stand-in).
// ---------------------------------------------------------------------------

/// A Deployment as someone first made it with `kubectl apply` (client
/// side): an env var and a sidecar the manifest will not have.
const HAND_MADE: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: @NS
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
          image: nginx:1.25
          env:
            - {name: DEBUG, value: \"1\"}
        - name: sidecar
          image: busybox:1.36
";

#[test]
fn objects_made_with_kubectl_are_adopted_and_fields_removed_later_really_go() {
    let lab = Lab::new();
    lab.kube.kubectl_ok(&["create", "namespace", &lab.ns]);
    let out = lab
        .kube
        .kubectl_stdin(&["apply", "-f", "-"], &lab.t(HAND_MADE));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "web-config", "namespace": lab.ns},
        "data": {"greeting": "hello", "color": "blue", "legacy": "x"}});
    lab.kube.create(&cm);
    let before = lab.deployment();
    assert!(managers(&before).contains(&"kubectl-client-side-apply".to_string()));

    let (out, text) = lab.plan();
    assert!(out.status.success(), "{text}");
    lab.has(&text, "~ k8s:web/@NS/Deployment.apps/web\n");
    assert!(
        text.contains("note: adopts the fields of \"kubectl-client-side-apply\" (made by hand): fields the manifest does not set are removed"),
        "{text}"
    );
    assert!(
        text.contains("note: adopts the fields of \"kubectl-create\""),
        "{text}"
    );
    assert!(!text.contains("conflict"), "{text}");
    let text = lab.apply_ok();
    assert!(!text.contains("failed k8s:"), "{text}");
    let d = lab.deployment();
    let containers = d["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert_eq!(containers.len(), 1, "the sidecar left: {d}");
    assert!(containers[0].get("env").is_none(), "DEBUG left: {d}");
    assert!(
        d["metadata"]["annotations"]
            .get("kubectl.kubernetes.io/last-applied-configuration")
            .is_none(),
        "{d}"
    );
    assert_eq!(managers(&d), ["homelab-agent"]);
    assert!(lab.config_map("web-config").unwrap()["data"]
        .get("legacy")
        .is_none());
    // And it stays that way: nothing to do.
    lab.has(&lab.plan().1, "No changes: 3 object(s) in sync.");
}

#[test]
fn a_key_removed_from_a_secret_leaves_the_cluster_also_after_stringdata() {
    use base64::Engine;
    let lab = Lab::new();
    let secret = "apiVersion: v1
kind: Secret
metadata:
  name: creds
stringData:
  A: alpha
  B: beta
";
    // What earlier versions of the agent did: apply stringData.
    lab.kube.kubectl_ok(&["create", "namespace", &lab.ns]);
    let old = lab.t(&secret.replace("  name: creds\n", "  name: creds\n  namespace: @NS\n"));
    let out = lab.kube.kubectl_stdin(
        &[
            "apply",
            "--server-side",
            "--field-manager=homelab-agent",
            "-f",
            "-",
        ],
        &old,
    );
    assert!(out.status.success());
    lab.write("k8s/web/secret.yaml", secret);
    lab.apply_ok();
    lab.write("k8s/web/secret.yaml", &secret.replace("  B: beta\n", ""));
    let (_, text) = lab.plan();
    lab.has(&text, "~ k8s:web/@NS/Secret/creds");
    let text = lab.apply_ok();
    assert!(!text.contains("failed k8s:"), "{text}");
    let s = lab.kube.get("secret", Some(&lab.ns), "creds").unwrap();
    assert_eq!(
        s["data"]["A"],
        base64::engine::general_purpose::STANDARD.encode("alpha")
    );
    assert!(s["data"].get("B").is_none(), "B stayed: {s}");
    assert!(lab.plan().1.contains("No changes"));
    // Again, on a Secret the agent made itself.
    lab.write(
        "k8s/web/secret.yaml",
        &secret.replace("  B: beta\n", "  C: gamma\n"),
    );
    lab.apply_ok();
    lab.write("k8s/web/secret.yaml", secret);
    lab.apply_ok();
    let s = lab.kube.get("secret", Some(&lab.ns), "creds").unwrap();
    let mut keys: Vec<&String> = s["data"].as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["A", "B"]);
}

const HPA: &str = "apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: web
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: web}
  minReplicas: 4
  maxReplicas: 6
  metrics:
    - type: Resource
      resource: {name: cpu, target: {type: Utilization, averageUtilization: 80}}
";

#[test]
fn a_controllers_fields_are_never_forced_and_replicas_are_handed_over_to_an_hpa() {
    let lab = Lab::new();
    lab.write(
        "k8s/web/app.yaml",
        &APP.replace("replicas: 2", "replicas: 3"),
    );
    lab.apply_ok();
    // The HPA (the real controller) scales to its minimum through the
    // scale subresource.
    lab.write("k8s/web/hpa.yaml", HPA);
    lab.apply_ok();
    lab.kube.wait_for(
        "the HPA scaling to 4",
        std::time::Duration::from_secs(60),
        || lab.deployment()["spec"]["replicas"] == 4,
    );
    let (_, text) = lab.plan();
    assert!(
        text.contains("conflict: field manager \"kube-controller-manager\" (a controller) owns .spec.replicas; a controller's fields are never forced"),
        "{text}"
    );
    let (out, text) = lab.apply();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("a controller's fields are never forced"),
        "{text}"
    );
    assert_eq!(lab.deployment()["spec"]["replicas"], 4, "not forced");
    // The manifest stops setting replicas: the HPA owns them already (its
    // scale took them over), so they stay at 4.
    lab.write("k8s/web/app.yaml", &APP.replace("  replicas: 2\n", ""));
    lab.has(&lab.plan().1, "No changes: 4 object(s) in sync.");
    lab.apply_ok();
    assert_eq!(lab.deployment()["spec"]["replicas"], 4);

    // An HPA that has not written replicas yet (within its bounds, no
    // metrics): the agent still owns them. Leaving the manifest, they are
    // handed over at their value instead of falling back to 1.
    let api = APP
        .replace("name: web-config", "name: api-config")
        .replace("name: web\n", "name: api\n")
        .replace("{app: web}", "{app: api}")
        .replace("replicas: 2", "replicas: 5");
    let api_hpa = HPA
        .replace("name: web\n", "name: api\n")
        .replace("name: web}", "name: api}")
        .replace("minReplicas: 4", "minReplicas: 2");
    lab.write("k8s/web/api.yaml", &api);
    lab.write("k8s/web/api-hpa.yaml", &api_hpa);
    lab.apply_ok();
    let replicas = || {
        lab.kube
            .get("deployment.apps", Some(&lab.ns), "api")
            .unwrap()["spec"]["replicas"]
            .clone()
    };
    assert_eq!(replicas(), 5);
    lab.write("k8s/web/api.yaml", &api.replace("  replicas: 5\n", ""));
    let (_, text) = lab.plan();
    assert!(
        text.contains("note: spec.replicas left the manifest: handed over at its current value 5"),
        "{text}"
    );
    let text = lab.apply_ok();
    assert!(!text.contains("failed k8s:"), "{text}");
    assert_eq!(replicas(), 5, "not reset to 1");
    // Once the deployment controller has seen the applied spec (the
    // event), the count is still the handed-over one.
    lab.kube.wait_for(
        "the deployment controller to observe the apply",
        std::time::Duration::from_secs(60),
        || {
            let d = lab
                .kube
                .get("deployment.apps", Some(&lab.ns), "api")
                .unwrap();
            d["status"]["observedGeneration"].as_i64() >= d["metadata"]["generation"].as_i64()
        },
    );
    assert_eq!(replicas(), 5);
    lab.has(&lab.plan().1, "No changes: 7 object(s) in sync.");
}

const JOB: &str = "apiVersion: batch/v1
kind: Job
metadata:
  name: migrate
spec:
  ttlSecondsAfterFinished: 1
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: migrate
          image: busybox:1.36
          args: [echo, v1]
";

#[test]
fn a_job_removed_by_its_ttl_is_not_run_again_and_a_changed_job_is() {
    let lab = Lab::new();
    lab.write("k8s/web/job.yaml", JOB);
    lab.apply_ok();
    // Completed (the harness's node), then deleted by the TTL controller.
    lab.kube.wait_for(
        "the TTL controller",
        std::time::Duration::from_secs(60),
        || {
            lab.kube
                .get("job.batch", Some(&lab.ns), "migrate")
                .is_none()
        },
    );
    let (out, text) = lab.plan();
    assert!(out.status.success(), "{text}");
    lab.has(&text, "No changes: 4 object(s) in sync.");
    let text = lab.apply_ok();
    assert!(text.contains("Nothing to do"), "{text}");
    assert!(lab
        .kube
        .get("job.batch", Some(&lab.ns), "migrate")
        .is_none());
    // A changed Job runs again.
    lab.write("k8s/web/job.yaml", &JOB.replace("echo, v1", "echo, v2"));
    let text = lab.apply_ok();
    lab.has(&text, "+ k8s:web/@NS/Job.batch/migrate");
    // And one changed while the old run still exists is deleted and made anew.
    lab.write(
        "k8s/web/job.yaml",
        &JOB.replace("  ttlSecondsAfterFinished: 1\n", "")
            .replace("echo, v1", "echo, v3"),
    );
    lab.apply_ok();
    lab.write(
        "k8s/web/job.yaml",
        &JOB.replace("  ttlSecondsAfterFinished: 1\n", "")
            .replace("echo, v1", "echo, v4"),
    );
    let (_, text) = lab.plan();
    assert!(text.contains("note: a changed Job runs again"), "{text}");
    lab.apply_ok();
    let job = lab.kube.get("job.batch", Some(&lab.ns), "migrate").unwrap();
    assert_eq!(
        job["spec"]["template"]["spec"]["containers"][0]["args"][1],
        "v4"
    );
}

const STATEFUL: &str = "apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: db
spec:
  serviceName: db
  replicas: 1
  selector:
    matchLabels: {app: db}
  template:
    metadata:
      labels: {app: db}
    spec:
      containers:
        - name: db
          image: postgres:16
  volumeClaimTemplates:
    - metadata: {name: data}
      spec:
        accessModes: [ReadWriteOnce]
        resources: {requests: {storage: 1Gi}}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: frozen
immutable: true
data:
  k: v1
";

#[test]
fn immutable_fields_fail_the_object_alone_unless_it_may_be_recreated() {
    let lab = Lab::new();
    lab.write("k8s/web/db.yaml", STATEFUL);
    lab.apply_ok();
    lab.write(
        "k8s/web/db.yaml",
        &STATEFUL
            .replace("storage: 1Gi", "storage: 2Gi")
            .replace("k: v1", "k: v2"),
    );
    lab.write(
        "k8s/web/app.yaml",
        &APP.replace("color: blue", "color: green"),
    );
    let (out, text) = lab.plan();
    assert_eq!(out.status.code(), Some(1), "{text}");
    lab.has(
        &text,
        "error: k8s:web/@NS/StatefulSet.apps/db  (k8s/web/db.yaml:1): cannot change in place: spec.volumeClaimTemplates (immutable)",
    );
    lab.has(&text, "error: k8s:web/@NS/ConfigMap/frozen");
    assert!(text.contains("homelab-agent/recreate"), "{text}");
    let (out, text) = lab.apply();
    assert_eq!(out.status.code(), Some(1), "{text}");
    // The rest of the stack is not held back.
    lab.has(&text, "~ k8s:web/@NS/ConfigMap/web-config updated");
    assert_eq!(
        lab.config_map("web-config").unwrap()["data"]["color"],
        "green"
    );
    // Opted in: deleted and created again.
    lab.write(
        "k8s/web/db.yaml",
        &STATEFUL
            .replace("storage: 1Gi", "storage: 2Gi")
            .replace("k: v1", "k: v2")
            .replace(
                "  name: db\n",
                "  name: db\n  annotations: {homelab-agent/recreate: \"true\"}\n",
            )
            .replace(
                "  name: frozen\n",
                "  name: frozen\n  annotations: {homelab-agent/recreate: \"true\"}\n",
            ),
    );
    let (out, text) = lab.plan();
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("note: spec.volumeClaimTemplates cannot change in place: it is deleted and created again"),
        "{text}"
    );
    let text = lab.apply_ok();
    assert!(!text.contains("failed k8s:"), "{text}");
    let sts = lab
        .kube
        .get("statefulset.apps", Some(&lab.ns), "db")
        .unwrap();
    assert_eq!(
        sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"],
        "2Gi"
    );
    assert_eq!(lab.config_map("frozen").unwrap()["data"]["k"], "v2");
}

#[test]
fn deletion_takes_time_and_the_plan_says_so() {
    let lab = Lab::new();
    let pvc = "apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: media
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: held
  finalizers: [example.com/hold]
data: {k: v}
";
    lab.write("k8s/web/pvc.yaml", pvc);
    lab.apply_ok();
    // An object held by a finalizer, deleted by someone: never in sync.
    lab.kube
        .kubectl_ok(&["delete", "configmap", "held", "-n", &lab.ns, "--wait=false"]);
    let (_, text) = lab.plan();
    lab.has(&text, "k8s:web/@NS/ConfigMap/held");
    assert!(
        text.contains(
            "note: it is being deleted (held by finalizers example.com/hold): apply waits"
        ),
        "{text}"
    );
    assert!(!text.contains("object(s) in sync"), "{text}");
    // The finalizer is released: apply re-creates it.
    let release = lab.kube.kubectl(&[
        "patch",
        "configmap",
        "held",
        "-n",
        &lab.ns,
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
    assert!(release.status.success());
    lab.apply_ok();
    assert!(lab.config_map("held").is_some());
    // Drop the finalizer from the manifest so the namespace can go.
    lab.write(
        "k8s/web/pvc.yaml",
        &pvc.replace("  finalizers: [example.com/hold]\n", ""),
    );
    lab.apply_ok();
    lab.kube.kubectl_ok(&[
        "patch",
        "configmap",
        "held",
        "-n",
        &lab.ns,
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);

    // Pruning the namespace names what goes with it.
    for f in ["00-namespace.yaml", "app.yaml", "pvc.yaml"] {
        std::fs::remove_file(lab.repo().join("k8s/web").join(f)).unwrap();
    }
    let (_, text) = lab.plan();
    lab.has(
        &text,
        "- k8s:web//Namespace/@NS  will be deleted: it left the stack; everything in namespace @NS goes with it, including 1 PersistentVolumeClaim(s) (media) and their data",
    );
    lab.apply_ok();
    // Added back at once: the namespace is still terminating; apply waits.
    lab.write("k8s/web/00-namespace.yaml", NAMESPACE);
    lab.write("k8s/web/app.yaml", APP);
    let terminating = lab
        .kube
        .get("namespace", None, &lab.ns)
        .is_some_and(|n| n["status"]["phase"] == "Terminating");
    if terminating {
        let (_, text) = lab.plan();
        assert!(text.contains("is being deleted"), "{text}");
    }
    let text = lab.apply_ok();
    lab.has(&text, "k8s:web/@NS/ConfigMap/web-config created");
    assert_eq!(
        lab.kube.get("namespace", None, &lab.ns).unwrap()["status"]["phase"],
        "Active"
    );
}

#[test]
fn misspelt_fields_are_errors_naming_the_field() {
    let lab = Lab::new();
    lab.write(
        "k8s/web/app.yaml",
        &APP.replace("  replicas: 2\n", "  replicas: 2\n  replicass: 3\n"),
    );
    lab.write(
        "k8s/web/crd.yaml",
        "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: gadgets.strict.example.com
spec:
  group: strict.example.com
  scope: Namespaced
  names: {plural: gadgets, singular: gadget, kind: Gadget}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              properties:
                size: {type: integer}
",
    );
    lab.apply_ok_or_partial();
    lab.write(
        "k8s/web/gadget.yaml",
        "apiVersion: strict.example.com/v1\nkind: Gadget\nmetadata:\n  name: g\nspec:\n  sise: 3\n",
    );
    let (out, text) = lab.plan();
    assert_eq!(out.status.code(), Some(1), "{text}");
    lab.has(
        &text,
        "error: k8s:web/@NS/Deployment.apps/web  (k8s/web/app.yaml:9): unknown field",
    );
    assert!(text.contains("spec.replicass"), "{text}");
    lab.has(&text, "error: k8s:web/@NS/Gadget.strict.example.com/g");
    assert!(text.contains("unknown field spec.sise"), "{text}");
}

#[test]
fn a_read_only_identity_is_told_once_what_permission_is_missing() {
    let lab = Lab::new();
    let kubeconfig = lab
        .kube
        .write_kubeconfig(lab.tmp.path(), &["lab"], Identity::Viewer);
    lab.write_config(&format!("kubeconfig: {}\n", kubeconfig.display()));
    let (out, text) = lab.plan();
    assert_eq!(out.status.code(), Some(1), "{text}");
    lab.has(
        &text,
        "Stack web (namespace @NS, context lab): error: user \"viewer\" may not create",
    );
    assert!(text.contains("create namespaces (cluster-wide)"), "{text}");
    assert_eq!(text.matches("may not").count(), 1, "{text}");
    assert!(!text.contains("403"), "{text}");
}

#[test]
fn client_certificates_authenticate_like_minikube_and_k3s_kubeconfigs() {
    let lab = Lab::new();
    let kubeconfig = lab
        .kube
        .write_kubeconfig(lab.tmp.path(), &["lab"], Identity::ClientCert);
    lab.write_config(&format!("kubeconfig: {}\n", kubeconfig.display()));
    lab.apply_ok();
    lab.has(&lab.plan().1, "No changes: 3 object(s) in sync.");
}

#[test]
fn a_stack_waiting_for_its_rollout_holds_no_other_stack_up() {
    let lab = Lab::new();
    let slow_ns = lab.kube.namespace("slow");
    // The slow stack comes first: applied one after the other, web would
    // wait for its whole timeout.
    lab.write(
        "hosts/lab.yaml",
        &HOST.replace("stacks:\n", "stacks:\n  - name: slow\n    context: lab\n"),
    );
    lab.write(
        "k8s/slow/stack.yaml",
        &format!("namespace: {slow_ns}\ntimeout: 25s\n"),
    );
    lab.write(
        "k8s/slow/app.yaml",
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {slow_ns}\n---\n{}",
            APP.replace(
                "      labels: {app: web}\n    spec:",
                "      labels: {app: web, kube-env.test/hold: ContainerCreating}\n    spec:"
            )
        ),
    );
    let config = lab.config();
    let mut child = agent()
        .args(["apply", "--config", config.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The other stack converges while this one waits for its pods (well
    // before the slow stack's 25 s timeout).
    lab.kube
        .wait_for("the web stack", std::time::Duration::from_secs(12), || {
            lab.config_map("web-config").is_some()
        });
    assert!(
        child.try_wait().unwrap().is_none(),
        "apply was still waiting on the slow stack"
    );
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "failed k8s:slow/{slow_ns}/Deployment.apps/web: not healthy after 25s"
        )),
        "{text}"
    );
    lab.has(&text, "+ k8s:web/@NS/Deployment.apps/web created");
    lab.kube.delete_namespace(&slow_ns);
}

#[test]
fn the_daemon_heals_native_drift_while_a_stack_waits_for_its_rollout() {
    let lab = Lab::new();
    lab.write("k8s/web/stack.yaml", "namespace: @NS\ntimeout: 40s\n");
    lab.write(
        "k8s/web/app.yaml",
        &APP.replace(
            "      labels: {app: web}\n    spec:",
            "      labels: {app: web, kube-env.test/hold: ContainerCreating}\n    spec:",
        ),
    );
    let kubeconfig = lab.tmp.path().join("kubeconfig");
    let listen = format!("127.0.0.1:{}", homelab_agent_tests::ports::reserve());
    lab.write_config(&format!(
        "kubeconfig: {}\nlisten: {listen}\npoll_interval: 1h\n",
        kubeconfig.display()
    ));
    let daemon = start_daemon(&lab);
    let file = lab.root().join("srv/app.conf");
    // The stack's objects exist: the host was applied and the watchers
    // follow its catalog (they are synced before the stacks start).
    lab.kube.wait_for(
        "the first run's native apply",
        std::time::Duration::from_secs(60),
        || {
            std::fs::read_to_string(&file).is_ok_and(|c| c == "hello\n")
                && lab
                    .kube
                    .get("deployment.apps", Some(&lab.ns), "web")
                    .is_some()
        },
    );
    // The stack now waits for pods that will not start; a hand edit of a
    // native file is healed meanwhile, not after the stack's 40 s: when the
    // heal is seen, the stack has not failed yet.
    std::fs::write(&file, "edited by hand\n").unwrap();
    lab.kube.wait_for(
        "the drift healed",
        std::time::Duration::from_secs(60),
        || std::fs::read_to_string(&file).is_ok_and(|c| c == "hello\n"),
    );
    let logs = daemon.log_text();
    assert!(
        !logs.contains("not healthy after"),
        "healed only after the stack's wait: {logs}"
    );
    daemon.wait_for_log(
        "native drift healed while a stack waits for its rollout",
        1,
        std::time::Duration::from_secs(60),
    );
    assert!(
        daemon.status()["running"] == true,
        "the rollout wait is over: {}",
        daemon.log_text()
    );
    let _ = daemon.terminate();
}
