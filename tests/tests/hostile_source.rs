//! Issue 12 (items 3 and 6), end to end: a local repository is read under
//! the rules of a git commit, whatever is on disk, and desired state that
//! would touch the agent's own state is refused. The invalid-repo corpus
//! (cases 60-79) covers one problem per module file; these are the cases
//! it cannot hold: the host file itself, the listing of `hosts/`, the
//! revision's total read budget, and the `whole_filesystem` opt-in.

use std::os::unix::fs::symlink;
use std::process::Output;

use homelab_agent_tests::{agent, run, run_agent_bounded, stderr, stdout, tree, Lab};

const CANARY: &str = "OUTSIDE-THE-REPO-CANARY";

const HOST: &str = "platform: linux\nroots: [/srv/app]\nmodules:\n  - name: app\n";
const MODULE: &str = "resources:\n  - file: /srv/app/x.conf\n    content: \"x = 1\\n\"\n";

fn all(o: &Output) -> String {
    format!("{}{}", stdout(o), stderr(o))
}

/// Runs plan, validate and apply; each must refuse (exit 1), show
/// `expect`, never show the canary, and change nothing in the lab. A
/// command that never ends fails ([`homelab_agent_tests::HANG_LIMIT`]);
/// how fast the refusals are is `bench/refusals.py`'s.
fn refused(lab: &Lab, expect: &str) -> String {
    let before = tree(&lab.root());
    let repo = lab.repo();
    let repo = repo.to_str().unwrap();
    let mut texts = Vec::new();
    for what in ["plan", "validate", "apply"] {
        let out = run_agent_bounded(&mut match what {
            "validate" => {
                let mut c = agent();
                c.args(["validate", "--repo", repo, "--host", "lab"]);
                c
            }
            cmd => lab.agent_command(cmd, "lab", &[]),
        });
        let text = all(&out);
        assert_eq!(out.status.code(), Some(1), "agent {what}:\n{text}");
        assert!(
            text.contains(expect),
            "agent {what} lacks {expect:?}:\n{text}"
        );
        assert!(
            !text.contains(CANARY),
            "agent {what} shows the canary:\n{text}"
        );
        assert!(tree(&lab.root()) == before, "agent {what} changed the lab");
        texts.push(lab.redact(&text));
    }
    texts.join("")
}

/// A lab whose baseline (one file) is applied, so refusals can be seen
/// to leave it alone.
fn lab() -> Lab {
    let lab = Lab::empty();
    lab.write("hosts/lab.yaml", HOST);
    lab.write("modules/app/module.yaml", MODULE);
    let out = lab.agent("apply", "lab", &[]);
    assert!(out.status.success(), "{}", all(&out));
    lab
}

/// A directory outside the repository whose files are a valid host file
/// and module holding the canary: read through a link, they would apply it.
fn outside() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("lab.yaml"),
        format!(
            "platform: linux\ndescription: {CANARY}\nroots: [/srv/app]\nmodules:\n  - name: app\n"
        ),
    )
    .unwrap();
    dir
}

#[test]
fn a_host_file_linked_outside_the_repository_is_refused() {
    let lab = lab();
    let out = outside();
    std::fs::remove_file(lab.repo().join("hosts/lab.yaml")).unwrap();
    symlink(
        out.path().join("lab.yaml"),
        lab.repo().join("hosts/lab.yaml"),
    )
    .unwrap();
    let text = refused(
        &lab,
        "hosts/lab.yaml: hosts/lab.yaml is a symlink in the repository",
    );
    assert!(text.contains("replace the symlink with the file"), "{text}");
}

