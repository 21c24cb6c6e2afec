//! The release artifacts of `scripts/release.sh` (found in `$HOMELAB_DIST`,
//! else `target/dist`; `.ci/run` builds them before `cargo test`, a missing
//! one fails with how to build it):
//!
//! - the portable binary requires no glibc symbol version above the floor
//!   (read from its ELF with the `object` crate), is x86_64, stripped, and
//!   needs only libraries every glibc system has;
//! - `agent --version` names the version, the commit and the target;
//! - completions, man pages and the unit are what the binary itself
//!   generates (the unit is the one `agent install-service` writes);
//! - SHA256SUMS covers every file;
//! - the `.deb` installs with `dpkg -i` in the real Debian container
//!   (`tests/src/nspawn.rs`), runs `agent --version`, `init` and `plan` from
//!   /usr/bin, its unit passes `systemd-analyze verify` and stays disabled,
//!   and `dpkg -r` leaves nothing but configuration (`dpkg -P` not even that).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use homelab_agent_tests::dist::{self, GLIBC_FLOOR, TARGET};
use homelab_agent_tests::nspawn::{Container, WORK_DIR};
use homelab_agent_tests::{agent, stderr, stdout};
use sha2::Digest;

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn show(o: &std::process::Output) -> String {
    format!("exit {:?}\n{}\n{}", o.status.code(), stdout(o), stderr(o))
}

#[test]
fn portable_binary_needs_no_glibc_newer_than_the_floor() {
    let bin = dist::binary();
    let facts = dist::elf_facts(&bin);
    assert!(facts.machine_x86_64, "{} is not x86_64", bin.display());
    assert!(
        !facts.symtab,
        "{} is not stripped (.symtab present)",
        bin.display()
    );
    let highest = *facts
        .glibc
        .last()
        .unwrap_or_else(|| panic!("no GLIBC_ versions required: {:?}", facts.required));
    assert!(
        highest <= GLIBC_FLOOR,
        "{} requires GLIBC_{}.{}, above the floor {}.{}; every requirement: {:#?}",
        bin.display(),
        highest.0,
        highest.1,
        GLIBC_FLOOR.0,
        GLIBC_FLOOR.1,
        facts.required
    );
    // Only libraries that are part of glibc itself (or gcc's runtime, on
    // every glibc system): no OpenSSL, no libz.
    let system = [
        "libc.so.6",
        "libm.so.6",
        "libpthread.so.0",
        "libdl.so.2",
        "librt.so.1",
        "libutil.so.1",
        "libgcc_s.so.1",
        "ld-linux-x86-64.so.2",
    ];
    for lib in &facts.needed {
        assert!(
            system.contains(&lib.as_str()),
            "{} needs {lib}, which an old host may lack (needed: {:?})",
            bin.display(),
            facts.needed
        );
    }
    eprintln!(
        "release: {} ({} bytes) requires GLIBC_{}.{} at most (floor {}.{}); needs {:?}",
        bin.display(),
        std::fs::metadata(&bin).unwrap().len(),
        highest.0,
        highest.1,
        GLIBC_FLOOR.0,
        GLIBC_FLOOR.1,
        facts.needed
    );
}

#[test]
fn version_names_the_commit_and_the_target() {
    let out = Command::new(dist::binary())
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let text = stdout(&out);
    let prefix = format!("agent {VERSION} (commit ");
    assert!(text.starts_with(&prefix), "{text}");
    let commit = text[prefix.len()..].split(',').next().unwrap();
    let hex = commit.trim_end_matches("-dirty");
    assert!(
        hex.len() == 12 && hex.chars().all(|c| c.is_ascii_hexdigit()),
        "commit {commit:?} in {text}"
    );
    assert!(
        text.trim_end().ends_with(&format!(", built for {TARGET})")),
        "{text}"
    );

    // A build that asked no git (a debug build, or one from a crates tarball
    // without .git) says so instead of naming a stale commit.
    let out = agent().arg("--version").output().unwrap();
    let text = stdout(&out);
    assert!(text.starts_with(&format!("agent {VERSION} (")), "{text}");
    assert!(
        text.contains("(unknown commit, built for ") || text.contains("(commit "),
        "{text}"
    );
    assert!(text.contains(", built for x86_64-"), "{text}");
}

