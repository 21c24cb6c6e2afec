//! What a real API server cannot be made to do on demand, against the
//! Kubernetes API stand-in (`homelab_agent_tests::kube_standin`): a server
//! that throttles every request (429 with `Retry-After`). Hangs and dropped
//! connections are tested against the real control plane through a
//! `FaultProxy` (tests/tests/kube.rs).

use homelab_agent_tests::kube_standin::KubeStandIn;
use homelab_agent_tests::{agent, stderr, stdout};

#[test]
fn a_throttling_api_server_fails_the_stack_in_bounded_time_and_the_host_converges() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    let write = |rel: &str, text: &str| {
        let p = repo.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    write(
        "hosts/lab.yaml",
        "platform: linux\nroots: [/srv]\nmodules:\n  - name: app\nstacks:\n  - name: web\n    context: lab\n",
    );
    write(
        "modules/app/module.yaml",
        "resources:\n  - file: /srv/app.conf\n    content: \"hello\\n\"\n",
    );
    write("k8s/web/stack.yaml", "namespace: web\n");
    write(
        "k8s/web/cm.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: web\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndata: {k: v}\n",
    );
    let kube = KubeStandIn::start();
    let kubeconfig = kube.write_kubeconfig(tmp.path(), "lab");
    let config = tmp.path().join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "repo: {}\nhost: lab\nroot: {}\nkubeconfig: {}\n",
            repo.display(),
            tmp.path().join("root").display(),
            kubeconfig.display()
        ),
    )
    .unwrap();
    kube.throttle(Some(1));
    let before = kube.requests().len();
    let started = std::time::Instant::now();
    let out = agent()
        .args(["apply", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let took = started.elapsed();
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("Stack web: failed: the Kubernetes API at")
            && text.contains("429 TooManyRequests")
            && text.contains("still throttled after 3 tries"),
        "{text}"
    );
    assert!(text.contains("+ file:/srv/app.conf created"), "{text}");
    // Three tries, a Retry-After of 1 s between them: bounded, not minutes.
    assert_eq!(kube.requests().len() - before, 3, "{:?}", kube.requests());
    assert!(
        took >= std::time::Duration::from_secs(2) && took < std::time::Duration::from_secs(20),
        "took {took:?}"
    );
    // The server recovers: the stack converges.
    kube.throttle(None);
    let out = agent()
        .args(["apply", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(kube.get("", "ConfigMap", Some("web"), "c").is_some());
}
