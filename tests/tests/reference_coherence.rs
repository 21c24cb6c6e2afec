//! The reference homelab as one system (issue 16): a test of this
//! repository's data, not of the agent. Every host's desired state is
//! rendered through the agent's own library (`desired::load_with`, secrets
//! from the 1Password Connect stand-in's reference vault), and the hosts are
//! checked against each other:
//!
//! - every secret reference resolves (nothing is skipped);
//! - every `*.ops.eblu.me` name used anywhere is a site of the one Caddy,
//!   and every upstream it proxies to is a listener that exists (a native
//!   service's bind address, a minikube LoadBalancer Service through the
//!   tunnel, or a MetalLB address one Service owns);
//! - every LoadBalancer address is inside a MetalLB pool, owned once; the
//!   pools hold no host's address and no IPv6 on the IPv4 cluster, and every
//!   address range the repository mentions is a pool;
//! - k3s comes up from the repo: the server's auto-deploy folder installs
//!   the CNI it disabled flannel for (Cilium) and MetalLB, the workers join
//!   the server's address and port, every node pulls through the mirror;
//! - every port a client is told is the one its server listens on (Forgejo
//!   SSH, the agents' scrape targets, the VLog Worker API and its
//!   NetworkPolicy, GinFlix's Services and streamer), and Caddy may bind its;
//! - every database is backed up exactly once, into one folder; borgmatic's
//!   key is deployed and its public half is what sifaka authorises;
//! - every host has its agent config in `agents/`.
//!
//! Real tools check what they can: `caddy adapt` reads the Caddyfile (its
//! sites and upstreams come from Caddy's own parser), `caddy validate` the
//! whole rendered file, `promtool check config` the scrape config,
//! `validate-borgmatic-config` borgmatic's config, and `nginx -t` plus real
//! nginx and Caddy serve GinFlix's `/stream/*` route.
//! (`kubernetes-validate` checks every manifest in `k8s_manifests.rs`.)
//!
//! Each contradiction the issue listed is reintroduced into a copy of the
//! repository by a test below, and the checks must name it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use homelab_agent::config::{self, AgentConfig, OnePasswordConfig};
use homelab_agent::desired::{self, LoadOptions};
use homelab_agent::k8s::Stack;
use homelab_agent_tests::connect_standin::ConnectStandIn;
use homelab_agent_tests::ports::{start_on_reserved_port, start_on_reserved_ports};
use homelab_agent_tests::real_tools::{caddy, caddy_env, http_get, nginx, run_bounded};
use homelab_agent_tests::{copy_dir, workspace};
use serde_json::Value;

const OP_TOKEN: &str = "reference-coherence-connect-token";
/// The domain Caddy serves (seed 001).
const DOMAIN: &str = ".ops.eblu.me";

/// Real key material for the items the checks compare: borgmatic's key pair
/// and the wildcard certificate.
struct Keys {
    _dir: tempfile::TempDir,
    borg_private: String,
    borg_public: String,
    cert: String,
    key: String,
}

fn keys() -> Keys {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("borg");
    let out = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "borgmatic@indri",
            "-f",
        ])
        .arg(&key)
        .output()
        .expect("ssh-keygen (apt: openssh-client)");
    assert!(out.status.success(), "{out:?}");
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=*.ops.eblu.me"])
        .args(["-addext", "subjectAltName=DNS:*.ops.eblu.me"])
        .arg("-keyout")
        .arg(dir.path().join("tls.key"))
        .arg("-out")
        .arg(dir.path().join("tls.crt"))
        .output()
        .expect("openssl");
    assert!(out.status.success(), "{out:?}");
    let read = |name: &str| {
        std::fs::read_to_string(dir.path().join(name))
            .unwrap()
            .trim_end()
            .to_string()
    };
    Keys {
        borg_private: read("borg"),
        borg_public: read("borg.pub"),
        cert: read("tls.crt"),
        key: read("tls.key"),
        _dir: dir,
    }
}

/// One host as rendered from the repository.
struct Host {
    name: String,
    platform: String,
    /// Every path a resource writes and its bytes (secrets resolved).
    files: BTreeMap<PathBuf, Vec<u8>>,
    stacks: Vec<Stack>,
    /// `agents/<name>.yaml`, parsed as `agent run` parses it.
    agent: Option<AgentConfig>,
}

impl Host {
    fn file(&self, path: &str) -> Option<String> {
        self.files
            .get(Path::new(path))
            .map(|b| String::from_utf8_lossy(b).into_owned())
    }
    /// The rendered file whose path ends with `suffix` (one at most).
    fn file_ending(&self, suffix: &str) -> Option<(PathBuf, String)> {
        self.files
            .iter()
            .find(|(p, _)| p.to_string_lossy().ends_with(suffix))
            .map(|(p, b)| (p.clone(), String::from_utf8_lossy(b).into_owned()))
    }
    fn ip(&self) -> Option<Ipv4Addr> {
        match self.agent.as_ref()?.listen.ip() {
            std::net::IpAddr::V4(ip) => Some(ip),
            std::net::IpAddr::V6(_) => None,
        }
    }
    fn objects(&self) -> impl Iterator<Item = (&Stack, &Value)> {
        self.stacks
            .iter()
            .flat_map(|s| s.objects.iter().map(move |o| (s, &o.body.0)))
    }
}

/// The whole homelab, rendered.
struct Lab {
    repo: PathBuf,
    hosts: BTreeMap<String, Host>,
    /// Problems found while loading (unresolved secrets, missing configs).
    load_problems: Vec<String>,
    keys: Arc<Keys>,
}

fn load(repo: &Path, keys: Arc<Keys>) -> Lab {
    let connect = ConnectStandIn::start(OP_TOKEN);
    let items = connect.add_reference_vault();
    connect.set_field(&items["borgmatic"], "ssh_private_key", &keys.borg_private);
    connect.set_field(&items["borgmatic"], "ssh_public_key", &keys.borg_public);
    connect.set_field(&items["ops-eblu-me-tls"], "certificate", &keys.cert);
    connect.set_field(&items["ops-eblu-me-tls"], "private_key", &keys.key);
    let tmp = tempfile::tempdir().unwrap();
    let token_file = tmp.path().join("op-token");
    std::fs::write(&token_file, OP_TOKEN).unwrap();
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let secrets = homelab_agent::engine::secret_source(Some(&OnePasswordConfig {
        connect_url: connect.url(),
        token_file,
    }));
    let source = Arc::new(homelab_agent::source::LocalDir::open(repo).unwrap());
    let mut names = desired::host_names(source.as_ref()).unwrap();
    names.sort();
    let mut hosts = BTreeMap::new();
    let mut problems = Vec::new();
    for name in names {
        let opts = LoadOptions {
            secrets: secrets.clone(),
            ..LoadOptions::default()
        };
        let catalog = desired::load_with(source.clone(), &name, &opts)
            .unwrap_or_else(|e| panic!("host {name} does not load:\n{e}"));
        let mut files = BTreeMap::new();
        for e in &catalog.entries {
            if let Some(why) = &e.blocked {
                problems.push(format!("{name}: {} is skipped: {why}", e.id));
            }
            for (path, bytes) in e.resource.rendered() {
                files.insert(path.to_path_buf(), bytes.to_vec());
            }
        }
        for s in &catalog.stacks {
            for o in &s.objects {
                if let Some(why) = &o.blocked {
                    problems.push(format!("{name}: {} is skipped: {why}", o.id));
                }
            }
        }
        let agent_file = repo.join(format!("agents/{name}.yaml"));
        let agent = match std::fs::read_to_string(&agent_file) {
            Ok(text) => match config::parse(&agent_file, &text) {
                Ok(c) => {
                    if c.host.as_deref() != Some(name.as_str()) {
                        problems.push(format!("agents/{name}.yaml names host {:?}", c.host));
                    }
                    Some(c)
                }
                Err(e) => {
                    problems.push(format!("agents/{name}.yaml does not parse: {e}"));
                    None
                }
            },
            Err(_) => {
                problems.push(format!(
                    "{name} has no agent config in the repository (agents/{name}.yaml)"
                ));
                None
            }
        };
        hosts.insert(
            name.clone(),
            Host {
                name,
                platform: catalog.host.platform.name().to_string(),
                files,
                stacks: catalog.stacks,
                agent,
            },
        );
    }
    Lab {
        repo: repo.to_path_buf(),
        hosts,
        load_problems: problems,
        keys,
    }
}

