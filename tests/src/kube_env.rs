//! A real Kubernetes control plane for the tests: etcd, kube-apiserver and
//! kube-controller-manager, built from source by `tests/kube-env/build.sh`
//! (Kubernetes v1.37.2, cached outside the source tree), started on free
//! 127.0.0.1 ports with their data in a temp dir.
//!
//! - **Authentication:** TLS with a CA the harness makes (openssl); a token
//!   file with an admin identity (`system:masters`) and a read-only one (the
//!   `view` ClusterRole, cluster wide); client certificates signed by the same
//!   CA (what minikube and k3s kubeconfigs carry). **Authorization:** RBAC.
//! - **Controllers:** the real Deployment, ReplicaSet, StatefulSet, Job,
//!   CronJob, garbage-collector, namespace, TTL-after-finished, HPA,
//!   ServiceAccount and PVC/PV-protection controllers.
//! - **No kubelet and no scheduler:** a small *node* thread moves pods to
//!   Running and Ready (pods of a Job to Succeeded). A pod labelled
//!   [`HOLD_LABEL`]`: <Reason>` is held back: it stays Pending with its
//!   containers waiting for that reason (`ImagePullBackOff`,
//!   `CrashLoopBackOff`, ...), so a rollout fails for real. Unscheduled pods
//!   are deleted at once by the API server, so namespaces terminate quickly.
//!
//! One control plane per test binary ([`KubeEnv::shared`]); each test works
//! in namespaces of its own ([`KubeEnv::namespace`]). Everything is stopped
//! and the temp dir removed when the test binary exits (an `atexit` hook),
//! also after a panicking test, and by a watchdog process if the test binary
//! is killed.
//!
//! Run one by hand to try the agent against it:
//! `cargo run -p homelab-agent-tests --bin kube-env` prints a kubeconfig path
//! and keeps the control plane up until Ctrl-C.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Label on a pod (template) that keeps the harness's node from starting
/// it; the value is the container's waiting reason.
pub const HOLD_LABEL: &str = "kube-env.test/hold";

/// The admin bearer token (group `system:masters`).
const ADMIN_TOKEN: &str = "kube-env-admin-token-0123456789abcdef";
/// The read-only bearer token (ClusterRole `view`).
const VIEWER_TOKEN: &str = "kube-env-viewer-token-0123456789abcdef";

/// The controllers kube-controller-manager runs (`--controllers`).
const CONTROLLERS: &[&str] = &[
    "deployment-controller",
    "replicaset-controller",
    "statefulset-controller",
    "daemonset-controller",
    "job-controller",
    "cronjob-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "ttl-after-finished-controller",
    "horizontal-pod-autoscaler-controller",
    "serviceaccount-controller",
    "persistentvolumeclaim-protection-controller",
    "persistentvolume-protection-controller",
    "clusterrole-aggregation-controller",
];

/// Who a kubeconfig authenticates as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// Bearer token, `system:masters`.
    Admin,
    /// Bearer token, ClusterRole `view` only.
    Viewer,
    /// Client certificate (CN `cert-admin`, O `system:masters`), as
    /// minikube and k3s kubeconfigs carry.
    ClientCert,
}

/// A running control plane.
pub struct KubeEnv {
    dir: PathBuf,
    bin: PathBuf,
    server: String,
    ca_pem: String,
    http: reqwest::blocking::Client,
    admin_kubeconfig: PathBuf,
    procs: Arc<Mutex<Vec<Child>>>,
    stop: Arc<AtomicBool>,
    namespaces: AtomicUsize,
}

static SHARED: OnceLock<KubeEnv> = OnceLock::new();

