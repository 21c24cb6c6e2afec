//! `agent run` end to end against a real git smart-HTTP server (lighttpd +
//! git-http-backend, basic auth) on loopback: push + Forgejo webhook →
//! converged; bad, foreign-branch, replayed and bursty webhooks; the server
//! going away; invalid commits; signed commits; hand edits healed by the file
//! watcher; SIGTERM; `plan --rev`; and hostile revisions and clients (issue
//! 12): a commit that crashed the agent, a template that hung it, SIGTERM
//! mid-render, slowloris clients, weak webhook secrets.

mod json_doc;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use homelab_agent_tests::connect_standin::ConnectStandIn;
use homelab_agent_tests::git_server::{
    forgejo_push, generate_ssh_key, http_get, http_post, http_request, new_uuid, GitServer,
    WorkClone,
};
use homelab_agent_tests::local_daemon::{first_run, probe_ready, wait_for_file, Daemon, LocalLab};
use homelab_agent_tests::{agent, ports, stderr, stdout};

/// At least 32 bytes: shorter webhook secrets are refused (see config::MIN_SHARED_SECRET_BYTES).
const SECRET: &str = "webhook-secret-for-tests-0123456789";
const ZERO: &str = "0000000000000000000000000000000000000000";

fn host_yaml(port: u16, extra_module: bool) -> String {
    let mut s = format!("platform: linux\nroots: [/srv]\nmodules:\n  - name: app\n    params:\n      port: {port}\n");
    if extra_module {
        s.push_str("  - name: extra\n");
    }
    s
}

const APP: &str = r#"params:
  port: {type: int, required: true}
resources:
  - directory: /srv/app
  - file: /srv/app/app.conf
    content: "port = {{ params.port }}\n"
    mode: "0640"
  - file: /srv/app/notes.txt
    content: "hands off\n"
    on_drift: report
"#;

const EXTRA: &str = "resources:\n  - file: /srv/extra.txt\n    content: \"extra\\n\"\n";

/// A lab: git server with `lab/homelab.git`, a work clone, and the
/// suite's [`homelab_agent_tests::Lab`] (sandbox root, agent config).
struct Lab {
    lab: homelab_agent_tests::Lab,
    server: GitServer,
    clone: WorkClone,
    listen: Mutex<String>,
}

impl std::ops::Deref for Lab {
    type Target = homelab_agent_tests::Lab;
    fn deref(&self) -> &homelab_agent_tests::Lab {
        &self.lab
    }
}

impl Lab {
    fn new() -> Lab {
        let lab = homelab_agent_tests::Lab::empty();
        let server = GitServer::start();
        server.create_repo("lab", "homelab");
        let clone = WorkClone::clone_from(&server, "lab", "homelab", &lab.tmp.path().join("work"));
        clone.write("hosts/lab.yaml", &host_yaml(8080, true));
        clone.write("modules/app/module.yaml", APP);
        clone.write("modules/extra/module.yaml", EXTRA);
        clone.commit("initial homelab");
        clone.push("main");
        let lab = Lab {
            lab,
            server,
            clone,
            listen: Mutex::new(format!("127.0.0.1:{}", ports::reserve())),
        };
        lab.write_config("1h", None);
        lab
    }

    /// The daemon's address (another after a start found the first taken).
    fn listen(&self) -> String {
        self.listen.lock().unwrap().clone()
    }

    fn write_config(&self, poll: &str, allowed_signers: Option<&Path>) {
        self.write_config_with(poll, allowed_signers, "");
    }

    /// [`Lab::write_config`] with `extra` lines appended.
    fn write_config_with(&self, poll: &str, allowed_signers: Option<&Path>, extra: &str) {
        let token = self.server.write_token_file(self.tmp.path());
        let secret = self.write_private("webhook-secret", SECRET);
        let verify = allowed_signers
            .map(|p| format!("verify:\n  allowed_signers: {}\n", p.display()))
            .unwrap_or_default();
        std::fs::write(
            self.config(),
            format!(
                "repo: {}\nref: main\ntoken_file: {}\nhost: lab\npoll_interval: {poll}\nwebhook_secret_file: {}\nlisten: {}\nroot: {}\n{verify}{extra}",
                self.server.url("lab", "homelab"),
                token.display(),
                secret.display(),
                self.listen(),
                self.root().display(),
            ),
        )
        .unwrap();
    }

    fn start(&self) -> Daemon {
        self.start_with(agent)
    }

    /// Starts `command()` (the agent, or a wrapper that execs it) as
    /// `agent run`, and waits for its first run.
    fn start_with(&self, command: impl Fn() -> std::process::Command) -> Daemon {
        self.start_until(command, first_run)
    }

    fn start_until(
        &self,
        command: impl Fn() -> std::process::Command,
        ready: impl Fn(&str) -> bool,
    ) -> Daemon {
        let d = Daemon::start(
            command,
            &self.config(),
            &self.tmp.path().join("daemon.log"),
            &[("RUST_LOG", "info")],
            ready,
        );
        *self.listen.lock().unwrap() = d.listen.clone();
        d
    }

    /// Pushes and sends the webhook Forgejo would send; returns the HTTP status.
    fn push_and_notify(&self, before: &str) -> (u16, String) {
        self.clone.push("main");
        self.webhook(
            "refs/heads/main",
            before,
            &self.clone.head(),
            &new_uuid(),
            SECRET,
        )
    }

    fn webhook(
        &self,
        git_ref: &str,
        before: &str,
        after: &str,
        delivery: &str,
        secret: &str,
    ) -> (u16, String) {
        let (body, headers) = forgejo_push(
            secret.as_bytes(),
            git_ref,
            before,
            after,
            &self.server.url("lab", "homelab"),
            delivery,
        );
        http_post(&self.listen(), "/hooks/forgejo", &headers, &body)
    }

