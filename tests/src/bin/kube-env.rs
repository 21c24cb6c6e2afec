//! Runs the tests' real Kubernetes control plane by hand, to try the agent
//! against it:
//!
//! ```sh
//! cargo run -p homelab-agent-tests --bin kube-env
//! # prints: KUBECONFIG=/tmp/kube-env-XXXX/admin.kubeconfig (contexts admin, minikube, default)
//! ```
//!
//! It stays up until Ctrl-C (or SIGTERM), then stops everything and removes
//! its temp dir.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use homelab_agent_tests::kube_env::{Identity, KubeEnv};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn main() {
    let env = KubeEnv::start();
    let dir = env.admin_kubeconfig().parent().unwrap().to_path_buf();
    let kubeconfig = env.write_kubeconfig(&dir, &["minikube", "default", "admin"], Identity::Admin);
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    println!("API server: {}", env.server());
    println!("KUBECONFIG={}", kubeconfig.display());
    println!("(contexts minikube, default, admin; Ctrl-C stops it)");
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(env);
}
