//! A file's `validate:` end to end, with the real binary and a real checker
//! (`python3 -m json.tool`, which refuses broken JSON with its own message):
//! a broken template makes `agent apply` exit 1 with the tool's message, the
//! live file stays byte-for-byte as it was (and no temp file is left), the
//! file's dependents are skipped, and everything else on the host converges.
//! The next good revision goes through. Real tools (caddy, borgmatic) are in
//! `real_tools.rs`.
//!
//! Then `agent validate` itself (issue 14): outside a homelab repository,
//! a host of another platform, `--config` checking what `agent run` checks
//! and the desired state it points at.

use homelab_agent_tests::{stderr, stdout, tree, Lab, Node};

const HOST: &str = "\
platform: linux
roots: [/srv/app]
modules:
  - name: app
    params: {port: 8080, motd: hello}
";

const MODULE: &str = r#"
params:
  port: {type: int, required: true}
  motd: {type: string, required: true}
resources:
  - directory: /srv/app
    mode: "0755"
  - file: /srv/app/config.json
    template: config.json.j2
    mode: "0640"
    validate: python3 -m json.tool %s
  # Comes after the validated file: never written while it is refused.
  - file: /srv/app/config.json.sha
    content: "generated from config.json (port {{ params.port }})\n"
    after: ["file:/srv/app/config.json"]
  - file: /srv/app/motd
    content: "{{ params.motd }}\n"
"#;

const GOOD: &str = "{\n  \"port\": {{ params.port }}\n}\n";
/// A missing comma after the port: json.tool says `Expecting ',' delimiter`.
const BROKEN: &str = "{\n  \"port\": {{ params.port }}\n  \"debug\": true\n}\n";

fn lab(template: &str) -> Lab {
    let lab = Lab::empty();
    lab.write("hosts/lab.yaml", HOST);
    lab.write("modules/app/module.yaml", MODULE);
    lab.write("modules/app/templates/config.json.j2", template);
    lab
}

fn app_dir(lab: &Lab) -> std::collections::BTreeMap<std::path::PathBuf, Node> {
    tree(&lab.host_path("/srv/app"))
}