    /// What started each recorded run (`webhook`, `watch`, `webhook+signal`, ...).
    fn run_triggers(&self) -> Vec<String> {
        let out = agent()
            .args([
                "status",
                "--config",
                self.config().to_str().unwrap(),
                "--json",
                "--runs",
                "200",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["trigger"].as_str().unwrap().to_string())
            .collect()
    }

    /// How many recorded runs `trigger` started (alone or in a batch).
    fn runs_by(&self, trigger: &str) -> usize {
        self.run_triggers()
            .iter()
            .filter(|t| t.split('+').any(|t| t == trigger))
            .count()
    }

    /// A barrier for "nothing more happens" checks: SIGHUP queues a run
    /// (`signal`), and this waits until that run is recorded and over. The
    /// trigger queue hands out everything pending at once, so every trigger
    /// queued before the signal has then run (before it or in its batch).
    fn barrier(&self, daemon: &Daemon) {
        let signals = self.runs_by("signal");
        let reloads = daemon.log_count("SIGHUP: configuration reloaded");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(daemon.child.id() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap();
        daemon.wait_for_log(
            "SIGHUP: configuration reloaded",
            reloads + 1,
            Duration::from_secs(30),
        );
        let start = Instant::now();
        while self.runs_by("signal") <= signals || daemon.status()["running"] == true {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the SIGHUP run was never recorded; daemon log:\n{}",
                daemon.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The peak resident memory of a process (`VmHWM`), for the log of
/// hostile-input measurements.
fn peak_rss(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .map(|l| l.trim_start_matches("VmHWM:").trim().to_string())
        .unwrap_or_default()
}

#[test]
fn push_and_webhook_converge_the_host() {
    let lab = Lab::new();
    let daemon = lab.start();
    let conf = lab.host_path("/srv/app/app.conf");
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "port = 8080\n");
    let first = daemon.status();
    assert_eq!(first["applied_revision"], first["fetched_revision"]);

    let before = lab.clone.head();
    lab.clone.write("hosts/lab.yaml", &host_yaml(9090, true));
    lab.clone.commit("app: move to 9090");
    let start = Instant::now();
    let (code, body) = lab.push_and_notify(&before);
    assert_eq!(code, 202, "{body}");
    wait_for_file(&conf, "port = 9090\n", Duration::from_secs(10));
    eprintln!(
        "push-to-converged latency (push + webhook + fetch + apply): {:?}",
        start.elapsed()
    );
    let status = daemon.wait_until("the webhook run", Duration::from_secs(10), |s| {
        s["applied_revision"] == lab.clone.head()
    });
    assert_eq!(status["fetched_revision"], lab.clone.head());
    assert!(daemon.terminate().success());
}

#[test]
fn webhooks_that_must_not_trigger_runs_do_not() {
    let lab = Lab::new();
    let daemon = lab.start();
    let head = lab.clone.head();
    // Bad signature.
    let (code, _) = lab.webhook(
        "refs/heads/main",
        ZERO,
        &head,
        &new_uuid(),
        "not-the-secret",
    );
    assert_eq!(code, 401);
    // Another branch.
    let (code, body) = lab.webhook("refs/heads/feature", ZERO, &head, &new_uuid(), SECRET);
    assert_eq!(code, 200, "{body}");
    daemon.wait_for_log("webhook: push to another ref", 1, Duration::from_secs(10));
    lab.barrier(&daemon);
    assert_eq!(lab.runs_by("webhook"), 0, "a refused webhook started a run");
    // A replayed delivery id.
    let id = new_uuid();
    assert_eq!(
        lab.webhook("refs/heads/main", ZERO, &head, &id, SECRET).0,
        202
    );
    daemon.wait_until("the accepted run", Duration::from_secs(30), |_| {
        lab.runs_by("webhook") == 1
    });
    assert_eq!(
        lab.webhook("refs/heads/main", ZERO, &head, &id, SECRET).0,
        200
    );
    daemon.wait_for_log("webhook: delivery seen before", 1, Duration::from_secs(10));
    lab.barrier(&daemon);
    assert_eq!(
        lab.runs_by("webhook"),
        1,
        "a replayed delivery triggers nothing"
    );

    // 20 valid webhooks in a burst: at most 2 runs.
    let queued = daemon.log_count("webhook: run queued");
    for _ in 0..20 {
        assert_eq!(
            lab.webhook("refs/heads/main", ZERO, &head, &new_uuid(), SECRET)
                .0,
            202
        );
    }
    daemon.wait_for_log("webhook: run queued", queued + 20, Duration::from_secs(10));
    lab.barrier(&daemon);
    let burst = lab.runs_by("webhook") - 1;
    assert!((1..=2).contains(&burst), "20 webhooks gave {burst} runs");
}

#[test]
fn server_down_keeps_the_last_good_revision_and_recovers() {
    let mut lab = Lab::new();
    lab.write_config("1s", None);
    let daemon = lab.start();
    let good = lab.clone.head();
    assert!(lab.host_path("/srv/extra.txt").exists());
    // Next commit would prune extra; the server goes away before anyone fetches it.
    lab.clone.write("hosts/lab.yaml", &host_yaml(8080, false));
    lab.clone.commit("drop extra");
    lab.clone.push("main");
    lab.server.stop();
    let status = daemon.wait_until("a failed fetch", Duration::from_secs(20), |s| {
        s["refused"]["stage"] == "fetch"
    });
    assert_eq!(status["last_good_revision"], good);
    assert!(
        lab.host_path("/srv/extra.txt").exists(),
        "no deletions while the source is down"
    );
    let (code, why) = http_get(&lab.listen(), "/readyz");
    assert_eq!(code, 503);
    assert!(why.contains("fetch"), "{why}");
    lab.server.restart();
    daemon.wait_until("the recovery", Duration::from_secs(30), |s| {
        s["refused"].is_null() && s["applied_revision"] == lab.clone.head()
    });
    assert!(
        !lab.host_path("/srv/extra.txt").exists(),
        "the new revision applied once reachable"
    );
    assert_eq!(http_get(&lab.listen(), "/readyz").0, 200);
}

#[test]
fn an_invalid_commit_is_refused_and_the_next_good_one_applies() {
    let lab = Lab::new();
    let daemon = lab.start();
    let good = lab.clone.head();
    let before = good.clone();
    lab.clone.write(
        "modules/app/module.yaml",
        &APP.replace("mode: \"0640\"", "mdoe: \"0640\""),
    );
    lab.clone.commit("typo");
    assert_eq!(lab.push_and_notify(&before).0, 202);
    let status = daemon.wait_until("the refusal", Duration::from_secs(10), |s| {
        s["refused"]["stage"] == "validate"
    });
    let error = status["refused"]["error"].as_str().unwrap();
    assert!(error.contains("modules/app/module.yaml:7"), "{error}");
    assert!(error.contains("unknown key `mdoe`"), "{error}");
    assert_eq!(
        status["applied_revision"], good,
        "stays on the last good revision"
    );
    let out = agent()
        .args(["status", "--config", lab.config().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        stdout(&out).contains("modules/app/module.yaml:7"),
        "{}",
        stdout(&out)
    );

    let before = lab.clone.head();
    lab.clone.write("modules/app/module.yaml", APP);
    lab.clone.write("hosts/lab.yaml", &host_yaml(7070, true));
    lab.clone.commit("fix typo, move to 7070");
    assert_eq!(lab.push_and_notify(&before).0, 202);
    daemon.wait_until("the fix", Duration::from_secs(10), |s| {
        s["refused"].is_null() && s["applied_revision"] == lab.clone.head()
    });
    assert_eq!(
        std::fs::read_to_string(lab.host_path("/srv/app/app.conf")).unwrap(),
        "port = 7070\n"
    );
}

#[test]
fn only_commits_signed_by_an_allowed_key_apply() {
    let lab = Lab::new();
    let keys = lab.tmp.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let trusted = generate_ssh_key(&keys, "trusted");
    let stranger = generate_ssh_key(&keys, "stranger");
    let pubkey = std::fs::read_to_string(trusted.with_extension("pub")).unwrap();
    let signers = keys.join("allowed_signers");
    std::fs::write(
        &signers,
        format!("ops@homelab.test namespaces=\"git\" {pubkey}"),
    )
    .unwrap();
    lab.write_config("1h", Some(&signers));
    // The initial commit is unsigned: refused, nothing applied.
    let daemon = lab.start();
    let status = daemon.status();
    assert_eq!(status["refused"]["stage"], "signature", "{status:#}");
    assert!(!lab.host_path("/srv/app/app.conf").exists());

    let before = lab.clone.head();
    lab.clone.write("hosts/lab.yaml", &host_yaml(6060, true));
    lab.clone
        .commit_signed("signed by the trusted key", &trusted);
    assert_eq!(lab.push_and_notify(&before).0, 202);
    daemon.wait_until("the trusted commit", Duration::from_secs(10), |s| {
        s["refused"].is_null() && s["applied_revision"] == lab.clone.head()
    });
    assert_eq!(
        std::fs::read_to_string(lab.host_path("/srv/app/app.conf")).unwrap(),
        "port = 6060\n"
    );

    let good = lab.clone.head();
    lab.clone.write("hosts/lab.yaml", &host_yaml(5050, true));
    lab.clone.commit_signed("signed by a stranger", &stranger);
    assert_eq!(lab.push_and_notify(&good).0, 202);
    let status = daemon.wait_until("the untrusted commit", Duration::from_secs(10), |s| {
        s["refused"]["stage"] == "signature"
    });
    assert_eq!(status["applied_revision"], good);
    assert_eq!(
        std::fs::read_to_string(lab.host_path("/srv/app/app.conf")).unwrap(),
        "port = 6060\n"
    );
}

#[test]
fn hand_edits_are_healed_or_only_reported() {
    let lab = Lab::new();
    let daemon = lab.start();
    let conf = lab.host_path("/srv/app/app.conf");
    let queued_for_conf = || {
        daemon
            .log_text()
            .lines()
            .filter(|l| l.contains("change on disk; queueing a run") && l.contains("app.conf"))
            .count()
    };
    // The edit is one event: written beside, renamed over (as editors do).
    let edited = lab.host_path("/srv/app/.app.conf.edit");
    std::fs::write(&edited, "port = 1\n").unwrap();
    std::fs::rename(&edited, &conf).unwrap();
    wait_for_file(&conf, "port = 8080\n", Duration::from_secs(30));
    daemon.wait_until("the heal run", Duration::from_secs(30), |_| true);

    // on_drift: report: seen and recorded, left alone. Its file sits in the
    // same watched directory, so once its event is handled, the watcher has
    // handled every earlier one (the agent's own write's among them).
    let notes = lab.host_path("/srv/app/notes.txt");
    std::fs::write(&notes, "my notes\n").unwrap();
    daemon.wait_until("the report run", Duration::from_secs(30), |s| {
        s["counts"]["drift_reported"] == 1
    });
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "my notes\n");
    // The rename is seen once or twice (notify reports its target and the
    // pair; the second may come after the heal, when nothing differs); the
    // agent's own write queues nothing more.
    assert!(
        (1..=2).contains(&queued_for_conf()),
        "the agent's own write queued a run; daemon log:\n{}",
        daemon.log_text()
    );
}

#[test]
fn sigterm_exits_zero_with_state_consistent_with_disk() {
    let lab = Lab::new();
    let daemon = lab.start();
    // A big change so SIGTERM lands during a run.
    let before = lab.clone.head();
    let mut module = String::from("resources:\n");
    for i in 0..3000 {
        module.push_str(&format!(
            "  - file: /srv/bulk/f{i:04}\n    content: \"{i}\\n\"\n"
        ));
    }
    lab.clone.write("modules/extra/module.yaml", &module);
    lab.clone.commit("bulk");
    assert_eq!(lab.push_and_notify(&before).0, 202);
    // SIGTERM once the run writes the bulk files (the event, on disk).
    let bulk = lab.host_path("/srv/bulk");
    let start = Instant::now();
    while std::fs::read_dir(&bulk).map_or(true, |mut d| d.next().is_none()) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the bulk run never started writing; daemon log:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let log = daemon.log.clone();
    let status = daemon.terminate();
    assert!(status.success(), "exit status {status:?}");
    // The signal landed during that run: the daemon said it would finish
    // the current resource (not "stopping", which it says when idle).
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("SIGTERM: finishing the current resource"),
        "{text}"
    );
    // The next plan agrees with what the state says: what was applied is in
    // sync, the rest is still to do, nothing is drift.
    let root = lab.root();
    let config = lab.config();
    let out = agent()
        .args([
            "plan",
            "--config",
            config.to_str().unwrap(),
            "--root",
            root.to_str().unwrap(),
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["summary"]["drift"], 0, "{}", plan["summary"]);
    assert_eq!(plan["summary"]["errors"], 0);
}

#[test]
fn plan_an_older_revision_without_a_work_tree() {
    let lab = Lab::new();
    let first = lab.clone.head();
    lab.clone.write("hosts/lab.yaml", &host_yaml(9999, true));
    let second = lab.clone.commit("newer");
    lab.clone.push("main");
    let root = lab.root();
    let config = lab.config();
    let run_plan = |rev: Option<&str>| {
        let mut args = vec![
            "plan",
            "--config",
            config.to_str().unwrap(),
            "--root",
            root.to_str().unwrap(),
        ];
        if let Some(rev) = rev {
            args.extend(["--rev", rev]);
        }
        let out = agent().args(&args).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    let newest = run_plan(None);
    assert!(
        newest.contains(&format!("at revision {second}")),
        "{newest}"
    );
    assert!(newest.contains("+port = 9999"), "{newest}");
    let older = run_plan(Some(&first));
    assert!(older.contains(&format!("at revision {first}")), "{older}");
    assert!(older.contains("+port = 8080"), "{older}");
    // Relative revisions need history: a local repository has it.
    let out = agent()
        .args([
            "plan",
            "--repo",
            lab.clone.dir.to_str().unwrap(),
            "--rev",
            "HEAD~1",
            "--host",
            "lab",
            "--root",
            root.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("at revision {first}")),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("+port = 8080"), "{}", stdout(&out));
    // No work tree anywhere in the state directory's cache.
    let cache = root.join("var/lib/homelab-agent/git");
    for entry in walk(&cache) {
        assert!(
            !entry.ends_with("hosts/lab.yaml"),
            "a work tree was checked out: {}",
            entry.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn sighup_reloads_a_good_config_and_refuses_a_bad_one() {
    let lab = Lab::new();
    let daemon = lab.start();
    let pid = nix::unistd::Pid::from_raw(daemon.child.id() as i32);
    let good = std::fs::read_to_string(lab.config()).unwrap();
    // A bad config: refused, the old one (and its webhook secret) kept.
    std::fs::write(lab.config(), format!("{good}bogus_key: 1\n")).unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let log = daemon.wait_for_log("new configuration refused", 1, Duration::from_secs(30));
    let head = lab.clone.head();
    assert_eq!(
        lab.webhook("refs/heads/main", ZERO, &head, &new_uuid(), SECRET)
            .0,
        202,
        "old secret still valid"
    );
    assert!(log.contains("unknown key `bogus_key`"), "{log}");
    // Another state directory: refused too (the lock and the control socket
    // stay where the daemon started), and the controls still answer.
    std::fs::write(
        lab.config(),
        format!(
            "{good}state_dir: {}\n",
            lab.tmp.path().join("elsewhere").display()
        ),
    )
    .unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let log = daemon.wait_for_log("new configuration refused", 2, Duration::from_secs(30));
    assert!(log.contains("the state directory would move from"), "{log}");
    std::fs::write(lab.config(), &good).unwrap();
    let out = agent()
        .args(["reconcile", "--no-wait", "--config"])
        .arg(lab.config())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // A good config with a new secret: the old secret stops working.
    std::fs::write(lab.config(), &good).unwrap();
    std::fs::write(
        lab.tmp.path().join("webhook-secret"),
        "rotated-secret-0123456789-abcdefghij",
    )
    .unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    daemon.wait_for_log("SIGHUP: configuration reloaded", 1, Duration::from_secs(30));
    assert_eq!(
        lab.webhook("refs/heads/main", ZERO, &head, &new_uuid(), SECRET)
            .0,
        401
    );
    assert_eq!(
        lab.webhook(
            "refs/heads/main",
            ZERO,
            &head,
            &new_uuid(),
            "rotated-secret-0123456789-abcdefghij"
        )
        .0,
        202
    );
}

#[test]
fn a_manual_rollback_is_kept_until_the_next_push() {
    let lab = Lab::new();
    let first = lab.clone.head();
    lab.clone.write("hosts/lab.yaml", &host_yaml(9191, true));
    lab.clone.commit("newer");
    lab.clone.push("main");
    let daemon = lab.start();
    let conf = lab.host_path("/srv/app/app.conf");
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "port = 9191\n");
    drop(daemon);
    // Roll back by hand while the daemon is down, then restart it.
    let out = agent()
        .args([
            "apply",
            "--config",
            lab.config().to_str().unwrap(),
            "--rev",
            &first,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "port = 8080\n");
    let daemon = lab.start();
    let status = daemon.status();
    assert_eq!(status["manual_override"], true, "{status:#}");
    assert_eq!(status["applied_revision"], first);
    assert_eq!(
        std::fs::read_to_string(&conf).unwrap(),
        "port = 8080\n",
        "the pinned revision is kept"
    );
    // A hand edit is healed back to the pinned revision, not the newest.
    std::fs::write(&conf, "edited\n").unwrap();
    wait_for_file(&conf, "port = 8080\n", Duration::from_secs(2));
    // The next push ends the override.
    let before = lab.clone.head();
    lab.clone.write("hosts/lab.yaml", &host_yaml(9292, true));
    lab.clone.commit("after the rollback");
    assert_eq!(lab.push_and_notify(&before).0, 202);
    wait_for_file(&conf, "port = 9292\n", Duration::from_secs(10));
    let status = daemon.wait_until("the push", Duration::from_secs(10), |s| {
        s["manual_override"] == false
    });
    assert_eq!(status["applied_revision"], lab.clone.head());
}

/// The extra module with a file that needs a secret, and one after it.
const EXTRA_WITH_SECRET: &str = "resources:
  - file: /srv/extra.txt
    content: \"extra\\n\"
  - file: /srv/secret.conf
    content: \"password={{ secret('op://homelab/db/password') }}\\n\"
  - file: /srv/after-secret.conf
    content: \"uses the secret\\n\"
    after: [file:/srv/secret.conf]
";

/// Issue 14: with 1Password Connect offline, a run that only skipped the
/// resources needing its secret is not a failed run: the revision is
/// applied and becomes the last good one, `/readyz` is 200, the
/// last-success metric is set, `agent status` names the applied revision;
/// after a bad commit the daemon still heals drift with the last good
/// revision; each skipped resource is logged once, not every run.
#[test]
fn a_run_that_only_skipped_is_ready_and_the_last_good_revision_keeps_healing() {
    let lab = Lab::new();
    let mut connect = ConnectStandIn::start("offline-connect-token-for-tests");
    let token = lab.write_private("op-token", "offline-connect-token-for-tests");
    connect.stop();
    lab.write_config_with(
        "1h",
        None,
        &format!(
            "onepassword:\n  connect_url: {}\n  token_file: {}\n",
            connect.url(),
            token.display()
        ),
    );
    lab.clone
        .write("modules/extra/module.yaml", EXTRA_WITH_SECRET);
    lab.clone.commit("a file that needs a secret");
    lab.clone.push("main");
    let good = lab.clone.head();
    let daemon = lab.start();
    let status = daemon.status();
    assert_eq!(status["last_run"]["result"], "skipped", "{status}");
    assert_eq!(status["last_run"]["counts"]["skipped"], 2, "{status}");
    assert_eq!(status["counts"]["skipped"], 2, "{status}");
    assert_eq!(status["applied_revision"], good, "{status}");
    assert_eq!(status["last_good_revision"], good, "{status}");
    let (code, why) = http_get(&lab.listen(), "/readyz");
    assert_eq!(code, 200, "{why}");
    assert!(
        daemon.metric("homelab_agent_last_successful_run_timestamp_seconds{host=\"lab\"}") > 0.0,
        "no last success after a run that only skipped"
    );
    assert_eq!(
        daemon.metric(
            "homelab_agent_runs_total{host=\"lab\",trigger=\"startup\",result=\"skipped\"}"
        ),
        1.0
    );
    assert!(lab.host_path("/srv/extra.txt").exists());
    assert!(!lab.host_path("/srv/secret.conf").exists());
    let out = agent()
        .args(["status", "--config", lab.config().to_str().unwrap()])
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(
        text.contains(&format!("Applied revision: {good} at ")),
        "{text}"
    );
    assert!(
        text.contains("Skipped in the last run: 2 resource(s)") && text.contains(" skipped  "),
        "{text}"
    );

    // A bad commit: refused; a hand edit is still healed, with the last
    // good revision.
    let before = lab.clone.head();
    lab.clone.write(
        "modules/app/module.yaml",
        &APP.replace("mode: \"0640\"", "mdoe: \"0640\""),
    );
    lab.clone.commit("typo");
    assert_eq!(lab.push_and_notify(&before).0, 202);
    let status = daemon.wait_until("the refusal", Duration::from_secs(20), |s| {
        s["refused"]["stage"] == "validate"
    });
    assert_eq!(status["last_good_revision"], good, "{status}");
    assert_eq!(status["last_run"]["revision"], good, "{status}");
    assert_eq!(status["last_run"]["result"], "skipped", "{status}");
    let conf = lab.host_path("/srv/app/app.conf");
    std::fs::write(&conf, "port = 1\n").unwrap();
    wait_for_file(&conf, "port = 8080\n", Duration::from_secs(30));
    // The heal (the one write may queue a second watch run, which then
    // finds nothing to do: wait for the heal itself, then for quiet).
    daemon.wait_for_log(
        "applied resource=file:/srv/app/app.conf action=update classification=drift",
        1,
        Duration::from_secs(30),
    );
    daemon.wait_until("every run to finish", Duration::from_secs(30), |_| {
        let log = daemon.log_text();
        log.matches("run started").count() == log.matches("run finished").count()
    });
    // Every run (startup, the refused push, the heal, ...) has a start and
    // an end line; each skipped resource is logged once.
    let log = daemon.log_text();
    let lines = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
    let runs = lab.run_triggers().len();
    assert!(runs >= 3, "{runs} runs");
    assert_eq!(lines("run finished"), runs, "{log}");
    assert_eq!(lines("run started"), runs, "{log}");
    assert_eq!(
        lines("skipped: a secret did not resolve"),
        2,
        "one line per skipped resource, not one per run:\n{log}"
    );
    assert!(
        !log.contains("Some(") && !log.contains("[\""),
        "debug formatting in the log:\n{log}"
    );
}

/// A local-directory source has no history: after a bad edit the daemon
/// keeps the last good desired state (in memory) and heals drift with it,
/// then converges the fix.
#[test]
fn a_local_directory_daemon_keeps_healing_after_a_bad_edit() {
    let lab = LocalLab::new();
    lab.write("hosts/lab.yaml", &host_yaml(1111, false));
    lab.write("modules/app/module.yaml", APP);
    lab.write_config("");
    let daemon = lab.start();
    let conf = lab.host_path("/srv/app/app.conf");
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "port = 1111\n");
    let good = daemon.status()["last_good_revision"].clone();
    assert!(
        good.as_str().is_some_and(|g| g.starts_with("local-")),
        "{good}"
    );

    lab.write(
        "modules/app/module.yaml",
        &APP.replace("mode: \"0640\"", "mdoe: \"0640\""),
    );
    let status = daemon.wait_until("the refusal", Duration::from_secs(20), |s| {
        s["refused"]["stage"] == "validate"
    });
    assert_eq!(status["last_good_revision"], good, "{status}");
    assert_eq!(
        status["last_run"]["revision"], good,
        "converged the kept state: {status}"
    );
    std::fs::write(&conf, "port = 1\n").unwrap();
    wait_for_file(&conf, "port = 1111\n", Duration::from_secs(30));
    assert!(daemon.log_text().contains("revision refused"));

    lab.write("modules/app/module.yaml", APP);
    lab.write("hosts/lab.yaml", &host_yaml(2222, false));
    wait_for_file(&conf, "port = 2222\n", Duration::from_secs(30));
    daemon.wait_until("the fix", Duration::from_secs(20), |s| {
        s["refused"].is_null() && s["last_good_revision"] != good
    });
}

#[test]
fn a_local_directory_source_is_watched_and_logs_can_be_json() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    std::fs::create_dir_all(repo.join("hosts")).unwrap();
    std::fs::create_dir_all(repo.join("modules/app")).unwrap();
    std::fs::write(repo.join("hosts/lab.yaml"), host_yaml(1111, false)).unwrap();
    std::fs::write(repo.join("modules/app/module.yaml"), APP).unwrap();
    let listen = format!("127.0.0.1:{}", ports::reserve());
    let root = tmp.path().join("root");
    let config = tmp.path().join("agent.yaml");
    std::fs::write(
        &config,
        format!("repo: {}\nhost: lab\npoll_interval: 1h\nlisten: {listen}\nroot: {}\nlog_format: json\n", repo.display(), root.display()),
    )
    .unwrap();
    let out = agent()
        .args(["validate", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let log = tmp.path().join("daemon.log");
    let _daemon = Daemon::start(agent, &config, &log, &[], first_run);
    let conf = root.join("srv/app/app.conf");
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "port = 1111\n");
    // An uncommitted edit in the working directory converges without a push.
    std::fs::write(repo.join("hosts/lab.yaml"), host_yaml(2222, false)).unwrap();
    wait_for_file(&conf, "port = 2222\n", Duration::from_secs(5));
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
}

// --- issue 12: hostile revisions and clients ---

/// A "billion laughs" module: nine levels of ten aliases, a 10^9-element
/// expansion. Before YAML aliases were bounded, the agent expanded it until
/// memory ran out and it died.
fn billion_laughs() -> String {
    let mut s = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..10 {
        let refs = vec![format!("*a{}", i - 1); 10].join(", ");
        s.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    s.push_str("resources: []\n");
    s
}

/// The agent under a 2.5 GB address-space limit (as a cgroup or systemd's
/// `MemoryMax` would impose), so an expansion without bound ends in an
/// allocation failure (abort) instead of the machine's OOM killer.
fn agent_with_memory_limit() -> std::process::Command {
    let mut c = std::process::Command::new("sh");
    c.args([
        "-c",
        "ulimit -v 2500000 && exec \"$0\" \"$@\"",
        homelab_agent_tests::agent_bin().to_str().unwrap(),
    ]);
    c
}

/// Regression test for issue 12 (item 8): a commit that crashed the daemon.
/// Either the agent refuses it outright (bounded YAML), or it dies on it
/// once; then, restarted with that commit still at the branch head (as
/// systemd would), it refuses the commit without rendering it again, stays
/// on the last good revision and heals drift, across further restarts.
#[test]
fn a_commit_that_crashed_the_agent_is_refused_across_restarts() {
    let lab = Lab::new();
    let mut daemon = lab.start_with(agent_with_memory_limit);
    let good = lab.clone.head();
    let before = good.clone();
    lab.clone
        .write("modules/extra/module.yaml", &billion_laughs());
    lab.clone.commit("billion laughs");
    let bad = lab.clone.head();
    assert_eq!(lab.push_and_notify(&before).0, 202);
    // Refused while alive, or dead.
    let start = Instant::now();
    let crashed = loop {
        if let Some(status) = daemon.child.try_wait().unwrap() {
            eprintln!(
                "the agent died on the commit ({status}) after {:?}",
                start.elapsed()
            );
            break true;
        }
        if let Ok((200, body)) = http_request("GET", &lab.listen(), "/api/status", &[], &[]) {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            if v["refused"]["revision"] == bad.as_str() && v["running"] == false {
                break false;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "neither refused nor dead"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    for restart in 0..2 {
        if crashed || restart > 0 {
            drop(daemon);
            daemon = lab.start_with(agent_with_memory_limit);
        }
        let status = daemon.wait_until("the refusal", Duration::from_secs(30), |s| {
            s["refused"]["revision"] == bad.as_str()
        });
        assert_eq!(status["applied_revision"], good, "{status:#}");
        assert_eq!(status["fetched_revision"], bad, "{status:#}");
        if crashed {
            assert_eq!(status["refused"]["cause"], "crashed", "{status:#}");
        }
        assert!(
            daemon.child.try_wait().unwrap().is_none(),
            "the agent died again"
        );
        // Still healing drift on the last good revision.
        let conf = lab.host_path("/srv/app/app.conf");
        std::fs::write(&conf, "edited\n").unwrap();
        wait_for_file(&conf, "port = 8080\n", Duration::from_secs(5));
        let (code, why) = http_get(&lab.listen(), "/readyz");
        assert_eq!(code, 503);
        assert!(why.contains(&bad), "{why}");
    }
    // A fixed commit applies.
    let before = lab.clone.head();
    lab.clone.write("modules/extra/module.yaml", EXTRA);
    lab.clone.write("hosts/lab.yaml", &host_yaml(7171, true));
    lab.clone.commit("fixed");
    assert_eq!(lab.push_and_notify(&before).0, 202);
    daemon.wait_until("the fix", Duration::from_secs(20), |s| {
        s["refused"].is_null() && s["applied_revision"] == lab.clone.head()
    });
    assert_eq!(
        std::fs::read_to_string(lab.host_path("/srv/app/app.conf")).unwrap(),
        "port = 7171\n"
    );
}

/// Three nested loops over 10,000 each (10^12 iterations, no output): a
/// template that never ends on its own.
const HANGING_MODULE: &str = "resources:\n  - file: /srv/extra.txt\n    content: \"{% for i in range(10000) %}{% for j in range(10000) %}{% for k in range(10000) %}{% endfor %}{% endfor %}{% endfor %}\"\n";

/// Regression test for issue 12 (item 8): a template that hung the daemon.
/// The render is abandoned at half the run's budget, the revision refused
/// as timed out; the daemon keeps answering, stays on the last good
/// revision, heals drift without rendering the commit again, and after a
/// restart does not render it again either. (How fast is bench/'s.)
#[test]
fn a_template_that_hangs_is_abandoned_and_refused() {
    const NOT_AGAIN: &str =
        "revision refused earlier (it panicked, hung or crashed the agent); not tried again";
    let lab = Lab::new();
    lab.write_config_with("1h", None, "run_timeout: 4s\n");
    let daemon = lab.start();
    let good = lab.clone.head();
    let before = good.clone();
    lab.clone.write("modules/extra/module.yaml", HANGING_MODULE);
    lab.clone.commit("a template that never ends");
    let bad = lab.clone.head();
    assert_eq!(lab.push_and_notify(&before).0, 202);
    // Without the render's bound the run never ends: this wait fails.
    let status = daemon.wait_until("the refusal", Duration::from_secs(60), |s| {
        s["refused"]["revision"] == bad.as_str()
    });
    eprintln!(
        "hanging template refused; daemon peak RSS {}",
        peak_rss(daemon.child.id())
    );
    assert_eq!(status["refused"]["stage"], "validate", "{status:#}");
    // Stopped by the template's instruction budget (refused with
    // file:line), or abandoned at half the run's budget: never waited for.
    let timed_out = status["refused"]["cause"] == "timed_out";
    let error = status["refused"]["error"].as_str().unwrap();
    if timed_out {
        assert!(
            error.contains("took longer than") && error.contains("abandoned"),
            "{error}"
        );
    } else {
        assert_eq!(status["refused"]["cause"], "invalid", "{status:#}");
        assert!(
            error.contains("modules/extra/module.yaml:3: template error"),
            "{error}"
        );
    }
    assert_eq!(status["applied_revision"], good, "{status:#}");
    assert_eq!(http_get(&lab.listen(), "/healthz").0, 200);
    assert_eq!(
        std::fs::read_to_string(lab.host_path("/srv/extra.txt")).unwrap(),
        "extra\n"
    );
    // Drift is still healed; a commit abandoned as hung is not rendered
    // again for it (the heal run says so).
    let not_again = daemon.log_count(NOT_AGAIN);
    let conf = lab.host_path("/srv/app/app.conf");
    std::fs::write(&conf, "edited\n").unwrap();
    wait_for_file(&conf, "port = 8080\n", Duration::from_secs(30));
    if timed_out {
        daemon.wait_for_log(NOT_AGAIN, not_again + 1, Duration::from_secs(30));
    }
    let (code, why) = http_get(&lab.listen(), "/readyz");
    assert_eq!(code, 503);
    assert!(why.contains(&bad), "{why}");
    drop(daemon);
    // Restarted with the commit still at the head: refused without a render.
    let not_again = std::fs::read_to_string(lab.tmp.path().join("daemon.log"))
        .unwrap()
        .matches(NOT_AGAIN)
        .count();
    let daemon = lab.start();
    let status = daemon.wait_until("the refusal", Duration::from_secs(30), |s| {
        s["refused"]["revision"] == bad.as_str() && s["last_run"].is_object()
    });
    assert_eq!(status["applied_revision"], good, "{status:#}");
    if timed_out {
        assert_eq!(status["refused"]["cause"], "timed_out", "{status:#}");
        assert!(
            daemon.log_count(NOT_AGAIN) > not_again,
            "the hanging commit was rendered again after the restart; daemon log:\n{}",
            daemon.log_text()
        );
    }
}

/// SIGTERM while a render of a never-ending template runs: the daemon
/// exits 0 without waiting for the render to end by itself (within its
/// shutdown grace; the 20 s bound of `terminate` only stops a hang).
#[test]
fn sigterm_mid_render_ends_the_daemon() {
    let lab = Lab::new();
    lab.write_config_with("1h", None, "run_timeout: 1h\n");
    let daemon = lab.start();
    let before = lab.clone.head();
    lab.clone.write("modules/extra/module.yaml", HANGING_MODULE);
    lab.clone.commit("a template that never ends");
    let bad = lab.clone.head();
    assert_eq!(lab.push_and_notify(&before).0, 202);
    // The render has started: its marker names the commit.
    let marker = lab.host_path("/var/lib/homelab-agent/daemon/rendering");
    wait_for_file(&marker, &format!("{bad}\n"), Duration::from_secs(30));
    let mut daemon = daemon;
    let status = homelab_agent_tests::terminate(&mut daemon.child);
    assert!(status.success(), "{status:?}");
    let log = daemon.log_text();
    assert!(
        log.contains("SIGTERM: finishing the current resource"),
        "the signal did not land during the run: {log}"
    );
    // Not a crash: the next start renders the commit again.
    assert!(!marker.exists(), "the render marker was left behind");
}

/// Regression test for issue 12 (item 9): hundreds of slowloris clients
/// (half a request head each, never finished) against the daemon:
/// `/healthz` still answers while they hold their connections, and the
/// daemon holds a bounded number of file descriptors.
#[test]
fn slowloris_clients_neither_starve_healthz_nor_exhaust_descriptors() {
    use std::io::Write;
    let lab = Lab::new();
    let daemon = lab.start();
    let pid = daemon.child.id();
    let fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let idle = fds();
    let mut slow = Vec::new();
    for _ in 0..300 {
        let mut c = std::net::TcpStream::connect(lab.listen()).unwrap();
        c.write_all(b"GET /api/status HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .unwrap();
        slow.push(c);
    }
    // A starved `/healthz` would be closed at once (every slot busy) or
    // left waiting until the slow clients' 10 s header timeout; the
    // client's own 5 s bound is below that, so either fails here.
    let (code, body) = http_get(&lab.listen(), "/healthz");
    eprintln!(
        "/healthz under 300 slowloris clients; fds idle {idle}, now {}; peak RSS {}",
        fds(),
        peak_rss(pid)
    );
    assert_eq!((code, body.as_str()), (200, "ok"));
    assert!(fds() < idle + 64 + 16, "{} fds open (idle: {idle})", fds());
    drop(slow);
}

/// `agent run` that must exit by itself (killed, and the test failing, if it
/// is still running after `limit`).
fn run_until_exit(lab: &Lab, limit: Duration) -> std::process::Output {
    let mut child = agent()
        .args(["run", "--config", lab.config().to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("`agent run` started with this config:\n{}", stderr(&out));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Regression test for issue 12 (item 5): an empty or short webhook secret
/// (anyone can sign with an empty HMAC key) is refused by `agent run` and
/// by `agent validate --config` alike, with the minimum, never the value.
#[test]
fn weak_webhook_secrets_are_refused_by_run_and_validate_alike() {
    let lab = Lab::new();
    let secret = lab.tmp.path().join("webhook-secret");
    for (content, want) in [
        ("", "is empty"),
        (
            "short-secret-Qw9",
            "holds 16 bytes; `webhook_secret_file` needs at least 32",
        ),
    ] {
        std::fs::write(&secret, content).unwrap();
        let validate = agent()
            .args(["validate", "--config", lab.config().to_str().unwrap()])
            .output()
            .unwrap();
        let run = run_until_exit(&lab, Duration::from_secs(10));
        for (what, out) in [("validate", &validate), ("run", &run)] {
            assert_eq!(out.status.code(), Some(1), "{what}: {}", stderr(out));
            let err = stderr(out);
            assert!(err.contains(want), "{what}: {err}");
            if !content.is_empty() {
                assert!(
                    !err.contains(content) && !stdout(out).contains(content),
                    "{what}: {err}"
                );
            }
        }
    }
    // Group-readable: refused by both, too.
    std::fs::write(&secret, SECRET).unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    let out = agent()
        .args(["validate", "--config", lab.config().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("chmod 600"), "{}", stderr(&out));
}

/// Regression test for issue 12 (item 8): a reloaded config naming a FIFO
/// as its webhook secret or allowed signers (the read never returns) is
/// refused; before, the reload blocked the event loop: no probe, no webhook
/// answered again.
#[test]
fn a_reloaded_config_that_would_hang_the_agent_is_refused() {
    let lab = Lab::new();
    let daemon = lab.start();
    let pid = nix::unistd::Pid::from_raw(daemon.child.id() as i32);
    let fifo = lab.tmp.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let good = std::fs::read_to_string(lab.config()).unwrap();
    for (i, bad) in [
        good.replace(
            &format!(
                "webhook_secret_file: {}",
                lab.tmp.path().join("webhook-secret").display()
            ),
            &format!("webhook_secret_file: {}", fifo.display()),
        ),
        format!("{good}verify:\n  allowed_signers: {}\n", fifo.display()),
    ]
    .into_iter()
    .enumerate()
    {
        assert_ne!(bad, good);
        std::fs::write(lab.config(), &bad).unwrap();
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
        // The reload returned (refused): the event loop is free again, and
        // answers (the client's own 5 s bound only stops a hang).
        daemon.wait_for_log("new configuration refused", i + 1, Duration::from_secs(30));
        let (code, _) = http_request("GET", &lab.listen(), "/healthz", &[], &[]).unwrap();
        assert_eq!(code, 200);
        let head = lab.clone.head();
        assert_eq!(
            lab.webhook("refs/heads/main", ZERO, &head, &new_uuid(), SECRET)
                .0,
            202,
            "the old config is kept"
        );
    }
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert_eq!(log.matches("new configuration refused").count(), 2, "{log}");
    assert!(log.contains("not a regular file"), "{log}");
}

/// Regression test for issue 12 (item 8): a run that goes past its time
/// budget (a `validate:` tool that takes 30 s, `run_timeout: 2s`) is
/// reported stuck on `/readyz` and in the log while it lasts; SIGTERM then
/// ends the daemon at once instead of waiting for it.
#[test]
fn a_run_past_its_budget_is_reported_stuck() {
    let lab = Lab::new();
    lab.write_config_with("1h", None, "run_timeout: 2s\n");
    let daemon = lab.start();
    let before = lab.clone.head();
    lab.clone.write(
        "modules/extra/module.yaml",
        "resources:\n  - file: /srv/extra.txt\n    content: \"slow\\n\"\n    validate: \"/bin/sh -c 'sleep 30' %s\"\n",
    );
    lab.clone.commit("a validator that takes 30 s");
    assert_eq!(lab.push_and_notify(&before).0, 202);
    // Reported while the run lasts (it ends when the validator does, and
    // is then no longer stuck: a wait past that fails).
    let start = Instant::now();
    let why = loop {
        let (code, why) = http_get(&lab.listen(), "/readyz");
        if code == 503 && why.contains("stuck") {
            break why;
        }
        assert!(
            !daemon.log_text().contains("the abandoned run ended")
                && start.elapsed() < Duration::from_secs(60),
            "never reported stuck: {code} {why}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("reported stuck: {why}");
    assert!(why.contains("run_timeout"), "{why}");
    let status = daemon.status();
    assert_eq!(status["stuck"]["budget_secs"], 2, "{status:#}");
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert!(log.contains("exceeded its time budget"), "{log}");
    // SIGTERM does not wait for the abandoned run: the daemon says so, and
    // exits before that run ends (it would log "the abandoned run ended").
    let mut daemon = daemon;
    let exit = homelab_agent_tests::terminate(&mut daemon.child);
    assert!(exit.success(), "{exit:?}");
    let log = daemon.log_text();
    assert!(
        log.contains("SIGTERM: stopping (the abandoned run is left behind)"),
        "{log}"
    );
    assert!(!log.contains("the abandoned run ended"), "{log}");
}

/// Issue 12 (item 9): with `api_token_file`, `/api/status` and `/metrics`
/// need the bearer token, the probes do not, `/readyz` keeps its reason to
/// itself, and `agent status --config` sends the token.
#[test]
fn the_api_token_guards_status_and_metrics() {
    let lab = Lab::new();
    let token = "api-token-0123456789abcdef-0123456789";
    let path = lab.tmp.path().join("api-token");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    lab.write_config_with("1h", None, &format!("api_token_file: {}\n", path.display()));
    // `start` waits on /api/status: it cannot without the token, so on /readyz.
    let daemon = lab.start_until(agent, probe_ready);
    let bearer = format!("Bearer {token}");
    for path in ["/api/status", "/metrics"] {
        let (code, _) = http_request("GET", &lab.listen(), path, &[], &[]).unwrap();
        assert_eq!(code, 401, "{path}");
        let (code, _) = http_request(
            "GET",
            &lab.listen(),
            path,
            &[("Authorization".to_string(), "Bearer nope".to_string())],
            &[],
        )
        .unwrap();
        assert_eq!(code, 401, "{path}");
        let (code, _) = http_request(
            "GET",
            &lab.listen(),
            path,
            &[("Authorization".to_string(), bearer.clone())],
            &[],
        )
        .unwrap();
        assert_eq!(code, 200, "{path}");
    }
    assert_eq!(http_get(&lab.listen(), "/healthz").0, 200);
    let out = agent()
        .args(["status", "--config", lab.config().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        stdout(&out).contains(&format!("Daemon: running on {}", lab.listen())),
        "{}",
        stdout(&out)
    );
    drop(daemon);
}

/// `agent <cmd> --config <lab config> <extra>`.
fn control(lab: &Lab, cmd: &str, extra: &[&str]) -> std::process::Output {
    agent()
        .arg(cmd)
        .arg("--config")
        .arg(lab.config())
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn agent_reconcile_runs_now_and_waits_for_the_result() {
    let lab = Lab::new();
    let daemon = lab.start();
    let conf = lab.host_path("/srv/app/app.conf");
    // Pushed without a webhook, and the poll is an hour away: only the
    // request makes a run.
    lab.clone.write("hosts/lab.yaml", &host_yaml(9090, true));
    lab.clone.commit("port 9090");
    lab.clone.push("main");
    let out = control(&lab, "reconcile", &[]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with("Run on host lab (manual): success, revision "),
        "{text}"
    );
    assert!(text.contains(&lab.clone.head()), "{text}");
    assert!(text.contains("changed 1,"), "{text}");
    // Waited for: the file is converged when the command returns.
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "port = 9090\n");

    // JSON: the documented shape (docs/json-output.md, "agent reconcile").
    let out = control(&lab, "reconcile", &["--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["format_version"], 1);
    assert_eq!(v["command"], "reconcile");
    assert_eq!(v["run"]["result"], "success");
    assert_eq!(v["run"]["trigger"], "manual");
    assert_eq!(v["run"]["revision"], lab.clone.head().as_str());
    assert_eq!(v["run"]["counts"]["changed"], 0);
    let errors: Vec<String> = json_doc::schema()
        .iter_errors(&v)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{errors:?}\n{v}");

    // A refused commit: the run falls back to the last good revision, and
    // the command says so and exits 1.
    let good = lab.clone.head();
    lab.clone
        .write("hosts/lab.yaml", "platform: linux\nmodules: [\n");
    lab.clone.commit("broken host file");
    lab.clone.push("main");
    let out = control(&lab, "reconcile", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(text.contains(&format!("revision {good}")), "{text}");
    assert!(
        text.contains(&format!(
            "the newest revision {} was refused at validate",
            lab.clone.head()
        )),
        "{text}"
    );

    // Without waiting: queued, and the run comes.
    let manual = lab.runs_by("manual");
    let out = control(&lab, "reconcile", &["--no-wait"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("Run queued on host lab"));
    let start = Instant::now();
    while lab.runs_by("manual") <= manual {
        assert!(start.elapsed() < Duration::from_secs(30), "no run came");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The runs it made are the daemon's: counted under trigger "manual".
    assert!(
        daemon
            .metric("homelab_agent_runs_total{host=\"lab\",trigger=\"manual\",result=\"success\"}")
            >= 2.0
    );
}

#[test]
fn suspend_stops_applying_not_drift_detection_and_survives_a_restart() {
    let lab = Lab::new();
    let daemon = lab.start();
    let conf = lab.host_path("/srv/app/app.conf");
    assert_eq!(daemon.metric("homelab_agent_suspended{host=\"lab\"}"), 0.0);
    let out = control(&lab, "suspend", &["--reason", "disk swap\nin progress"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("Host lab: applying suspended (since "),
        "{}",
        stdout(&out)
    );
    let status = daemon.status();
    assert_eq!(status["suspended"]["reason"], "disk swap in progress");
    assert_eq!(daemon.metric("homelab_agent_suspended{host=\"lab\"}"), 1.0);
    // Asked twice: nothing changes.
    let out = control(&lab, "suspend", &["--reason", "other"]);
    assert!(
        stdout(&out).contains("was already suspended"),
        "{}",
        stdout(&out)
    );

    // A hand edit is seen and reported, not healed.
    std::fs::write(&conf, "port = 1\n").unwrap();
    daemon.wait_for_log(
        "drifted; not healed (applying is suspended)",
        1,
        Duration::from_secs(30),
    );
    daemon.wait_until("the suspended plan", Duration::from_secs(30), |s| {
        s["planned"]["drift"] == 1 && s["running"] == false
    });
    assert!(
        daemon.metric("homelab_agent_drifted_resources{host=\"lab\",module=\"app\",kind=\"file\"}")
            >= 1.0
    );
    // Counted (and sent to Loki) once, as a drift: the heal after resume is
    // its correction, not a new drift.
    let drift_events =
        "homelab_agent_drift_events_total{host=\"lab\",module=\"app\",kind=\"file\"}";
    let corrections =
        "homelab_agent_drift_corrections_total{host=\"lab\",module=\"app\",kind=\"file\"}";
    assert_eq!(daemon.metric(drift_events), 1.0);
    assert_eq!(daemon.metric(corrections), 0.0);
    let out = control(&lab, "resume", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for_file(&conf, "port = 8080\n", Duration::from_secs(30));
    daemon.wait_until("the resumed run", Duration::from_secs(30), |s| {
        s["last_attempt"]["result"] == "success" && s["running"] == false
    });
    assert_eq!(daemon.metric(drift_events), 1.0);
    assert_eq!(daemon.metric(corrections), 1.0);
    // Suspended again, the next hand edit is a new drift.
    let out = control(&lab, "suspend", &["--reason", "disk swap\nin progress"]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::write(&conf, "port = 1\n").unwrap();
    daemon.wait_for_log(
        "drifted; not healed (applying is suspended)",
        2,
        Duration::from_secs(30),
    );
    daemon.wait_until("the suspended plan", Duration::from_secs(30), |s| {
        s["planned"]["drift"] == 1 && s["running"] == false
    });
    assert_eq!(daemon.metric(drift_events), 2.0);
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "port = 1\n");
    // A push is fetched and planned, not applied.
    let before = lab.clone.head();
    lab.clone.write("hosts/lab.yaml", &host_yaml(9090, true));
    lab.clone.commit("port 9090");
    let (code, _) = lab.push_and_notify(&before);
    assert_eq!(code, 202);
    daemon.wait_until("the push is fetched", Duration::from_secs(30), |s| {
        s["fetched_revision"] == lab.clone.head().as_str() && s["running"] == false
    });
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "port = 1\n");
    assert_eq!(daemon.status()["applied_revision"], before.as_str());
    assert!(
        daemon.metric(
            "homelab_agent_runs_total{host=\"lab\",trigger=\"webhook\",result=\"suspended\"}"
        ) >= 1.0
    );

    // Nothing else applies either: `agent apply` and `agent reconcile` refuse.
    let out = control(&lab, "apply", &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("applying is suspended on host lab (since "),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("disk swap in progress"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "port = 1\n");
    let out = control(&lab, "reconcile", &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("the daemon refused: applying is suspended on host lab"),
        "{}",
        stderr(&out)
    );
    // `agent status` says so.
    let out = control(&lab, "status", &[]);
    assert!(
        stdout(&out).contains("Suspended: applying is paused since "),
        "{}",
        stdout(&out)
    );

    // Kept across a restart.
    assert!(daemon.terminate().success());
    let daemon = lab.start();
    assert_eq!(
        daemon.status()["suspended"]["reason"],
        "disk swap in progress"
    );
    assert_eq!(daemon.metric("homelab_agent_suspended{host=\"lab\"}"), 1.0);
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "port = 1\n");

    // Resume: converges at once.
    let out = control(&lab, "resume", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("Host lab: applying resumed (it was suspended since "),
        "{}",
        stdout(&out)
    );
    wait_for_file(&conf, "port = 9090\n", Duration::from_secs(30));
    assert_eq!(daemon.metric("homelab_agent_suspended{host=\"lab\"}"), 0.0);
    assert!(daemon.status()["suspended"].is_null());
    let out = control(&lab, "resume", &[]);
    assert!(
        stdout(&out).contains("was not suspended"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn suspend_without_a_daemon_is_kept_for_it_and_refuses_apply() {
    let lab = Lab::new();
    let out = control(&lab, "suspend", &["--reason", "moving racks"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("No daemon is running"),
        "{}",
        stdout(&out)
    );
    let out = control(&lab, "apply", &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("moving racks"), "{}", stderr(&out));
    assert!(!lab.host_path("/srv/app/app.conf").exists());
    // JSON callers get the error document.
    let out = control(&lab, "apply", &["--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["stage"], "suspended", "{v}");
    // A plan still works, and notes it.
    let out = control(&lab, "plan", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("note: applying is suspended on host lab"));
    // The daemon starts suspended: it plans, applies nothing.
    let daemon = lab.start_until(agent, |listen| {
        matches!(homelab_agent_tests::local_daemon::get(listen, "/api/status", None), Ok((200, _, body))
            if serde_json::from_str::<serde_json::Value>(&body)
                .is_ok_and(|s| s["last_attempt"]["result"] == "suspended"))
    });
    assert!(daemon.status()["last_run"].is_null());
    assert_eq!(daemon.status()["suspended"]["reason"], "moving racks");
    assert!(!lab.host_path("/srv/app/app.conf").exists());
    assert!(daemon.terminate().success());
    let out = control(&lab, "resume", &[]);
    assert!(
        stdout(&out).contains("applying resumed"),
        "{}",
        stdout(&out)
    );
    let out = control(&lab, "apply", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(lab.host_path("/srv/app/app.conf").exists());
}

#[test]
fn the_controls_refuse_anyone_but_the_agents_user() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs a client as another user: run the suite as root (scripts/test.sh does)"
    );
    let lab = Lab::new();
    let daemon = lab.start();
    use std::os::unix::fs::PermissionsExt;
    let state = lab.root().join("var/lib/homelab-agent");
    let socket = state.join("daemon/control.sock");
    // A copy of the agent that user 65534 can run wherever the checkout is.
    let bin_dir = tempfile::tempdir().unwrap();
    let bin = bin_dir.path().join("agent");
    std::fs::copy(homelab_agent_tests::agent_bin(), &bin).unwrap();
    for p in [bin_dir.path(), bin.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let as_nobody = || {
        use std::os::unix::process::CommandExt;
        let mut c = std::process::Command::new(&bin);
        c.args(["reconcile", "--state-dir"])
            .arg(&state)
            .uid(65534)
            .gid(65534)
            .env_remove("SUDO_USER");
        c.output().unwrap()
    };
    let manual = lab.runs_by("manual");
    // The file permissions stop another user at connect().
    let out = as_nobody();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("permission denied on the control socket"),
        "{}",
        stderr(&out)
    );
    // With the path opened up by mistake, the peer check still refuses.
    let mut dir = socket.parent().unwrap().to_path_buf();
    while dir.starts_with(lab.tmp.path()) {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)).unwrap();
        dir.pop();
    }
    std::fs::set_permissions(lab.tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out)
            .contains("only the agent's user (uid 0) or root may control it; you are uid 65534"),
        "{}",
        stderr(&out)
    );
    daemon.wait_for_log(
        "refused a client that is not the agent's user",
        1,
        Duration::from_secs(10),
    );
    // Nothing was run for them.
    lab.barrier(&daemon);
    assert_eq!(lab.runs_by("manual"), manual);
}

#[test]
fn a_daemon_for_a_host_of_another_platform_says_so_once_per_run() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    let srv = tmp.path().join("srv");
    std::fs::create_dir_all(repo.join("hosts")).unwrap();
    std::fs::create_dir_all(repo.join("modules/app")).unwrap();
    // A macOS host, outside a sandbox, on this Linux machine.
    std::fs::write(
        repo.join("hosts/mini.yaml"),
        format!(
            "platform: macos\nroots: [{}]\nmodules:\n  - name: app\n",
            srv.display()
        ),
    )
    .unwrap();
    let files: String = (0..16)
        .map(|i| {
            format!(
                "  - file: {}/f{i}.conf\n    content: \"x\\n\"\n    owner: _www\n",
                srv.display()
            )
        })
        .collect();
    std::fs::write(
        repo.join("modules/app/module.yaml"),
        format!("resources:\n{files}"),
    )
    .unwrap();
    let listen = format!("127.0.0.1:{}", ports::reserve());
    let config = tmp.path().join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "repo: {}\nhost: mini\npoll_interval: 1h\nlisten: {listen}\nstate_dir: {}\n",
            repo.display(),
            tmp.path().join("state").display()
        ),
    )
    .unwrap();
    let log = tmp.path().join("daemon.log");
    let daemon = Daemon::start(agent, &config, &log, &[("RUST_LOG", "info")], |listen| {
        matches!(homelab_agent_tests::local_daemon::get(listen, "/api/status", None), Ok((200, _, body))
            if serde_json::from_str::<serde_json::Value>(&body)
                .is_ok_and(|s| s["last_attempt"]["result"] == "error"))
    });
    let status = daemon.status();
    let error = status["last_attempt"]["error"].as_str().unwrap();
    assert!(
        error.starts_with("host mini is a macOS host and this machine runs Linux"),
        "{error}"
    );
    let text = daemon.log_text();
    assert_eq!(text.matches("is a macOS host").count(), 1, "{text}");
    assert!(!text.contains("does not exist"), "{text}");
    assert!(!srv.exists(), "nothing is written for it");
    assert_ne!(
        homelab_agent_tests::local_daemon::get(&daemon.listen, "/readyz", None)
            .unwrap()
            .0,
        200
    );
}