/// The directory holding the built binaries (`kube-apiserver`,
/// `kube-controller-manager`, `kubectl`, `etcd`): `$HOMELAB_KUBE_BIN`, or
/// what `tests/kube-env/build.sh` builds (once; cached).
pub fn binaries() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| crate::go_env_bin("HOMELAB_KUBE_BIN", "kube-env"))
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The CA, the API server's serving certificate (127.0.0.1 and localhost),
/// a client certificate for `cert-admin` and the service-account key pair.
fn make_pki(dir: &Path) {
    openssl(dir, &["genrsa", "-out", "ca.key", "2048"]);
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-days",
            "2",
            "-subj",
            "/CN=kube-env-ca",
            "-out",
            "ca.crt",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, subj, ext) in [
        ("server", "/CN=kube-apiserver", "server.ext"),
        ("client", "/O=system:masters/CN=cert-admin", "client.ext"),
    ] {
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let crt = format!("{name}.crt");
        openssl(dir, &["genrsa", "-out", &key, "2048"]);
        openssl(
            dir,
            &["req", "-new", "-key", &key, "-subj", subj, "-out", &csr],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                ext,
                "-out",
                &crt,
            ],
        );
    }
    openssl(dir, &["genrsa", "-out", "sa.key", "2048"]);
    openssl(dir, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
}

fn spawn(procs: &Mutex<Vec<Child>>, dir: &Path, bin: &Path, args: &[String], log: &str) -> u32 {
    let log = std::fs::File::create(dir.join(log)).unwrap();
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
    // The watchdog kills these process groups if the test binary is killed.
    use std::io::Write;
    let mut pids = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("pids"))
        .unwrap();
    writeln!(pids, "{}", child.id()).unwrap();
    let pid = child.id();
    procs.lock().unwrap_or_else(|e| e.into_inner()).push(child);
    pid
}

