//! Events to Loki, end to end: `agent run` (and `agent apply`) pushing to the
//! Loki push-API stand-in (`src/loki_standin.rs`), for what a real server
//! cannot be made to do on demand (a 400 for one entry, a 429 with
//! `Retry-After`, a slow answer) and for what only the stand-in records
//! (each push, its headers and body). The stand-in decodes JSON only, so
//! these tests set `format: json`; `loki_victorialogs.rs` runs both formats
//! against a real server. Labels, line fields,
//! ordering per stream, batching, tenant and basic auth; Loki answering 400,
//! 429, 500, slowly or not at all (the agent keeps reconciling, memory stays
//! bounded, drops are counted); no secret value in any event.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use homelab_agent_tests::connect_standin::ConnectStandIn;
use homelab_agent_tests::leaks::Evidence;
use homelab_agent_tests::local_daemon::{sample, wait_for_file, LocalLab};
use homelab_agent_tests::loki_standin::{Entry, LokiStandIn};
use homelab_agent_tests::{agent, stderr};

const HOST: &str = "platform: linux\nroots: [/srv]\nmodules:\n  - name: app\n";
const PASSWORD: &str = "loki-pw-Zq81";
const EVENTS: [&str; 7] = [
    "apply",
    "drift",
    "correction",
    "prune",
    "refused",
    "rollback",
    "error",
];

/// A module with a directory, `n` heal-mode files, a report-only file and
/// (when `extra`) one more file.
fn module(n: usize, extra: bool) -> String {
    let mut s = String::from("resources:\n  - directory: /srv/app\n");
    for i in 0..n {
        s.push_str(&format!(
            "  - file: /srv/app/f{i}.conf\n    content: \"value = {i}\\n\"\n"
        ));
    }
    s.push_str(
        "  - file: /srv/app/notes.txt\n    content: \"hands off\\n\"\n    on_drift: report\n",
    );
    if extra {
        s.push_str("  - file: /srv/app/extra.txt\n    content: \"extra\\n\"\n");
    }
    s
}

fn loki_config(loki: &LokiStandIn, extra: &str) -> String {
    format!(
        "loki:\n  url: {}\n  format: json\n  batch_wait: 300ms\n{extra}",
        loki.url()
    )
}

fn of_event<'a>(entries: &'a [Entry], event: &str) -> Vec<&'a Entry> {
    entries
        .iter()
        .filter(|e| e.labels.get("event").map(String::as_str) == Some(event))
        .collect()
}

fn count(entries: &[Entry], event: &str) -> usize {
    of_event(entries, event).len()
}

