//! Secrets from 1Password end to end: the real `agent` binary, configured
//! with `onepassword: {connect_url, token_file}`, against the Connect
//! stand-in (`homelab_agent_tests::connect_standin`, a real HTTP server on
//! 127.0.0.1). Converging, the per-run cache, rotation, Connect down or
//! failing mid-run, a deleted item, `agent secrets check`, no Connect at all,
//! the mode of a secret file from its first byte, and the leak test: no
//! secret value (nor its common encodings) anywhere but in the files that
//! are meant to hold it.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use homelab_agent_tests::connect_standin::ConnectStandIn;
use homelab_agent_tests::git_server::http_request;
use homelab_agent_tests::leaks::{contains, forms, Evidence};
use homelab_agent_tests::{agent, run_watching_modes, stderr, stdout, tree, Node};

const TOKEN: &str = "ops-connect-token-Jx81-e2e-Vq4";
/// A distinctive value.
const DB_PASSWORD: &str = "Lk7-zeta-CANARY-91xq";
/// A low-entropy one.
const DB_USER: &str = "hunter2";
/// One whose URL, JSON (HTML-safe) and base64 forms all differ from it.
const API_KEY: &str = "p@ss/w0rd+Zq8=&x<y>";
/// Rotated values.
const ROTATED: &str = "Rot8-omega-CANARY-55vb";
const ROTATED_AGAIN: &str = "Rot9-sigma-CANARY-08kd";

const HOST: &str = "platform: linux\nroots: [/srv]\nmodules:\n  - name: app\n";

/// Inline content, a template, a section reference, a field of an item
/// another file also uses, and a file without secrets.
const APP: &str = r#"resources:
  - directory: /srv/app
  - file: /srv/app/db.conf
    content: "user=app\npassword={{ secret('op://homelab/db/password') }}\n"
  - file: /srv/app/app.ini
    template: app.ini.j2
  - file: /srv/app/user.txt
    content: "{{ secret('op://homelab/db/username') }}\n"
  - file: /srv/app/api.env
    content: "API_KEY={{ secret('op://homelab/api/prod/key') }}\n"
  - file: /srv/app/plain.txt
    content: "no secrets here\n"
"#;

const APP_INI: &str = "[database]\nuser = {{ secret(\"op://homelab/db/username\") }}\npassword = {{ secret('op://homelab/db/password') }}\n";

/// The files of [`APP`] that hold secrets.
const SECRET_FILES: &[&str] = &[
    "/srv/app/db.conf",
    "/srv/app/app.ini",
    "/srv/app/user.txt",
    "/srv/app/api.env",
];

fn db_conf(password: &str) -> String {
    format!("user=app\npassword={password}\n")
}

fn app_ini(password: &str) -> String {
    format!("[database]\nuser = {DB_USER}\npassword = {password}\n")
}

/// A sandbox, a repo (a local directory), an agent config and a Connect
/// stand-in holding vault `homelab` with items `db` (username, password)
/// and `api` (section `prod`: key).
struct Lab {
    lab: homelab_agent_tests::Lab,
    connect: ConnectStandIn,
    vault: String,
    db: String,
    api: String,
}

impl std::ops::Deref for Lab {
    type Target = homelab_agent_tests::Lab;
    fn deref(&self) -> &homelab_agent_tests::Lab {
        &self.lab
    }
}

impl Lab {
    fn new() -> Lab {
        Lab::with_module(APP)
    }

    fn with_module(module: &str) -> Lab {
        let connect = ConnectStandIn::start(TOKEN);
        let vault = connect.add_vault("homelab");
        let db = connect.add_item(
            &vault,
            "db",
            &[("username", DB_USER), ("password", DB_PASSWORD)],
        );
        let api = connect.add_item_with_section(&vault, "api", "prod", &[("key", API_KEY)]);
        let lab = Lab {
            lab: homelab_agent_tests::Lab::empty(),
            connect,
            vault,
            db,
            api,
        };
        std::fs::create_dir_all(lab.home()).unwrap();
        lab.write("hosts/lab.yaml", HOST);
        lab.write("modules/app/module.yaml", module);
        lab.write("modules/app/templates/app.ini.j2", APP_INI);
        std::fs::write(lab.token_file(), format!("{TOKEN}\n")).unwrap();
        std::fs::set_permissions(lab.token_file(), std::fs::Permissions::from_mode(0o600)).unwrap();
        lab.write_config(true, "");
        lab
    }

    /// `$HOME`, `$XDG_CACHE_HOME` and `$TMPDIR` of the agent: inside the
    /// lab, so a cache the agent kept anywhere would be seen on disk.
    fn home(&self) -> PathBuf {
        self.tmp.path().join("home")
    }

    fn token_file(&self) -> PathBuf {
        self.tmp.path().join("op-token")
    }

    fn state_dir(&self) -> PathBuf {
        self.root().join("var/lib/homelab-agent")
    }

