//! The invalid-repo corpus: every directory under `tests/fixtures/invalid/`
//! is a small, complete desired-state repo (`hosts/lab.yaml`, one or two
//! modules) that is valid except for one deliberate problem. The
//! `26-symlink-in-managed-path` repo is valid; its problem is on disk (the
//! test turns `<root>/srv/app` into a symlink to another directory).
//!
//! For every case the lab first applies a valid baseline (so the sandbox,
//! the inventory and the state directory exist), then swaps the repo for the
//! case and runs `agent plan`, `agent validate` and `agent apply`. Each must
//! exit 1 (validate exits 0 on the symlink case: its repo is valid), name
//! where the problem is (file:line and/or resource id, see the table in
//! [`corpus!`] below), and leave the whole lab root (managed files and the
//! state directory) byte-for-byte as it was. The error text of each case is
//! an insta snapshot, so every message gets reviewed.
//!
//! Ignored tests are known agent bugs, kept here so the fix can flip them:
//! a `when:` typo that is silently accepted, and `agent apply` rewriting the
//! state database header when it refuses a plan (see [`check_case`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use homelab_agent_tests::{
    agent, copy_dir, run_agent_bounded, stderr, stdout, tree, workspace, Lab, Node,
};

/// The only case whose problem is on disk instead of in the repo.
const SYMLINK_CASE: &str = "26-symlink-in-managed-path";