#[test]
fn events_reach_loki_with_three_labels_structured_lines_in_order_and_batched() {
    let loki = LokiStandIn::start();
    loki.require_tenant("homelab");
    loki.require_basic_auth("agent", PASSWORD);
    let lab = LocalLab::new();
    lab.write("hosts/lab.yaml", HOST);
    lab.write("modules/app/module.yaml", &module(3, true));
    let pw = lab.write_private("loki-password", &format!("{PASSWORD}\n"));
    lab.write_config(&loki_config(
        &loki,
        &format!(
            "  tenant: homelab\n  username: agent\n  password_file: {}\n",
            pw.display()
        ),
    ));
    let daemon = lab.start();

    // The first run creates six resources: six `apply` events, one push.
    let entries = loki.wait_for("6 apply events", Duration::from_secs(10), |e| {
        count(e, "apply") == 6
    });
    let pushes = loki.pushes();
    assert_eq!(pushes.len(), 1, "one batch for one run: {pushes:?}");
    assert_eq!((pushes[0].status, pushes[0].entry_count()), (204, 6));
    let created = of_event(&entries, "apply");
    let line = created
        .iter()
        .map(|e| e.json())
        .find(|l| l["resource"] == "file:/srv/app/f0.conf")
        .expect("an event for f0.conf");
    assert_eq!(line["event"], "apply");
    assert_eq!(line["level"], "info");
    assert_eq!(line["kind"], "file");
    assert_eq!(line["module"], "app");
    assert_eq!(line["action"], "create");
    assert_eq!(line["trigger"], "startup");
    assert!(
        line["revision"].as_str().unwrap().starts_with("local-"),
        "{line}"
    );
    assert_eq!(line["msg"], "file:/srv/app/f0.conf created");

    // Drift, healed and report-only.
    std::fs::write(lab.host_path("/srv/app/f1.conf"), "edited by hand\n").unwrap();
    wait_for_file(
        &lab.host_path("/srv/app/f1.conf"),
        "value = 1\n",
        Duration::from_secs(5),
    );
    std::fs::write(lab.host_path("/srv/app/notes.txt"), "my notes\n").unwrap();
    let entries = loki.wait_for("drift, correction", Duration::from_secs(10), |e| {
        count(e, "drift") >= 2 && count(e, "correction") >= 1
    });
    let correction = of_event(&entries, "correction")[0].json();
    assert_eq!(correction["resource"], "file:/srv/app/f1.conf");
    assert_eq!(correction["changes"], serde_json::json!(["content"]));
    assert_eq!(correction["action"], "update");
    assert_eq!(correction["trigger"], "watch");
    assert!(
        !correction.to_string().contains("edited by hand"),
        "{correction}"
    );
    let report_only = of_event(&entries, "drift")
        .into_iter()
        .map(|e| e.json())
        .find(|l| l["resource"] == "file:/srv/app/notes.txt")
        .unwrap();
    assert_eq!(report_only["action"], "report");
    assert_eq!(report_only["level"], "warn");
    assert_eq!(
        report_only["msg"],
        "file:/srv/app/notes.txt drifted (content): reported only (on_drift: report)"
    );

    // A resource leaves the desired state: prune.
    lab.write("modules/app/module.yaml", &module(3, false));
    let entries = loki.wait_for("a prune", Duration::from_secs(10), |e| {
        count(e, "prune") == 1
    });
    let prune = of_event(&entries, "prune")[0].json();
    assert_eq!(prune["resource"], "file:/srv/app/extra.txt");
    assert_eq!(prune["action"], "delete");
    assert_eq!(prune["trigger"], "source");

    // An invalid revision is refused, once, with where and why.
    lab.write(
        "modules/app/module.yaml",
        "resources:\n  - file: relative/path\n    content: x\n",
    );
    let entries = loki.wait_for("a refusal", Duration::from_secs(10), |e| {
        count(e, "refused") == 1
    });
    let refused = of_event(&entries, "refused")[0].json();
    assert_eq!(refused["stage"], "validate");
    assert_eq!(refused["level"], "error");
    let error = refused["error"].as_str().unwrap();
    assert!(error.contains("modules/app/module.yaml:2"), "{error}");
    lab.write("modules/app/module.yaml", &module(3, false));
    daemon.wait_until("the fixed revision", Duration::from_secs(10), |s| {
        s["refused"].is_null()
    });

    // A managed directory replaced by a symlink: its files cannot be
    // observed (the agent never follows one), the run stops before apply
    // with an error event, and heals once the symlink is gone.
    let app = lab.host_path("/srv/app");
    let elsewhere = lab.tmp.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::rename(&app, lab.tmp.path().join("moved-away")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &app).unwrap();
    let entries = loki.wait_for("a run error", Duration::from_secs(10), |e| {
        of_event(e, "error")
            .iter()
            .any(|x| x.json()["stage"] == "observe")
    });
    let run_error = of_event(&entries, "error")[0].json();
    assert_eq!(run_error["level"], "error");
    assert_eq!(run_error["msg"], "run failed at observe");
    assert!(
        run_error["error"]
            .as_str()
            .unwrap()
            .contains("could not be observed; nothing was applied"),
        "{run_error}"
    );
    assert!(run_error["revision"]
        .as_str()
        .unwrap()
        .starts_with("local-"));
    let m = daemon.wait_metrics("the failed run", Duration::from_secs(10), |m| {
        sample(
            m,
            "homelab_agent_runs_total{host=\"lab\",trigger=\"watch\",result=\"error\"}",
        )
        .unwrap_or(0.0)
            >= 1.0
    });
    assert!(
        sample(
            &m,
            "homelab_agent_run_phase_failures_total{host=\"lab\",phase=\"observe\"}"
        )
        .unwrap()
            >= 1.0,
        "{m}"
    );
    assert!(
        elsewhere.read_dir().unwrap().next().is_none(),
        "nothing written through the symlink"
    );
    std::fs::remove_file(&app).unwrap();
    wait_for_file(
        &lab.host_path("/srv/app/f0.conf"),
        "value = 0\n",
        Duration::from_secs(10),
    );

    // Everything the stand-in stored, over every push: once nothing is
    // queued and the stand-in holds every event the agent counts as sent.
    daemon.wait_metrics("every event delivered", Duration::from_secs(30), |m| {
        sample(m, "homelab_agent_loki_queued_events{host=\"lab\"}") == Some(0.0)
            && sample(m, "homelab_agent_loki_events_sent_total{host=\"lab\"}")
                == Some(loki.entries().len() as f64)
    });
    let entries = loki.entries();
    let mut last: BTreeMap<String, u128> = BTreeMap::new();
    for e in &entries {
        let keys: BTreeSet<&str> = e.labels.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            BTreeSet::from(["event", "host", "job"]),
            "{:?}",
            e.labels
        );
        assert_eq!(e.labels["job"], "homelab-agent");
        assert_eq!(e.labels["host"], "lab");
        assert!(
            EVENTS.contains(&e.labels["event"].as_str()),
            "{:?}",
            e.labels
        );
        let line = e.json();
        assert_eq!(line["event"], e.labels["event"].as_str(), "{line}");
        assert!(
            line["msg"].is_string() && line["level"].is_string(),
            "{line}"
        );
        // Time order within each stream, and never two equal timestamps.
        let prev = last.insert(e.labels["event"].clone(), e.ts);
        assert!(prev.is_none_or(|p| p < e.ts), "out of order: {:?}", e);
    }
    assert_eq!(count(&entries, "refused"), 1, "the refusal is sent once");
    let pushes = loki.pushes();
    assert!(
        pushes.len() < entries.len(),
        "events are batched: {} pushes for {} events",
        pushes.len(),
        entries.len()
    );
    for p in &pushes {
        assert_eq!(p.status, 204, "{}", p.body);
        assert_eq!(p.tenant.as_deref(), Some("homelab"));
        assert_eq!(p.basic_user.as_deref(), Some("agent"));
        assert!(p.basic_ok);
        assert_eq!(p.content_type.as_deref(), Some("application/json"));
        assert!(!p.body.contains(PASSWORD));
    }
    let (_, metrics) = daemon.metrics(Some("text/plain"));
    assert_eq!(
        sample(
            &metrics,
            "homelab_agent_loki_events_sent_total{host=\"lab\"}"
        ),
        Some(entries.len() as f64),
        "{metrics}"
    );
    for reason in ["queue_full", "rejected", "retries_exhausted"] {
        let series =
            format!("homelab_agent_loki_events_dropped_total{{host=\"lab\",reason=\"{reason}\"}}");
        assert_eq!(sample(&metrics, &series), Some(0.0), "{series}");
    }
    assert!(!daemon.log_text().contains(PASSWORD));
}