    fn read(&self, path: &str) -> String {
        std::fs::read_to_string(self.host_path(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
    }

    fn mode(&self, path: &str) -> u32 {
        std::fs::metadata(self.host_path(path))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    /// `onepassword:` when `connect`; `extra` is appended verbatim.
    fn write_config(&self, connect: bool, extra: &str) {
        let op = if connect {
            format!(
                "onepassword:\n  connect_url: {}\n  token_file: {}\n",
                self.connect.url(),
                self.token_file().display()
            )
        } else {
            String::new()
        };
        self.lab.write_config("lab", &format!("{op}{extra}"));
    }

    /// `agent ARGS --config agent.yaml`.
    fn agent(&self, args: &[&str]) -> Output {
        agent()
            .env("HOME", self.home())
            .env("XDG_CACHE_HOME", self.home().join(".cache"))
            .env("TMPDIR", self.home())
            .args(args)
            .arg("--config")
            .arg(self.config())
            .output()
            .expect("spawn agent")
    }

    /// `agent ARGS --config agent.yaml`, which must exit with `code`.
    fn expect(&self, args: &[&str], code: i32) -> Output {
        let out = self.agent(args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "agent {args:?}: stdout:\n{}\nstderr:\n{}",
            stdout(&out),
            stderr(&out)
        );
        out
    }

    /// `plan --json` as id -> classification.
    fn classes(&self) -> BTreeMap<String, String> {
        let out = self.expect(&["plan", "--json"], 0);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["id"].as_str().unwrap().to_string(),
                    r["classification"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// The inventory from `agent status --json`.
    fn inventory(&self) -> serde_json::Map<String, serde_json::Value> {
        let out = self.expect(&["status", "--json"], 0);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["inventory"].as_object().cloned().unwrap_or_default()
    }

    /// Replaces the port, ids and paths that change between runs.
    fn redact(&self, text: &str) -> String {
        text.replace(&self.connect.url(), "http://127.0.0.1:[PORT]")
            .replace(&self.vault, "[VAULT]")
            .replace(&self.db, "[DB_ITEM]")
            .replace(&self.api, "[API_ITEM]")
            .replace(self.root().to_str().unwrap(), "[ROOT]")
            .replace(self.repo().to_str().unwrap(), "[REPO]")
    }
}

fn id(path: &str) -> String {
    format!("file:{path}")
}

/// Every file under `dir` holding `needle` (bytes).
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    tree(dir)
        .into_iter()
        .filter_map(|(rel, node)| match node {
            Node::File { content, .. } if contains(&content, needle) => Some(dir.join(rel)),
            _ => None,
        })
        .collect()
}

// --- 1. converging ---

#[test]
fn apply_writes_secret_values_with_mode_0600_and_then_has_nothing_to_do() {
    let lab = Lab::new();
    let out = lab.expect(&["apply"], 0);
    let text = stdout(&out);
    for path in SECRET_FILES {
        assert!(
            text.contains(&format!("+ {} created", id(path))),
            "{path}:\n{text}"
        );
    }
    assert_eq!(lab.read("/srv/app/db.conf"), db_conf(DB_PASSWORD));
    assert_eq!(lab.read("/srv/app/app.ini"), app_ini(DB_PASSWORD));
    assert_eq!(lab.read("/srv/app/user.txt"), format!("{DB_USER}\n"));
    assert_eq!(lab.read("/srv/app/api.env"), format!("API_KEY={API_KEY}\n"));
    assert_eq!(lab.read("/srv/app/plain.txt"), "no secrets here\n");
    // No `mode:` in the module: files holding secrets are 0600, others the default.
    for path in SECRET_FILES {
        assert_eq!(lab.mode(path), 0o600, "{path}");
    }
    assert_eq!(lab.mode("/srv/app/plain.txt"), 0o644);

    let out = lab.expect(&["plan", "--detailed-exitcode"], 0);
    assert!(
        stdout(&out).contains("No changes: 6 resource(s) in sync."),
        "{}",
        stdout(&out)
    );
    assert!(lab.classes().values().all(|c| c == "in_sync"));
}

// --- 2. one fetch per item per run ---

#[test]
fn each_item_is_fetched_once_per_run_and_nothing_is_cached_on_disk() {
    let mut module = String::from("resources:\n  - directory: /srv/bulk\n");
    let mut fields = Vec::new();
    for i in 0..10 {
        module.push_str(&format!(
            "  - file: /srv/bulk/k{i}\n    content: \"{{{{ secret('op://homelab/bulk/k{i}') }}}}\\n\"\n"
        ));
        fields.push((format!("k{i}"), format!("bulk-value-{i}-Tz6w")));
    }
    let lab = Lab::with_module(&module);
    let pairs: Vec<(&str, &str)> = fields
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    lab.connect.add_item(&lab.vault, "bulk", &pairs);

    // Per run: the vault by name (one filtered list), the item by title (one
    // filtered list) and the item itself (one GET). Ten references, three
    // requests; every run pays them again.
    let cost = |args: &[&str], code: i32| {
        let before = lab.connect.requests();
        lab.expect(args, code);
        lab.connect.requests() - before
    };
    assert_eq!(cost(&["plan"], 0), 3);
    assert_eq!(cost(&["apply"], 0), 3);
    for i in 0..10 {
        assert_eq!(
            lab.read(&format!("/srv/bulk/k{i}")),
            format!("bulk-value-{i}-Tz6w\n")
        );
    }
    assert_eq!(cost(&["apply"], 0), 3);
    assert_eq!(cost(&["plan", "--json"], 0), 3);
    assert_eq!(cost(&["plan", "--detailed-exitcode"], 0), 3);
    // Nothing cached on disk: each value is in its one managed file and
    // nowhere else in the lab (repo, config, sandbox root with the state
    // directory, and the agent's $HOME, cache and temp directories).
    for (i, (_, value)) in fields.iter().enumerate() {
        assert_eq!(
            files_containing(lab.tmp.path(), value.as_bytes()),
            [lab.host_path(&format!("/srv/bulk/k{i}"))],
            "{value}"
        );
    }
}

// --- 3. rotation ---

#[test]
fn a_rotated_secret_changes_exactly_the_files_that_use_it() {
    let lab = Lab::new();
    lab.expect(&["apply"], 0);
    lab.connect.set_field(&lab.db, "password", ROTATED);

    let classes = lab.classes();
    let expected: BTreeMap<String, String> = [
        ("directory:/srv/app", "in_sync"),
        ("file:/srv/app/db.conf", "change"),
        ("file:/srv/app/app.ini", "change"),
        // Same item, another field: untouched.
        ("file:/srv/app/user.txt", "in_sync"),
        ("file:/srv/app/api.env", "in_sync"),
        ("file:/srv/app/plain.txt", "in_sync"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(classes, expected);

    let out = lab.expect(&["plan", "--detailed-exitcode"], 2);
    let text = stdout(&out);
    for secret in [DB_PASSWORD, ROTATED, DB_USER] {
        assert!(!text.contains(secret), "{secret} in the plan:\n{text}");
    }
    insta::assert_snapshot!("rotated_plan", lab.redact(&text));

    lab.expect(&["apply"], 0);
    assert_eq!(lab.read("/srv/app/db.conf"), db_conf(ROTATED));
    assert_eq!(lab.read("/srv/app/app.ini"), app_ini(ROTATED));
    assert_eq!(lab.mode("/srv/app/db.conf"), 0o600);
    lab.expect(&["plan", "--detailed-exitcode"], 0);
}

/// Applies `module`, then a revision where db.conf drops its password:
/// the file on disk still holds it, and plans must show neither its old
/// lines nor a hash of it (a low-entropy secret could be brute-forced).
fn check_dropped_secret_is_hidden(lab: &Lab, module: &str) {
    lab.write("modules/app/module.yaml", module);
    lab.expect(&["apply"], 0);
    lab.write(
        "modules/app/module.yaml",
        &module.replace("password={{ secret('op://homelab/db/password') }}\\n", ""),
    );
    for args in [&["plan"][..], &["plan", "--json"][..]] {
        let out = lab.expect(args, 0);
        let text = stdout(&out);
        assert!(!text.contains(DB_PASSWORD), "{args:?}:\n{text}");
        assert!(
            text.contains("39 bytes (held secrets, not shown)"),
            "{text}"
        );
        let old = std::fs::read(lab.host_path("/srv/app/db.conf")).unwrap();
        let hash = blake3::hash(&old).to_hex();
        assert!(!text.contains(&hash[..12]), "{text}");
    }
    lab.expect(&["apply"], 0);
    assert_eq!(lab.read("/srv/app/db.conf"), "user=app\n");
}

#[test]
fn a_file_that_stops_holding_a_secret_does_not_show_the_old_value() {
    let lab = Lab::new();
    check_dropped_secret_is_hidden(&lab, APP);
    assert_eq!(lab.mode("/srv/app/db.conf"), 0o644);
}

// --- 4. Connect down, an item deleted, Connect failing mid-run ---

/// No file under the sandbox (state included) holds the placeholder.
fn assert_no_placeholder(lab: &Lab) {
    let found = files_containing(&lab.root(), b"<unresolved secret>");
    assert!(found.is_empty(), "placeholder written to {found:?}");
}

#[test]
fn connect_down_skips_secret_resources_and_converges_the_rest() {
    let mut lab = Lab::new();
    // A file that was there before the agent: it will be adopted, not created.
    std::fs::create_dir_all(lab.host_path("/srv/app")).unwrap();
    std::fs::write(lab.host_path("/srv/app/api.env"), "API_KEY=old\n").unwrap();
    lab.connect.stop();

    let out = lab.expect(&["apply"], 0);
    let text = stdout(&out);
    assert!(text.contains("+ file:/srv/app/plain.txt created"), "{text}");
    for (path, reference) in [
        ("/srv/app/db.conf", "op://homelab/db/password"),
        ("/srv/app/app.ini", "op://homelab/db/username"),
        ("/srv/app/user.txt", "op://homelab/db/username"),
        ("/srv/app/api.env", "op://homelab/api/prod/key"),
    ] {
        let want = format!(
            "? {} skipped: {reference}: cannot reach Connect at {}",
            id(path),
            lab.connect.url()
        );
        assert!(text.contains(&want), "missing {want:?} in:\n{text}");
    }
    assert!(
        text.contains("0 pruned") && text.contains("0 failed, 4 skipped."),
        "{text}"
    );
    for path in ["/srv/app/db.conf", "/srv/app/app.ini", "/srv/app/user.txt"] {
        assert!(!lab.host_path(path).exists(), "{path} was written");
    }
    assert_eq!(lab.read("/srv/app/api.env"), "API_KEY=old\n");
    assert_no_placeholder(&lab);
    // A skipped resource was not applied: it is not in the inventory (which
    // would make the pre-existing api.env "created", so prunable).
    let inventory = lab.inventory();
    for path in SECRET_FILES {
        assert!(
            !inventory.contains_key(&id(path)),
            "{path} recorded although skipped: {inventory:?}"
        );
    }

    let out = lab.expect(&["plan", "--detailed-exitcode"], 2);
    assert!(
        stdout(&out).contains(&format!(
            "? file:/srv/app/db.conf  (module app) skipped: needs op://homelab/db/password: cannot reach Connect at {}",
            lab.connect.url()
        )),
        "{}",
        stdout(&out)
    );
    lab.expect(&["apply", "--detailed-exitcode"], 2);

    lab.connect.restart();
    lab.expect(&["apply"], 0);
    assert_eq!(lab.read("/srv/app/db.conf"), db_conf(DB_PASSWORD));
    assert_eq!(lab.read("/srv/app/api.env"), format!("API_KEY={API_KEY}\n"));
    let inventory = lab.inventory();
    assert_eq!(inventory[&id("/srv/app/api.env")]["origin"], "adopted");
    assert_eq!(inventory[&id("/srv/app/db.conf")]["origin"], "created");
    lab.expect(&["plan", "--detailed-exitcode"], 0);
}

/// The exit codes of README.md's table, and `agent status`, agree with the
/// run's result: a run that only skipped (Connect down) exits 0, or 2 with
/// `--detailed-exitcode` (something left undone), is recorded as
/// `skipped`, and its revision is applied; drift reported under
/// `on_drift: report` is left undone too (2); an error is 1.
#[test]
fn exit_codes_and_status_agree_on_a_run_that_only_skipped() {
    let mut lab = Lab::with_module(&format!(
        "{APP}  - file: /srv/app/notes.txt\n    content: \"notes\\n\"\n    on_drift: report\n"
    ));
    lab.connect.stop();
    lab.expect(&["apply", "--detailed-exitcode"], 2);
    let out = lab.expect(&["status"], 0);
    let text = stdout(&out);
    assert!(
        !text.contains("none yet") && text.contains("Applied revision: local-"),
        "{text}"
    );
    assert!(
        text.contains("Skipped in the last run: 4 resource(s)"),
        "{text}"
    );
    assert!(text.contains(" skipped  local-"), "{text}");
    // Nothing changed, 4 still skipped: 0 without the flag, 2 with it.
    lab.expect(&["apply"], 0);
    lab.expect(&["apply", "--detailed-exitcode"], 2);
    lab.expect(&["plan", "--detailed-exitcode"], 2);
    let out = lab.expect(&["status", "--json"], 0);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["runs"][0]["result"], "skipped", "{v}");
    // A skip is not an error: the run has none (why it skipped is in the
    // plan, the log and `secrets check`).
    assert!(v["runs"][0]["error"].is_null(), "{v}");
    assert!(v["applied"]["last_success_at"].as_u64().is_some(), "{v}");

    lab.connect.restart();
    lab.expect(&["apply", "--detailed-exitcode"], 2);
    lab.expect(&["apply", "--detailed-exitcode"], 0);
    lab.expect(&["plan", "--detailed-exitcode"], 0);
    // Drift left alone under `on_drift: report`: apply leaves it undone (2).
    std::fs::write(lab.host_path("/srv/app/notes.txt"), "mine\n").unwrap();
    lab.expect(&["apply", "--detailed-exitcode"], 2);
    lab.expect(&["apply"], 0);
    // A resource that cannot be handled: 1, with or without the flag.
    std::fs::remove_file(lab.host_path("/srv/app/plain.txt")).unwrap();
    std::fs::create_dir(lab.host_path("/srv/app/plain.txt")).unwrap();
    lab.expect(&["apply", "--detailed-exitcode"], 1);
    lab.expect(&["apply"], 1);
}

#[test]
fn connect_down_after_converging_touches_and_prunes_no_secret_file() {
    // user.txt is report-only: a hand edit of it must stay drift (shown,
    // left alone) across an outage, never turn into a "change" that is
    // overwritten.
    let module = APP.replace(
        "    content: \"{{ secret('op://homelab/db/username') }}\\n\"\n",
        "    content: \"{{ secret('op://homelab/db/username') }}\\n\"\n    on_drift: report\n",
    );
    assert_ne!(module, APP);
    let mut lab = Lab::with_module(&module);
    lab.expect(&["apply"], 0);
    std::fs::write(lab.host_path("/srv/app/user.txt"), "edited by hand\n").unwrap();
    let secret_files = |lab: &Lab| -> Vec<(String, u32)> {
        SECRET_FILES
            .iter()
            .map(|p| (lab.read(p), lab.mode(p)))
            .collect()
    };
    let before = secret_files(&lab);

    lab.connect.stop();
    lab.write(
        "modules/app/module.yaml",
        &module.replace("no secrets here", "no secrets here, v2"),
    );
    let out = lab.expect(&["apply"], 0);
    let text = stdout(&out);
    assert!(
        text.contains("~ file:/srv/app/plain.txt updated (content)"),
        "{text}"
    );
    assert!(text.contains("0 pruned"), "{text}");
    assert!(text.contains("4 skipped."), "{text}");
    assert_eq!(lab.read("/srv/app/plain.txt"), "no secrets here, v2\n");
    assert_eq!(secret_files(&lab), before, "a secret file was touched");
    assert_no_placeholder(&lab);

    lab.connect.restart();
    let classes = lab.classes();
    assert_eq!(classes[&id("/srv/app/user.txt")], "drift");
    assert_eq!(classes[&id("/srv/app/db.conf")], "in_sync");
    let out = lab.expect(&["apply"], 0);
    assert!(
        stdout(&out).contains("file:/srv/app/user.txt drift reported, left alone"),
        "{}",
        stdout(&out)
    );
    assert_eq!(lab.read("/srv/app/user.txt"), "edited by hand\n");
}

#[test]
fn a_deleted_item_skips_what_uses_it_and_names_the_item() {
    let lab = Lab::new();
    lab.expect(&["apply"], 0);
    lab.connect.remove_item(&lab.db);
    let out = lab.expect(&["apply", "--detailed-exitcode"], 2);
    let text = stdout(&out);
    let want = format!(
        "? file:/srv/app/db.conf skipped: op://homelab/db/password: Connect at {} has no item \"db\" in vault {}",
        lab.connect.url(),
        lab.vault
    );
    assert!(text.contains(&want), "missing {want:?} in:\n{text}");
    assert!(
        text.contains("0 pruned") && text.contains("3 skipped."),
        "{text}"
    );
    // What the item fed stays as it was; the rest is in sync.
    assert_eq!(lab.read("/srv/app/db.conf"), db_conf(DB_PASSWORD));
    assert_eq!(lab.read("/srv/app/api.env"), format!("API_KEY={API_KEY}\n"));
    assert_no_placeholder(&lab);
}

#[test]
fn connect_failing_mid_run_writes_only_complete_files() {
    let lab = Lab::new();
    // Vault lookup, item `db` (list + get) are served; then Connect fails.
    lab.connect.fail_after(3, 500, 100);
    let out = lab.expect(&["apply", "--detailed-exitcode"], 2);
    let text = stdout(&out);
    assert!(
        text.contains("? file:/srv/app/api.env skipped: op://homelab/api/prod/key: Connect at"),
        "{text}"
    );
    assert!(text.contains("answered 500"), "{text}");
    assert!(text.contains("1 skipped."), "{text}");
    assert!(!lab.host_path("/srv/app/api.env").exists());
    assert_eq!(lab.read("/srv/app/db.conf"), db_conf(DB_PASSWORD));
    assert_eq!(lab.read("/srv/app/app.ini"), app_ini(DB_PASSWORD));
    assert_no_placeholder(&lab);

    lab.connect.fail_next(500, 0);
    lab.expect(&["apply"], 0);
    assert_eq!(lab.read("/srv/app/api.env"), format!("API_KEY={API_KEY}\n"));
    lab.expect(&["plan", "--detailed-exitcode"], 0);
}

// --- 5. agent secrets check ---

#[test]
fn secrets_check_names_each_bad_reference_and_its_resource() {
    let lab = Lab::new();
    lab.connect
        .add_item(&lab.vault, "dup", &[("password", "dup-one-Qa1x")]);
    lab.connect
        .add_item(&lab.vault, "dup", &[("password", "dup-two-Qa2x")]);
    let restricted = lab.connect.add_vault("restricted");
    lab.connect
        .add_item(&restricted, "vpn", &[("password", "vpn-secret-Mm3r")]);
    lab.connect.deny_vault(&restricted);
    let good = "resources:\n  - directory: /srv/app\n  - file: /srv/app/good.txt\n    content: \"{{ secret('op://homelab/db/password') }}\"\n  - file: /srv/app/section.txt\n    content: \"{{ secret('op://homelab/api/prod/key') }}\"\n  - file: /srv/app/plain.txt\n    content: plain\n";
    let bad = format!(
        "{good}  - file: /srv/app/missing.txt\n    content: \"{{{{ secret('op://homelab/nope/password') }}}}\"\n  - file: /srv/app/dup.txt\n    content: \"{{{{ secret('op://homelab/dup/password') }}}}\"\n  - file: /srv/app/nofield.txt\n    content: \"{{{{ secret('op://homelab/db/pin') }}}}\"\n  - file: /srv/app/denied.txt\n    content: \"{{{{ secret('op://restricted/vpn/password') }}}}\"\n  - file: /srv/app/denied-by-id.txt\n    content: \"{{{{ secret('op://{restricted}/vpn/password') }}}}\"\n"
    );
    lab.write("modules/app/module.yaml", &bad);
    let out = lab.expect(&["secrets", "check"], 1);
    let text = stdout(&out);
    let all = format!("{text}{}", stderr(&out));
    for secret in [
        DB_PASSWORD,
        DB_USER,
        API_KEY,
        "dup-one-Qa1x",
        "dup-two-Qa2x",
        "vpn-secret-Mm3r",
        TOKEN,
    ] {
        assert!(!all.contains(secret), "{secret} printed:\n{all}");
    }
    let dups: Vec<String> = {
        // The ambiguity lists both ids; name them by position for the snapshot.
        let v: Vec<&str> = text
            .split("(ids ")
            .nth(1)
            .and_then(|r| r.split(')').next())
            .unwrap_or_default()
            .split(", ")
            .collect();
        v.into_iter().map(str::to_string).collect()
    };
    assert_eq!(dups.len(), 2, "{text}");
    let mut redacted = lab.redact(&text).replace(&restricted, "[RESTRICTED]");
    for (i, d) in dups.iter().enumerate() {
        redacted = redacted.replace(d, &format!("[DUP_{}]", i + 1));
    }
    insta::assert_snapshot!("secrets_check_failures", redacted);

    lab.write("modules/app/module.yaml", good);
    let out = lab.expect(&["secrets", "check"], 0);
    assert_eq!(
        stdout(&out),
        "Secrets for host lab: 2 resource(s) resolved all their references, 0 could not.\n"
    );
}

/// `agent secrets check` checks the references in a stack's Secrets too,
/// and a resource skipped only because one before it is blocked is listed
/// as waiting, not counted as a secret failure.
#[test]
fn secrets_check_covers_stack_secrets_and_does_not_count_what_waits() {
    let lab = Lab::new();
    let module = "resources:\n  - directory: /srv/app\n  - file: /srv/app/good.txt\n    content: \"{{ secret('op://homelab/db/password') }}\"\n  - file: /srv/app/missing.txt\n    content: \"{{ secret('op://homelab/nope/password') }}\"\n  - file: /srv/app/after.txt\n    content: plain\n    after: [file:/srv/app/missing.txt]\n";
    lab.write("modules/app/module.yaml", module);
    lab.write(
        "hosts/lab.yaml",
        &format!("{HOST}stacks:\n  - name: web\n    context: lab\n"),
    );
    lab.write("k8s/web/stack.yaml", "namespace: web\n");
    lab.write(
        "k8s/web/secret.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: api\ntype: Opaque\nstringData:\n  KEY: \"{{ secret('op://homelab/api/prod/key') }}\"\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: gone\ntype: Opaque\nstringData:\n  KEY: \"{{ secret('op://homelab/gone/key') }}\"\n",
    );
    let out = lab.expect(&["secrets", "check"], 1);
    let text = lab.redact(&stdout(&out));
    for secret in [DB_PASSWORD, API_KEY, TOKEN] {
        assert!(!text.contains(secret), "{secret} printed:\n{text}");
    }
    insta::assert_snapshot!("secrets_check_stacks_and_waiting", text);
    // Only what waits: exit 0 once the references resolve.
    lab.write("modules/app/module.yaml", &module.replace("nope", "db"));
    lab.write(
        "k8s/web/secret.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: api\ntype: Opaque\nstringData:\n  KEY: \"{{ secret('op://homelab/api/prod/key') }}\"\n",
    );
    let out = lab.expect(&["secrets", "check"], 0);
    assert_eq!(
        stdout(&out),
        "Secrets for host lab: 3 resource(s) resolved all their references, 0 could not.\n"
    );
}

// --- 6. no Connect configured ---

#[test]
fn without_onepassword_plan_works_and_skips_secret_resources() {
    let lab = Lab::new();
    lab.write_config(false, "");
    let out = lab.expect(&["plan"], 0);
    let text = stdout(&out);
    assert!(
        text.contains("? file:/srv/app/db.conf  (module app) skipped: needs op://homelab/db/password: no 1Password Connect configured (set `onepassword:` in the agent config)"),
        "{text}"
    );
    assert!(text.contains("+ file:/srv/app/plain.txt"), "{text}");
    assert!(text.contains("4 skipped."), "{text}");
    let classes = lab.classes();
    for path in SECRET_FILES {
        assert_eq!(classes[&id(path)], "skipped", "{path}");
    }
    assert_eq!(classes[&id("/srv/app/plain.txt")], "create");
    assert_eq!(lab.connect.requests(), 0);
}

#[test]
fn secret_outside_a_files_content_is_refused() {
    // A symlink target, a path and a `when:` would print the value in every
    // plan, log and resource id: refused, before anything is fetched.
    let lab = Lab::with_module(
        "resources:\n  - directory: /srv/app\n  - symlink: /srv/app/link\n    target: \"/srv/{{ secret('op://homelab/db/password') }}\"\n  - file: \"/srv/app/{{ secret('op://homelab/db/username') }}.txt\"\n    content: x\n  - file: /srv/app/maybe.txt\n    content: y\n    when: \"secret('op://homelab/api/prod/key') != ''\"\n",
    );
    let out = lab.expect(&["plan"], 1);
    let all = format!("{}{}", stdout(&out), stderr(&out));
    for secret in [DB_PASSWORD, DB_USER, API_KEY] {
        assert!(!all.contains(secret), "{secret} printed:\n{all}");
    }
    assert_eq!(
        all.matches("secret() may only be used in a file's `content` or `template`")
            .count(),
        3,
        "{all}"
    );
    assert!(all.contains("module.yaml:4"), "{all}");
    assert_eq!(lab.connect.requests(), 0);
}

// --- 8. a secret file's mode from its first byte ---

/// Runs `agent apply` under umask 000 while a thread lists `dir` as fast
/// as it can; returns every (name, mode) seen with group/other bits.
fn apply_watching(lab: &Lab, dir: &Path) -> Vec<(String, u32)> {
    let config = lab.config();
    run_watching_modes(&["apply", "--config", config.to_str().unwrap()], dir)
}

#[test]
fn a_secret_file_is_0600_before_its_first_byte() {
    // No `mode:` anywhere: 0600 comes from holding a secret.
    let mut module = String::from("resources:\n  - directory: /srv/shared\n    mode: \"0755\"\n");
    for i in 0..200 {
        module.push_str(&format!(
            "  - file: /srv/shared/key{i:03}\n    content: \"{{{{ secret('op://homelab/db/password') }}}} {i}\\n\"\n"
        ));
    }
    let lab = Lab::with_module(&module);
    let dir = lab.host_path("/srv/shared");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let exposed = apply_watching(&lab, &dir);
    assert!(
        exposed.is_empty(),
        "secret files seen with group/other bits during create: {exposed:?}"
    );
    for i in 0..200 {
        let path = format!("/srv/shared/key{i:03}");
        assert_eq!(lab.mode(&path), 0o600, "{path}");
        assert_eq!(lab.read(&path), format!("{DB_PASSWORD} {i}\n"));
    }
    // A rotation replaces every file through a temp file: same rule.
    lab.connect.set_field(&lab.db, "password", ROTATED);
    let exposed = apply_watching(&lab, &dir);
    assert!(
        exposed.is_empty(),
        "secret files seen with group/other bits during replace: {exposed:?}"
    );
    assert_eq!(lab.read("/srv/shared/key007"), format!("{ROTATED} 7\n"));
    assert_eq!(lab.mode("/srv/shared/key007"), 0o600);
}

// --- 7. the leak test ---

/// `agent run` with `RUST_LOG=trace`, logging to a file.
struct Daemon {
    child: Child,
    listen: String,
    log: PathBuf,
}

impl Daemon {
    fn start(lab: &Lab, log: PathBuf, listen: &str) -> Daemon {
        let child = agent()
            .args(["run", "--config", lab.config().to_str().unwrap()])
            .env("RUST_LOG", "trace")
            .stdout(std::fs::File::create(log.with_extension("stdout")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let d = Daemon {
            child,
            listen: listen.to_string(),
            log,
        };
        d.wait_run(0);
        d
    }

    fn get(&self, path: &str) -> (u16, String) {
        http_request("GET", &self.listen, path, &[], &[]).unwrap()
    }

    /// Waits until a run that finished after `after_ms` is reported, and no
    /// run is in progress; returns its `finished_ms`.
    fn wait_run(&self, after_ms: u64) -> u64 {
        self.wait_run_where(after_ms, |_| true)
    }

    /// [`Daemon::wait_run`] for a run whose record satisfies `ok`.
    fn wait_run_where(&self, after_ms: u64, ok: impl Fn(&serde_json::Value) -> bool) -> u64 {
        let start = Instant::now();
        loop {
            if let Ok((200, body)) = http_request("GET", &self.listen, "/api/status", &[], &[]) {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                let run = &v["last_run"];
                let finished = run["finished_ms"].as_u64().unwrap_or(0);
                if finished > after_ms && v["running"] == false && ok(run) {
                    return finished;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no such run finished; daemon log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    fn terminate(mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "daemon exit: {status}");
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "daemon did not stop"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_file(path: &Path, want: &str) {
    let start = Instant::now();
    while std::fs::read_to_string(path).ok().as_deref() != Some(want) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{} never became {want:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A JSON config rendering secrets through `tojson` (which escapes `&`,
/// `<` and `>`): the value on disk differs from the value from Connect.
const CONFIG_JSON: &str =
    "{\n  \"user\": {{ secret('op://homelab/db/username') | tojson }},\n  \"api_key\": {{ secret('op://homelab/api/prod/key') | tojson }}\n}\n";

#[test]
fn no_secret_value_leaks_anywhere() {
    let module = format!("{APP}  - file: /srv/app/config.json\n    template: config.json.j2\n");
    let mut lab = Lab::with_module(&module);
    lab.write("modules/app/templates/config.json.j2", CONFIG_JSON);
    let listen = format!("127.0.0.1:{}", homelab_agent_tests::ports::reserve());
    let daemon_config =
        |format: &str| format!("listen: {listen}\npoll_interval: 1h\nlog_format: {format}\n");
    lab.write_config(true, &daemon_config("text"));
    let mut ev = Evidence::default();
    let run = |lab: &Lab, ev: &mut Evidence, what: &str, args: &[&str], code: i32| {
        let out = lab.expect(args, code);
        ev.output(what, &out);
        out
    };

    // The CLI: validate, check, plan (text, JSON), apply.
    run(&lab, &mut ev, "validate config", &["validate"], 0);
    let out = agent()
        .args(["validate", "--repo", lab.repo().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    ev.output("validate repo", &out);
    run(&lab, &mut ev, "secrets check", &["secrets", "check"], 0);
    let out = run(&lab, &mut ev, "plan", &["plan"], 0);
    // A new file's masked preview shows where its secrets go, not what they are.
    assert!(
        stdout(&out).contains("+password=[redacted]"),
        "{}",
        stdout(&out)
    );
    run(&lab, &mut ev, "plan --json", &["plan", "--json"], 0);
    run(&lab, &mut ev, "apply", &["apply"], 0);
    assert_eq!(lab.read("/srv/app/db.conf"), db_conf(DB_PASSWORD));
    let json_conf = lab.read("/srv/app/config.json");
    assert!(json_conf.contains("\\u0026"), "tojson escapes: {json_conf}");

    // Drift: a hand edit of a secret file (holding an old value), healed.
    std::fs::write(
        lab.host_path("/srv/app/db.conf"),
        db_conf(&format!("{DB_PASSWORD}-edited")),
    )
    .unwrap();
    run(&lab, &mut ev, "plan (drift)", &["plan"], 0);
    run(&lab, &mut ev, "plan --json (drift)", &["plan", "--json"], 0);
    run(&lab, &mut ev, "apply (drift)", &["apply"], 0);
    assert_eq!(lab.read("/srv/app/db.conf"), db_conf(DB_PASSWORD));

    // A failing apply: a secret file where a directory sits.
    lab.write(
        "modules/app/module.yaml",
        &format!(
            "{module}  - file: /srv/app/conflict.conf\n    content: \"key={{{{ secret('op://homelab/db/password') }}}}\\n\"\n"
        ),
    );
    std::fs::create_dir_all(lab.host_path("/srv/app/conflict.conf")).unwrap();
    let out = run(&lab, &mut ev, "apply (failing)", &["apply"], 1);
    assert!(stderr(&out).contains("conflict.conf"), "{}", stderr(&out));
    run(&lab, &mut ev, "plan (failing)", &["plan", "--json"], 1);
    lab.write("modules/app/module.yaml", &module);
    std::fs::remove_dir(lab.host_path("/srv/app/conflict.conf")).unwrap();

    // Rotation, then Connect down.
    lab.connect.set_field(&lab.db, "password", ROTATED);
    run(&lab, &mut ev, "plan (rotated)", &["plan"], 0);
    run(
        &lab,
        &mut ev,
        "plan --json (rotated)",
        &["plan", "--json"],
        0,
    );
    run(&lab, &mut ev, "apply (rotated)", &["apply", "--json"], 0);
    assert_eq!(lab.read("/srv/app/db.conf"), db_conf(ROTATED));
    lab.connect.stop();
    run(&lab, &mut ev, "plan (down)", &["plan"], 0);
    run(&lab, &mut ev, "apply (down)", &["apply"], 0);
    lab.connect.restart();
    run(&lab, &mut ev, "status", &["status"], 0);
    run(&lab, &mut ev, "status --json", &["status", "--json"], 0);

    // The daemon at trace level: text, then JSON logs.
    let text_log = lab.tmp.path().join("daemon-text.log");
    let daemon = Daemon::start(&lab, text_log.clone(), &listen);
    let mut last = daemon.wait_run(0);
    // Drift: the watcher sees the edit, a run heals it.
    std::fs::write(lab.host_path("/srv/app/db.conf"), "password=by-hand\n").unwrap();
    wait_for_file(&lab.host_path("/srv/app/db.conf"), &db_conf(ROTATED));
    last = daemon.wait_run(last);
    // Rotation: SIGHUP queues a run.
    lab.connect.set_field(&lab.db, "password", ROTATED_AGAIN);
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for_file(&lab.host_path("/srv/app/db.conf"), &db_conf(ROTATED_AGAIN));
    last = daemon.wait_run(last);
    // Connect down for a run: skipped resources are logged with why.
    lab.connect.stop();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let skipped = |run: &serde_json::Value| run["counts"]["skipped"].as_u64().unwrap_or(0);
    last = daemon.wait_run_where(last, |run| skipped(run) == 5);
    lab.connect.restart();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    daemon.wait_run_where(last, |run| skipped(run) == 0);
    // The controls: a run on request (text and JSON), then suspended runs
    // that find a secret file drifted.
    run(&lab, &mut ev, "reconcile", &["reconcile"], 0);
    run(
        &lab,
        &mut ev,
        "reconcile --json",
        &["reconcile", "--json"],
        0,
    );
    run(
        &lab,
        &mut ev,
        "suspend",
        &["suspend", "--reason", "test"],
        0,
    );
    std::fs::write(
        lab.host_path("/srv/app/db.conf"),
        db_conf(&format!("{ROTATED_AGAIN}-by-hand")),
    )
    .unwrap();
    let start = std::time::Instant::now();
    loop {
        let (_, body) = daemon.get("/api/status");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["last_attempt"]["result"] == "suspended" && v["planned"]["drift"] == 1 {
            ev.add("GET /api/status (suspended)", body);
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{body}");
        std::thread::sleep(Duration::from_millis(20));
    }
    run(&lab, &mut ev, "reconcile (suspended)", &["reconcile"], 1);
    run(&lab, &mut ev, "plan (suspended)", &["plan"], 0);
    run(
        &lab,
        &mut ev,
        "status (suspended)",
        &["status", "--json"],
        0,
    );
    run(&lab, &mut ev, "resume", &["resume"], 0);
    wait_for_file(&lab.host_path("/srv/app/db.conf"), &db_conf(ROTATED_AGAIN));
    for path in ["/api/status", "/readyz", "/healthz"] {
        let (code, body) = daemon.get(path);
        ev.add(format!("GET {path} (text daemon) {code}"), body);
    }
    daemon.terminate();
    let log = std::fs::read_to_string(&text_log).unwrap();
    assert!(log.contains("skipped: a secret did not resolve"), "{log}");
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "not verbose:\n{log}"
    );

    lab.write_config(true, &daemon_config("json"));
    let json_log = lab.tmp.path().join("daemon-json.log");
    let daemon = Daemon::start(&lab, json_log.clone(), &listen);
    let last = daemon.wait_run(0);
    std::fs::write(lab.host_path("/srv/app/api.env"), "API_KEY=by-hand\n").unwrap();
    wait_for_file(
        &lab.host_path("/srv/app/api.env"),
        &format!("API_KEY={API_KEY}\n"),
    );
    daemon.wait_run(last);
    for path in ["/api/status", "/readyz", "/healthz"] {
        let (code, body) = daemon.get(path);
        ev.add(format!("GET {path} (json daemon) {code}"), body);
    }
    daemon.terminate();
    let log = std::fs::read_to_string(&json_log).unwrap();
    assert!(log.starts_with('{'), "{log}");

    // Everything on disk but the files meant to hold the values (and the
    // token file): daemon logs, the state directory (redb bytes included),
    // the repo, the config.
    let mut exclude: Vec<PathBuf> = SECRET_FILES.iter().map(|p| lab.host_path(p)).collect();
    exclude.push(lab.host_path("/srv/app/config.json"));
    exclude.push(lab.token_file());
    let redb = std::fs::metadata(lab.state_dir().join("state.redb")).unwrap();
    assert!(redb.len() > 0);
    let scanned = ev.files(lab.tmp.path(), &exclude);
    assert!(
        ev.items
            .iter()
            .any(|(what, _)| what.ends_with("state.redb")),
        "the state database was not scanned"
    );
    assert!(scanned > 10, "{scanned} files scanned");

    ev.assert_no_leaks(&[DB_PASSWORD, DB_USER, API_KEY, ROTATED, ROTATED_AGAIN, TOKEN]);
}

/// The same with a group-readable secret file (an explicit `mode: "0640"`):
/// the inventory remembers that the applied file held secrets, so its old
/// lines stay hidden even though the file is not private.
#[test]
fn a_shared_file_that_stops_holding_a_secret_does_not_show_the_old_value() {
    let lab = Lab::new();
    let shared = APP.replace(
        "password={{ secret('op://homelab/db/password') }}\\n\"",
        "password={{ secret('op://homelab/db/password') }}\\n\"\n    mode: \"0640\"",
    );
    assert_ne!(shared, APP, "the fixture has the line this test edits");
    check_dropped_secret_is_hidden(&lab, &shared);
    assert_eq!(lab.mode("/srv/app/db.conf"), 0o640);
}

// --- 9. the leak test on error paths (issue 12, item 4) ---

/// A Connect token that is wrong (a secret all the same).
const WRONG_TOKEN: &str = "wrong-connect-token-Hh27-CANARY";
/// A webhook secret too short to be accepted.
const SHORT_WEBHOOK: &str = "whk-CANARY-Pq5";
/// Credentials written into repository URLs: a password, and a token as the user.
const URL_PASSWORD: &str = "urlpass-CANARY-Tt81";
const URL_TOKEN_USER: &str = "ghpCANARYurltoken4Kq";

/// Renders that fail after `secret()` resolved: the value becomes the name of
/// an included template, or the input of a filter and an operator that fail.
const INCLUDE_SECRET: &str = "resources:\n  - directory: /srv/app\n  - file: /srv/app/bad.conf\n    content: \"{% include secret('op://homelab/db/password') %}\"\n";
const FILTER_SECRET: &str = "resources:\n  - directory: /srv/app\n  - file: /srv/app/bad.conf\n    content: \"{{ secret('op://homelab/api/prod/key') | int }}{{ secret('op://homelab/db/username') + 1 }}\"\n";
/// A secret file whose `validate:` tool prints the file and fails.
const FAILING_VALIDATOR: &str = "resources:\n  - directory: /srv/app\n  - file: /srv/app/checked.conf\n    content: \"password={{ secret('op://homelab/db/password') }}\\n\"\n    validate: \"/usr/bin/awk '{print} END {exit 1}' %s\"\n";

/// `agent run` (trace logs to `log`) that may refuse its first revision.
fn start_daemon(lab: &Lab, log: &Path) -> Child {
    agent()
        .args(["run", "--config", lab.config().to_str().unwrap()])
        .env("RUST_LOG", "trace")
        .stdout(std::fs::File::create(log.with_extension("stdout")).unwrap())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Polls `/api/status` until `ok` holds and no run is in progress.
fn wait_status(
    listen: &str,
    log: &Path,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        if let Ok((200, body)) = http_request("GET", listen, "/api/status", &[], &[]) {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            if v["running"] == false && ok(&v) {
                return v;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out; daemon log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `agent run` that must refuse its config and exit (stopped after 10 s,
/// and its output returned, if it starts instead).
fn run_must_exit(lab: &Lab) -> Output {
    let mut child = agent()
        .args(["run", "--config", lab.config().to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait_with_output().unwrap()
}

fn stop(mut child: Child) {
    let status = homelab_agent_tests::terminate(&mut child);
    assert!(status.success(), "{status}");
}

/// Every flow where a run fails or is refused, each grepped like the
/// success paths above (raw, URL, form, JSON, hex, base64): renders that
/// fail after `secret()` resolved (plan text and JSON, apply, secrets check,
/// validate), the same revisions refused by the daemon (`/api/status`,
/// `/readyz`, logs, state, `agent status`), a failing `validate:` of a
/// secret file (CLI and daemon), Connect failing and rejecting the token,
/// a run stopped by SIGTERM mid-apply, an unusable Connect token file, weak
/// webhook secrets and credentials in repository URLs (`agent validate
/// --config`, `agent run`, plan).
#[test]
fn no_secret_value_leaks_on_error_paths() {
    let lab = Lab::with_module(INCLUDE_SECRET);
    let listen = format!("127.0.0.1:{}", homelab_agent_tests::ports::reserve());
    let daemon_config = format!("listen: {listen}\npoll_interval: 1h\n");
    lab.write_config(true, &daemon_config);
    let mut ev = Evidence::default();
    let mut flows = 0;
    let mut run = |lab: &Lab, ev: &mut Evidence, what: &str, args: &[&str], code: i32| {
        let out = lab.expect(args, code);
        ev.output(what, &out);
        flows += 1;
        out
    };

    // 1-2. Renders failing after secret() resolved, through every command.
    for (name, module) in [("include", INCLUDE_SECRET), ("filter", FILTER_SECRET)] {
        lab.write("modules/app/module.yaml", module);
        let out = run(&lab, &mut ev, &format!("plan ({name})"), &["plan"], 1);
        assert!(stderr(&out).contains("module.yaml:4"), "{}", stderr(&out));
        run(
            &lab,
            &mut ev,
            &format!("plan --json ({name})"),
            &["plan", "--json"],
            1,
        );
        run(&lab, &mut ev, &format!("apply ({name})"), &["apply"], 1);
        run(
            &lab,
            &mut ev,
            &format!("apply --json ({name})"),
            &["apply", "--json"],
            1,
        );
        run(
            &lab,
            &mut ev,
            &format!("secrets check ({name})"),
            &["secrets", "check"],
            1,
        );
        let out = agent()
            .args(["validate", "--repo", lab.repo().to_str().unwrap()])
            .output()
            .unwrap();
        ev.output(&format!("validate ({name})"), &out);
    }

    // 3. The daemon refuses those revisions: /api/status, /readyz, logs, state.
    lab.write("modules/app/module.yaml", INCLUDE_SECRET);
    let log = lab.tmp.path().join("daemon-refusals.log");
    let daemon = start_daemon(&lab, &log);
    wait_status(&listen, &log, |s| s["refused"]["stage"] == "validate");
    for path in ["/api/status", "/readyz"] {
        let (code, body) = http_request("GET", &listen, path, &[], &[]).unwrap();
        ev.add(format!("GET {path} (include refused) {code}"), body);
    }
    lab.write("modules/app/module.yaml", FILTER_SECRET);
    std::thread::sleep(Duration::from_millis(500));
    wait_status(&listen, &log, |s| {
        s["refused"]["error"]
            .as_str()
            .is_some_and(|e| !e.contains("include"))
    });
    for path in ["/api/status", "/readyz"] {
        let (code, body) = http_request("GET", &listen, path, &[], &[]).unwrap();
        ev.add(format!("GET {path} (filter refused) {code}"), body);
    }
    stop(daemon);
    run(&lab, &mut ev, "status (refused)", &["status"], 0);
    run(
        &lab,
        &mut ev,
        "status --json (refused)",
        &["status", "--json"],
        0,
    );

    // 4. A secret file's validator prints the file and fails: CLI, then daemon.
    lab.write("modules/app/module.yaml", FAILING_VALIDATOR);
    let out = run(&lab, &mut ev, "apply (validator fails)", &["apply"], 1);
    assert!(stdout(&out).contains("checked.conf"), "{}", stdout(&out));
    assert!(!lab.host_path("/srv/app/checked.conf").exists());
    let log = lab.tmp.path().join("daemon-validator.log");
    let daemon = start_daemon(&lab, &log);
    let finished = |s: &serde_json::Value| s["last_run"]["finished_ms"].as_u64().unwrap_or(0);
    let last = finished(&wait_status(&listen, &log, |s| {
        s["last_run"]["result"].is_string()
    }));

    // 5. Connect failing (500) and then rejecting the token (401), in the daemon.
    lab.connect.fail_next(500, 1000);
    lab.write("modules/app/module.yaml", APP);
    let skipped_after = |last: u64| {
        move |s: &serde_json::Value| {
            finished(s) > last && s["last_run"]["counts"]["skipped"].as_u64() == Some(4)
        }
    };
    let last = finished(&wait_status(&listen, &log, skipped_after(last)));
    lab.connect.fail_next(500, 0);
    std::fs::write(lab.token_file(), format!("{WRONG_TOKEN}\n")).unwrap();
    lab.write("modules/app/module.yaml", &format!("{APP}\n"));
    wait_status(&listen, &log, skipped_after(last));
    for path in ["/api/status", "/readyz"] {
        let (code, body) = http_request("GET", &listen, path, &[], &[]).unwrap();
        ev.add(format!("GET {path} (connect failing) {code}"), body);
    }
    stop(daemon);
    run(&lab, &mut ev, "plan (wrong token)", &["plan"], 0);
    std::fs::write(lab.token_file(), format!("{TOKEN}\n")).unwrap();

    // 6. SIGTERM while the daemon applies 300 secret files.
    let mut bulk = String::from("resources:\n  - directory: /srv/bulk\n");
    for i in 0..300 {
        bulk.push_str(&format!(
            "  - file: /srv/bulk/k{i:03}\n    content: \"{{{{ secret('op://homelab/db/password') }}}} {i}\\n\"\n"
        ));
    }
    lab.write("modules/app/module.yaml", &bulk);
    let log = lab.tmp.path().join("daemon-cancelled.log");
    let mut daemon = start_daemon(&lab, &log);
    let start = Instant::now();
    while !lab.host_path("/srv/bulk").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the apply never started"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let status = homelab_agent_tests::terminate(&mut daemon);
    assert!(status.success(), "{status}");
    run(
        &lab,
        &mut ev,
        "status --json (cancelled)",
        &["status", "--json"],
        0,
    );
    lab.write("modules/app/module.yaml", APP);

    // 7. An unusable Connect token file: group-readable.
    std::fs::set_permissions(lab.token_file(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(&lab, &mut ev, "plan (token file 0644)", &["plan"], 1);
    assert!(stderr(&out).contains("chmod 600"), "{}", stderr(&out));
    run(
        &lab,
        &mut ev,
        "validate --config (token file 0644)",
        &["validate"],
        1,
    );
    std::fs::set_permissions(lab.token_file(), std::fs::Permissions::from_mode(0o600)).unwrap();

    // 8. A short webhook secret: validate --config and run refuse it alike.
    let webhook = lab.tmp.path().join("webhook-secret");
    std::fs::write(&webhook, SHORT_WEBHOOK).unwrap();
    std::fs::set_permissions(&webhook, std::fs::Permissions::from_mode(0o600)).unwrap();
    lab.write_config(
        true,
        &format!(
            "{daemon_config}webhook_secret_file: {}\n",
            webhook.display()
        ),
    );
    let out = run(
        &lab,
        &mut ev,
        "validate --config (short webhook secret)",
        &["validate"],
        1,
    );
    assert!(
        stderr(&out).contains("needs at least 32"),
        "{}",
        stderr(&out)
    );
    let out = run_must_exit(&lab);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    ev.output("run (short webhook secret)", &out);

    // 9. Credentials in repository URLs: refused or masked, never repeated.
    for repo in [
        format!("https://ann:{URL_PASSWORD}@127.0.0.1:9/lab/homelab.git"),
        format!("http://{URL_TOKEN_USER}@127.0.0.1:9/lab/homelab.git"),
    ] {
        std::fs::write(
            lab.config(),
            format!(
                "repo: {repo}\nhost: lab\nroot: {}\n{daemon_config}",
                lab.root().display()
            ),
        )
        .unwrap();
        let code = if repo.contains(URL_PASSWORD) { 1 } else { 0 };
        run(
            &lab,
            &mut ev,
            &format!("validate --config ({repo})"),
            &["validate"],
            code,
        );
        run(&lab, &mut ev, &format!("plan ({repo})"), &["plan"], 1);
        if code == 0 {
            // Starts, fails to fetch, says so in /api/status and its log.
            let log = lab.tmp.path().join("daemon-url.log");
            let daemon = start_daemon(&lab, &log);
            wait_status(&listen, &log, |s| s["refused"]["stage"] == "fetch");
            for path in ["/api/status", "/readyz"] {
                let (code, body) = http_request("GET", &listen, path, &[], &[]).unwrap();
                ev.add(format!("GET {path} (url) {code}"), body);
            }
            stop(daemon);
            run(&lab, &mut ev, "status (url)", &["status"], 0);
        } else {
            let out = run_must_exit(&lab);
            assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
            ev.output("run (url with a password)", &out);
        }
        let out = agent()
            .args([
                "plan",
                "--repo",
                &repo,
                "--host",
                "lab",
                "--root",
                lab.root().to_str().unwrap(),
            ])
            .output()
            .unwrap();
        ev.output(&format!("plan --repo {repo}"), &out);
    }
    assert!(flows >= 8, "{flows} flows");

    // Everything on disk but the files meant to hold values and the token file.
    let mut exclude: Vec<PathBuf> = SECRET_FILES.iter().map(|p| lab.host_path(p)).collect();
    exclude.push(lab.token_file());
    exclude.push(lab.tmp.path().join("webhook-secret"));
    exclude.push(lab.config());
    for i in 0..300 {
        exclude.push(lab.host_path(&format!("/srv/bulk/k{i:03}")));
    }
    ev.files(lab.tmp.path(), &exclude);
    assert!(
        ev.items
            .iter()
            .any(|(what, _)| what.ends_with("state.redb")),
        "the state database was not scanned"
    );
    ev.assert_no_leaks(&[
        DB_PASSWORD,
        DB_USER,
        API_KEY,
        TOKEN,
        WRONG_TOKEN,
        SHORT_WEBHOOK,
        URL_PASSWORD,
        URL_TOKEN_USER,
    ]);
}

/// The leak test's error paths in templates (issue 12, item 4): a
/// rendering that fails after `secret()` returned a value. minijinja quotes
/// values in its messages; none of these may carry one, in any form, in
/// plan (text, JSON), apply, validate, or anything written to disk.
#[test]
fn no_secret_value_leaks_from_a_failing_template() {
    let s = "secret('op://homelab/db/password')";
    let flows = [
        ("include name", format!("{{% include {s} %}}")),
        ("extends name", format!("{{% extends {s} ~ '.j2' %}}")),
        ("filter error", format!("{{{{ {s} | int(strict=true) }}}}")),
        ("filter argument", format!("{{{{ 'abc' | indent({s}) }}}}")),
        (
            "macro argument",
            format!("{{% macro m(a) %}}{{{{ a.x.y }}}}{{% endmacro %}}{{{{ m({s}) }}}}"),
        ),
        ("attribute of the value", format!("{{{{ {s}.nope.nope }}}}")),
        ("arithmetic", format!("{{{{ {s} - 1 }}}}")),
        ("map key", format!("{{{{ {{'a': 1}}[{s}] }}}}")),
        ("call of the value", format!("{{{{ {s}() }}}}")),
        // Fails with the value, not with it masked: the detail is withheld.
        (
            "error after a comparison",
            format!("{{% if {s} != '[redacted]' %}}{{{{ nope }}}}{{% endif %}}"),
        ),
    ];
    let lab = Lab::with_module("resources:\n  - directory: /srv/app\n");
    let mut ev = Evidence::default();
    for (what, text) in &flows {
        // The same failure from a template file and from inline content.
        lab.write("modules/app/templates/bad.j2", text);
        for (how, module) in [
            (
                "template",
                "resources:\n  - file: /srv/app/bad.conf\n    template: bad.j2\n".to_string(),
            ),
            (
                "content",
                format!(
                    "resources:\n  - file: /srv/app/bad.conf\n    content: {}\n",
                    serde_json::to_string(text).unwrap()
                ),
            ),
        ] {
            lab.write("modules/app/module.yaml", &module);
            let out = lab.expect(&["plan"], 1);
            assert!(
                stderr(&out).contains(if how == "template" {
                    "modules/app/templates/bad.j2"
                } else {
                    "modules/app/module.yaml:3"
                }),
                "{what} ({how}): {}",
                stderr(&out)
            );
            ev.output(&format!("plan, {what} ({how})"), &out);
            let out = lab.expect(&["plan", "--json"], 1);
            ev.output(&format!("plan --json, {what} ({how})"), &out);
            let out = lab.expect(&["apply"], 1);
            ev.output(&format!("apply, {what} ({how})"), &out);
            // `validate --config` checks the desired state too (issue 14).
            let out = lab.expect(&["validate"], 1);
            ev.output(&format!("validate, {what} ({how})"), &out);
        }
    }
    let exclude = vec![lab.token_file()];
    ev.files(lab.tmp.path(), &exclude);
    let mut leaks = Vec::new();
    for (form, needle) in forms(DB_PASSWORD) {
        for (what, bytes) in &ev.items {
            if contains(bytes, &needle) {
                leaks.push(format!("{form} in {what}"));
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "{} leak(s):\n{}",
        leaks.len(),
        leaks.join("\n")
    );
}
