//! Build facts for `agent --version`: the git commit and the target triple.
//!
//! - `HOMELAB_AGENT_COMMIT` (set by `scripts/release.sh`) names the commit;
//!   otherwise a release-profile build inside a git checkout asks git (and is
//!   rebuilt when HEAD moves); otherwise, as from a crates tarball with no
//!   `.git`, or a debug build, the commit is "unknown commit". Debug builds do
//!   not ask git: following HEAD would rebuild the agent on every commit.
//! - `HOMELAB_AGENT_TARGET` (the release script passes zigbuild's
//!   `x86_64-unknown-linux-gnu.2.17`, glibc floor included) names the
//!   target; otherwise cargo's `TARGET`.

use std::path::Path;
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!text.is_empty()).then_some(text)
}

/// The commit from git, registering the files whose change moves it.
fn git_commit(manifest_dir: &Path) -> Option<String> {
    // Only the repository this crate sits in (a crates tarball unpacked
    // inside some other repository must not borrow its commit).
    let top = git(manifest_dir, &["rev-parse", "--show-toplevel"])?;
    if !manifest_dir.starts_with(&top) || !Path::new(&top).join("agent/build.rs").exists() {
        return None;
    }
    for path in ["HEAD", "packed-refs"] {
        if let Some(p) = git(manifest_dir, &["rev-parse", "--git-path", path]) {
            println!(
                "cargo:rerun-if-changed={}",
                Path::new(&top).join(p).display()
            );
        }
    }
    if let Some(head_ref) = git(manifest_dir, &["symbolic-ref", "-q", "HEAD"]) {
        if let Some(p) = git(manifest_dir, &["rev-parse", "--git-path", &head_ref]) {
            println!(
                "cargo:rerun-if-changed={}",
                Path::new(&top).join(p).display()
            );
        }
    }
    git(manifest_dir, &["rev-parse", "--short=12", "HEAD"])
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=HOMELAB_AGENT_COMMIT");
    println!("cargo:rerun-if-env-changed=HOMELAB_AGENT_TARGET");
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let commit = std::env::var("HOMELAB_AGENT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| {
            release
                .then(|| git_commit(Path::new(&manifest_dir)))
                .flatten()
        })
        .map(|c| format!("commit {}", c.trim()))
        .unwrap_or_else(|| "unknown commit".to_string());
    let target = std::env::var("HOMELAB_AGENT_TARGET")
        .ok()
        .filter(|t| !t.trim().is_empty())
        .or_else(|| std::env::var("TARGET").ok())
        .unwrap_or_else(|| "unknown target".to_string());
    println!("cargo:rustc-env=HOMELAB_AGENT_BUILD_COMMIT={commit}");
    println!(
        "cargo:rustc-env=HOMELAB_AGENT_BUILD_TARGET={}",
        target.trim()
    );
}