#[test]
fn loki_answering_429_500_400_slowly_or_not_at_all_never_stops_the_agent() {
    let mut loki = LokiStandIn::start();
    let lab = LocalLab::new();
    lab.write("hosts/lab.yaml", HOST);
    lab.write("modules/app/module.yaml", &module(8, false));
    lab.write_config(&loki_config(
        &loki,
        "  max_buffered_events: 6\n  batch_size: 4\n  max_retries: 5\n  max_backoff: 1s\n  timeout: 1s\n",
    ));
    let daemon = lab.start();
    let series = |reason: &str| {
        format!("homelab_agent_loki_events_dropped_total{{host=\"lab\",reason=\"{reason}\"}}")
    };
    // 10 creates at once into room for 6: the oldest queued are dropped and
    // counted, the rest sent in batches of at most 4.
    let m = daemon.wait_metrics("the first run's events", Duration::from_secs(10), |m| {
        sample(m, "homelab_agent_loki_queued_events{host=\"lab\"}") == Some(0.0)
            && sample(m, "homelab_agent_loki_events_sent_total{host=\"lab\"}").unwrap_or(0.0) > 0.0
    });
    assert_eq!(sample(&m, &series("queue_full")), Some(4.0), "{m}");
    assert_eq!(count(&loki.entries(), "apply"), 6);
    assert!(loki.pushes().iter().all(|p| p.entry_count() <= 4));
    let edit_and_heal = |i: usize| -> Duration {
        let path = lab.host_path(&format!("/srv/app/f{i}.conf"));
        std::fs::write(&path, "edited\n").unwrap();
        wait_for_file(&path, &format!("value = {i}\n"), Duration::from_secs(10))
    };

    // 429, then 500: the batch is retried with backoff and stored once.
    loki.fail_sequence(&[429, 500]);
    let before = loki.pushes().len();
    edit_and_heal(0);
    loki.wait_for("the retried drift", Duration::from_secs(10), |e| {
        count(e, "correction") >= 1
    });
    let pushes = loki.pushes()[before..].to_vec();
    let statuses: Vec<u16> = pushes.iter().take(3).map(|p| p.status).collect();
    assert_eq!(statuses, [429, 500, 204], "{pushes:?}");
    assert_eq!(pushes[0].body, pushes[2].body, "the same batch is resent");
    for (a, b) in [(0, 1), (1, 2)] {
        let gap = pushes[b].at - pushes[a].at;
        assert!(gap >= Duration::from_millis(390), "backoff was {gap:?}");
    }
    // Stored once: every entry of the resent batch appears once.
    let entries = loki.entries();
    for (_, values) in &pushes[2].streams {
        for (ts, _) in values {
            let n = entries.iter().filter(|e| e.ts.to_string() == *ts).count();
            assert_eq!(n, 1, "entry {ts} stored {n} times");
        }
    }

    // 429 and 503 with Retry-After: the agent waits what the server asked
    // (1 s, over its own 500 ms first backoff); a server asking for an hour
    // is waited for at most max_backoff (1 s here).
    loki.retry_after(Some("1"));
    loki.fail_sequence(&[429, 503]);
    let before = loki.pushes().len();
    edit_and_heal(0);
    loki.wait_for(
        "the drift after Retry-After",
        Duration::from_secs(10),
        |e| count(e, "correction") >= 2,
    );
    let pushes = loki.pushes()[before..].to_vec();
    let statuses: Vec<u16> = pushes.iter().take(3).map(|p| p.status).collect();
    assert_eq!(statuses, [429, 503, 204], "{pushes:?}");
    for (a, b) in [(0, 1), (1, 2)] {
        let gap = pushes[b].at - pushes[a].at;
        // Our own first backoff is 400..600 ms; Retry-After says 1 s.
        assert!(
            gap >= Duration::from_millis(950),
            "Retry-After: 1 not honoured: waited {gap:?}"
        );
    }
    loki.retry_after(Some("3600"));
    loki.fail_sequence(&[429]);
    let before = loki.pushes().len();
    edit_and_heal(0);
    loki.wait_for(
        "the drift after a long Retry-After",
        Duration::from_secs(10),
        |e| count(e, "correction") >= 3,
    );
    // (Waiting the hour asked would have failed the wait above: the retry
    // came after max_backoff.)
    let pushes = loki.pushes()[before..].to_vec();
    let statuses: Vec<u16> = pushes.iter().take(2).map(|p| p.status).collect();
    assert_eq!(statuses, [429, 204], "{pushes:?}");
    loki.retry_after(None);

    // 400 (a partial reject): the ignored entry is counted, the batch is
    // not resent.
    loki.reject_first_entry_next(1);
    let before = loki.pushes().len();
    edit_and_heal(1);
    daemon.wait_metrics("a rejected event", Duration::from_secs(10), |m| {
        sample(m, &series("rejected")) == Some(1.0)
    });
    // A barrier: the queue sends in order, so once a later event is stored,
    // a resend of the rejected batch would have come before it.
    let corrections = count(&loki.entries(), "correction");
    edit_and_heal(1);
    loki.wait_for("a later correction", Duration::from_secs(30), |e| {
        count(e, "correction") > corrections
    });
    let pushes = loki.pushes()[before..].to_vec();
    assert_eq!(pushes[0].status, 400, "{pushes:?}");
    assert_eq!(pushes[0].entry_count(), 2);
    assert!(
        pushes[1..].iter().all(|p| p.body != pushes[0].body),
        "a 400 is not resent: {pushes:?}"
    );
    let (ignored_ts, _) = &pushes[0].streams[0].1[0];
    let (stored_ts, _) = &pushes[0].streams[1].1[0];
    let entries = loki.entries();
    assert!(
        entries.iter().all(|e| e.ts.to_string() != *ignored_ts),
        "the ignored entry was not resent"
    );
    assert_eq!(
        entries
            .iter()
            .filter(|e| e.ts.to_string() == *stored_ts)
            .count(),
        1,
        "the other entry was stored once"
    );

    // Slow Loki (answers after 3 s, the agent gives up after 1 s): the heal
    // run ends without waiting for the push (before the agent gives up on
    // the batch), which is dropped after its retries and counted.
    loki.delay(Duration::from_secs(3));
    let exhausted = sample(
        &daemon.metrics(Some("text/plain")).1,
        &series("retries_exhausted"),
    );
    edit_and_heal(2);
    daemon.wait_until(
        "the heal run with Loki slow",
        Duration::from_secs(30),
        |_| true,
    );
    assert_eq!(
        sample(
            &daemon.metrics(Some("text/plain")).1,
            &series("retries_exhausted")
        ),
        exhausted,
        "the heal run waited for Loki"
    );
    daemon.wait_metrics("retries exhausted", Duration::from_secs(40), |m| {
        sample(m, &series("retries_exhausted")).unwrap_or(0.0) >= 2.0
    });
    loki.delay(Duration::ZERO);

    // Loki down: the agent keeps healing; at most 6 events are held; the
    // oldest are dropped and counted.
    loki.stop();
    let mut max_queued = 0.0f64;
    for i in 3..8 {
        edit_and_heal(i);
        let (_, m) = daemon.metrics(Some("text/plain"));
        max_queued =
            max_queued.max(sample(&m, "homelab_agent_loki_queued_events{host=\"lab\"}").unwrap());
    }
    let m = daemon.wait_metrics("queue_full drops", Duration::from_secs(10), |m| {
        sample(m, &series("queue_full")).unwrap_or(0.0) > 0.0
    });
    let queued = sample(&m, "homelab_agent_loki_queued_events{host=\"lab\"}").unwrap();
    assert!(
        queued <= 6.0 && max_queued <= 6.0,
        "queued {queued}, at most {max_queued}"
    );
    let status = daemon.status();
    assert_eq!(status["last_run"]["result"], "success", "{status}");

    // Back up: what is still held is delivered, newest last.
    loki.restart();
    let m = daemon.wait_metrics("the queue to drain", Duration::from_secs(30), |m| {
        sample(m, "homelab_agent_loki_queued_events{host=\"lab\"}") == Some(0.0)
    });
    let entries = loki.wait_for("the newest correction", Duration::from_secs(10), |e| {
        of_event(e, "correction")
            .iter()
            .any(|c| c.json()["resource"] == "file:/srv/app/f7.conf")
    });
    // Every event is accounted for: sent or dropped for a reason.
    let sent = sample(&m, "homelab_agent_loki_events_sent_total{host=\"lab\"}").unwrap();
    let dropped: f64 = ["queue_full", "rejected", "retries_exhausted"]
        .iter()
        .map(|r| sample(&m, &series(r)).unwrap())
        .sum();
    let labels = "{host=\"lab\",module=\"app\",kind=\"file\"}";
    let drifts = sample(&m, &format!("homelab_agent_drift_events_total{labels}")).unwrap();
    let heals = sample(
        &m,
        &format!("homelab_agent_drift_corrections_total{labels}"),
    )
    .unwrap();
    assert!(drifts >= 8.0 && heals == drifts, "{m}");
    // 10 creates, then one drift and one correction event per drift.
    assert_eq!(
        sent + dropped,
        10.0 + drifts + heals,
        "sent {sent} dropped {dropped}\n{m}"
    );
    assert_eq!(sent as usize, entries.len());
}