#[test]
fn sha256sums_cover_every_artifact() {
    let dir = dist::dir();
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap();
    let mut listed = BTreeSet::new();
    for line in sums.lines() {
        let (hash, name) = line
            .split_once("  ")
            .unwrap_or_else(|| panic!("not `HASH  NAME`: {line:?}"));
        let data = std::fs::read(dir.join(name))
            .unwrap_or_else(|e| panic!("SHA256SUMS names {name}: {e}"));
        assert_eq!(hex::encode(sha2::Sha256::digest(&data)), hash, "{name}");
        assert!(listed.insert(name.to_string()), "{name} listed twice");
    }
    let mut files = BTreeSet::new();
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                let rel = e.path().strip_prefix(&dir).unwrap().display().to_string();
                if rel != "SHA256SUMS" {
                    files.insert(rel);
                }
            }
        }
    }
    assert_eq!(listed, files, "SHA256SUMS must list every artifact, once");
    for needed in [
        "completions/agent.bash",
        "completions/_agent",
        "completions/agent.fish",
        "man/man1/agent.1",
        "service/homelab-agent.service",
    ] {
        assert!(files.contains(needed), "{needed} missing from {files:?}");
    }
    assert!(files.iter().any(|f| f.ends_with("_amd64.deb")), "{files:?}");
    assert!(
        files
            .iter()
            .any(|f| f.ends_with("-x86_64-linux-gnu.tar.gz")),
        "{files:?}"
    );
}