/// Starts `bin`, told `n` ports up front by `args`, and waits (`limit` at
/// most) until `ready`; when it exits saying a port was in use (taken
/// since the allocator reserved it), again on other ports. Returns the
/// ports it runs on.
#[allow(clippy::too_many_arguments)]
fn start_on_ports(
    procs: &Mutex<Vec<Child>>,
    dir: &Path,
    bin: &Path,
    log: &str,
    n: usize,
    args: impl Fn(&[u16]) -> Vec<String>,
    ready: impl Fn(&[u16]) -> bool,
    limit: Duration,
) -> Vec<u16> {
    let what = bin.file_name().unwrap().to_string_lossy().into_owned();
    crate::ports::start_on_reserved_ports(&what, n, |ports| {
        let pid = spawn(procs, dir, bin, &args(ports), log);
        let deadline = Instant::now() + limit;
        loop {
            if ready(ports) {
                return crate::ports::Start::Up(ports.to_vec());
            }
            let exited = {
                let mut procs = procs.lock().unwrap_or_else(|e| e.into_inner());
                let at = procs.iter().position(|c| c.id() == pid).unwrap();
                match procs[at].try_wait() {
                    Ok(Some(status)) => {
                        // Already reaped by `try_wait`.
                        let _ = procs.remove(at).wait();
                        Some(status)
                    }
                    _ => None,
                }
            };
            if let Some(status) = exited {
                let text = std::fs::read_to_string(dir.join(log)).unwrap_or_default();
                if crate::ports::says_address_in_use(&text) {
                    return crate::ports::Start::PortTaken(tail(&dir.join(log)));
                }
                panic!("{what} exited ({status}):\n{}", tail(&dir.join(log)));
            }
            assert!(
                Instant::now() < deadline,
                "{what} did not start:\n{}",
                tail(&dir.join(log))
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

extern "C" fn stop_shared_at_exit() {
    if let Some(env) = SHARED.get() {
        env.shutdown();
    }
}

impl KubeEnv {
    /// The control plane of this test binary, started on first use.
    pub fn shared() -> &'static KubeEnv {
        SHARED.get_or_init(|| {
            let env = KubeEnv::start();
            // SAFETY: registering a plain extern "C" function with no captured state.
            unsafe {
                libc::atexit(stop_shared_at_exit);
            }
            env
        })
    }

    /// Starts a control plane of its own (the bench and the `kube-env`
    /// binary; tests use [`KubeEnv::shared`]). Stopped on drop.
    pub fn start() -> KubeEnv {
        let bin = binaries().to_path_buf();
        let dir = tempfile::Builder::new()
            .prefix("kube-env-")
            .tempdir()
            .unwrap()
            .keep();
        make_pki(&dir);
        std::fs::write(
            dir.join("tokens.csv"),
            format!(
                "{ADMIN_TOKEN},admin,admin-uid,\"system:masters\"\n{VIEWER_TOKEN},viewer,viewer-uid,\"\"\n"
            ),
        )
        .unwrap();
        let procs = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        watchdog(&dir);

        let http = {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let ca = std::fs::read(dir.join("ca.crt")).unwrap();
            reqwest::blocking::Client::builder()
                .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
                .timeout(Duration::from_secs(10))
                .no_proxy()
                .build()
                .unwrap()
        };

        // etcd
        let url = |port: u16| format!("http://127.0.0.1:{port}");
        let etcd_ports = start_on_ports(
            &procs,
            &dir,
            &bin.join("etcd"),
            "etcd.log",
            2,
            |ports| {
                let (client, peer) = (url(ports[0]), url(ports[1]));
                vec![
                    "--name=kube-env".into(),
                    format!("--data-dir={}", dir.join("etcd").display()),
                    format!("--listen-client-urls={client}"),
                    format!("--advertise-client-urls={client}"),
                    format!("--listen-peer-urls={peer}"),
                    format!("--initial-advertise-peer-urls={peer}"),
                    format!("--initial-cluster=kube-env={peer}"),
                    "--unsafe-no-fsync".into(),
                    "--log-level=warn".into(),
                ]
            },
            |ports| {
                http.get(format!("{}/health", url(ports[0])))
                    .send()
                    .is_ok_and(|r| r.status().is_success())
            },
            Duration::from_secs(60),
        );
        let etcd_url = url(etcd_ports[0]);

        // kube-apiserver: started here, ready (waited for below) once the
        // env can ask it.
        let p = |f: &str| dir.join(f).display().to_string();
        let api_port = start_on_ports(
            &procs,
            &dir,
            &bin.join("kube-apiserver"),
            "kube-apiserver.log",
            1,
            |ports| {
                vec![
                    format!("--etcd-servers={etcd_url}"),
                    "--bind-address=127.0.0.1".into(),
                    "--advertise-address=127.0.0.1".into(),
                    format!("--secure-port={}", ports[0]),
                    format!("--cert-dir={}", p("apiserver-certs")),
                    format!("--tls-cert-file={}", p("server.crt")),
                    format!("--tls-private-key-file={}", p("server.key")),
                    format!("--client-ca-file={}", p("ca.crt")),
                    format!("--token-auth-file={}", p("tokens.csv")),
                    "--authorization-mode=RBAC".into(),
                    "--service-account-issuer=https://kubernetes.default.svc".into(),
                    format!("--service-account-key-file={}", p("sa.pub")),
                    format!("--service-account-signing-key-file={}", p("sa.key")),
                    "--service-cluster-ip-range=10.96.0.0/16".into(),
                    // The endpoint reconciler would publish 127.0.0.1, which
                    // Endpoints refuse (loopback); nothing here needs it.
                    "--endpoint-reconciler-type=none".into(),
                    "--allow-privileged=true".into(),
                    "--profiling=false".into(),
                    "--v=1".into(),
                ]
            },
            // Serving TLS with this CA's certificate: it is the one started.
            |ports| {
                http.get(format!("https://127.0.0.1:{}/readyz", ports[0]))
                    .bearer_auth(ADMIN_TOKEN)
                    .send()
                    .is_ok()
            },
            Duration::from_secs(120),
        )[0];
        let server = format!("https://127.0.0.1:{api_port}");
        let ca_pem = std::fs::read_to_string(dir.join("ca.crt")).unwrap();
        let env = KubeEnv {
            admin_kubeconfig: dir.join("admin.kubeconfig"),
            dir,
            bin,
            server,
            ca_pem,
            http,
            procs,
            stop,
            namespaces: AtomicUsize::new(0),
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let ok = env
                .request(reqwest::Method::GET, "/readyz", None)
                .is_ok_and(|(code, _)| code == 200);
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver did not become ready:\n{}",
                tail(&env.dir.join("kube-apiserver.log"))
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        env.write_kubeconfig_to(&env.admin_kubeconfig, &["admin"], Identity::Admin);

        // The read-only identity.
        env.create(&json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "kube-env-viewer"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "viewer"}]
        }));

        // kube-controller-manager (its own secure port is not used here,
        // but it must be free)
        start_on_ports(
            &env.procs,
            &env.dir,
            &env.bin.join("kube-controller-manager"),
            "kube-controller-manager.log",
            1,
            |ports| {
                vec![
                    format!("--kubeconfig={}", env.admin_kubeconfig.display()),
                    format!("--controllers={}", CONTROLLERS.join(",")),
                    "--leader-elect=false".into(),
                    "--bind-address=127.0.0.1".into(),
                    format!("--secure-port={}", ports[0]),
                    format!("--cert-dir={}", env.dir.join("kcm-certs").display()),
                    format!(
                        "--service-account-private-key-file={}",
                        env.dir.join("sa.key").display()
                    ),
                    // The HPA controller re-reads every 2 s (default 15 s), so
                    // a test sees it act within its bounds.
                    "--horizontal-pod-autoscaler-sync-period=2s".into(),
                    "--concurrent-deployment-syncs=10".into(),
                    "--v=1".into(),
                ]
            },
            |ports| std::net::TcpStream::connect(("127.0.0.1", ports[0])).is_ok(),
            Duration::from_secs(60),
        );
        // The ServiceAccount controller creating `default` in `default` is
        // the sign that controllers run.
        let deadline = Instant::now() + Duration::from_secs(60);
        while env
            .get_path("/api/v1/namespaces/default/serviceaccounts/default")
            .is_none()
        {
            assert!(
                Instant::now() < deadline,
                "kube-controller-manager did not start:\n{}",
                tail(&env.dir.join("kube-controller-manager.log"))
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        env.start_node();
        env
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The kubeconfig of the admin identity (context `admin`).
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// A fresh namespace name for one test: `<prefix>-<n>`. Not created.
    pub fn namespace(&self, prefix: &str) -> String {
        let n = self.namespaces.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{}-{n}", std::process::id() % 10_000)
    }

    /// Writes a kubeconfig at `dir/kubeconfig` with one context per name in
    /// `contexts`, all pointing at this server as `identity`.
    pub fn write_kubeconfig(&self, dir: &Path, contexts: &[&str], identity: Identity) -> PathBuf {
        let path = dir.join("kubeconfig");
        self.write_kubeconfig_to(&path, contexts, identity);
        path
    }

    /// Like [`KubeEnv::write_kubeconfig`], with another server address (a
    /// [`FaultProxy`] in front of this one, or a dead port).
    pub fn write_kubeconfig_for(
        &self,
        dir: &Path,
        contexts: &[&str],
        identity: Identity,
        server: &str,
    ) -> PathBuf {
        let path = dir.join("kubeconfig");
        self.write_kubeconfig_at(&path, contexts, identity, server);
        path
    }

    fn write_kubeconfig_to(&self, path: &Path, contexts: &[&str], identity: Identity) {
        self.write_kubeconfig_at(path, contexts, identity, &self.server.clone());
    }

    fn write_kubeconfig_at(
        &self,
        path: &Path,
        contexts: &[&str],
        identity: Identity,
        server: &str,
    ) {
        use base64::Engine;
        let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
        let user = match identity {
            Identity::Admin => format!("    token: {ADMIN_TOKEN}\n"),
            Identity::Viewer => format!("    token: {VIEWER_TOKEN}\n"),
            Identity::ClientCert => format!(
                "    client-certificate-data: {}\n    client-key-data: {}\n",
                b64(&std::fs::read(self.dir.join("client.crt")).unwrap()),
                b64(&std::fs::read(self.dir.join("client.key")).unwrap())
            ),
        };
        let mut text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: kube-env\n  cluster:\n    server: {}\n    certificate-authority-data: {}\nusers:\n- name: kube-env\n  user:\n{user}contexts:\n",
            server,
            b64(self.ca_pem.as_bytes())
        );
        for c in contexts {
            text.push_str(&format!(
                "- name: {c}\n  context:\n    cluster: kube-env\n    user: kube-env\n    namespace: default\n"
            ));
        }
        text.push_str(&format!("current-context: {}\n", contexts[0]));
        std::fs::write(path, text).unwrap();
    }

    /// One request as the admin: (status code, JSON body or Null).
    pub fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&str, &Value)>,
    ) -> Result<(u16, Value), String> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.server))
            .bearer_auth(ADMIN_TOKEN)
            .header("Accept", "application/json");
        if let Some((content_type, body)) = body {
            req = req
                .header("Content-Type", content_type)
                .body(serde_json::to_vec(body).unwrap());
        }
        let resp = req.send().map_err(|e| e.to_string())?;
        let code = resp.status().as_u16();
        let bytes = resp.bytes().map_err(|e| e.to_string())?;
        Ok((code, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
    }

    /// GET an API path; `None` on 404. Panics on anything but 200/404.
    pub fn get_path(&self, path: &str) -> Option<Value> {
        match self.request(reqwest::Method::GET, path, None) {
            Ok((200, v)) => Some(v),
            Ok((404, _)) => None,
            Ok((code, v)) => panic!("GET {path}: {code} {v}"),
            Err(e) => panic!("GET {path}: {e}"),
        }
    }

    /// `kubectl` of this build as the admin, with a discovery cache of
    /// this control plane's own.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new(self.bin.join("kubectl"))
            .arg(format!("--kubeconfig={}", self.admin_kubeconfig.display()))
            .arg(format!(
                "--cache-dir={}",
                self.dir.join("kubectl-cache").display()
            ))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run kubectl")
    }

    /// `kubectl` with `stdin` as its input (`kubectl apply -f -`).
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Output {
        use std::io::Write;
        let mut child = Command::new(self.bin.join("kubectl"))
            .arg(format!("--kubeconfig={}", self.admin_kubeconfig.display()))
            .arg(format!(
                "--cache-dir={}",
                self.dir.join("kubectl-cache").display()
            ))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// `kubectl` that must succeed; its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The object as JSON (`resource` as kubectl names it: `deployment.apps`,
    /// `configmap`, `ipaddresspools.metallb.io`), `None` when it does not exist.
    pub fn get(&self, resource: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let mut args = vec![
            "get",
            resource,
            name,
            "-o",
            "json",
            "--ignore-not-found",
            "--show-managed-fields",
        ];
        if let Some(ns) = namespace {
            args.extend(["-n", ns]);
        }
        let text = self.kubectl_ok(&args);
        if text.trim().is_empty() {
            None
        } else {
            Some(serde_json::from_str(&text).unwrap())
        }
    }

    /// Names of the objects of a resource in a namespace (or cluster wide).
    pub fn names(&self, resource: &str, namespace: Option<&str>) -> Vec<String> {
        let mut args = vec!["get", resource, "-o", "json"];
        match namespace {
            Some(ns) => args.extend(["-n", ns]),
            None => args.push("-A"),
        }
        let v: Value = serde_json::from_str(&self.kubectl_ok(&args)).unwrap();
        let mut names: Vec<String> = v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    }

    /// Creates an object as the admin with `kubectl create` (manager
    /// `kubectl-create`); panics on failure.
    pub fn create(&self, object: &Value) {
        let out = self.kubectl_stdin(&["create", "-f", "-"], &object.to_string());
        assert!(
            out.status.success(),
            "kubectl create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Server-side apply as another field manager (`kubectl apply
    /// --server-side --field-manager=M`); the error text on a conflict.
    pub fn apply_as(&self, manager: &str, object: &Value, force: bool) -> Result<(), String> {
        let fm = format!("--field-manager={manager}");
        let mut args = vec!["apply", "--server-side", fm.as_str(), "-f", "-"];
        if force {
            args.push("--force-conflicts");
        }
        let out = self.kubectl_stdin(&args, &object.to_string());
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Installs upstream CRDs from `tests/fixtures/crds/` (as `helm`, the
    /// way a project's installation would) and waits until they are
    /// Established.
    pub fn install_crds(&self, files: &[&str]) {
        let dir = crate::workspace().join("tests/fixtures/crds");
        let mut names = Vec::new();
        for f in files {
            let path = dir.join(f);
            let out = self.kubectl_ok(&[
                "apply",
                "--server-side",
                "--field-manager=helm",
                "-f",
                path.to_str().unwrap(),
                "-o",
                "name",
            ]);
            names.extend(out.lines().map(str::to_string));
        }
        let mut args = vec!["wait", "--for=condition=Established", "--timeout=60s"];
        args.extend(names.iter().map(String::as_str));
        self.kubectl_ok(&args);
    }

    /// Waits (bounded) until `check` holds, polling every 200 ms.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Deletes a namespace and does not wait.
    pub fn delete_namespace(&self, ns: &str) {
        let _ = self.kubectl(&[
            "delete",
            "namespace",
            ns,
            "--wait=false",
            "--ignore-not-found",
        ]);
    }

    /// The node thread: every 200 ms, pending pods become Running and Ready
    /// (Job pods Succeeded), unless held by [`HOLD_LABEL`].
    fn start_node(&self) {
        let http = self.http.clone();
        let server = self.server.clone();
        let stop = self.stop.clone();
        std::thread::Builder::new()
            .name("kube-env-node".into())
            .spawn(move || {
                let mut held: std::collections::HashSet<String> = Default::default();
                while !stop.load(Ordering::Relaxed) {
                    let pending = http
                        .get(format!(
                            "{server}/api/v1/pods?fieldSelector=status.phase%3DPending"
                        ))
                        .bearer_auth(ADMIN_TOKEN)
                        .send()
                        .and_then(|r| r.json::<Value>());
                    if let Ok(list) = pending {
                        for pod in list["items"].as_array().into_iter().flatten() {
                            let uid = pod["metadata"]["uid"].as_str().unwrap_or("").to_string();
                            let hold = pod["metadata"]["labels"][HOLD_LABEL].as_str();
                            if hold.is_some() && held.contains(&uid) {
                                continue;
                            }
                            let status = node_status(pod, hold);
                            let ns = pod["metadata"]["namespace"].as_str().unwrap_or("");
                            let name = pod["metadata"]["name"].as_str().unwrap_or("");
                            let ok = http
                                .patch(format!(
                                    "{server}/api/v1/namespaces/{ns}/pods/{name}/status"
                                ))
                                .bearer_auth(ADMIN_TOKEN)
                                .header("Content-Type", "application/merge-patch+json")
                                .body(json!({ "status": status }).to_string())
                                .send()
                                .is_ok_and(|r| r.status().is_success());
                            if ok && hold.is_some() {
                                held.insert(uid);
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
            .unwrap();
    }

    /// Stops every process and removes the temp dir. Idempotent.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let mut procs = self.procs.lock().unwrap_or_else(|e| e.into_inner());
        // Controllers first, etcd last.
        for child in procs.iter_mut().rev() {
            let pid = child.id() as i32;
            unsafe {
                libc::kill(-pid, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
            let _ = child.wait();
        }
        procs.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// The tail of a component's log (`etcd`, `kube-apiserver`,
    /// `kube-controller-manager`), for failure messages.
    pub fn log_tail(&self, component: &str) -> String {
        tail(&self.dir.join(format!("{component}.log")))
    }
}

impl Drop for KubeEnv {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The status the harness's node gives a pending pod.
fn node_status(pod: &Value, hold: Option<&str>) -> Value {
    let now = now_rfc3339();
    let containers: Vec<(String, String)> = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or("").to_string(),
                c["image"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let cond = |t: &str, s: bool, reason: Option<&str>| {
        let mut c = json!({"type": t, "status": if s { "True" } else { "False" }, "lastTransitionTime": now});
        if let Some(r) = reason {
            c["reason"] = json!(r);
        }
        c
    };
    if let Some(reason) = hold {
        let statuses: Vec<Value> = containers
            .iter()
            .map(|(name, image)| {
                json!({"name": name, "image": image, "imageID": "", "ready": false, "started": false,
                       "restartCount": 0,
                       "state": {"waiting": {"reason": reason, "message": format!("held back by the test harness ({HOLD_LABEL})")}}})
            })
            .collect();
        return json!({
            "phase": "Pending",
            "startTime": now,
            "conditions": [cond("PodScheduled", true, None), cond("Initialized", true, None),
                           cond("ContainersReady", false, Some("ContainersNotReady")),
                           cond("Ready", false, Some("ContainersNotReady"))],
            "containerStatuses": statuses,
        });
    }
    let is_job = pod["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|o| o["kind"] == "Job");
    if is_job {
        let statuses: Vec<Value> = containers
            .iter()
            .map(|(name, image)| {
                json!({"name": name, "image": image, "imageID": "", "ready": false, "started": false,
                       "restartCount": 0,
                       "state": {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": now, "finishedAt": now}}})
            })
            .collect();
        return json!({
            "phase": "Succeeded",
            "startTime": now,
            "conditions": [cond("PodScheduled", true, None), cond("Initialized", true, None),
                           cond("ContainersReady", false, Some("PodCompleted")),
                           cond("Ready", false, Some("PodCompleted"))],
            "containerStatuses": statuses,
        });
    }
    let statuses: Vec<Value> = containers
        .iter()
        .map(|(name, image)| {
            json!({"name": name, "image": image, "imageID": "", "ready": true, "started": true,
                   "restartCount": 0, "state": {"running": {"startedAt": now}}})
        })
        .collect();
    json!({
        "phase": "Running",
        "startTime": now,
        "conditions": [cond("PodScheduled", true, None), cond("Initialized", true, None),
                       cond("ContainersReady", true, None), cond("Ready", true, None)],
        "containerStatuses": statuses,
    })
}

fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    crate::rfc3339(secs)
}

/// A process that outlives a killed test binary just long enough to stop
/// the control plane and remove its temp dir: it polls the parent's pid and
/// kills every process group the harness started (their pids are appended
/// to `dir/pids`).
fn watchdog(dir: &Path) {
    let script = format!(
        "while kill -0 {parent} 2>/dev/null; do sleep 1; done; \
         [ -f '{dir}/pids' ] && for p in $(cat '{dir}/pids'); do kill -KILL -- -$p 2>/dev/null; done; \
         rm -rf '{dir}'",
        parent = std::process::id(),
        dir = dir.display()
    );
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    if let Ok(child) = cmd.spawn() {
        // Never waited for: it ends on its own after this process.
        std::mem::forget(child);
    }
}

/// What a [`FaultProxy`] does with connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forwards bytes both ways to the API server.
    Pass,
    /// Accepts and never answers (a hung server or network).
    Hang,
    /// Accepts and closes at once (a server restarting).
    Close,
}

/// A TCP proxy on 127.0.0.1 in front of the real API server (TLS passes
/// through untouched, the certificate is valid for 127.0.0.1), for faults
/// the real server cannot be made to show on demand: hanging and dropped
/// connections. It counts the connections it accepted.
pub struct FaultProxy {
    port: u16,
    mode: Arc<Mutex<Fault>>,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    pub fn start(target: &str) -> FaultProxy {
        let target = target
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener.set_nonblocking(true).unwrap();
        let proxy = FaultProxy {
            port: listener.local_addr().unwrap().port(),
            mode: Arc::new(Mutex::new(Fault::Pass)),
            accepted: Arc::new(AtomicUsize::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (mode, accepted, stop) = (
            proxy.mode.clone(),
            proxy.accepted.clone(),
            proxy.stop.clone(),
        );
        std::thread::spawn(move || {
            let mut hung = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let conn = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                accepted.fetch_add(1, Ordering::Relaxed);
                conn.set_nonblocking(false).unwrap();
                match *mode.lock().unwrap_or_else(|e| e.into_inner()) {
                    Fault::Close => drop(conn),
                    Fault::Hang => hung.push(conn),
                    Fault::Pass => {
                        let Ok(upstream) = std::net::TcpStream::connect(&target) else {
                            continue;
                        };
                        let (mut a, mut b) =
                            (conn.try_clone().unwrap(), upstream.try_clone().unwrap());
                        let (mut c, mut d) = (conn, upstream);
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut a, &mut b);
                            let _ = b.shutdown(std::net::Shutdown::Write);
                        });
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut d, &mut c);
                            let _ = c.shutdown(std::net::Shutdown::Write);
                        });
                    }
                }
            }
        });
        proxy
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn set(&self, fault: Fault) {
        *self.mode.lock().unwrap_or_else(|e| e.into_inner()) = fault;
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
