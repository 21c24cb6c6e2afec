//! Regression tests for issue 12 (item 10): a reader that goes away before
//! the agent has written (`agent status | head`, `agent plan | head -1`,
//! `agent kinds | head -1`) is not a crash. Standard output is a pipe
//! whose read end is already closed, so every write fails with `EPIPE`
//! (the agent ignores `SIGPIPE`, as every Rust program does): before the
//! fix `println!` panicked ("failed printing to stdout") and the exit code
//! was 101.

use std::process::{Output, Stdio};

use homelab_agent_tests::{agent, stderr, Lab};

/// A standard output nobody reads: the read end of the pipe is closed.
fn closed_pipe() -> Stdio {
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    Stdio::from(write)
}

fn run_closed(args: &[&str]) -> Output {
    agent()
        .args(args)
        .stdout(closed_pipe())
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

fn check(args: &[&str], code: i32) {
    let out = run_closed(args);
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "agent {args:?} panicked:\n{err}");
    assert_eq!(out.status.code(), Some(code), "agent {args:?}:\n{err}");
}

#[test]
fn kinds_plan_apply_status_and_validate_survive_a_closed_stdout() {
    let lab = Lab::empty();
    lab.write(
        "hosts/indri.yaml",
        "platform: linux\nroots: [/srv]\nmodules:\n  - name: app\n",
    );
    let mut module = String::from("resources:\n  - directory: /srv/app\n");
    // Enough output that it cannot fit one write.
    for i in 0..200 {
        module.push_str(&format!(
            "  - file: /srv/app/f{i:03}\n    content: \"line {i}\\n\"\n"
        ));
    }
    lab.write("modules/app/module.yaml", &module);
    let repo = lab.repo();
    let root = lab.root();
    let (repo, root) = (repo.to_str().unwrap(), root.to_str().unwrap());
    let target = ["--repo", repo, "--root", root, "--host", "indri"];
    check(&["kinds"], 0);
    check(&[&["plan"][..], &target].concat(), 0);
    check(&[&["plan", "--json"][..], &target].concat(), 0);
    // The apply is done and recorded although nobody read its report.
    check(&[&["apply"][..], &target].concat(), 0);
    let state = lab.root().join("var/lib/homelab-agent");
    let state = state.to_str().unwrap();
    check(&["status", "--state-dir", state, "--host", "indri"], 0);
    check(
        &["status", "--state-dir", state, "--host", "indri", "--json"],
        0,
    );
    check(&["validate", "--repo", repo], 0);
    // Recorded: the next plan has nothing to do.
    let out = agent()
        .args([&["plan", "--detailed-exitcode"][..], &target].concat())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}