#[test]
fn completions_man_pages_and_unit_come_from_the_binary() {
    let bin = dist::binary();
    for (shell, file) in [
        ("bash", "completions/agent.bash"),
        ("zsh", "completions/_agent"),
        ("fish", "completions/agent.fish"),
    ] {
        let out = Command::new(&bin)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", show(&out));
        let shipped = std::fs::read_to_string(dist::file(file)).unwrap();
        assert_eq!(
            stdout(&out),
            shipped,
            "{file} is not `agent completions {shell}`"
        );
        for sub in ["plan", "apply", "init", "install-service", "completions"] {
            assert!(shipped.contains(sub), "{file} lacks {sub}");
        }
    }
    let man = std::fs::read_to_string(dist::file("man/man1/agent.1")).unwrap();
    assert!(man.contains(".TH agent 1"), "{man}");
    for sub in ["plan", "apply", "validate", "init", "install-service"] {
        dist::file(&format!("man/man1/agent-{sub}.1"));
    }
    assert!(!dist::dir().join("man/man1/agent-dist-files.1").exists());

    // The packaged unit is the one `agent install-service` writes (same code,
    // no second copy): compared with this workspace's binary.
    let out = agent()
        .args(["install-service", "--dry-run", "--binary", "/usr/bin/agent"])
        .args(["--config", "/etc/homelab-agent/agent.yaml"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let text = stdout(&out);
    let written = text
        .split_once("(would be written)\n")
        .map(|(_, unit)| unit)
        .unwrap_or_else(|| panic!("{text}"));
    let shipped = std::fs::read_to_string(dist::file("service/homelab-agent.service")).unwrap();
    assert_eq!(
        written.trim_end(),
        shipped.trim_end(),
        "the packaged unit differs from `agent install-service`'s (rebuild with scripts/release.sh)"
    );

    let tar = dist::find("tarball", |n| n.ends_with("-x86_64-linux-gnu.tar.gz"));
    let out = Command::new("tar").arg("tzf").arg(&tar).output().unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let entries = stdout(&out);
    let top = format!("homelab-agent-{VERSION}-x86_64-linux-gnu");
    for e in [
        "agent",
        "README.md",
        "completions/agent.bash",
        "man/man1/agent.1",
        "service/homelab-agent.service",
    ] {
        assert!(
            entries.lines().any(|l| l == format!("{top}/{e}")),
            "{e} missing from {}:\n{entries}",
            tar.display()
        );
    }
}

/// Every path on the container's root filesystem, less what dpkg, apt and
/// logs keep for themselves.
fn snapshot(c: &Container) -> BTreeSet<String> {
    let out = c.exec(&["find", "/", "-xdev"]);
    assert!(out.status.success(), "{}", show(&out));
    stdout(&out)
        .lines()
        .filter(|p| {
            ![
                "/var/lib/dpkg/",
                "/var/log/",
                "/var/cache/",
                "/var/lib/apt/",
            ]
            .iter()
            .any(|skip| p.starts_with(skip))
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn the_deb_installs_runs_verifies_and_removes_cleanly() {
    let deb = dist::deb();
    let c = Container::boot("deb");
    let name = deb.file_name().unwrap().to_string_lossy().into_owned();
    std::fs::copy(&deb, c.work_dir().join(&name)).unwrap();
    let before = snapshot(&c);

    let out = c.exec(&["dpkg", "-i", &format!("{WORK_DIR}/{name}")]);
    assert!(out.status.success(), "dpkg -i: {}", show(&out));
    let listed = stdout(&c.exec(&["dpkg", "-L", "homelab-agent"]));
    for path in [
        "/usr/bin/agent",
        "/usr/lib/systemd/system/homelab-agent.service",
        "/usr/share/man/man1/agent.1.gz",
        "/usr/share/man/man1/agent-plan.1.gz",
        "/usr/share/bash-completion/completions/agent",
        "/usr/share/zsh/vendor-completions/_agent",
        "/usr/share/fish/vendor_completions.d/agent.fish",
    ] {
        assert!(
            listed.lines().any(|l| l == path),
            "{path} not in the package:\n{listed}"
        );
    }

    // From the installed path: the version, and a repository it starts and plans.
    let out = c.exec(&["/usr/bin/agent", "--version"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        stdout(&out).starts_with(&format!("agent {VERSION} (commit "))
            && stdout(&out).contains(TARGET),
        "{}",
        show(&out)
    );
    let lab = format!("{WORK_DIR}/lab");
    let out = c.exec(&["/usr/bin/agent", "init", &lab, "--host", "box"]);
    assert!(out.status.success(), "{}", show(&out));
    let out = c.exec(&["/usr/bin/agent", "plan", "--repo", &lab, "--host", "box"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(stdout(&out).contains("Plan: 2 to create"), "{}", show(&out));

    // The unit: verified by systemd, installed but neither enabled nor started.
    let unit = "/usr/lib/systemd/system/homelab-agent.service";
    let out = c.exec(&["systemd-analyze", "verify", "--man=no", unit]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        !stderr(&out).contains("homelab-agent.service"),
        "systemd-analyze warns about the unit: {}",
        show(&out)
    );
    assert_eq!(
        stdout(&c.systemctl(&["is-enabled", "homelab-agent.service"])).trim(),
        "disabled"
    );
    assert_eq!(
        stdout(&c.systemctl(&["is-active", "homelab-agent.service"])).trim(),
        "inactive"
    );
    let installed = snapshot(&c);
    assert!(installed.contains("/usr/bin/agent"));

    // Remove: every file of the package goes; what stays is configuration.
    let out = c.exec(&["dpkg", "-r", "homelab-agent"]);
    assert!(out.status.success(), "dpkg -r: {}", show(&out));
    for path in listed.lines().filter(|p| !p.is_empty()) {
        let out = c.exec(&["test", "-d", path]);
        if out.status.success() {
            continue; // a directory the system shares (/usr/bin, ...)
        }
        let out = c.exec(&["test", "-e", path]);
        assert!(!out.status.success(), "{path} is still there after dpkg -r");
    }
    let status = stdout(&c.exec(&[
        "dpkg-query",
        "-W",
        "-f",
        "${db:Status-Status}",
        "homelab-agent",
    ]));
    assert_eq!(status.trim(), "config-files");
    let removed = snapshot(&c);
    let left: Vec<&String> = removed.difference(&before).collect();
    for p in &left {
        assert!(
            p.starts_with("/etc/") || p.starts_with("/var/lib/systemd/deb-systemd-helper-"),
            "{p} was left by dpkg -r, and is not configuration; everything left: {left:?}"
        );
    }
    eprintln!("release: after dpkg -r, configuration left: {left:?}");

    // Purge: not even that.
    let out = c.exec(&["dpkg", "-P", "homelab-agent"]);
    assert!(out.status.success(), "dpkg -P: {}", show(&out));
    let purged = snapshot(&c);
    let left: Vec<&String> = purged.difference(&before).collect();
    assert!(left.is_empty(), "left after dpkg -P: {left:?}");
    let gone: Vec<&String> = before.difference(&purged).collect();
    assert!(gone.is_empty(), "removed by the package: {gone:?}");
    assert!(Path::new(&deb).exists());
}
