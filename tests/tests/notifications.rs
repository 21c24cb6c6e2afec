//! Notifications (`notify:` in the agent config) end to end: the daemon,
//! fed by a real git smart-HTTP server, sets Forgejo commit statuses on the
//! commits it applies and posts ntfy messages, against the Forgejo/ntfy
//! stand-in (`forgejo_standin.rs`, written from
//! `specs/forgejo-commit-status.md`). And the notifier on its own: the
//! rollback message, each message once, nothing secret in a body.

use std::time::{Duration, Instant};

use homelab_agent_tests::forgejo_standin::{ForgejoStandIn, Message, Status};
use homelab_agent_tests::git_server::{forgejo_push, http_post, new_uuid, GitServer, WorkClone};
use homelab_agent_tests::local_daemon::{first_run, Daemon};
use homelab_agent_tests::{agent, ports};

const SECRET: &str = "webhook-secret-for-tests-0123456789";
const FORGE_TOKEN: &str = "forge-token-9f8e7d6c5b4a39281706";
const NTFY_TOKEN: &str = "tk_ntfy-token-0a1b2c3d4e5f60718293";
const TARGET: &str = "https://lab.example/api/status";

const APP: &str = r#"resources:
  - directory: /srv/app
  - file: /srv/app/app.conf
    content: "port = 8080\n"
  - file: /srv/app/notes.txt
    content: "hands off\n"
    on_drift: report
"#;

/// A file whose `validate:` command refuses it: apply fails on it.
const FAILING: &str =
    "  - file: /srv/app/bad.conf\n    content: \"x\\n\"\n    validate: /bin/false %s\n";

struct Lab {
    lab: homelab_agent_tests::Lab,
    server: GitServer,
    clone: WorkClone,
    forge: ForgejoStandIn,
    listen: String,
}

impl Lab {
    fn new() -> Lab {
        let lab = homelab_agent_tests::Lab::empty();
        let server = GitServer::start();
        server.create_repo("lab", "homelab");
        let clone = WorkClone::clone_from(&server, "lab", "homelab", &lab.tmp.path().join("work"));
        clone.write(
            "hosts/lab.yaml",
            "platform: linux\nroots: [/srv]\nmodules:\n  - name: app\n",
        );
        clone.write("modules/app/module.yaml", APP);
        let forge = ForgejoStandIn::start(FORGE_TOKEN);
        let lab = Lab {
            lab,
            server,
            clone,
            forge,
            listen: format!("127.0.0.1:{}", ports::reserve()),
        };
        lab.commit_and_push("initial homelab");
        let token = lab.server.write_token_file(lab.lab.tmp.path());
        let secret = lab.lab.write_private("webhook-secret", SECRET);
        let forge_token = lab
            .lab
            .write_private("forge-token", &format!("{FORGE_TOKEN}\n"));
        let ntfy_token = lab.lab.write_private("ntfy-token", NTFY_TOKEN);
        std::fs::write(
            lab.lab.config(),
            format!(
                "repo: {}\nref: main\ntoken_file: {}\nhost: lab\npoll_interval: 1h\nwebhook_secret_file: {}\nlisten: {}\nroot: {}\nnotify:\n  forgejo:\n    url: {}\n    repository: lab/homelab\n    token_file: {}\n    target_url: {TARGET}\n  webhook:\n    url: {}\n    token_file: {}\n  timeout: 2s\n",
                lab.server.url("lab", "homelab"),
                token.display(),
                secret.display(),
                lab.listen,
                lab.lab.root().display(),
                lab.forge.url(),
                forge_token.display(),
                lab.forge.ntfy_url("homelab"),
                ntfy_token.display(),
            ),
        )
        .unwrap();
        lab
    }

    /// Commits, tells the forge about the commit (as a push to Forgejo
    /// would), pushes; returns the commit id.
    fn commit_and_push(&self, msg: &str) -> String {
        let id = self.clone.commit(msg);
        self.forge
            .add_repo("lab/homelab", std::slice::from_ref(&id));
        self.clone.push("main");
        id
    }

    /// Pushes a commit and sends Forgejo's webhook; returns the commit id.
    fn push(&self, msg: &str) -> String {
        let before = self.clone.head();
        let id = self.commit_and_push(msg);
        let (body, headers) = forgejo_push(
            SECRET.as_bytes(),
            "refs/heads/main",
            &before,
            &id,
            &self.server.url("lab", "homelab"),
            &new_uuid(),
        );
        let (code, text) = http_post(&self.listen, "/hooks/forgejo", &headers, &body);
        assert_eq!(code, 202, "{text}");
        id
    }

