//! The reference stacks in `k8s/`: every one loads (rendered with the
//! reference hosts' vars), every manifest passes `kubernetes-validate
//! --strict` for a current Kubernetes release, and the stacks say what the
//! seed documents ask for (probes, securityContext, budgets, policies,
//! schedules, routes, pools).
//!
//! `kubernetes-validate` (PyPI) is installed by `.ci/run` into
//! `target/kubernetes-validate-venv` (or found on PATH).

use std::path::PathBuf;
use std::sync::Arc;

use homelab_agent::desired::{self, LoadOptions};
use homelab_agent::k8s::Stack;
use homelab_agent_tests::{copy_dir, workspace};
use serde_json::Value;

/// Every stack folder under k8s/.
fn stack_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(workspace().join("k8s"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("stack.yaml").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The vars of a host file (`vars:` block, as YAML text).
fn vars_of(host: &str) -> String {
    let text = std::fs::read_to_string(workspace().join(format!("hosts/{host}.yaml"))).unwrap();
    let mut out = String::new();
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with("vars:") {
            inside = true;
            continue;
        }
        if inside && !line.starts_with(' ') && !line.trim().is_empty() && !line.starts_with('#') {
            inside = false;
        }
        if inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Loads every stack of the repo for a host that owns them all, with the
/// vars of the hosts that own them for real (no secrets: Secret values
/// render as a placeholder, which is still a string).
fn load_all() -> Vec<Stack> {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path();
    copy_dir(&workspace().join("k8s"), &repo.join("k8s"));
    copy_dir(&workspace().join("modules"), &repo.join("modules"));
    if workspace().join("dashboards").is_dir() {
        copy_dir(&workspace().join("dashboards"), &repo.join("dashboards"));
    }
    let stacks: String = stack_names().iter().map(|n| format!("  - {n}\n")).collect();
    // Both owners' vars; a key both set (the registry's name) once.
    let mut seen = std::collections::BTreeSet::new();
    let vars: String = format!("{}{}", vars_of("indri"), vars_of("k3s-cp"))
        .lines()
        .filter(|l| {
            let key = l.trim_start().split(':').next().unwrap_or("");
            l.trim_start().starts_with('#') || seen.insert(key.to_string())
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let host = format!("platform: linux\nroots: [/srv]\nvars:\n{vars}stacks:\n{stacks}");
    std::fs::create_dir_all(repo.join("hosts")).unwrap();
    std::fs::write(repo.join("hosts/all.yaml"), host).unwrap();
    let source = Arc::new(homelab_agent::source::LocalDir::open(repo).unwrap());
    let catalog = desired::load_with(source, "all", &LoadOptions::default())
        .unwrap_or_else(|e| panic!("the reference stacks do not load:\n{e}"));
    catalog.stacks
}

fn kubernetes_validate() -> PathBuf {
    let venv = workspace().join("target/kubernetes-validate-venv/bin/kubernetes-validate");
    if venv.is_file() {
        return venv;
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("kubernetes-validate"))
            .find(|p| p.is_file())
    });
    on_path.unwrap_or_else(|| {
        panic!("kubernetes-validate is not installed: run .ci/run (it installs it into target/kubernetes-validate-venv), or pip install kubernetes-validate")
    })
}

fn object<'a>(stacks: &'a [Stack], stack: &str, kind: &str, name: &str) -> &'a Value {
    let s = stacks
        .iter()
        .find(|s| s.name() == stack)
        .unwrap_or_else(|| panic!("no stack {stack}"));
    &s.objects
        .iter()
        .find(|o| o.reference.kind == kind && o.reference.name == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in stack {stack}"))
        .body
        .0
}

#[test]
fn every_manifest_validates_strictly_against_current_kubernetes() {
    let stacks = load_all();
    assert_eq!(
        stack_names(),
        [
            "metallb",
            "monitoring",
            "onepassword-connect",
            "vlog-workers",
            "vlog-workers-intel",
            "vlog-workers-nvidia",
            "vod"
        ]
    );
    let dir = tempfile::tempdir().unwrap();
    let mut files: Vec<PathBuf> = Vec::new();
    let mut custom = Vec::new();
    for s in &stacks {
        for o in &s.objects {
            if o.reference.group.contains("metallb.io") {
                custom.push(o);
                continue;
            }
            // No schema for the operator's CRD here; its spec is the rules file
            // promtool checks and tests (tests/tests/dashboards.rs).
            if o.reference.group == "monitoring.coreos.com" {
                continue;
            }
            let p = dir.path().join(format!(
                "{}-{}-{}.json",
                s.name(),
                o.reference.kind,
                o.reference.name
            ));
            std::fs::write(&p, serde_json::to_string_pretty(&o.body.0).unwrap()).unwrap();
            files.push(p);
        }
    }
    assert!(files.len() > 25, "{} manifests", files.len());
    let out = std::process::Command::new(kubernetes_validate())
        .arg("--strict")
        .arg("--kubernetes-version")
        .arg("1.37.0")
        .args(&files)
        .output()
        .expect("run kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "kubernetes-validate --strict failed:\n{text}"
    );
    assert!(!text.contains("ERROR"), "{text}");
    assert_eq!(
        text.matches("INFO").count(),
        files.len(),
        "every file validated:\n{text}"
    );
    // MetalLB's custom resources have no schema in kubernetes-validate: the
    // pools' addresses are checked here instead.
    assert_eq!(custom.len(), 3);
    for o in custom {
        for a in o
            .body
            .0
            .pointer("/spec/addresses")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let a = a.as_str().unwrap();
            let ok = match a.split_once('/') {
                Some((ip, bits)) => {
                    ip.parse::<std::net::IpAddr>().is_ok() && bits.parse::<u8>().is_ok()
                }
                None => a.split_once('-').is_some_and(|(x, y)| {
                    x.parse::<std::net::IpAddr>().is_ok() && y.parse::<std::net::IpAddr>().is_ok()
                }),
            };
            assert!(ok, "{a} is neither a CIDR nor a range");
        }
    }
}

#[test]
fn the_stacks_say_what_the_seed_documents_ask_for() {
    let stacks = load_all();
    // VLog workers: ConfigMap, probes, restricted securityContext, work dir.
    let cm = object(&stacks, "vlog-workers", "ConfigMap", "vlog-worker-config");
    assert_eq!(cm["data"]["VLOG_WORKER_HEALTH_PORT"], "8080");
    assert!(cm["data"]["VLOG_WORKER_API_URL"]
        .as_str()
        .unwrap()
        .ends_with(":9002"));
    let secret = object(&stacks, "vlog-workers", "Secret", "vlog-worker-credentials");
    // Loaded Secrets are sent as `data` (see k8s/load.rs).
    assert!(secret["data"]["VLOG_WORKER_API_KEY"].is_string());
    for (stack, name) in [
        ("vlog-workers", "vlog-worker"),
        ("vlog-workers-nvidia", "vlog-worker-nvidia"),
        ("vlog-workers-intel", "vlog-worker-intel"),
    ] {
        let d = object(&stacks, stack, "Deployment", name);
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/health");
        assert_eq!(c["livenessProbe"]["httpGet"]["port"], 8080);
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/ready");
        assert_eq!(c["readinessProbe"]["httpGet"]["port"], 8080);
        let sc = &c["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true);
        assert_eq!(
            (sc["runAsUser"].as_i64(), sc["runAsGroup"].as_i64()),
            (Some(1000), Some(1000))
        );
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
        assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
        assert!(c["resources"]["limits"]["memory"].is_string());
        let volumes = d["spec"]["template"]["spec"]["volumes"].to_string();
        assert!(volumes.contains("emptyDir"), "{volumes}");
        // One PodDisruptionBudget per worker type, minAvailable 1.
        let pdb = object(&stacks, stack, "PodDisruptionBudget", name);
        assert_eq!(pdb["spec"]["minAvailable"], 1);
    }
    let nvidia = object(
        &stacks,
        "vlog-workers-nvidia",
        "Deployment",
        "vlog-worker-nvidia",
    );
    assert_eq!(
        nvidia["spec"]["template"]["spec"]["runtimeClassName"],
        "nvidia"
    );
    assert_eq!(
        nvidia["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
            ["nvidia.com/gpu"],
        "1"
    );
    let intel = object(
        &stacks,
        "vlog-workers-intel",
        "Deployment",
        "vlog-worker-intel",
    );
    assert_eq!(
        intel["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
            ["gpu.intel.com/i915"],
        "1"
    );
    let hpa = object(
        &stacks,
        "vlog-workers",
        "HorizontalPodAutoscaler",
        "vlog-worker",
    );
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "vlog-worker");
    // NetworkPolicy: no ingress; egress only to 9002 and 53 (no Redis: the
    // workers poll).
    let np = object(&stacks, "vlog-workers", "NetworkPolicy", "vlog-worker");
    assert_eq!(
        np["spec"]["policyTypes"],
        serde_json::json!(["Ingress", "Egress"])
    );
    assert_eq!(np["spec"]["ingress"], serde_json::json!([]));
    let mut ports: Vec<i64> = np["spec"]["egress"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r["ports"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["port"].as_i64().unwrap())
        })
        .collect();
    ports.sort();
    ports.dedup();
    assert_eq!(ports, [53, 9002]);
    object(&stacks, "vlog-workers", "CronJob", "vlog-stale-job-cleanup");

    // GinFlix.
    let pg = object(&stacks, "vod", "StatefulSet", "postgres");
    assert!(
        pg["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
            .is_string()
    );
    object(&stacks, "vod", "Secret", "postgres-credentials");
    object(&stacks, "vod", "Deployment", "web");
    object(&stacks, "vod", "Service", "web");
    object(&stacks, "vod", "Job", "web-migrate-1-0-0");
    let site = object(&stacks, "vod", "ConfigMap", "streamer-site");
    assert!(site["data"]["default.conf"]
        .as_str()
        .unwrap()
        .contains("/var/www/html"));
    object(&stacks, "vod", "Deployment", "streamer");
    // web and streamers on their MetalLB addresses, the client address kept.
    for name in ["web", "streamer"] {
        let svc = object(&stacks, "vod", "Service", name);
        assert_eq!(svc["spec"]["type"], "LoadBalancer");
        assert_eq!(svc["spec"]["externalTrafficPolicy"], "Local");
        assert!(svc["metadata"]["annotations"]["metallb.universe.tf/loadBalancerIPs"].is_string());
    }
    // GinFlix's database dumped nightly like the others: verified, 7 days kept.
    let backup = object(&stacks, "vod", "CronJob", "postgres-backup");
    assert_eq!(backup["spec"]["schedule"], "0 2 * * *");
    assert_eq!(backup["spec"]["timeZone"], "Etc/UTC");
    let script = backup
        .pointer("/spec/jobTemplate/spec/template/spec/containers/0/args/0")
        .unwrap()
        .as_str()
        .unwrap();
    for needle in [
        "pg_dump -Fc",
        "pg_restore --list",
        "rm -f",
        "-mtime +\"$((RETENTION_DAYS - 1))\"",
    ] {
        assert!(
            script.contains(needle),
            "{needle} missing from the backup script"
        );
    }
    assert!(
        backup
            .to_string()
            .contains("\"RETENTION_DAYS\",\"value\":\"7\""),
        "{backup}"
    );
    // The Connect server's API on 8080, a LoadBalancer for the tunnel.
    let connect = object(
        &stacks,
        "onepassword-connect",
        "Service",
        "onepassword-connect",
    );
    assert_eq!(connect["spec"]["type"], "LoadBalancer");
    assert_eq!(connect["spec"]["ports"][0]["port"], 8080);
    // The agents' scrape config for kube-prometheus-stack.
    let scrape = object(&stacks, "monitoring", "Secret", "homelab-agent-scrape");
    assert!(scrape["data"]["scrape-configs.yaml"].is_string());

    // MetalLB.
    assert_eq!(
        object(&stacks, "metallb", "IPAddressPool", "internal")["spec"]["autoAssign"],
        true
    );
    assert_eq!(
        object(&stacks, "metallb", "IPAddressPool", "internet-facing")["spec"]["autoAssign"],
        false
    );
    let l2 = object(&stacks, "metallb", "L2Advertisement", "l2");
    assert_eq!(
        l2["spec"]["ipAddressPools"],
        serde_json::json!(["internal", "internet-facing"])
    );

    // Every object carries both ownership labels.
    for s in &stacks {
        for o in &s.objects {
            let labels = &o.body.0["metadata"]["labels"];
            assert_eq!(
                labels["app.kubernetes.io/managed-by"], "homelab-agent",
                "{}",
                o.id
            );
            assert_eq!(
                labels["homelab-agent/stack"],
                format!("all.{}", s.name()),
                "{}",
                o.id
            );
        }
    }
}