/// The case table: test name, fixture directory, and substrings that must
/// appear in the error output (where the problem is: `file:line`, resource
/// id, the offending word). Attributes (such as `#[should_panic]`) go on the test.
macro_rules! corpus {
    ($( $(#[$attr:meta])* $test:ident: $dir:literal => [$($expect:literal),+ $(,)?]; )+) => {
        /// Every case directory, with its expected substrings.
        const CASES: &[(&str, &[&str])] = &[$(($dir, &[$($expect),+])),+];
        $(
            $(#[$attr])*
            #[test]
            fn $test() {
                check($dir, &[$($expect),+]);
            }
        )+
    };
}

corpus! {
    yaml_syntax: "01-yaml-syntax" => [
        "hosts/lab.yaml:9: invalid YAML: mapping values are not allowed",
    ];
    yaml_duplicate_key: "02-yaml-duplicate-key" => [
        "modules/app/module.yaml:17: duplicate key `mode`",
    ];
    unknown_host_key: "03-unknown-host-key" => [
        "hosts/lab.yaml:10: unknown key `on_drfit`",
        "did you mean `on_drift`?",
    ];
    unknown_resource_key: "04-unknown-resource-key" => [
        "modules/app/module.yaml:16: file:/srv/app/x.conf: unknown key `mdoe`",
        "did you mean `mode`?",
    ];
    wrong_type_roots: "05-wrong-type-roots" => [
        "hosts/lab.yaml:4: `roots` in host lab must be a list of strings, found a string",
    ];
    wrong_type_param: "06-wrong-type-param" => [
        "hosts/lab.yaml:9: param `port` of module app must be",
        "found a string",
    ];
    missing_required_param: "07-missing-required-param" => [
        "hosts/lab.yaml:7: module app needs param `port`",
    ];
    unknown_param: "08-unknown-param" => [
        "hosts/lab.yaml:10: module app has no param `listen`",
    ];
    unknown_module: "09-unknown-module" => [
        "hosts/lab.yaml:7: unknown module `ap`",
        "available modules: app",
    ];
    unknown_resource_kind: "10-unknown-resource-kind" => [
        "modules/app/module.yaml:14: fiel:/srv/app/x.conf: unknown resource kind `fiel`",
    ];
    template_syntax_error: "11-template-syntax-error" => [
        "modules/app/templates/x.conf.j2:3: file:/srv/app/x.conf: template error in `port = {{ params.port }`: syntax error",
    ];
    template_undefined_var: "12-template-undefined-var" => [
        "modules/app/templates/x.conf.j2:3: file:/srv/app/x.conf: template error in `port = {{ params.prot }}`: undefined value",
    ];
    path_undefined_var: "13-path-undefined-var" => [
        "modules/app/module.yaml:14: template error in `{{ params.dir }}/x.conf`: undefined value",
    ];
    template_not_found: "14-template-not-found" => [
        "modules/app/module.yaml:15: file:/srv/app/x.conf: template `x.conf.jinja` not found",
    ];
    path_outside_roots: "15-path-outside-roots" => [
        "modules/app/module.yaml:14: file:/etc/app/x.conf: path /etc/app/x.conf is outside the host's roots (/srv/app)",
    ];
    relative_path: "16-relative-path" => [
        "modules/app/module.yaml:14: file:srv/app/x.conf: path `srv/app/x.conf` is relative",
    ];
    dotdot_escape: "17-dotdot-escape" => [
        "modules/app/module.yaml:14: file:/srv/app/../../etc/passwd:",
        "resolves to /etc/passwd",
    ];
    duplicate_id_two_modules: "18-duplicate-id-two-modules" => [
        "modules/other/module.yaml:3: file:/srv/app/x.conf: duplicate resource",
        "first declared at modules/app/module.yaml:14",
    ];
    duplicate_id_module_twice: "19-duplicate-id-module-twice" => [
        "modules/app/module.yaml:12: directory:/srv/app: duplicate resource",
        "modules/app/module.yaml:14: file:/srv/app/x.conf: duplicate resource",
    ];
    dependency_cycle: "20-dependency-cycle" => [
        "modules/app/module.yaml:12: directory:/srv/app: dependency cycle",
        "file:/srv/app/x.conf",
    ];
    dangling_after: "21-dangling-after" => [
        "modules/app/module.yaml:17: file:/srv/app/x.conf: `after` names `directory:/srv/ap`",
    ];
    mode_unquoted: "22-mode-unquoted" => [
        "modules/app/module.yaml:16: file:/srv/app/x.conf: `mode` must be a quoted octal string",
    ];
    content_and_template: "23-content-and-template" => [
        "modules/app/module.yaml:15: file:/srv/app/x.conf: a file takes only one of",
    ];
    when_expression_error: "24-when-expression-error" => [
        "modules/app/module.yaml:17: file:/srv/app/x.conf: `when: params.port >` cannot be evaluated",
    ];
    unknown_platform: "25-unknown-platform" => [
        "hosts/lab.yaml:2: `platform` must be `macos` or `linux`",
    ];
    symlink_in_managed_path: "26-symlink-in-managed-path" => [
        "file:/srv/app/x.conf: /srv/app is a symlink",
    ];
    when_undefined_variable: "27-when-undefined-variable" => [
        "modules/app/module.yaml:17",
        "params.enabeld",
    ];
    validate_without_path: "28-validate-without-path" => [
        "modules/app/module.yaml:17: file:/srv/app/x.conf: `validate: /usr/sbin/app --check-config` does not say where the file goes: `%s` is missing",
        "%s stands for the path of the rendered temp file",
    ];
    schedule_bad_calendar: "30-schedule-bad-calendar" => [
        "modules/app/module.yaml:19: schedule:app-backup: `calendar`: hour `25` is out of range (0-23)",
    ];
    notify_dangling: "31-notify-dangling" => [
        "modules/app/module.yaml:17: file:/srv/app/x.conf: `notify` names `service:ap`, which is not in this host's catalog",
        "did you mean `service:app`?",
    ];
    service_relative_program: "32-service-relative-program" => [
        "modules/app/module.yaml:18: service:app: `program` must be an absolute path, found `bin/app`",
    ];
    empty_module_file: "33-empty-module-file" => [
        "modules/app/module.yaml:1: file is empty",
    ];
    // Issue 12, items 3 and 6: a local repository read under a commit's
    // rules (the on-disk part is made by `hostile_setup`), and desired state
    // that conflicts with itself or with the agent.
    template_symlink_outside: "60-template-symlink-outside" => [
        "modules/app/module.yaml:15: file:/srv/app/x.conf: modules/app/templates/x.conf.j2 is a symlink in the repository",
        "replace the symlink with the file",
    ];
    template_symlink_inside: "61-template-symlink-inside" => [
        "modules/app/module.yaml:15: file:/srv/app/x.conf: modules/app/templates/x.conf.j2 is a symlink in the repository",
    ];
    include_symlink_outside: "62-include-symlink-outside" => [
        "modules/app/templates/x.conf.j2:2: file:/srv/app/x.conf:",
        "modules/app/templates/part.j2 is a symlink in the repository",
    ];
    source_file_symlink_outside: "63-source-file-symlink-outside" => [
        "modules/app/module.yaml:15: file:/srv/app/x.conf: modules/app/files/data.txt is a symlink in the repository",
    ];
    templates_dir_symlink_outside: "64-templates-dir-symlink-outside" => [
        "modules/app/module.yaml:15: file:/srv/app/x.conf: modules/app/templates/x.conf.j2 is reached through modules/app/templates, a symlink in the repository",
    ];
    module_dir_symlink_outside: "65-module-dir-symlink-outside" => [
        "hosts/lab.yaml:7: modules/app/module.yaml is reached through modules/app, a symlink in the repository",
    ];
    module_file_symlink_outside: "66-module-file-symlink-outside" => [
        "hosts/lab.yaml:7: modules/app/module.yaml is a symlink in the repository",
    ];
    template_fifo: "67-template-fifo" => [
        "modules/app/module.yaml:15: file:/srv/app/x.conf: modules/app/templates/x.conf.j2 is a FIFO (named pipe), not a regular file",
    ];
    template_too_large: "68-template-too-large" => [
        "modules/app/module.yaml:15: file:/srv/app/x.conf: modules/app/templates/x.conf.j2 is larger than 4 MiB, the limit for one repository file",
    ];
    manifest_symlink_outside: "69-manifest-symlink-outside" => [
        "k8s/app/stack.yaml:3: k8s/app/app.yaml is a symlink in the repository",
    ];
    configmap_file_symlink_outside: "70-configmap-file-symlink-outside" => [
        "k8s/app/stack.yaml:6: dashboards/app.json is a symlink in the repository",
    ];
    file_and_absent_same_path: "71-file-and-absent-same-path" => [
        "modules/app/module.yaml:17: absent:/srv/app/x.conf: /srv/app/x.conf is also written by file:/srv/app/x.conf (declared at modules/app/module.yaml:14)",
    ];
    file_and_directory_same_path: "72-file-and-directory-same-path" => [
        "modules/app/module.yaml:17: directory:/srv/app/x.conf: /srv/app/x.conf is also written by file:/srv/app/x.conf",
    ];
    file_under_symlink_resource: "73-file-under-symlink-resource" => [
        "modules/app/module.yaml:16: file:/srv/app/current/x.conf: /srv/app/current/x.conf is under symlink:/srv/app/current (declared at modules/app/module.yaml:14), a symlink",
    ];
    path_under_absent: "74-path-under-absent" => [
        "modules/app/module.yaml:15: file:/srv/app/old/x.conf: /srv/app/old/x.conf is under absent:/srv/app/old (declared at modules/app/module.yaml:14), which removes it",
    ];
    file_on_service_unit: "75-file-on-service-unit" => [
        "service:app: /etc/systemd/system/app.service is also written by file:/etc/systemd/system/app.service",
    ];
    root_holds_state_dir: "76-root-holds-state-dir" => [
        "hosts/lab.yaml:6: root `/var/lib` holds the agent's state directory /var/lib/homelab-agent",
    ];
    root_slash_without_opt_in: "77-root-slash-without-opt-in" => [
        "hosts/lab.yaml:5: root `/` lets the agent manage every path of the machine",
        "whole_filesystem: true",
    ];
    // Issue 14, item 2: strict everywhere, also where a filter takes any value.
    template_tojson_undefined: "80-template-tojson-undefined" => [
        "modules/app/templates/x.conf.j2:3: file:/srv/app/x.conf: template error in `port = {{ params.prot | tojson }}`: undefined value: the filter `tojson` was given an undefined value",
    ];
    // Issue 14, item 3: the catalog's checks run with the other errors.
    notify_dangling_among_other_errors: "81-notify-dangling-among-other-errors" => [
        "modules/app/module.yaml:17: file:/srv/app/x.conf: `notify` names `service:ap`, which is not in this host's catalog",
        "modules/app/module.yaml:19: template error in `port = {{ params.prot }}`: undefined value",
        "modules/app/module.yaml:21: service:app: unknown key `progam` in resource service",
    ];
    path_with_newline: "78-path-with-newline" => [
        r"modules/app/module.yaml:14: file:/srv/app/x.conf\n+ file:/etc/shadow: path `/srv/app/x.conf\n+ file:/etc/shadow` holds a control or invisible character",
    ];
    path_with_nul: "79-path-with-nul" => [
        r"modules/app/module.yaml:14: file:/srv/app/x\0.conf: path `/srv/app/x\0.conf` holds a control",
        r"modules/app/module.yaml:17: file:/srv/app/\u{202e}fnoc.x: path",
    ];
    // Hostile input (issue 12): bounded YAML and templates. The cases too big
    // to commit (4 MiB, 500,000 keys) are generated in tests/hostile_parse.rs,
    // which also measures time and memory for these.
    yaml_billion_laughs: "40-yaml-billion-laughs" => [
        "hosts/lab.yaml:17: the document has more than 500,000 values (aliases expanded)",
    ];
    yaml_deep_nesting: "41-yaml-deep-nesting" => [
        "modules/app/module.yaml:17: lists and maps nest deeper than 128 levels",
    ];
    template_self_include: "42-template-self-include" => [
        "modules/app/templates/x.conf.j2:3: file:/srv/app/x.conf:",
        "recursion limit exceeded",
    ];
    template_nested_loops: "43-template-nested-loops" => [
        "modules/app/templates/x.conf.j2:3: file:/srv/app/x.conf:",
        "stopped after 1,000,000 instructions",
    ];
    template_gigabyte_string: "44-template-gigabyte-string" => [
        "modules/app/templates/x.conf.j2:3: file:/srv/app/x.conf:",
        "repeated string is too large",
    ];
    template_huge_output: "45-template-huge-output" => [
        "modules/app/module.yaml:15: file:/srv/app/x.conf: template `x.conf.j2`:",
        "over 4 MiB, the limit for one rendering",
    ];
    template_missing_include: "46-template-missing-include" => [
        "modules/app/templates/x.conf.j2:3: file:/srv/app/x.conf:",
        "non-existing template 'common.conf.j2'",
    ];
    template_macro_recursion: "47-template-macro-recursion" => [
        "modules/app/templates/x.conf.j2:2: file:/srv/app/x.conf:",
        "recursion limit exceeded",
    ];
    template_error_in_include: "48-template-error-in-include" => [
        "modules/app/templates/common.conf.j2:2: file:/srv/app/x.conf: template error in `listen = {{ params.listen }}`",
    ];
    content_nested_loops: "49-content-nested-loops" => [
        "modules/app/module.yaml:15: template error in `{% for i in range(100000) %}",
        "stopped after 1,000,000 instructions",
    ];
    k8s_manifest_billion_laughs: "50-k8s-manifest-billion-laughs" => [
        "k8s/web/configmap.yaml:12: the document has more than 500,000 values (aliases expanded)",
    ];
}

fn fixtures() -> PathBuf {
    workspace().join("tests/fixtures/invalid")
}

/// The valid repo applied before every case: a different module and paths
/// than the cases use, so accepting an invalid case would both create files
/// under /srv/app and prune /srv/base (and change the state directory).
const BASELINE_HOST: &str = "\
platform: linux
description: \"baseline of the invalid-repo corpus\"
roots:
  - /srv
modules:
  - name: base
";
const BASELINE_MODULE: &str = "\
description: \"what the lab holds before each invalid case\"
resources:
  - directory: /srv/base
    mode: \"0750\"
  - file: /srv/base/keep.conf
    content: \"keep = true\\n\"
    mode: \"0640\"
";

fn code(o: &Output) -> Option<i32> {
    o.status.code()
}

/// Baseline applied, repo swapped for `case`, on-disk setup done.
/// Returns the lab and (for the symlink case) the symlink's target directory.
fn prepare(case: &str) -> (Lab, Option<tempfile::TempDir>, Option<tempfile::TempDir>) {
    let lab = Lab::empty();
    lab.write("hosts/lab.yaml", BASELINE_HOST);
    lab.write("modules/base/module.yaml", BASELINE_MODULE);
    let out = lab.agent("apply", "lab", &[]);
    assert_eq!(
        code(&out),
        Some(0),
        "baseline apply failed:\n{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(
        std::fs::read(lab.host_path("/srv/base/keep.conf")).unwrap(),
        b"keep = true\n"
    );
    assert!(lab.root().join("var/lib/homelab-agent").is_dir());

    std::fs::remove_dir_all(lab.repo()).unwrap();
    copy_dir(&fixtures().join(case), &lab.repo());
    let hostile = hostile_setup(case, &lab.repo());

    let outside = (case == SYMLINK_CASE).then(|| {
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), lab.host_path("/srv/app")).unwrap();
        outside
    });
    (lab, outside, hostile)
}

/// Runs one case; see the module docs.
fn check(case: &str, expect: &[&str]) {
    let (lab, outside, _hostile) = prepare(case);
    let before = tree(&lab.root());
    let repo_before = tree(&lab.repo());
    let repo = lab.repo();
    let repo = repo.to_str().unwrap();

    let unchanged = |what: &str| {
        let after = tree(&lab.root());
        assert!(
            after == before,
            "{case}: `{what}` changed the lab root:\n{}",
            tree_diff(&before, &after)
        );
        let repo_after = tree(&lab.repo());
        assert!(
            repo_after == repo_before,
            "{case}: `{what}` changed the repo:\n{}",
            tree_diff(&repo_before, &repo_after)
        );
        if let Some(outside) = &outside {
            assert!(
                std::fs::read_dir(outside.path()).unwrap().next().is_none(),
                "{case}: `{what}` wrote through the symlink"
            );
        }
    };

    // Every command leaves the root byte-for-byte alone, state included,
    // and ends (issue 12: a FIFO or a huge file never hangs; a command
    // still running after HANG_LIMIT fails the test; how fast the
    // refusals are is bench/refusals.py's).
    let plan = run_agent_bounded(&mut lab.agent_command("plan", "lab", &[]));
    unchanged("agent plan");
    let validate = run_agent_bounded(agent().args(["validate", "--repo", repo, "--host", "lab"]));
    unchanged("agent validate");
    let apply = run_agent_bounded(&mut lab.agent_command("apply", "lab", &[]));
    unchanged("agent apply");
    // And within 200 MB of memory (peak RSS of `agent validate`, which
    // reads and renders everything `plan` does).
    let measured =
        homelab_agent_tests::measure_agent(&["validate", "--repo", repo, "--host", "lab"]);
    assert!(
        measured.rss_kb < 200 * 1024,
        "{case}: agent validate peaked at {} KiB",
        measured.rss_kb
    );
    unchanged("agent validate (measured)");

    let all = |o: &Output| format!("{}{}", stdout(o), stderr(o));
    // Nothing read from outside the repository shows anywhere.
    for o in [&plan, &validate, &apply] {
        assert!(
            !all(o).contains(CANARY),
            "{case}: output shows {CANARY}:\n{}",
            all(o)
        );
    }
    assert_eq!(
        code(&apply),
        Some(1),
        "{case}: agent apply:\n{}",
        all(&apply)
    );
    assert_eq!(code(&plan), Some(1), "{case}: agent plan:\n{}", all(&plan));

    let snapshot = if case == SYMLINK_CASE {
        // The repo is valid: validate passes; plan reports the observation
        // error on stdout (with the rest of the plan); apply prints that
        // plan and refuses on stderr.
        assert_eq!(
            code(&validate),
            Some(0),
            "{case}: agent validate:\n{}",
            all(&validate)
        );
        assert_eq!(stdout(&validate), "ok: host lab: 2 resources\n");
        for (what, text) in [
            ("plan stdout", stdout(&plan)),
            ("apply stdout", stdout(&apply)),
            ("apply stderr", stderr(&apply)),
        ] {
            for e in expect {
                assert!(text.contains(e), "{case}: {what} lacks {e:?}:\n{text}");
            }
        }
        assert!(
            stderr(&apply).contains("nothing was applied"),
            "{case}: {}",
            stderr(&apply)
        );
        format!(
            "--- agent plan: stdout\n{}--- agent plan: stderr\n{}--- agent apply: stdout\n{}--- agent apply: stderr\n{}",
            stdout(&plan),
            stderr(&plan),
            stdout(&apply),
            stderr(&apply)
        )
    } else {
        assert_eq!(
            code(&validate),
            Some(1),
            "{case}: agent validate:\n{}",
            all(&validate)
        );
        let err = stderr(&apply);
        assert!(
            err.starts_with("error: the desired state is invalid ("),
            "{case}: agent apply stderr:\n{err}"
        );
        assert!(err.contains("nothing was changed"), "{case}: {err}");
        for e in expect {
            assert!(
                err.contains(e),
                "{case}: agent apply stderr lacks {e:?}:\n{err}"
            );
        }
        // The same message from every command; validate names the host.
        assert_eq!(stdout(&apply), "", "{case}: agent apply stdout");
        assert_eq!(stdout(&plan), "", "{case}: agent plan stdout");
        assert_eq!(stderr(&plan), err, "{case}: plan and apply disagree");
        assert_eq!(stdout(&validate), "", "{case}: agent validate stdout");
        assert_eq!(
            stderr(&validate),
            err.replacen("error: ", "error: host lab: ", 1),
            "{case}: validate and apply disagree"
        );
        err
    };
    insta::assert_snapshot!(case, redact_revision(&lab.redact(&snapshot)));
}

/// `at revision local-1df9210c1654` -> `at revision [REV]`: the revision is
/// a digest of the fixture, which would make every edit of it a message change.
fn redact_revision(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("at revision ") {
        let (head, tail) = rest.split_at(i + "at revision ".len());
        out.push_str(head);
        out.push_str("[REV]");
        rest = &tail[tail.find(char::is_whitespace).unwrap_or(tail.len())..];
    }
    out.push_str(rest);
    out
}

/// What differs between two [`tree`]s, one line per path (file contents
/// summarised: a state database is megabytes of bytes).
fn tree_diff(before: &BTreeMap<PathBuf, Node>, after: &BTreeMap<PathBuf, Node>) -> String {
    fn show(n: &Node) -> String {
        match n {
            Node::File { mode, uid, content } => {
                format!("file mode {mode:04o} uid {uid}, {} bytes", content.len())
            }
            Node::Dir { mode } => format!("directory mode {mode:04o}"),
            Node::Link { target } => format!("symlink -> {}", target.display()),
        }
    }
    let mut out = String::new();
    for (path, b) in before {
        match after.get(path) {
            None => out.push_str(&format!("  removed {}: was {}\n", path.display(), show(b))),
            Some(a) if a != b => {
                let what = match (a, b) {
                    (Node::File { content: ca, .. }, Node::File { content: cb, .. })
                        if ca != cb =>
                    {
                        let first = ca.iter().zip(cb).position(|(x, y)| x != y);
                        format!(
                            " (content differs from byte {})",
                            first.unwrap_or(ca.len().min(cb.len()))
                        )
                    }
                    _ => String::new(),
                };
                out.push_str(&format!(
                    "  changed {}: {} -> {}{what}\n",
                    path.display(),
                    show(b),
                    show(a)
                ));
            }
            Some(_) => {}
        }
    }
    for (path, a) in after {
        if !before.contains_key(path) {
            out.push_str(&format!("  added {}: {}\n", path.display(), show(a)));
        }
    }
    out
}

/// The table and the fixture directories match, and each fixture is a
/// complete repo.
#[test]
fn every_fixture_is_in_the_table() {
    let mut dirs: Vec<String> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    dirs.sort();
    let mut table: Vec<String> = CASES.iter().map(|(d, _)| d.to_string()).collect();
    table.sort();
    assert_eq!(dirs, table);
    assert!(CASES.len() >= 18);
    for (dir, _) in CASES {
        let case = fixtures().join(dir);
        assert!(
            case.join("hosts/lab.yaml").is_file(),
            "{dir}: no hosts/lab.yaml"
        );
        assert!(
            case.join("modules/app/module.yaml").is_file(),
            "{dir}: no modules/app/module.yaml"
        );
        assert!(
            Path::new(&case.join("modules/app/templates")).is_dir(),
            "{dir}: no modules/app/templates/"
        );
    }
}

/// In every file outside the repository that a hostile case links to: it
/// must never show in an output or reach the lab.
const CANARY: &str = "OUTSIDE-THE-REPO-CANARY";

/// Issue 12: the on-disk part of cases 60-70, which git cannot hold (a
/// FIFO, a link to a path outside this checkout, 4 MiB of nothing). Each
/// fixture is valid as committed; one of its paths is replaced here. Links
/// point into the returned directory, whose files are valid templates,
/// YAML and modules holding [`CANARY`]: followed, they would render it.
fn hostile_setup(case: &str, repo: &Path) -> Option<tempfile::TempDir> {
    use std::os::unix::fs::symlink;
    let outside = tempfile::tempdir().unwrap();
    let o = outside.path();
    let module = format!(
        "resources:\n  - file: /srv/app/x.conf\n    content: \"{CANARY}\\n\"\n    mode: \"0644\"\n"
    );
    std::fs::write(o.join("secret"), format!("canary: {CANARY}\n")).unwrap();
    std::fs::create_dir_all(o.join("app/templates")).unwrap();
    std::fs::write(o.join("app/module.yaml"), &module).unwrap();
    std::fs::write(o.join("app/templates/x.conf.j2"), format!("{CANARY}\n")).unwrap();
    // The committed path, removed to make room for the hostile one.
    let at = |rel: &str| {
        let path = repo.join(rel);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path).unwrap(),
            Ok(_) => std::fs::remove_file(&path).unwrap(),
            Err(e) => panic!("{case}: the fixture has no {rel}: {e}"),
        }
        path
    };
    let secret = o.join("secret");
    let link = |target: &Path, rel: &str| symlink(target, at(rel)).unwrap();
    match case {
        "60-template-symlink-outside" => link(&secret, "modules/app/templates/x.conf.j2"),
        "61-template-symlink-inside" => {
            link(Path::new("real.j2"), "modules/app/templates/x.conf.j2")
        }
        "62-include-symlink-outside" => link(&secret, "modules/app/templates/part.j2"),
        "63-source-file-symlink-outside" => link(&secret, "modules/app/files/data.txt"),
        "64-templates-dir-symlink-outside" => {
            link(&o.join("app/templates"), "modules/app/templates")
        }
        "65-module-dir-symlink-outside" => link(&o.join("app"), "modules/app"),
        "66-module-file-symlink-outside" => {
            link(&o.join("app/module.yaml"), "modules/app/module.yaml")
        }
        "67-template-fifo" => {
            nix::unistd::mkfifo(
                &at("modules/app/templates/x.conf.j2"),
                nix::sys::stat::Mode::from_bits_truncate(0o644),
            )
            .unwrap();
        }
        "68-template-too-large" => {
            let f = std::fs::File::create(at("modules/app/templates/x.conf.j2")).unwrap();
            f.set_len(4 * 1024 * 1024 + 1).unwrap();
        }
        "69-manifest-symlink-outside" => link(&secret, "k8s/app/app.yaml"),
        "70-configmap-file-symlink-outside" => link(&secret, "dashboards/app.json"),
        _ => return None,
    }
    Some(outside)
}
