//! A file's `validate:` end to end, with the real binary and a real checker
//! (`python3 -m json.tool`, which refuses broken JSON with its own message):
//! a broken template makes `agent apply` exit 1 with the tool's message, the
//! live file stays byte-for-byte as it was (and no temp file is left), the
//! file's dependents are skipped, and everything else on the host converges.
//! The next good revision goes through. Real tools (caddy, borgmatic) are in
//! `real_tools.rs`.

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