#[test]
fn a_hosts_folder_linked_outside_the_repository_is_refused_when_listed() {
    let lab = lab();
    let out = outside();
    std::fs::remove_dir_all(lab.repo().join("hosts")).unwrap();
    symlink(out.path(), lab.repo().join("hosts")).unwrap();
    refused(
        &lab,
        "hosts/lab.yaml is reached through hosts, a symlink in the repository",
    );
    // `agent validate` of every host lists hosts/ first.
    let o = run(&["validate", "--repo", lab.repo().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", all(&o));
    assert!(
        all(&o).contains("hosts is a symlink in the repository"),
        "{}",
        all(&o)
    );
    assert!(!all(&o).contains(CANARY));
}

#[test]
fn a_fifo_host_file_is_refused_without_waiting_for_a_writer() {
    let lab = lab();
    let host = lab.repo().join("hosts/lab.yaml");
    std::fs::remove_file(&host).unwrap();
    nix::unistd::mkfifo(&host, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    refused(
        &lab,
        "hosts/lab.yaml is a FIFO (named pipe), not a regular file",
    );
}

/// Nine `source:` files of 4 MiB each (under the per-file limit) add up
/// past the 32 MiB a revision may read: refused at the one that crosses it.
#[test]
fn a_revision_reads_at_most_32_mib() {
    let lab = lab();
    let mut module = String::from("resources:\n");
    for i in 0..9 {
        module.push_str(&format!("  - file: /srv/app/f{i}\n    source: f{i}\n"));
        lab.write(&format!("modules/app/files/f{i}"), &"a".repeat(4 << 20));
    }
    lab.write("modules/app/module.yaml", &module);
    refused(
        &lab,
        "takes this host's desired state over 32 MiB, the limit for one revision",
    );
}

/// The budget is per host: `agent validate` of every host does not add up
/// what all hosts read (two hosts of 20 MiB each pass).
#[test]
fn validate_gives_each_host_its_own_read_budget() {
    let lab = lab();
    let mut module = String::from("resources:\n");
    for i in 0..5 {
        module.push_str(&format!("  - file: /srv/app/f{i}\n    source: f{i}\n"));
        lab.write(&format!("modules/app/files/f{i}"), &"a".repeat(4 << 20));
    }
    lab.write("modules/app/module.yaml", &module);
    lab.write("hosts/other.yaml", HOST);
    let o = run(&["validate", "--repo", lab.repo().to_str().unwrap()]);
    assert!(o.status.success(), "{}", all(&o));
    assert_eq!(
        stdout(&o),
        "ok: host lab: 5 resources\nok: host other: 5 resources\n"
    );
}

/// `/` as a root needs `whole_filesystem: true`; with it, the state
/// directory (here the sandbox's) and its parents stay out of reach.
#[test]
fn whole_filesystem_opts_in_to_root_slash_but_never_to_the_state_directory() {
    let lab = lab();
    lab.write(
        "hosts/lab.yaml",
        "platform: linux\nroots: [/]\nwhole_filesystem: true\nmodules:\n  - name: app\n",
    );
    let out = lab.agent("plan", "lab", &[]);
    assert!(out.status.success(), "{}", all(&out));
    lab.write(
        "modules/app/module.yaml",
        &format!(
            "{MODULE}  - file: /var/lib/homelab-agent/state.redb\n    content: \"\"\n  - absent: /var/lib\n  - directory: /var\n"
        ),
    );
    let text = refused(
        &lab,
        "modules/app/module.yaml:4: file:/var/lib/homelab-agent/state.redb: path /var/lib/homelab-agent/state.redb would change the agent's state directory /var/lib/homelab-agent",
    );
    assert!(
        text.contains("modules/app/module.yaml:6: absent:/var/lib: path /var/lib would change the agent's state directory"),
        "{text}"
    );
    // A directory resource on a parent only sets its mode: allowed.
    assert!(!text.contains("directory:/var:"), "{text}");
}

/// On macOS (case-insensitive file systems) two paths differing only in
/// case are one file: two claims on it are refused like any other.
#[test]
fn paths_differing_in_case_are_one_path_on_macos() {
    let lab = lab();
    lab.write(
        "hosts/lab.yaml",
        "platform: macos\nroots: [/srv/app]\nmodules:\n  - name: app\n",
    );
    lab.write(
        "modules/app/module.yaml",
        "resources:\n  - file: /srv/app/X.conf\n    content: \"a\\n\"\n  - absent: /srv/app/x.conf\n",
    );
    refused(
        &lab,
        "modules/app/module.yaml:4: absent:/srv/app/x.conf: /srv/app/x.conf is also written by file:/srv/app/X.conf",
    );
    // The same module on Linux names two files.
    lab.write("hosts/lab.yaml", HOST);
    let out = lab.agent("plan", "lab", &[]);
    assert!(out.status.success(), "{}", all(&out));
}

/// A symlink's target is printed like a path, so it may not forge lines.
#[test]
fn a_symlink_target_with_a_newline_is_refused() {
    let lab = lab();
    lab.write(
        "modules/app/module.yaml",
        &format!("{MODULE}  - symlink: /srv/app/link\n    target: \"/srv/app/x.conf\\n+ file:/etc/shadow\"\n"),
    );
    refused(
        &lab,
        r"modules/app/module.yaml:5: symlink:/srv/app/link: `target: /srv/app/x.conf\n+ file:/etc/shadow` is empty or holds a control or invisible character",
    );
}