    fn start(&mut self) -> Daemon {
        let d = Daemon::start(
            agent,
            &self.lab.config(),
            &self.lab.tmp.path().join("daemon.log"),
            &[("RUST_LOG", "info")],
            first_run,
        );
        self.listen = d.listen.clone();
        d
    }

    /// Waits until the forge holds a status `state` on `sha`.
    fn wait_status(&self, daemon: &Daemon, sha: &str, state: &str) -> Status {
        wait(daemon, &format!("a {state} status on {sha}"), || {
            self.forge
                .statuses()
                .into_iter()
                .find(|s| s.sha == sha && s.state == state)
        })
    }

    /// Waits until the topic holds a message tagged `tag`.
    fn wait_message(&self, daemon: &Daemon, tag: &str) -> Message {
        wait(daemon, &format!("a {tag} message"), || {
            self.forge
                .messages()
                .into_iter()
                .find(|m| m.tags.as_deref().unwrap_or("").split(',').any(|t| t == tag))
        })
    }
}

fn wait<T>(daemon: &Daemon, what: &str, mut found: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(t) = found() {
            return t;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never saw {what}; daemon log:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `homelab_agent_notify_errors_total{reason}` as the daemon serves it.
fn notify_errors(daemon: &Daemon, reason: &str) -> f64 {
    let (_, text) = daemon.metrics(None);
    text.lines()
        .find(|l| {
            l.starts_with("homelab_agent_notify_errors_total{")
                && l.contains(&format!("reason=\"{reason}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no notify_errors_total{{reason={reason}}} in:\n{text}"))
}

#[test]
fn commit_statuses_and_messages_follow_each_revision_and_a_down_forge_fails_no_run() {
    let mut lab = Lab::new();
    let first = lab.clone.head();
    let daemon = lab.start();

    // The first run converges: pending, then success, on the commit applied.
    let ok = lab.wait_status(&daemon, &first, "success");
    assert_eq!(ok.context, "homelab-agent/lab");
    assert_eq!(ok.target_url, TARGET);
    assert_eq!(ok.repo, "lab/homelab");
    assert!(ok.description.contains("converged"), "{ok:?}");
    let on_first: Vec<String> = lab
        .forge
        .statuses()
        .iter()
        .filter(|s| s.sha == first)
        .map(|s| s.state.clone())
        .collect();
    assert_eq!(on_first, ["pending", "success"]);

    // A hand edit of an `on_drift: report` file: one drift message.
    std::fs::write(lab.lab.host_path("/srv/app/notes.txt"), "my notes\n").unwrap();
    let drift = lab.wait_message(&daemon, "drift");
    assert_eq!(drift.title.as_deref(), Some("lab: drift"));
    assert!(drift.body.contains("file:/srv/app/notes.txt"), "{drift:?}");
    assert_eq!(
        drift.authorization.as_deref(),
        Some(&*format!("Bearer {NTFY_TOKEN}"))
    );

    // A revision whose apply fails: failure on that commit, a failure message.
    lab.clone
        .write("modules/app/module.yaml", &format!("{APP}{FAILING}"));
    let failing = lab.push("app: a config its validator refuses");
    let failed = lab.wait_status(&daemon, &failing, "failure");
    assert_eq!(failed.context, "homelab-agent/lab");
    assert!(failed.description.starts_with("lab failed: "), "{failed:?}");
    assert!(failed.description.chars().count() <= 140, "{failed:?}");
    let message = lab.wait_message(&daemon, "failure");
    assert_eq!(message.title.as_deref(), Some("lab: run failed"));
    assert_eq!(message.priority.as_deref(), Some("high"));
    assert!(message.body.contains(&failing[..12]), "{message:?}");

    // A revision refused at validation: failure on it too.
    lab.clone.write(
        "modules/app/module.yaml",
        &APP.replace("content:", "contnet:"),
    );
    let invalid = lab.push("app: a typo");
    let refused = lab.wait_status(&daemon, &invalid, "failure");
    assert!(refused.description.contains("refused"), "{refused:?}");

    // The forge answers 500, then is down: the runs converge all the same,
    // and what was not delivered is counted.
    lab.forge.fail_with(Some(500));
    lab.clone.write("modules/app/module.yaml", APP);
    let fixed = lab.push("app: fixed");
    daemon.wait_until("the fix applied", Duration::from_secs(30), |s| {
        s["applied_revision"] == fixed.as_str() && s["running"] == false
    });
    assert!(notify_errors(&daemon, "forgejo") >= 1.0);
    lab.forge.fail_with(None);
    lab.forge.stop();
    lab.clone.write("modules/app/extra.txt", "not read\n");
    let while_down = lab.push("docs: while the forge is down");
    daemon.wait_until("a run with the forge down", Duration::from_secs(30), |s| {
        s["applied_revision"] == while_down.as_str() && s["running"] == false
    });
    let errors = notify_errors(&daemon, "forgejo");
    assert!(errors >= 2.0, "{errors}");
    assert!(daemon.log_text().contains("notification not delivered"));
    lab.forge.restart();

    // Nothing secret in any body, and the tokens only where they belong.
    for r in lab.forge.requests() {
        for secret in [FORGE_TOKEN, NTFY_TOKEN, SECRET] {
            assert!(!r.body.contains(secret), "{secret} in {r:?}");
        }
    }
    assert!(daemon.terminate().success());
}

/// The notifier without a daemon: a rollback and a failure are each sent
/// once per revision (the same run again sends nothing), and what the run
/// scrubs never reaches the forge or the topic.
#[test]
fn each_message_is_sent_once_and_scrubbed() {
    use homelab_agent::config::{ForgejoNotify, NotifyConfig, WebhookNotify};
    use homelab_agent::notifications::{Notifier, RunNotice};

    let forge = ForgejoStandIn::start(FORGE_TOKEN);
    let sha = "0123456789abcdef0123456789abcdef01234567".to_string();
    forge.add_repo("lab/homelab", std::slice::from_ref(&sha));
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("forge-token");
    std::fs::write(&token, FORGE_TOKEN).unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let cfg = NotifyConfig {
        forgejo: Some(ForgejoNotify {
            url: forge.url(),
            repository: "lab/homelab".into(),
            token_file: token,
            target_url: None,
        }),
        webhook: Some(WebhookNotify {
            url: forge.ntfy_url("homelab"),
            token_file: None,
        }),
        timeout: Duration::from_secs(2),
    };
    let notifier = Notifier::new("lab", &cfg).unwrap().unwrap();
    let secret_value = "hunter2-secret-value";
    let scrub = |t: &str| t.replace(secret_value, "[redacted]");
    let notice = RunNotice {
        revision: sha.clone(),
        failure: Some(format!(
            "file:/srv/app/app.conf: validate refused password={secret_value}"
        )),
        failed: 1,
        rolled_back: vec!["file:/etc/app.conf".into()],
        ..RunNotice::default()
    };
    assert!(notifier.run_finished(&notice, &scrub).is_empty());
    assert!(notifier.run_finished(&notice, &scrub).is_empty());
    let statuses = forge.statuses();
    assert_eq!(statuses.len(), 1, "{statuses:?}");
    assert_eq!(statuses[0].state, "failure");
    let messages = forge.messages();
    let tags: Vec<&str> = messages
        .iter()
        .map(|m| m.tags.as_deref().unwrap())
        .collect();
    assert_eq!(
        tags,
        [
            "homelab-agent,failure,rotating_light",
            "homelab-agent,rollback,leftwards_arrow_with_hook"
        ]
    );
    assert_eq!(
        messages[1].title.as_deref(),
        Some("lab: change rolled back")
    );
    assert!(messages[1].body.contains("file:/etc/app.conf"));
    for r in forge.requests() {
        assert!(!r.body.contains(secret_value), "{r:?}");
        assert!(!r.body.contains(FORGE_TOKEN), "{r:?}");
    }
    assert!(forge.messages()[0].body.contains("password=[redacted]"));

    // Converged on the same revision: success, and a later failure is news.
    let ok = RunNotice {
        revision: sha.clone(),
        ..RunNotice::default()
    };
    assert!(notifier.run_finished(&ok, &scrub).is_empty());
    assert_eq!(forge.statuses().last().unwrap().state, "success");
    assert!(notifier.run_finished(&notice, &scrub).is_empty());
    assert_eq!(forge.messages().len(), 4, "{:?}", forge.messages());

    // A refused token: an error to count, not a panic or a hang.
    let mut wrong = cfg.clone();
    let bad = dir.path().join("bad-token");
    std::fs::write(&bad, "not-the-token").unwrap();
    std::fs::set_permissions(&bad, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    wrong.forgejo.as_mut().unwrap().token_file = bad;
    wrong.webhook = None;
    let errors = Notifier::new("lab", &wrong)
        .unwrap()
        .unwrap()
        .run_finished(&ok, &scrub);
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].target(), "forgejo");
    let text = errors[0].to_string();
    assert!(
        text.contains("401") && text.contains("token_file"),
        "{text}"
    );
    assert!(!text.contains("not-the-token"), "{text}");
}
