//! `agent init` starts a repository the agent accepts as it is: `validate`,
//! `validate --config`, `plan` and `apply --root` on the result; running it
//! again writes nothing and says what it kept; a file (or a symlink) in the
//! way is never overwritten nor followed.

use homelab_agent_tests::{agent, stderr, stdout};

fn show(o: &std::process::Output) -> String {
    format!("exit {:?}\n{}\n{}", o.status.code(), stdout(o), stderr(o))
}

const FILES: [&str; 5] = [
    "hosts/box.yaml",
    "modules/hello/module.yaml",
    "modules/hello/templates/hello.txt.j2",
    "agent.yaml",
    "README.md",
];

#[test]
fn init_writes_a_repository_that_validates_plans_and_applies() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("homelab");
    let root = tmp.path().join("root");

    let out = agent()
        .args(["init", "--host", "box"])
        .arg(&repo)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    for f in FILES {
        assert!(repo.join(f).is_file(), "{f} not written: {}", show(&out));
        assert!(
            stdout(&out).contains(&format!("wrote {f}")),
            "{}",
            show(&out)
        );
    }
    let host = std::fs::read_to_string(repo.join("hosts/box.yaml")).unwrap();
    assert!(host.contains("platform: linux"), "{host}");
    assert!(host.contains("roots: ["), "{host}");
    let readme = std::fs::read_to_string(repo.join("README.md")).unwrap();
    for needed in [
        "git push",
        "Webhooks",
        "/hooks/forgejo",
        "agent install-service",
    ] {
        assert!(readme.contains(needed), "README lacks {needed}");
    }

    let out = agent().arg("validate").current_dir(&repo).output().unwrap();
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        stdout(&out).contains("ok: host box: 2 resources"),
        "{}",
        show(&out)
    );
    let out = agent()
        .args(["validate", "--config", "agent.yaml"])
        .current_dir(&repo)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        stdout(&out).contains(&format!("repo {}", repo.display())),
        "the config follows the new repository: {}",
        show(&out)
    );

    let out = agent()
        .args(["plan", "--host", "box", "--detailed-exitcode", "--root"])
        .arg(&root)
        .current_dir(&repo)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(stdout(&out).contains("Plan: 2 to create"), "{}", show(&out));
    let out = agent()
        .args(["apply", "--host", "box", "--root"])
        .arg(&root)
        .current_dir(&repo)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let hello = std::fs::read_to_string(root.join("etc/homelab/hello.txt")).unwrap();
    assert_eq!(hello, "box (linux): converged by homelab-agent\n");
    let out = agent()
        .args(["plan", "--host", "box", "--detailed-exitcode", "--root"])
        .arg(&root)
        .current_dir(&repo)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
}

#[test]
fn init_again_keeps_every_file_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("homelab");
    std::fs::create_dir_all(repo.join("hosts")).unwrap();
    std::fs::write(repo.join("README.md"), "# mine\n").unwrap();
    // A symlink where a file would go: kept, and its target never written.
    let outside = tmp.path().join("outside.yaml");
    std::os::unix::fs::symlink(&outside, repo.join("hosts/box.yaml")).unwrap();

    let out = agent()
        .args(["init", "--host", "box"])
        .arg(&repo)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let text = stdout(&out);
    assert!(
        text.contains("kept  README.md (it exists; not overwritten)"),
        "{text}"
    );
    assert!(text.contains("kept  hosts/box.yaml"), "{text}");
    assert!(text.contains("wrote agent.yaml"), "{text}");
    assert_eq!(
        std::fs::read_to_string(repo.join("README.md")).unwrap(),
        "# mine\n"
    );
    assert!(!outside.exists(), "init wrote through a symlink");

    let before: Vec<Vec<u8>> = FILES
        .iter()
        .filter(|f| **f != "hosts/box.yaml")
        .map(|f| std::fs::read(repo.join(f)).unwrap())
        .collect();
    let out = agent()
        .args(["init", "--host", "box"])
        .arg(&repo)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        stdout(&out).contains("Nothing written: every file was there already."),
        "{}",
        show(&out)
    );
    let after: Vec<Vec<u8>> = FILES
        .iter()
        .filter(|f| **f != "hosts/box.yaml")
        .map(|f| std::fs::read(repo.join(f)).unwrap())
        .collect();
    assert_eq!(before, after);
}

#[test]
fn a_host_name_that_cannot_be_a_file_name_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = agent()
        .args(["init", "--host", "../etc"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        stderr(&out).contains("cannot be a host name"),
        "{}",
        show(&out)
    );
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}