// ------------------------------------------------------------------ helpers

/// The kubeconfig context a stack is applied through.
fn context(s: &Stack) -> Option<&str> {
    match &s.access {
        homelab_agent::k8s::model::ClusterAccess::Kubeconfig { context } => context.as_deref(),
        homelab_agent::k8s::model::ClusterAccess::InCluster => None,
    }
}

/// Every `<name>.ops.eblu.me` in `text`.
fn ops_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find(DOMAIN) {
        let before = &rest[..i];
        let start = before
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '.'))
            .map_or(0, |j| j + 1);
        let label = &before[start..];
        if !label.is_empty() {
            out.insert(format!("{label}{DOMAIN}"));
        }
        rest = &rest[i + DOMAIN.len()..];
    }
    out
}

/// Every file under the homelab's folders, as text.
fn repo_texts(repo: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Ok(text) = std::fs::read_to_string(repo.join("README.md")) {
        out.push(("README.md".to_string(), text));
    }
    for dir in ["hosts", "modules", "k8s", "agents", "dashboards"] {
        let mut stack = vec![repo.join(dir)];
        while let Some(d) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Ok(text) = std::fs::read_to_string(&p) {
                    let rel = p.strip_prefix(repo).unwrap().display().to_string();
                    out.push((rel, text));
                }
            }
        }
    }
    out
}

fn ipv4(s: &str) -> Option<Ipv4Addr> {
    s.parse().ok()
}

/// `a.b.c.d-a.b.c.e` or a CIDR, as an inclusive range; `None`: not IPv4.
fn pool_range(s: &str) -> Option<(u32, u32)> {
    if let Some((a, b)) = s.split_once('-') {
        return Some((u32::from(ipv4(a)?), u32::from(ipv4(b)?)));
    }
    let (ip, bits) = s.split_once('/')?;
    let ip = u32::from(ipv4(ip)?);
    let bits: u32 = bits.parse().ok()?;
    let mask = if bits == 0 {
        0
    } else {
        u32::MAX << (32 - bits)
    };
    Some((ip & mask, (ip & mask) | !mask))
}

/// Address ranges written `192.168.x.y-192.168.x.z` or `192.168.x.y-z` in `text`.
fn mentioned_ranges(text: &str) -> Vec<(String, (u32, u32))> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let is_ip = |c: u8| c.is_ascii_digit() || c == b'.';
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(b"192.168.") && (i == 0 || !is_ip(bytes[i - 1])) {
            let mut j = i;
            while j < bytes.len() && is_ip(bytes[j]) {
                j += 1;
            }
            if j < bytes.len() && bytes[j] == b'-' {
                let mut k = j + 1;
                while k < bytes.len() && is_ip(bytes[k]) {
                    k += 1;
                }
                let (a, b) = (
                    text[i..j].trim_end_matches('.'),
                    text[j + 1..k].trim_end_matches('.'),
                );
                let b_full = if b.contains('.') {
                    b.to_string()
                } else {
                    format!("{}.{b}", &a[..a.rfind('.').unwrap()])
                };
                if let (Some(x), Some(y)) = (ipv4(a), ipv4(&b_full)) {
                    out.push((format!("{a}-{b}"), (u32::from(x), u32::from(y))));
                }
                i = k;
                continue;
            }
            i = j;
            continue;
        }
        i += 1;
    }
    out
}

/// A Secret's value (loaded Secrets carry `data`, base64).
fn secret_value(obj: &Value, key: &str) -> Option<String> {
    let b64 = obj["data"][key].as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    String::from_utf8(bytes).ok()
}

/// One Caddy site as Caddy itself reads it (`caddy adapt`).
#[derive(Debug, Default)]
struct Site {
    /// Path routes (e.g. `/stream/*`): upstream dials, and whether the
    /// matched prefix is stripped.
    routes: Vec<(String, Vec<String>, bool)>,
    /// Everything else.
    default: Vec<String>,
}

/// Walks Caddy's JSON handlers; returns whether a prefix strip is in force
/// for what follows (`handle_path` is a rewrite route, then the proxy route).
fn collect_handlers(handlers: &Value, path: Option<&str>, strip: bool, site: &mut Site) -> bool {
    let mut strip = strip;
    for h in handlers.as_array().into_iter().flatten() {
        match h["handler"].as_str() {
            Some("rewrite") if h.get("strip_path_prefix").is_some() => strip = true,
            Some("reverse_proxy") => {
                let dials: Vec<String> = h["upstreams"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|u| u["dial"].as_str().map(str::to_string))
                    .collect();
                match path {
                    Some(p) => site.routes.push((p.to_string(), dials, strip)),
                    None => site.default.extend(dials),
                }
            }
            Some("subroute") => collect_routes(&h["routes"], path, strip, site),
            _ => {}
        }
    }
    strip
}

fn collect_routes(routes: &Value, path: Option<&str>, strip: bool, site: &mut Site) {
    let mut strip = strip;
    for r in routes.as_array().into_iter().flatten() {
        let p = r["match"][0]["path"][0].as_str();
        match p {
            // A route of its own path: a strip inside stays inside.
            Some(p) => {
                collect_handlers(&r["handle"], Some(p), strip, site);
            }
            None => strip = collect_handlers(&r["handle"], path, strip, site),
        }
    }
}

/// `caddy adapt` of a Caddyfile: its sites by host name.
fn caddy_sites(caddyfile: &str) -> BTreeMap<String, Site> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("Caddyfile");
    std::fs::write(&file, caddyfile).unwrap();
    let mut cmd = Command::new("caddy");
    cmd.args(["adapt", "--adapter", "caddyfile", "--config"])
        .arg(&file);
    caddy_env(&mut cmd, dir.path());
    let out = run_bounded(&mut cmd, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "caddy adapt: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut sites = BTreeMap::new();
    for server in json["apps"]["http"]["servers"]
        .as_object()
        .into_iter()
        .flat_map(|m| m.values())
    {
        for route in server["routes"].as_array().into_iter().flatten() {
            let hosts: Vec<String> = route["match"][0]["host"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|h| h.as_str().map(str::to_string))
                .collect();
            let mut site = Site::default();
            collect_handlers(&route["handle"], None, false, &mut site);
            for h in hosts {
                sites.insert(
                    h,
                    Site {
                        routes: site.routes.clone(),
                        default: site.default.clone(),
                    },
                );
            }
        }
    }
    sites
}

/// `KEY = value` of an ini section's key (Forgejo's app.ini).
fn ini(text: &str, section: &str, key: &str) -> Option<String> {
    let mut inside = section.is_empty();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            inside = line == format!("[{section}]");
            continue;
        }
        if inside {
            if let Some((k, v)) = line.split_once('=') {
                if k.trim() == key {
                    return Some(v.trim().to_string());
                }
            }
        }
    }
    None
}

/// `key: value` lines of a flat YAML file (k3s config.yaml, Cilium values).
fn yaml_scalar(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let l = l.trim();
        l.strip_prefix(&format!("{key}:"))
            .map(|v| v.trim().trim_matches('"').to_string())
    })
}

// ------------------------------------------------------------------ checks