#[test]
fn a_broken_template_fails_its_file_only_and_leaves_the_live_file_untouched() {
    let lab = lab(GOOD);
    let out = lab.agent("apply", "lab", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let good = std::fs::read(lab.host_path("/srv/app/config.json")).unwrap();
    assert_eq!(good, b"{\n  \"port\": 8080\n}\n");

    // The next revision breaks the JSON, and changes the port and the motd.
    lab.write("modules/app/templates/config.json.j2", BROKEN);
    lab.write(
        "hosts/lab.yaml",
        &HOST.replace("port: 8080, motd: hello", "port: 9090, motd: bonjour"),
    );
    let before = app_dir(&lab);
    let out = lab.agent("apply", "lab", &[]);
    let (text, err) = (stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(1), "{text}\n{err}");
    let all = format!("{text}\n{err}");
    // The tool's own message, the command line and what was left alone.
    assert!(
        all.contains("Expecting ',' delimiter: line 3 column 3"),
        "{all}"
    );
    assert!(all.contains("validate: `python3 -m json.tool "), "{all}");
    assert!(all.contains("/srv/app/.config.json.hla-tmp."), "{all}");
    assert!(all.contains("failed (exit 1)"), "{all}");
    assert!(
        all.contains("/srv/app/config.json was left untouched"),
        "{all}"
    );
    assert!(
        all.contains("it comes after file:/srv/app/config.json, which failed"),
        "the dependent is skipped: {all}"
    );

    let after = app_dir(&lab);
    let p = |s: &str| std::path::PathBuf::from(s);
    assert_eq!(
        after.get(&p("config.json")),
        before.get(&p("config.json")),
        "the live file is byte-for-byte (and mode) what it was"
    );
    assert_eq!(
        after.get(&p("config.json.sha")),
        before.get(&p("config.json.sha")),
        "the dependent was not written"
    );
    assert_eq!(
        std::fs::read_to_string(lab.host_path("/srv/app/motd")).unwrap(),
        "bonjour\n",
        "the rest of the host converged"
    );
    let names: Vec<_> = after.keys().collect();
    assert_eq!(
        names,
        [&p("config.json"), &p("config.json.sha"), &p("motd")],
        "no temp file is left behind"
    );

    // Still to do: the next plan shows the refused change again.
    let out = lab.agent("plan", "lab", &["--detailed-exitcode"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("~ file:/srv/app/config.json"),
        "{}",
        stdout(&out)
    );

    // The fix goes through, dependents included.
    lab.write(
        "modules/app/templates/config.json.j2",
        "{\n  \"port\": {{ params.port }},\n  \"debug\": true\n}\n",
    );
    let out = lab.agent("apply", "lab", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(lab.host_path("/srv/app/config.json")).unwrap(),
        "{\n  \"port\": 9090,\n  \"debug\": true\n}\n"
    );
    assert!(
        std::fs::read_to_string(lab.host_path("/srv/app/config.json.sha"))
            .unwrap()
            .contains("9090")
    );
    let out = lab.agent("plan", "lab", &["--detailed-exitcode"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
}

#[test]
fn a_broken_first_version_never_creates_the_file() {
    let lab = lab(BROKEN);
    let out = lab.agent("apply", "lab", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(!lab.host_path("/srv/app/config.json").exists());
    assert!(!lab.host_path("/srv/app/config.json.sha").exists());
    assert!(lab.host_path("/srv/app/motd").exists());
    let names: Vec<_> = app_dir(&lab).into_keys().collect();
    assert_eq!(names, [std::path::PathBuf::from("motd")]);
}

#[test]
fn agent_kinds_documents_validate() {
    let out = homelab_agent_tests::run(&["kinds"]);
    let text = stdout(&out);
    assert!(text.contains("validate_timeout"), "{text}");
    assert!(text.contains("runs in --root sandboxes too"), "{text}");
}

// --- `agent validate` and the CLI tell the truth (issue 14, item 3) ---

/// Run outside a homelab repository (a directory without `hosts/`), every
/// command says so, instead of "no host `x`" or "no hosts": the directory is
/// what is wrong.
#[test]
fn outside_a_homelab_repository_every_command_says_so() {
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::write(elsewhere.path().join("README.md"), "not a homelab\n").unwrap();
    let root = tempfile::tempdir().unwrap();
    let root = root.path().to_str().unwrap();
    let mut seen = Vec::new();
    for args in [
        &["validate"][..],
        &["validate", "--host", "lab"],
        &["plan", "--host", "lab", "--root", root],
        &["apply", "--host", "lab", "--root", root],
    ] {
        let out = homelab_agent_tests::agent()
            .current_dir(elsewhere.path())
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert_eq!(stdout(&out), "", "{args:?}");
        seen.push(stderr(&out));
    }
    assert!(seen.iter().all(|s| s == &seen[0]), "{seen:#?}");
    insta::assert_snapshot!("not_a_homelab_repository", seen[0]);
    // Named when it is given with --repo.
    let out = homelab_agent_tests::agent()
        .args(["validate", "--repo", elsewhere.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with(&format!(
            "error: this is not a homelab repository: {} has no hosts/ folder\n",
            elsewhere.path().display()
        )),
        "{}",
        stderr(&out)
    );
    // Nothing was written where the agent was run, nor under the root.
    assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 1);
    assert_eq!(std::fs::read_dir(root).unwrap().count(), 0);
}

/// The platform this test machine is not: a host of it cannot be looked at here.
fn other_platform() -> &'static str {
    if cfg!(target_os = "macos") {
        "linux"
    } else {
        "macos"
    }
}

/// A host of another platform planned on this machine (outside a sandbox)
/// is refused with one message saying why and what to do, not one "user
/// does not exist" (or "Homebrew not found") per resource; in a sandbox it
/// plans as before.
#[test]
fn a_host_of_another_platform_is_refused_once_outside_a_sandbox() {
    let lab = Lab::empty();
    lab.write(
        "hosts/lab.yaml",
        &format!(
            "platform: {}\nroots: [/srv/app]\nmodules:\n  - name: app\n",
            other_platform()
        ),
    );
    let mut module = String::from("resources:\n");
    for i in 0..16 {
        module.push_str(&format!(
            "  - file: /srv/app/f{i}.conf\n    content: \"{i}\\n\"\n    owner: nobody-{i}\n    group: nogroup-{i}\n"
        ));
    }
    lab.write("modules/app/module.yaml", &module);
    let state = lab.tmp.path().join("state");
    let state = state.to_str().unwrap();
    let repo = lab.repo();
    let repo = repo.to_str().unwrap();
    for cmd in ["plan", "apply"] {
        let out = homelab_agent_tests::agent()
            .args([cmd, "--repo", repo, "--host", "lab", "--state-dir", state])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{cmd}: {}", stderr(&out));
        let err = stderr(&out);
        assert_eq!(err.matches("error:").count(), 1, "{cmd}: {err}");
        assert!(!err.contains("does not exist"), "{cmd}: {err}");
        insta::assert_snapshot!(
            format!("other_platform_{cmd}"),
            err.replace(
                "macOS host and this machine runs Linux",
                "[OTHER] host and this machine runs [THIS]"
            )
            .replace(
                "Linux host and this machine runs macOS",
                "[OTHER] host and this machine runs [THIS]"
            )
        );
        assert!(!std::path::Path::new(state).exists(), "{cmd} wrote state");
    }
    // The same repository in a sandbox: planned, ownership not enforced.
    let out = lab.agent("plan", "lab", &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("Plan: 16 to create"),
        "{}",
        stdout(&out)
    );
    // Validating never looks at a host: the platform does not matter.
    let out = homelab_agent_tests::agent()
        .args(["validate", "--repo", repo])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// `validate --config` checks what its help promises: the config and its
/// files as `agent run` does at start, then the desired state of the
/// config's host when the repository is a local directory; a remote one is
/// said not to be checked.
#[test]
fn validate_config_checks_the_desired_state_it_points_at() {
    let lab = Lab::empty();
    lab.write("hosts/lab.yaml", HOST);
    lab.write("modules/app/module.yaml", MODULE);
    lab.write("modules/app/templates/config.json.j2", GOOD);
    lab.write_config("lab", "");
    let redact = |o: &std::process::Output| {
        lab.redact(&format!("{}{}", stdout(o), stderr(o)))
            .replace(lab.config().to_str().unwrap(), "[CONFIG]")
    };
    let out = lab.with_config(&["validate"]);
    assert_eq!(out.status.code(), Some(0), "{}", redact(&out));
    let good = redact(&out);
    // The desired state is broken: validate --config says where.
    lab.write(
        "modules/app/templates/config.json.j2",
        "{\n  \"port\": {{ params.prot | tojson }}\n}\n",
    );
    let out = lab.with_config(&["validate"]);
    assert_eq!(out.status.code(), Some(1), "{}", redact(&out));
    let broken = redact(&out);
    // A remote repository is not fetched by validate.
    std::fs::write(
        lab.config(),
        "repo: https://forge.example/lab/homelab.git\nhost: lab\n",
    )
    .unwrap();
    let out = lab.with_config(&["validate"]);
    assert_eq!(out.status.code(), Some(0), "{}", redact(&out));
    let remote = redact(&out);
    insta::assert_snapshot!(
        "validate_config",
        format!(
            "--- local, valid:\n{good}--- local, broken template:\n{broken}--- remote:\n{remote}"
        )
    );
}

/// `agent run` refuses a Loki password file that is not text at start;
/// `validate --config` refuses it too (before, it passed).
#[test]
fn validate_config_refuses_a_loki_password_file_that_run_refuses() {
    let lab = Lab::empty();
    lab.write("hosts/lab.yaml", HOST);
    lab.write("modules/app/module.yaml", MODULE);
    lab.write("modules/app/templates/config.json.j2", GOOD);
    let password = lab.write_private("loki-password", "");
    std::fs::write(&password, b"\xff\xfe not text").unwrap();
    lab.write_config(
        "lab",
        &format!(
            "loki:\n  url: http://127.0.0.1:9/\n  username: lab\n  password_file: {}\n",
            password.display()
        ),
    );
    let out = lab.with_config(&["validate"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains("loki.password_file: Loki password file") && err.contains("is not UTF-8 text"),
        "{err}"
    );
}
