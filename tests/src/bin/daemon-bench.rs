//! Benchmark of the daemon (`agent run`) against a real git smart-HTTP
//! server on loopback. Run:
//!
//! ```sh
//! cargo run --release -p homelab-agent-tests --bin daemon-bench -- [ROUNDS]
//! ```
//!
//! Reports medians (ROUNDS, default 20) of
//! - push-to-converged: `git push` of a one-file change, then the webhook
//!   Forgejo sends, until the managed file has the new content;
//! - drift-to-healed: a hand edit of a managed file until it is restored;
//! - the idle footprint: RSS after start-up and wake-ups (context switches
//!   of all threads) over 10 s with no triggers.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use homelab_agent_tests::agent;
use homelab_agent_tests::git_server::{
    forgejo_push, http_get, http_post, new_uuid, GitServer, WorkClone,
};

const SECRET: &str = "bench-webhook-secret-of-32-bytes-or-more";

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn wait_for(path: &Path, want: &str) -> Instant {
    let limit = Instant::now() + Duration::from_secs(20);
    loop {
        if std::fs::read_to_string(path).ok().as_deref() == Some(want) {
            return Instant::now();
        }
        assert!(
            Instant::now() < limit,
            "{} never became {want:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn proc_field(pid: u32, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Context switches per thread (voluntary + involuntary).
fn context_switches(pid: u32) -> std::collections::HashMap<String, u64> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Default::default();
    };
    tasks
        .flatten()
        .map(|t| {
            let tid = t.file_name().to_string_lossy().into_owned();
            let n = proc_field(
                pid,
                &format!("task/{tid}/status"),
                "voluntary_ctxt_switches:",
            ) + proc_field(
                pid,
                &format!("task/{tid}/status"),
                "nonvoluntary_ctxt_switches:",
            );
            (tid, n)
        })
        .collect()
}

/// Wake-ups between two snapshots: growth of surviving threads, all of a
/// new thread's, and one for each thread that exited.
fn wakeups(
    before: &std::collections::HashMap<String, u64>,
    after: &std::collections::HashMap<String, u64>,
) -> u64 {
    let grown: u64 = after
        .iter()
        .map(|(tid, n)| n - before.get(tid).copied().unwrap_or(0).min(*n))
        .sum();
    let exited = before
        .keys()
        .filter(|tid| !after.contains_key(*tid))
        .count() as u64;
    grown + exited
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    let tmp = tempfile::tempdir().unwrap();
    let server = GitServer::start();
    server.create_repo("lab", "homelab");
    let clone = WorkClone::clone_from(&server, "lab", "homelab", &tmp.path().join("work"));
    let host = |port: usize| {
        format!("platform: linux\nroots: [/srv]\nmodules:\n  - name: app\n    params: {{port: {port}}}\n")
    };
    clone.write("hosts/lab.yaml", &host(0));
    clone.write(
        "modules/app/module.yaml",
        "params:\n  port: {type: int, required: true}\nresources:\n  - file: /srv/app/app.conf\n    content: \"port = {{ params.port }}\\n\"\n",
    );
    clone.commit("initial");
    clone.push("main");
    let token = server.write_token_file(tmp.path());
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let listen = format!(
        "127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    );
    let root = tmp.path().join("root");
    let config = tmp.path().join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "repo: {}\ntoken_file: {}\nhost: lab\npoll_interval: 1h\nwebhook_secret_file: {}\nlisten: {listen}\nroot: {}\n",
            server.url("lab", "homelab"),
            token.display(),
            secret.display(),
            root.display()
        ),
    )
    .unwrap();
    let mut daemon = agent()
        .args(["run", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let conf = root.join("srv/app/app.conf");
    wait_for(&conf, "port = 0\n");
    std::thread::sleep(Duration::from_millis(500));
    let pid = daemon.id();

    // Idle footprint.
    let rss_kb = proc_field(pid, "status", "VmRSS:");
    let anon_kb = proc_field(pid, "status", "RssAnon:");
    let file_kb = proc_field(pid, "status", "RssFile:");
    let switches_before = context_switches(pid);
    std::thread::sleep(Duration::from_secs(10));
    let idle_switches = wakeups(&switches_before, &context_switches(pid));

    // Push to converged.
    let mut push = Vec::new();
    for i in 1..=rounds {
        let before = clone.head();
        clone.write("hosts/lab.yaml", &host(i));
        clone.commit(&format!("port {i}"));
        let start = Instant::now();
        clone.push("main");
        let (body, headers) = forgejo_push(
            SECRET.as_bytes(),
            "refs/heads/main",
            &before,
            &clone.head(),
            &server.url("lab", "homelab"),
            &new_uuid(),
        );
        let (code, reply) = http_post(&listen, "/hooks/forgejo", &headers, &body);
        assert_eq!(code, 202, "{reply}");
        push.push(wait_for(&conf, &format!("port = {i}\n")) - start);
        // Let the run finish before the next round.
        while http_get(&listen, "/api/status")
            .1
            .contains("\"running\":true")
        {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let want = format!("port = {rounds}\n");
    // Drift to healed.
    let mut heal = Vec::new();
    for _ in 0..rounds {
        std::thread::sleep(Duration::from_millis(100));
        let start = Instant::now();
        std::fs::write(&conf, "edited by hand\n").unwrap();
        heal.push(wait_for(&conf, &want) - start);
    }
    let peak_kb = proc_field(pid, "status", "VmHWM:");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = daemon.wait();

    println!("| measure ({rounds} rounds) | median | target |");
    println!("|---|---:|---:|");
    println!(
        "| push-to-converged (git push + webhook + fetch + apply) | {:.1} ms | ≤ 300 ms |",
        median(push).as_secs_f64() * 1e3
    );
    println!(
        "| drift-to-healed (hand edit → restored) | {:.1} ms | ≤ 100 ms |",
        median(heal).as_secs_f64() * 1e3
    );
    println!(
        "| idle RSS after start-up | {:.1} MB ({:.1} MB heap and stacks, {:.1} MB mapped code) | ≤ 15 MB |",
        rss_kb as f64 / 1024.0,
        anon_kb as f64 / 1024.0,
        file_kb as f64 / 1024.0
    );
    println!(
        "| peak RSS over the whole benchmark | {:.1} MB | |",
        peak_kb as f64 / 1024.0
    );
    println!("| wake-ups in 10 s idle (context switches, all threads) | {idle_switches} | ~0 (poll timer only) |");
}