/// Every problem of the homelab as a whole (empty: coherent).
fn problems(lab: &Lab) -> Vec<String> {
    let mut p = lab.load_problems.clone();
    let hosts: Vec<&Host> = lab.hosts.values().collect();

    // --- Caddy: the one reverse proxy for *.ops.eblu.me (seed 001).
    let proxies: Vec<(&Host, PathBuf, String)> = hosts
        .iter()
        .filter_map(|h| h.file_ending("/Caddyfile").map(|(path, t)| (*h, path, t)))
        .collect();
    let Some((proxy, _, caddyfile)) = proxies
        .iter()
        .find(|(_, _, t)| !ops_names(t).is_empty())
        .cloned()
    else {
        p.push("no Caddy serves the *.ops.eblu.me names".into());
        return p;
    };
    for (h, _, t) in &proxies {
        if h.name != proxy.name && !ops_names(t).is_empty() {
            p.push(format!("{} runs a second Caddy for *.ops.eblu.me", h.name));
        }
    }
    let sites = caddy_sites(&caddyfile);

    // Every name used anywhere is a site.
    let mut used: BTreeMap<String, String> = BTreeMap::new();
    for (file, text) in repo_texts(&lab.repo) {
        for n in ops_names(&text) {
            used.entry(n).or_insert(file.clone());
        }
    }
    for h in &hosts {
        for (path, bytes) in &h.files {
            for n in ops_names(&String::from_utf8_lossy(bytes)) {
                used.entry(n)
                    .or_insert(format!("{}:{}", h.name, path.display()));
            }
        }
        for (s, o) in h.objects() {
            for n in ops_names(&o.to_string()) {
                used.entry(n)
                    .or_insert(format!("{}: stack {}", h.name, s.name()));
            }
        }
    }
    for (name, at) in &used {
        if !sites.contains_key(name) {
            p.push(format!(
                "{name} (used in {at}) is not routed by Caddy on {}",
                proxy.name
            ));
        }
    }

    // Listeners on the proxy's host and MetalLB addresses on the k3s cluster.
    let mut local: BTreeSet<(String, u16)> = BTreeSet::new();
    if let Some((_, app)) = proxy.file_ending("/custom/conf/app.ini") {
        if let (Some(a), Some(port)) = (
            ini(&app, "server", "HTTP_ADDR"),
            ini(&app, "server", "HTTP_PORT").and_then(|v| v.parse().ok()),
        ) {
            local.insert((a, port));
        }
    }
    if let Some((_, zot)) = proxy.file_ending("zot/config.json") {
        let z: Value = serde_json::from_str(&zot).unwrap();
        if let (Some(a), Some(port)) = (
            z["http"]["address"].as_str(),
            z["http"]["port"].as_str().and_then(|v| v.parse().ok()),
        ) {
            local.insert((a.to_string(), port));
        }
    }
    if let Some((_, net)) = proxy.file_ending("/config/network.xml") {
        if let Some(port) = net
            .split("<InternalHttpPort>")
            .nth(1)
            .and_then(|r| r.split('<').next())
            .and_then(|v| v.parse().ok())
        {
            local.insert(("0.0.0.0".into(), port));
        }
    }
    // minikube LoadBalancer Services: on 127.0.0.1 through `minikube tunnel`.
    let tunnel = proxy
        .files
        .keys()
        .any(|p| p.to_string_lossy().contains("minikube-tunnel"));
    for (s, o) in proxy.objects() {
        if o["kind"] == "Service" && o["spec"]["type"] == "LoadBalancer" {
            if context(s) != Some("minikube") {
                continue;
            }
            if !tunnel {
                p.push(format!(
                    "{}: LoadBalancer Service {} in minikube, but no `minikube tunnel` runs",
                    proxy.name, o["metadata"]["name"]
                ));
            }
            for port in o["spec"]["ports"].as_array().into_iter().flatten() {
                let port = port["port"].as_u64().unwrap() as u16;
                if port < 1024 {
                    p.push(format!("minikube Service {} port {port}: the tunnel forwards only ports above 1024 without a password", o["metadata"]["name"]));
                }
                local.insert(("127.0.0.1".into(), port));
            }
        }
    }

    // MetalLB: pools, and the Services owning addresses in them.
    let mut pools: Vec<(String, (u32, u32))> = Vec::new();
    let mut lb: BTreeMap<(Ipv4Addr, u16), Vec<String>> = BTreeMap::new();
    let mut lb_ips: BTreeMap<Ipv4Addr, Vec<String>> = BTreeMap::new();
    let mut metallb_owner = None;
    for h in &hosts {
        for (s, o) in h.objects() {
            if o["kind"] == "IPAddressPool" {
                metallb_owner = Some(h.name.clone());
                for a in o["spec"]["addresses"].as_array().into_iter().flatten() {
                    let a = a.as_str().unwrap();
                    match pool_range(a) {
                        Some(r) => pools.push((a.to_string(), r)),
                        None => p.push(format!(
                            "MetalLB pool {} holds {a}: not IPv4, on an IPv4-only cluster",
                            o["metadata"]["name"]
                        )),
                    }
                }
            }
            if o["kind"] == "Service"
                && o["spec"]["type"] == "LoadBalancer"
                && context(s) != Some("minikube")
            {
                let name = format!("{}/{}", s.name(), o["metadata"]["name"].as_str().unwrap());
                let ip = o["metadata"]["annotations"]["metallb.universe.tf/loadBalancerIPs"]
                    .as_str()
                    .and_then(ipv4);
                let Some(ip) = ip else {
                    p.push(format!("LoadBalancer Service {name} has no fixed MetalLB address (metallb.universe.tf/loadBalancerIPs): Caddy cannot name it"));
                    continue;
                };
                lb_ips.entry(ip).or_default().push(name.clone());
                for port in o["spec"]["ports"].as_array().into_iter().flatten() {
                    lb.entry((ip, port["port"].as_u64().unwrap() as u16))
                        .or_default()
                        .push(name.clone());
                }
            }
        }
    }
    let in_pool = |ip: Ipv4Addr| {
        let n = u32::from(ip);
        pools.iter().any(|(_, (a, b))| *a <= n && n <= *b)
    };
    for (ip, owners) in &lb_ips {
        if !in_pool(*ip) {
            p.push(format!(
                "{owners:?} use {ip}, outside every MetalLB pool {:?}",
                pools.iter().map(|x| &x.0).collect::<Vec<_>>()
            ));
        }
        if owners.len() > 1 {
            p.push(format!("{ip} is owned by several Services: {owners:?}"));
        }
    }
    // No host address inside a pool (MetalLB would announce it twice).
    for h in &hosts {
        let mut ips: Vec<Ipv4Addr> = h.ip().into_iter().collect();
        if let Some(c) = h.file("/etc/rancher/k3s/config.yaml") {
            ips.extend(yaml_scalar(&c, "node-ip").and_then(|v| ipv4(&v)));
        }
        for ip in ips {
            if in_pool(ip) {
                p.push(format!(
                    "{}'s address {ip} is inside a MetalLB pool",
                    h.name
                ));
            }
        }
    }
    // Every address range the repository writes down is a real pool.
    for (file, text) in repo_texts(&lab.repo) {
        for (written, range) in mentioned_ranges(&text) {
            if !pools.iter().any(|(_, r)| *r == range) {
                p.push(format!(
                    "{file} mentions the range {written}, which is no MetalLB pool"
                ));
            }
        }
    }

    // Every upstream Caddy proxies to exists.
    for (name, site) in &sites {
        let dials = site
            .routes
            .iter()
            .flat_map(|r| r.1.iter())
            .chain(site.default.iter());
        for dial in dials {
            let Some((host, port)) = dial.rsplit_once(':') else {
                p.push(format!("{name}: upstream {dial} has no port"));
                continue;
            };
            let port: u16 = port.parse().unwrap();
            let ok = match ipv4(host) {
                Some(ip) if ip.is_loopback() => {
                    local.contains(&(host.to_string(), port))
                        || local.contains(&("0.0.0.0".to_string(), port))
                }
                Some(ip) => lb.contains_key(&(ip, port)),
                None => false,
            };
            if !ok {
                p.push(format!(
                    "{name}: Caddy proxies to {dial}, where nothing listens"
                ));
            }
        }
    }

    // Every Caddy may bind its ports (80/443 and the like).
    for (h, _, cf) in &proxies {
        for (path, bytes) in &h.files {
            let text = String::from_utf8_lossy(bytes);
            let path = path.to_string_lossy();
            if path.ends_with("/caddy.service") {
                let user = text.lines().find_map(|l| l.strip_prefix("User="));
                if user.is_some_and(|u| u != "root")
                    && !text.contains("AmbientCapabilities=CAP_NET_BIND_SERVICE")
                {
                    p.push(format!("{}: caddy runs as {user:?} without CAP_NET_BIND_SERVICE: it cannot bind 80 or 443", h.name));
                }
            }
            // macOS lets any user bind a port below 1024 on every interface, not on one address.
            if path.ends_with("caddy.plist")
                && text.contains("<key>UserName</key>")
                && cf.contains("\tbind ")
            {
                p.push(format!(
                    "{}: caddy binds one address as a user: macOS allows that only as root",
                    h.name
                ));
            }
        }
        let unit = if h.platform == "macos" {
            "caddy.plist"
        } else {
            "/caddy.service"
        };
        if !h.files.keys().any(|p| p.to_string_lossy().ends_with(unit)) {
            p.push(format!("{}: a Caddyfile but no caddy service", h.name));
        }
    }

    // --- Forgejo: the SSH port clone URLs advertise is the one it binds.
    for h in &hosts {
        if let Some((_, app)) = h.file_ending("/custom/conf/app.ini") {
            let told = ini(&app, "server", "SSH_PORT");
            let bound = ini(&app, "server", "SSH_LISTEN_PORT");
            if told != bound {
                p.push(format!("{}: Forgejo advertises SSH on {told:?} but listens on {bound:?} (nothing forwards between them)", h.name));
            }
        }
    }

    // --- zot: behind Caddy only, auth on.
    for h in &hosts {
        if let Some((_, zot)) = h.file_ending("zot/config.json") {
            let z: Value = serde_json::from_str(&zot).unwrap();
            if z["http"]["address"] != "127.0.0.1" {
                p.push(format!(
                    "{}: zot listens on {} instead of behind Caddy only",
                    h.name, z["http"]["address"]
                ));
            }
            if z["http"]["auth"]["htpasswd"].is_null() {
                p.push(format!("{}: zot runs with auth off", h.name));
            }
            if let Some(u) = z["http"]["externalUrl"].as_str() {
                for n in ops_names(u) {
                    if !sites.contains_key(&n) {
                        p.push(format!("zot's externalUrl {u} is not routed"));
                    }
                }
            }
        }
    }

    // --- k3s: bootstrappable from the repo.
    let server = hosts.iter().find(|h| {
        h.file("/etc/rancher/k3s/config.yaml")
            .is_some_and(|c| c.contains("cluster-cidr:"))
    });
    if let Some(server) = server {
        let config = server.file("/etc/rancher/k3s/config.yaml").unwrap();
        let server_ip = yaml_scalar(&config, "node-ip").unwrap();
        let manifests: Vec<String> = server
            .files
            .iter()
            .filter(|(p, _)| p.starts_with("/var/lib/rancher/k3s/server/manifests"))
            .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
            .collect();
        let chart = |name: &str| {
            manifests
                .iter()
                .find(|m| m.contains("kind: HelmChart") && m.contains(&format!("chart: {name}\n")))
        };
        if config.contains("flannel-backend: none") {
            match chart("cilium") {
                None => p.push(format!("{}: flannel is off but no HelmChart in the auto-deploy folder installs Cilium: no pod network", server.name)),
                Some(c) => {
                    if yaml_scalar(c, "k8sServiceHost") != Some(server_ip.clone()) {
                        p.push(format!("{}: Cilium's k8sServiceHost is not the server's node-ip {server_ip}", server.name));
                    }
                    if config.contains("disable-kube-proxy: true") && yaml_scalar(c, "kubeProxyReplacement").as_deref() != Some("true") {
                        p.push(format!("{}: kube-proxy is off but Cilium does not replace it", server.name));
                    }
                    if !c.contains("bootstrap: true") {
                        p.push(format!("{}: the Cilium HelmChart must be `bootstrap: true` (no CNI yet)", server.name));
                    }
                }
            }
        }
        if metallb_owner.is_some() {
            if chart("metallb").is_none() {
                p.push(format!("{}: the metallb stack's pools need MetalLB's CRDs and controller, which no HelmChart installs", server.name));
            }
            if metallb_owner.as_deref() != Some(server.name.as_str()) {
                p.push(format!(
                    "the metallb stack is owned by {metallb_owner:?}, not the k3s server {}",
                    server.name
                ));
            }
        }
        for h in &hosts {
            let Some(c) = h.file("/etc/rancher/k3s/config.yaml") else {
                continue;
            };
            if let Some(url) = yaml_scalar(&c, "server") {
                if url != format!("https://{server_ip}:6443") {
                    p.push(format!(
                        "{}: joins {url}, but the server listens on https://{server_ip}:6443",
                        h.name
                    ));
                }
            }
            if !c.contains("token: \"ref-k3s-cluster-token\"") {
                p.push(format!("{}: the join token is not the one from 1Password (op://homelab/k3s/cluster-token)", h.name));
            }
            match h.file("/etc/rancher/k3s/registries.yaml") {
                None => p.push(format!(
                    "{}: containerd does not pull through the zot mirror (no registries.yaml)",
                    h.name
                )),
                Some(r) => {
                    if !r.contains("docker.io:") {
                        p.push(format!("{}: registries.yaml mirrors no docker.io", h.name));
                    }
                }
            }
        }
    }
    // minikube's images come through zot too.
    for h in &hosts {
        for (s, o) in h.objects() {
            if context(s) != Some("minikube") {
                continue;
            }
            let text = o.to_string();
            for part in text.split("\"image\":\"").skip(1) {
                let image = part.split('"').next().unwrap();
                if !image.contains(DOMAIN) {
                    p.push(format!(
                        "{}: stack {} pulls {image} past the zot mirror",
                        h.name,
                        s.name()
                    ));
                }
            }
        }
    }

    // --- Prometheus scrapes every agent where it listens.
    let listens: BTreeSet<String> = hosts
        .iter()
        .filter_map(|h| h.agent.as_ref().map(|a| a.listen.to_string()))
        .collect();
    let mut targets = BTreeSet::new();
    for h in &hosts {
        for (_, o) in h.objects() {
            if let Some(v) = secret_value(o, "scrape-configs.yaml") {
                for line in v.lines() {
                    let l = line.trim();
                    if let Some(t) = l.strip_prefix("- ") {
                        let t = t.split('#').next().unwrap().trim();
                        if t.parse::<std::net::SocketAddr>().is_ok() {
                            targets.insert(t.to_string());
                        }
                    }
                }
            }
        }
    }
    if targets != listens {
        p.push(format!(
            "Prometheus scrapes {targets:?}, the agents listen on {listens:?}"
        ));
    }
    for h in &hosts {
        if let Some(a) = &h.agent {
            if a.listen.ip().is_loopback() {
                p.push(format!(
                    "{}'s agent listens on loopback only: Prometheus cannot scrape it",
                    h.name
                ));
            }
            for n in ops_names(&a.repo)
                .into_iter()
                .chain(a.onepassword.iter().flat_map(|o| ops_names(&o.connect_url)))
            {
                if !sites.contains_key(&n) {
                    p.push(format!("agents/{}.yaml uses {n}, not routed", h.name));
                }
            }
        }
    }

    // --- VLog workers: the NetworkPolicy opens what they are told, nothing more.
    for h in &hosts {
        let cm = h.objects().find(|(_, o)| {
            o["kind"] == "ConfigMap" && o["metadata"]["name"] == "vlog-worker-config"
        });
        let np = h
            .objects()
            .find(|(_, o)| o["kind"] == "NetworkPolicy" && o["metadata"]["name"] == "vlog-worker");
        let (Some((_, cm)), Some((_, np))) = (cm, np) else {
            continue;
        };
        let mut told: BTreeSet<(String, u64)> = BTreeSet::new();
        for (k, v) in cm["data"].as_object().unwrap() {
            if let Some(rest) = v.as_str().and_then(|v| v.split_once("://")).map(|x| x.1) {
                let hostport = rest.split('/').next().unwrap();
                if let Some((host, port)) = hostport.rsplit_once(':') {
                    if ipv4(host).is_none() {
                        p.push(format!("{k} names the host {host}: the workers' NetworkPolicy can only allow an address"));
                    }
                    told.insert((format!("{host}/32"), port.parse().unwrap()));
                }
            }
        }
        for rule in np["spec"]["egress"].as_array().into_iter().flatten() {
            let ports: Vec<u64> = rule["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x["port"].as_u64())
                .collect();
            for to in rule["to"].as_array().into_iter().flatten() {
                if let Some(cidr) = to["ipBlock"]["cidr"].as_str() {
                    for port in &ports {
                        if !told.contains(&(cidr.to_string(), *port)) {
                            p.push(format!("the workers' NetworkPolicy opens {cidr} port {port}, which their config never names"));
                        }
                    }
                }
            }
        }
        for (addr, port) in &told {
            let open = np["spec"]["egress"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|r| {
                    r["to"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|t| t["ipBlock"]["cidr"] == addr.as_str())
                        && r["ports"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|x| x["port"].as_u64() == Some(*port))
                });
            if !open {
                p.push(format!(
                    "the workers are told {addr} port {port}, which their NetworkPolicy blocks"
                ));
            }
        }
    }

    // --- GinFlix (seed 002).
    for h in &hosts {
        let web_cm = h.objects().find(|(s, o)| {
            s.name() == "vod" && o["kind"] == "ConfigMap" && o["metadata"]["name"] == "web-config"
        });
        let Some((_, web_cm)) = web_cm else { continue };
        if h.stacks
            .iter()
            .any(|s| s.name() == "vod" && context(s) == Some("minikube"))
        {
            p.push(format!(
                "GinFlix runs in {}'s minikube, which has no MetalLB",
                h.name
            ));
        }
        for (_, o) in h.objects() {
            if o["kind"] == "Deployment"
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.contains("caddy"))
            {
                p.push("GinFlix's Caddy runs inside Kubernetes (seed 002: outside it)".into());
            }
        }
        let base = web_cm["data"]["STREAM_BASE_URL"].as_str().unwrap_or("");
        let site_name = base
            .split("://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .unwrap_or("");
        let service = |name: &str| {
            h.objects()
                .find(|(s, o)| {
                    s.name() == "vod" && o["kind"] == "Service" && o["metadata"]["name"] == name
                })
                .map(|(_, o)| o.clone())
        };
        let container_port = |deploy: &str| {
            h.objects()
                .find(|(_, o)| o["kind"] == "Deployment" && o["metadata"]["name"] == deploy)
                .and_then(|(_, o)| {
                    o["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
                        .as_u64()
                })
        };
        let addr_of = |svc: &Value| {
            let ip = svc["metadata"]["annotations"]["metallb.universe.tf/loadBalancerIPs"]
                .as_str()
                .unwrap_or("?");
            format!("{ip}:{}", svc["spec"]["ports"][0]["port"])
        };
        let (Some(web), Some(streamer)) = (service("web"), service("streamer")) else {
            p.push("GinFlix lacks its web or streamer Service".into());
            continue;
        };
        for (svc, deploy) in [(&web, "web"), (&streamer, "streamer")] {
            if svc["spec"]["type"] != "LoadBalancer" {
                p.push(format!(
                    "GinFlix's {deploy} Service is not a MetalLB LoadBalancer"
                ));
            }
            if svc["spec"]["ports"][0]["targetPort"] != "http" || container_port(deploy).is_none() {
                p.push(format!(
                    "GinFlix's {deploy} Service does not reach its container port"
                ));
            }
        }
        let Some(site) = sites.get(site_name) else {
            p.push(format!("GinFlix's STREAM_BASE_URL {base} is not routed"));
            continue;
        };
        if site.default != [addr_of(&web)] {
            p.push(format!(
                "{site_name}: Caddy sends pages to {:?}, GinFlix's web Service is {}",
                site.default,
                addr_of(&web)
            ));
        }
        let site_conf = h
            .objects()
            .find(|(_, o)| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "streamer-site")
            .and_then(|(_, o)| o["data"]["default.conf"].as_str().map(str::to_string))
            .unwrap_or_default();
        let nginx_port = site_conf
            .split("listen ")
            .nth(1)
            .and_then(|r| r.split(';').next())
            .and_then(|v| v.parse::<u64>().ok());
        if nginx_port != container_port("streamer") {
            p.push(format!(
                "the streamer's nginx listens on {nginx_port:?}, its container port is {:?}",
                container_port("streamer")
            ));
        }
        match site.routes.iter().find(|r| r.0 == "/stream/*") {
            None => p.push(format!("{site_name}: no /stream/* route to the streamers")),
            Some((_, dials, strip)) => {
                if dials != &[addr_of(&streamer)] {
                    p.push(format!(
                        "{site_name}: /stream/* goes to {dials:?}, the streamer Service is {}",
                        addr_of(&streamer)
                    ));
                }
                if *strip && site_conf.contains("location /stream/") {
                    p.push(format!("{site_name}: Caddy strips /stream/ but the streamers serve under location /stream/"));
                }
            }
        }
    }

    // --- Backups: every database exactly once, into one folder.
    let mut dumped: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut dump_dirs: BTreeSet<String> = BTreeSet::new();
    let mut databases: BTreeSet<String> = BTreeSet::new();
    let mut nas: Option<(&Host, String)> = None;
    for h in &hosts {
        if let Some((_, env)) = h.file_ending("/pg-backup.env") {
            let dbs = env
                .lines()
                .find_map(|l| l.strip_prefix("DATABASES="))
                .unwrap_or("")
                .trim_matches('\'');
            for db in dbs.split_whitespace() {
                dumped
                    .entry(db.to_string())
                    .or_default()
                    .push(format!("{}: pg-backup", h.name));
            }
            let dir = env
                .lines()
                .find_map(|l| l.strip_prefix("BACKUP_DIR="))
                .unwrap_or("")
                .trim_matches('\'')
                .to_string();
            dump_dirs.insert(dir.clone());
            nas = Some((h, dir));
        }
        for (s, o) in h.objects() {
            // In-cluster PostgreSQL servers and their database.
            if o["kind"] == "Secret" {
                if let Some(db) = secret_value(o, "POSTGRES_DB") {
                    databases.insert(db);
                }
            }
            if o["kind"] == "CronJob" && o.to_string().contains("pg_dump") {
                let spec = &o["spec"]["jobTemplate"]["spec"]["template"]["spec"];
                let c = &spec["containers"][0];
                let mut db = None;
                for e in c["env"].as_array().into_iter().flatten() {
                    if e["name"] == "PGDATABASE" {
                        db = e["value"].as_str().map(str::to_string).or_else(|| {
                            let r = &e["valueFrom"]["secretKeyRef"];
                            h.objects()
                                .find(|(_, x)| {
                                    x["kind"] == "Secret" && x["metadata"]["name"] == r["name"]
                                })
                                .and_then(|(_, x)| secret_value(x, r["key"].as_str().unwrap()))
                        });
                    }
                }
                for from in c["envFrom"].as_array().into_iter().flatten() {
                    let name = &from["secretRef"]["name"];
                    if let Some((_, x)) = h
                        .objects()
                        .find(|(_, x)| x["kind"] == "Secret" && &x["metadata"]["name"] == name)
                    {
                        db = db.or(secret_value(x, "PGDATABASE"));
                    }
                }
                let who = format!(
                    "{}: CronJob {}/{}",
                    h.name,
                    s.name(),
                    o["metadata"]["name"].as_str().unwrap()
                );
                match db {
                    Some(db) => dumped.entry(db).or_default().push(who.clone()),
                    None => p.push(format!("{who} dumps no database it names")),
                }
                for v in spec["volumes"].as_array().into_iter().flatten() {
                    if let Some(path) = v["nfs"]["path"].as_str() {
                        dump_dirs.insert(path.to_string());
                        if let Some(nas) = &nas {
                            if v["nfs"]["server"].as_str().and_then(ipv4) != nas.0.ip() {
                                p.push(format!(
                                    "{who} mounts {} as NFS server, not the NAS {:?}",
                                    v["nfs"]["server"],
                                    nas.0.ip()
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    for db in &databases {
        if !dumped.contains_key(db) {
            p.push(format!("the database {db} is never backed up"));
        }
    }
    for (db, by) in &dumped {
        if by.len() > 1 {
            p.push(format!(
                "the database {db} is dumped {} times: {by:?}",
                by.len()
            ));
        }
    }
    if dump_dirs.len() > 1 {
        p.push(format!(
            "database dumps go to several folders: {dump_dirs:?}"
        ));
    }

    // borgmatic: its key deployed, its public half authorised on the NAS.
    for h in &hosts {
        let Some((_, conf)) = h.file_ending("/borgmatic/config.yaml") else {
            continue;
        };
        let key_path = conf
            .split("ssh -i ")
            .nth(1)
            .and_then(|r| r.split(' ').next());
        let Some(key_path) = key_path else {
            p.push(format!("{}: borgmatic names no SSH key", h.name));
            continue;
        };
        match h.file(key_path) {
            None => p.push(format!(
                "{}: borgmatic's SSH key {key_path} is never deployed",
                h.name
            )),
            Some(k) => {
                if k.trim_end() != lab.keys.borg_private {
                    p.push(format!(
                        "{}: {key_path} is not op://homelab/borgmatic/ssh_private_key",
                        h.name
                    ));
                }
            }
        }
        let public = lab
            .keys
            .borg_public
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let authorised = hosts.iter().any(|n| {
            n.file_ending("/.ssh/authorized_keys")
                .is_some_and(|(_, a)| {
                    a.lines().any(|l| {
                        l.contains(&public)
                            && l.contains(&format!(
                                "--restrict-to-repository /volume1/backups/borg/{}",
                                h.name
                            ))
                    })
                })
        });
        if !authorised {
            p.push(format!(
                "no NAS authorises {}'s borgmatic key for its repository",
                h.name
            ));
        }
        // Forgejo's live SQLite database goes in as a consistent copy only.
        if let Some((_, app)) = h.file_ending("/custom/conf/app.ini") {
            let db = ini(&app, "database", "PATH").unwrap_or_default();
            if !conf.contains(&format!("\"{db}\"")) || !conf.contains(".backup") {
                p.push(format!(
                    "{}: Forgejo's database {db} is not excluded and copied with .backup",
                    h.name
                ));
            }
        }
    }
    p
}

// ------------------------------------------------------------------ tests

fn shared_keys() -> Arc<Keys> {
    static KEYS: std::sync::OnceLock<Arc<Keys>> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| Arc::new(keys())).clone()
}

#[test]
fn the_reference_homelab_holds_together() {
    let lab = load(&workspace(), shared_keys());
    let found = problems(&lab);
    assert!(
        found.is_empty(),
        "the reference homelab contradicts itself:\n{}",
        found.join("\n")
    );
    // The checks saw what they check.
    assert_eq!(
        lab.hosts.keys().collect::<Vec<_>>(),
        ["indri", "k3s-cp", "k3s-pi", "k3s-x86", "sifaka"]
    );
    let caddyfile = lab.hosts["indri"]
        .file("/opt/homebrew/etc/caddy/Caddyfile")
        .unwrap();
    let sites = caddy_sites(&caddyfile);
    assert_eq!(
        sites.keys().collect::<Vec<_>>(),
        [
            "connect.ops.eblu.me",
            "forge.ops.eblu.me",
            "jellyfin.ops.eblu.me",
            "registry.ops.eblu.me",
            "vod.ops.eblu.me"
        ]
    );
}

/// `caddy validate` on indri's rendered Caddyfile (the certificate from the
/// stand-in vault, paths moved into a temp dir).
#[test]
fn caddy_validates_the_rendered_caddyfile() {
    let lab = load(&workspace(), shared_keys());
    let indri = &lab.hosts["indri"];
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("etc/tls")).unwrap();
    std::fs::create_dir_all(d.join("log")).unwrap();
    for f in ["certificate.pem", "private_key.pem"] {
        let body = indri
            .file(&format!("/opt/homebrew/etc/caddy/tls/{f}"))
            .unwrap();
        std::fs::write(d.join("etc/tls").join(f), body).unwrap();
    }
    let caddyfile = indri
        .file("/opt/homebrew/etc/caddy/Caddyfile")
        .unwrap()
        .replace(
            "/opt/homebrew/etc/caddy",
            &d.join("etc").display().to_string(),
        )
        .replace(
            "/opt/homebrew/var/log/caddy",
            &d.join("log").display().to_string(),
        );
    let file = d.join("Caddyfile");
    std::fs::write(&file, &caddyfile).unwrap();
    let mut cmd = Command::new("caddy");
    cmd.args(["validate", "--adapter", "caddyfile", "--config"])
        .arg(&file);
    caddy_env(&mut cmd, d);
    let out = run_bounded(&mut cmd, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "caddy validate:\n{}\n{caddyfile}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// GinFlix's route with the real servers: the vod site exactly as indri's
/// Caddyfile holds it (its address and upstreams moved to loopback) in front
/// of the streamer's nginx site exactly as the vod stack holds it (`nginx -t`
/// first). `/stream/*` reaches the video (ranges too), the rest the web app.
#[test]
fn ginflix_streams_through_caddy_and_nginx_as_rendered() {
    let lab = load(&workspace(), shared_keys());
    let caddyfile = lab.hosts["indri"]
        .file("/opt/homebrew/etc/caddy/Caddyfile")
        .unwrap();
    let cp = &lab.hosts["k3s-cp"];
    let site = cp
        .objects()
        .find(|(_, o)| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "streamer-site")
        .unwrap()
        .1["data"]["default.conf"]
        .as_str()
        .unwrap()
        .to_string();
    let start = caddyfile.find("\nvod.ops.eblu.me {").expect("the vod site");
    let block = &caddyfile[start + 1..];
    let block = &block[..block.find("\n}\n").unwrap() + 3];

    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let www = d.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let video: Vec<u8> = (0..100_000u32).map(|i| (i * 13 % 251) as u8).collect();
    std::fs::write(www.join("stock.mp4"), &video).unwrap();
    // nginx -t on the streamer site as the stack holds it.
    let (streamer_port, web_port, _nginx) = start_on_reserved_ports("nginx", 2, |ports| {
        let (streamer_port, web_port) = (ports[0], ports[1]);
        let site = site
            .replace(
                "listen 8080;",
                &format!("listen 127.0.0.1:{streamer_port};"),
            )
            .replace("/var/www/html", &www.display().to_string());
        let servers = format!(
            "{site}\nserver {{ listen 127.0.0.1:{web_port}; location / {{ default_type text/plain; return 200 \"ginflix web: $request_uri\\n\"; }} }}"
        );
        nginx(&d.join("nginx"), &servers, ports).map(|n| (streamer_port, web_port, n))
    });
    let conf = std::fs::read_to_string(d.join("nginx/nginx.conf")).unwrap();
    let check = Command::new(if Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    })
    .arg("-t")
    .arg("-c")
    .arg(d.join("nginx/nginx.conf"))
    .arg("-p")
    .arg(d.join("nginx"))
    .arg("-e")
    .arg(d.join("nginx/check.log"))
    .output()
    .unwrap();
    assert!(
        check.status.success(),
        "nginx -t: {}\n{conf}",
        String::from_utf8_lossy(&check.stderr)
    );

    let cp_web = cp
        .objects()
        .find(|(_, o)| o["kind"] == "Service" && o["metadata"]["name"] == "web")
        .unwrap()
        .1
        .clone();
    let cp_streamer = cp
        .objects()
        .find(|(_, o)| o["kind"] == "Service" && o["metadata"]["name"] == "streamer")
        .unwrap()
        .1
        .clone();
    let lb = |svc: &Value| {
        format!(
            "{}:{}",
            svc["metadata"]["annotations"]["metallb.universe.tf/loadBalancerIPs"]
                .as_str()
                .unwrap(),
            svc["spec"]["ports"][0]["port"]
        )
    };
    let block = block
        .lines()
        .filter(|l| !l.trim_start().starts_with("tls "))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("/opt/homebrew/var/log/caddy", &d.display().to_string())
        .replace(&lb(&cp_streamer), &format!("127.0.0.1:{streamer_port}"))
        .replace(&lb(&cp_web), &format!("127.0.0.1:{web_port}"));
    let caddy_dir = d.join("caddy");
    std::fs::create_dir_all(&caddy_dir).unwrap();
    let file = d.join("Caddyfile");
    let (caddy_port, proxy) = start_on_reserved_port("caddy", |caddy_port| {
        let block = block.replacen(
            "vod.ops.eblu.me {",
            &format!("http://127.0.0.1:{caddy_port} {{"),
            1,
        );
        std::fs::write(&file, format!("{{\n\tadmin off\n}}\n{block}\n")).unwrap();
        caddy(&caddy_dir, &file, caddy_port).map(|c| (caddy_port, c))
    });

    let r = http_get(caddy_port, "/stream/stock.mp4", &[]);
    assert_eq!(r.status, 200, "{r:?} {}", proxy.log_text());
    assert_eq!(r.header("Content-Type"), Some("video/mp4"));
    assert!(r.body == video, "the streamer's file under /stream/");
    let r = http_get(caddy_port, "/stream/stock.mp4", &[("Range", "bytes=10-19")]);
    assert_eq!(r.status, 206);
    assert_eq!(r.body, video[10..20]);
    assert_eq!(http_get(caddy_port, "/stream/missing.mp4", &[]).status, 404);
    assert_eq!(
        http_get(caddy_port, "/admin/", &[]).text(),
        "ginflix web: /admin/\n"
    );
    assert_eq!(http_get(caddy_port, "/", &[]).text(), "ginflix web: /\n");
}

/// promtool on the scrape config (the monitoring stack's Secret, as
/// kube-prometheus-stack appends it to scrape_configs).
#[test]
fn promtool_checks_the_agents_scrape_config() {
    let lab = load(&workspace(), shared_keys());
    let scrape = lab.hosts["indri"]
        .objects()
        .find_map(|(_, o)| secret_value(o, "scrape-configs.yaml"))
        .expect("the scrape config Secret");
    let dir = tempfile::tempdir().unwrap();
    let indented: String = scrape.lines().map(|l| format!("  {l}\n")).collect();
    let file = dir.path().join("prometheus.yml");
    std::fs::write(&file, format!("scrape_configs:\n{indented}")).unwrap();
    let out = homelab_agent_tests::prometheus::promtool(
        &["check", "config", file.to_str().unwrap()],
        None,
    );
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        scrape.contains("job_name: homelab-agent"),
        "the alert rules expect this job"
    );
}

/// validate-borgmatic-config on indri's rendered borgmatic config.
#[test]
fn borgmatic_config_validates() {
    let lab = load(&workspace(), shared_keys());
    let (_, conf) = lab.hosts["indri"]
        .file_ending("/borgmatic/config.yaml")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    std::fs::write(&file, conf).unwrap();
    let out = run_bounded(
        Command::new("validate-borgmatic-config")
            .arg("-c")
            .arg(&file),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ------------------------------------------- each listed contradiction, reintroduced

/// The problems of a copy of the repository after `edit` (file, from, to).
fn problems_after(edits: &[(&str, &str, &str)]) -> Vec<String> {
    let tmp = tempfile::tempdir().unwrap();
    for dir in ["hosts", "modules", "k8s", "agents", "dashboards"] {
        copy_dir(&workspace().join(dir), &tmp.path().join(dir));
    }
    std::fs::copy(workspace().join("README.md"), tmp.path().join("README.md")).unwrap();
    for (file, from, to) in edits {
        let path = tmp.path().join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{file} has no {from:?}");
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
    }
    problems(&load(tmp.path(), shared_keys()))
}

fn assert_found(found: &[String], needle: &str) {
    assert!(
        found.iter().any(|p| p.contains(needle)),
        "expected a problem containing {needle:?}, found:\n{}",
        found.join("\n")
    );
}

#[test]
fn k3s_without_cilium_or_metallb_charts_is_found() {
    let found = problems_after(&[(
        "modules/k3s/module.yaml",
        "  - file: /var/lib/rancher/k3s/server/manifests/cilium.yaml\n    template: cilium.yaml.j2\n    mode: \"0600\"\n    owner: root\n    group: root\n    when: params.role == \"server\"\n",
        "",
    )]);
    assert_found(
        &found,
        "no HelmChart in the auto-deploy folder installs Cilium",
    );
    let found = problems_after(&[(
        "modules/k3s/module.yaml",
        "  - file: /var/lib/rancher/k3s/server/manifests/metallb.yaml\n    template: metallb.yaml.j2\n    mode: \"0600\"\n    owner: root\n    group: root\n    when: params.role == \"server\"\n",
        "",
    )]);
    assert_found(&found, "which no HelmChart installs");
}

#[test]
fn a_documentation_ipv6_prefix_in_a_pool_is_found() {
    let found = problems_after(&[(
        "k8s/metallb/pools.yaml",
        "    - \"{{ vars.metallb_public_range }}\"\n",
        "    - \"{{ vars.metallb_public_range }}\"\n    - 2001:db8:1:2::/120\n",
    )]);
    assert_found(&found, "2001:db8:1:2::/120: not IPv4");
}

#[test]
fn an_unrouted_name_and_a_missing_listener_are_found() {
    let found = problems_after(&[(
        "hosts/indri.yaml",
        "        - {address: forge.ops.eblu.me, upstreams: [\"127.0.0.1:3001\"]}\n",
        "",
    )]);
    assert_found(&found, "forge.ops.eblu.me (used in");
    let found = problems_after(&[(
        "hosts/indri.yaml",
        "      http_port: 3001",
        "      http_port: 3000",
    )]);
    assert_found(
        &found,
        "forge.ops.eblu.me: Caddy proxies to 127.0.0.1:3001, where nothing listens",
    );
}

#[test]
fn forgejo_ssh_advertised_on_another_port_is_found() {
    let found = problems_after(&[(
        "hosts/indri.yaml",
        "      ssh_listen_port: 2222",
        "      ssh_listen_port: 2200",
    )]);
    assert_found(
        &found,
        "Forgejo advertises SSH on Some(\"2222\") but listens on Some(\"2200\")",
    );
}

#[test]
fn ginflix_contradictions_are_found() {
    // An address no Service owns, outside the pool.
    let found = problems_after(&[(
        "hosts/indri.yaml",
        "upstreams: [\"192.168.1.200:8000\"]",
        "upstreams: [\"192.168.1.240:8000\"]",
    )]);
    assert_found(
        &found,
        "Caddy proxies to 192.168.1.240:8000, where nothing listens",
    );
    let found = problems_after(&[(
        "hosts/k3s-cp.yaml",
        "ginflix_web_address: 192.168.1.200",
        "ginflix_web_address: 192.168.1.240",
    )]);
    assert_found(&found, "use 192.168.1.240, outside every MetalLB pool");
    // /stream/ stripped although the streamers serve under it.
    let found = problems_after(&[(
        "hosts/indri.yaml",
        "{path: \"/stream/*\", upstreams:",
        "{path: \"/stream/*\", strip: true, upstreams:",
    )]);
    assert_found(
        &found,
        "Caddy strips /stream/ but the streamers serve under location /stream/",
    );
    // On indri's minikube, which has no MetalLB.
    let found = problems_after(&[(
        "hosts/k3s-cp.yaml",
        "  - name: vod\n    context: default\n",
        "  - name: vod\n    context: minikube\n",
    )]);
    assert_found(&found, "GinFlix runs in k3s-cp's minikube");
    // Caddy on Linux without the capability to bind 80/443.
    let found = problems_after(&[(
        "modules/caddy/module.yaml",
        "      AmbientCapabilities: CAP_NET_BIND_SERVICE\n      CapabilityBoundingSet: CAP_NET_BIND_SERVICE\n",
        "      LimitNOFILE: \"1048576\"\n",
    ), (
        "hosts/k3s-x86.yaml",
        "stacks: []",
        "  - name: caddy\n    params:\n      sites: [{address: registry.ops.eblu.me, upstreams: [\"127.0.0.1:5050\"]}]\nstacks: []",
    ), ("hosts/k3s-x86.yaml", "  - /etc/rancher/k3s\n", "  - /etc/rancher/k3s\n  - /etc/caddy\n  - /var/log/caddy\n")]);
    assert_found(&found, "k3s-x86 runs a second Caddy for *.ops.eblu.me");
}

#[test]
fn caddy_without_the_bind_capability_is_found() {
    let found = problems_after(&[
        (
            "modules/caddy/module.yaml",
            "      AmbientCapabilities: CAP_NET_BIND_SERVICE\n      CapabilityBoundingSet: CAP_NET_BIND_SERVICE\n",
            "      LimitNOFILE: \"1048576\"\n",
        ),
        (
            "hosts/k3s-x86.yaml",
            "stacks: []",
            "  - name: caddy\n    params:\n      sites: [{address: \"http://ginflix.home.arpa\", upstreams: [\"192.168.1.200:8000\"]}]\nstacks: []",
        ),
        ("hosts/k3s-x86.yaml", "  - /etc/rancher/k3s\n", "  - /etc/rancher/k3s\n  - /etc/caddy\n  - /var/log/caddy\n"),
    ]);
    assert_found(
        &found,
        "k3s-x86: caddy runs as Some(\"caddy\") without CAP_NET_BIND_SERVICE",
    );
}

#[test]
fn backup_contradictions_are_found() {
    let found = problems_after(&[(
        "hosts/sifaka.yaml",
        "databases: [vlog, miniflux]",
        "databases: [vlog, ginflix, miniflux]",
    )]);
    assert_found(&found, "the database ginflix is dumped 2 times");
    let found = problems_after(&[(
        "k8s/vod/backup-cronjob.yaml",
        "pg_dump -Fc -f \"$file.partial\"",
        "true",
    )]);
    assert_found(&found, "the database ginflix is never backed up");
    let found = problems_after(&[(
        "k8s/vod/backup-cronjob.yaml",
        "path: /volume1/backups/postgres",
        "path: /volume1/backups/vlog",
    )]);
    assert_found(&found, "database dumps go to several folders");
    // borgmatic's key never deployed.
    let found = problems_after(&[(
        "modules/borgmatic/module.yaml",
        "    when: params.ssh_key != \"\"\n",
        "    when: \"false\"\n",
    )]);
    assert_found(
        &found,
        "borgmatic's SSH key /Users/erichblume/.config/borgmatic/sifaka_ed25519 is never deployed",
    );
    // sifaka authorises another key.
    let found = problems_after(&[("hosts/sifaka.yaml", "public_key_ref: op://homelab/borgmatic/ssh_public_key", "public_key: \"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJcshf3XGVVwE+KKgqg0UbM/tNrFlx0loizXyL1QEIDN borgmatic@indri\"")]);
    assert_found(&found, "no NAS authorises indri's borgmatic key");
}

#[test]
fn undeclared_platform_pieces_are_found() {
    // zot on every interface with auth off.
    let found = problems_after(&[
        (
            "hosts/indri.yaml",
            "      address: 127.0.0.1\n      port: 5050",
            "      address: 0.0.0.0\n      port: 5050",
        ),
        (
            "hosts/indri.yaml",
            "      auth_enabled: true",
            "      auth_enabled: false",
        ),
    ]);
    assert_found(&found, "zot listens on \"0.0.0.0\"");
    assert_found(&found, "zot runs with auth off");
    // An agent Prometheus does not scrape.
    let found = problems_after(&[(
        "k8s/monitoring/scrape-agents.yaml",
        "            - 192.168.1.22:9464   # k3s-pi\n",
        "",
    )]);
    assert_found(&found, "Prometheus scrapes");
    // A host without its agent config.
    let tmp_edit = problems_after(&[("agents/k3s-pi.yaml", "host: k3s-pi", "host: k3s-pie")]);
    assert_found(&tmp_edit, "agents/k3s-pi.yaml names host Some(\"k3s-pie\")");
    // A secret the vault does not hold.
    let found = problems_after(&[(
        "hosts/indri.yaml",
        "op://homelab/ops-eblu-me-tls/private_key",
        "op://homelab/ops-eblu-me-tls/key",
    )]);
    assert_found(&found, "is skipped: ");
    // A node pulling past the mirror.
    let found = problems_after(&[(
        "hosts/k3s-pi.yaml",
        "      registry_mirror: registry.ops.eblu.me\n",
        "",
    )]);
    assert_found(
        &found,
        "k3s-pi: containerd does not pull through the zot mirror",
    );
    // A join URL on another port.
    let found = problems_after(&[(
        "hosts/k3s-pi.yaml",
        "https://192.168.1.20:6443",
        "https://192.168.1.20:6444",
    )]);
    assert_found(&found, "k3s-pi: joins https://192.168.1.20:6444");
}

#[test]
fn the_smaller_contradictions_are_found() {
    // A pool range in a comment that differs from the real pool.
    let found = problems_after(&[(
        "hosts/k3s-x86.yaml",
        "# Caddy on indri.",
        "# Caddy on indri, at MetalLB's 192.168.1.240-250.",
    )]);
    assert_found(
        &found,
        "mentions the range 192.168.1.240-250, which is no MetalLB pool",
    );
    // The Worker API URL names a host while the policy allows an address.
    let found = problems_after(&[(
        "k8s/vlog-workers/configmap.yaml",
        "\"http://{{ vars.vlog_api_address }}:9002\"",
        "\"http://vlog.ops.eblu.me:9002\"",
    )]);
    assert_found(
        &found,
        "VLOG_WORKER_API_URL names the host vlog.ops.eblu.me",
    );
    // Redis egress open although the workers are never told of Redis.
    let found = problems_after(&[(
        "k8s/vlog-workers/networkpolicy.yaml",
        "      ports:\n        - protocol: TCP\n          port: 9002\n",
        "      ports:\n        - protocol: TCP\n          port: 9002\n    - to:\n        - ipBlock:\n            cidr: 192.168.1.30/32\n      ports:\n        - protocol: TCP\n          port: 6379\n",
    )]);
    assert_found(
        &found,
        "opens 192.168.1.30/32 port 6379, which their config never names",
    );
}
