//! What a real API server cannot be made to do on demand, against the
//! Kubernetes API stand-in (`homelab_agent_tests::kube_standin`): a server
//! that throttles every request (429 with `Retry-After`). Hangs and dropped
//! connections are tested against the real control plane through a
//! `FaultProxy` (tests/tests/kube.rs).

use homelab_agent_tests::kube_standin::KubeStandIn;
use homelab_agent_tests::{agent, run_agent_bounded, stderr, stdout, Lab};

#[test]
fn a_throttling_api_server_fails_the_stack_in_bounded_time_and_the_host_converges() {
    let lab = Lab::empty();
    let write = |rel: &str, text: &str| lab.write(rel, text);
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
    let kubeconfig = kube.write_kubeconfig(lab.tmp.path(), "lab");
    let config = lab.write_config("lab", &format!("kubeconfig: {}\n", kubeconfig.display()));
    kube.throttle(Some(1));
    let before = kube.requests().len();
    let started = std::time::Instant::now();
    // Gives up after its tries (a client that retried without end would
    // run past HANG_LIMIT and fail the test).
    let out = run_agent_bounded(agent().args(["apply", "--config", config.to_str().unwrap()]));
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
    // Three tries, the Retry-After of 1 s honoured between them.
    assert_eq!(kube.requests().len() - before, 3, "{:?}", kube.requests());
    assert!(took >= std::time::Duration::from_secs(2), "took {took:?}");
    // The server recovers: the stack converges.
    kube.throttle(None);
    let out = agent()
        .args(["apply", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(kube.get("", "ConfigMap", Some("web"), "c").is_some());
}