#[test]
fn agent_apply_sends_its_events_too_and_bad_loki_settings_are_refused() {
    let loki = LokiStandIn::start();
    let lab = LocalLab::new();
    lab.write("hosts/lab.yaml", HOST);
    lab.write("modules/app/module.yaml", &module(1, false));
    let config = lab.write_config(&loki_config(&loki, ""));
    let out = agent()
        .args(["apply", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // Flushed before exit: no wait needed.
    let entries = loki.entries();
    assert_eq!(count(&entries, "apply"), 3, "{entries:?}");
    assert!(entries.iter().all(|e| e.json()["trigger"] == "cli"));

    // A password file others can read stops `agent run` at start.
    let pw = lab.tmp.path().join("loose-password");
    std::fs::write(&pw, "pw\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = lab.write_config(&loki_config(
        &loki,
        &format!("  username: agent\n  password_file: {}\n", pw.display()),
    ));
    let out = homelab_agent_tests::run_agent_bounded(agent().args([
        "run",
        "--config",
        config.to_str().unwrap(),
    ]));
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("loki.password_file: Loki password file")
            && err.contains("is readable by group or others (mode 0644); run: chmod 600"),
        "{err}"
    );

    // A bad URL is a config error with its line.
    let config = lab.write_config("loki:\n  url: loki.example:3100\n");
    let out = agent()
        .args(["validate", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("agent.yaml:7: `loki.url: loki.example:3100` is not an http(s) URL"),
        "{}",
        stderr(&out)
    );
}

/// No secret value in any Loki push or in `/metrics` (both formats), with a
/// secret file that drifts and is healed, and a reference that fails.
#[test]
fn secrets_never_reach_loki_or_metrics() {
    const TOKEN: &str = "connect-token-for-telemetry-tests";
    const VALUE: &str = "TelemetrySecretVal9Kq2";
    let connect = ConnectStandIn::start(TOKEN);
    let vault = connect.add_vault("homelab");
    connect.add_item(&vault, "db", &[("password", VALUE)]);
    let loki = LokiStandIn::start();
    let lab = LocalLab::new();
    lab.write("hosts/lab.yaml", HOST);
    lab.write(
        "modules/app/module.yaml",
        "resources:\n  - file: /srv/app/db.conf\n    content: \"password={{ secret('op://homelab/db/password') }}\\n\"\n  - file: /srv/app/broken.conf\n    content: \"{{ secret('op://homelab/nope/password') }}\\n\"\n",
    );
    let token = lab.write_private("op-token", &format!("{TOKEN}\n"));
    lab.write_config(&format!(
        "onepassword:\n  connect_url: {}\n  token_file: {}\n{}",
        connect.url(),
        token.display(),
        loki_config(&loki, "")
    ));
    let daemon = lab.start();
    let db = lab.host_path("/srv/app/db.conf");
    wait_for_file(&db, &format!("password={VALUE}\n"), Duration::from_secs(10));
    std::fs::write(&db, "password=guess\n").unwrap();
    wait_for_file(&db, &format!("password={VALUE}\n"), Duration::from_secs(10));
    let entries = loki.wait_for(
        "the heal and the skipped file",
        Duration::from_secs(10),
        |e| count(e, "correction") == 1 && count(e, "error") >= 1,
    );
    let skipped = of_event(&entries, "error")[0].json();
    assert_eq!(skipped["resource"], "file:/srv/app/broken.conf");
    assert!(skipped["error"]
        .as_str()
        .unwrap()
        .contains("op://homelab/nope/password"));
    let m = daemon.metrics(Some("text/plain")).1;
    assert!(
        sample(
            &m,
            "homelab_agent_secret_errors_total{host=\"lab\",reason=\"failed\"}"
        )
        .unwrap()
            >= 1.0,
        "{m}"
    );
    // Every form the main leak test looks for (raw, URL, form, JSON, hex,
    // base64 at each alignment), in every push and both /metrics formats.
    let mut ev = Evidence::default();
    let pushes = loki.pushes();
    assert!(!pushes.is_empty());
    for p in pushes {
        ev.add("loki push", p.body);
    }
    ev.add("/metrics text", m);
    ev.add(
        "/metrics openmetrics",
        daemon.metrics(Some("application/openmetrics-text")).1,
    );
    ev.assert_no_leaks(&[VALUE]);
}
