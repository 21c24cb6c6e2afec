//! The `package` kind against the real apt and dpkg, inside a booted nspawn
//! container (`tests/src/nspawn.rs`): the agent runs inside, as on a
//! Debian host, and installs `hla-hello`, a tiny package built here with
//! `dpkg-deb` and served from a local flat apt repository in the
//! container's work directory (the container has no network).
//!
//! Also: `agent plan/apply --root` on this machine says packages are not
//! checked in sandbox mode and runs no package manager (stand-in tools on
//! PATH record any call).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use homelab_agent_tests::nspawn::{Container, WORK_DIR};
use homelab_agent_tests::{agent, stderr, stdout, Lab};
use sha2::{Digest, Sha256};

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Builds `NAME_VERSION_all.deb` into `out` with one file,
/// `/usr/share/NAME/version`, holding the version.
fn build_deb(out: &Path, name: &str, version: &str) -> PathBuf {
    let tree = tempfile::tempdir().unwrap();
    let root = tree.path().join("pkg");
    std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(root.join(format!("usr/share/{name}"))).unwrap();
    std::fs::write(
        root.join("DEBIAN/control"),
        format!(
            "Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: homelab-agent tests <tests@localhost>\nSection: misc\nPriority: optional\nDescription: test package for the agent's apt backend\n"
        ),
    )
    .unwrap();
    std::fs::write(
        root.join(format!("usr/share/{name}/version")),
        format!("{version}\n"),
    )
    .unwrap();
    std::fs::create_dir_all(out).unwrap();
    let deb = out.join(format!("{name}_{version}_all.deb"));
    let o = Command::new("dpkg-deb")
        .args(["--build", "--root-owner-group"])
        .arg(&root)
        .arg(&deb)
        .output()
        .expect("dpkg-deb (Debian: dpkg)");
    assert!(o.status.success(), "dpkg-deb: {}", text(&o));
    deb
}

/// Writes a flat repository (`deb [trusted=yes] file:DIR ./`) holding
/// exactly `debs`: the packages, a `Packages` index and a `Release` with
/// its hash.
fn publish(repo: &Path, debs: &[&Path]) {
    if repo.exists() {
        std::fs::remove_dir_all(repo).unwrap();
    }
    std::fs::create_dir_all(repo).unwrap();
    let mut packages = String::new();
    for deb in debs {
        let file = deb.file_name().unwrap().to_str().unwrap();
        std::fs::copy(deb, repo.join(file)).unwrap();
        let bytes = std::fs::read(deb).unwrap();
        let control = Command::new("dpkg-deb")
            .arg("-f")
            .arg(deb)
            .output()
            .unwrap();
        assert!(control.status.success(), "{}", text(&control));
        packages.push_str(stdout(&control).trim_end());
        packages.push_str(&format!(
            "\nFilename: ./{file}\nSize: {}\nSHA256: {}\n\n",
            bytes.len(),
            hex::encode(Sha256::digest(&bytes))
        ));
    }
    std::fs::write(repo.join("Packages"), &packages).unwrap();
    std::fs::write(
        repo.join("Release"),
        format!(
            "Origin: homelab-agent tests\nLabel: hla\nSuite: tests\nCodename: tests\nSHA256:\n {} {} Packages\n",
            hex::encode(Sha256::digest(packages.as_bytes())),
            packages.len()
        ),
    )
    .unwrap();
}

const HOST: &str = "platform: linux\nroots: [/srv]\nmodules:\n  - name: pkgs\n";

/// A container whose apt knows only the local repository.
struct AptLab {
    c: Container,
    debs: PathBuf,
}

impl AptLab {
    fn new() -> AptLab {
        let c = Container::boot("package-apt");
        let work = c.work_dir();
        let debs = work.join("debs");
        for (name, version) in [
            ("hla-hello", "1.0"),
            ("hla-hello", "1.1"),
            ("hla-extra", "2.0"),
        ] {
            build_deb(&debs, name, version);
        }
        // No network in the container: the Debian mirror debootstrap wrote
        // into sources.list would only make `apt-get update` fail.
        let rm = c.exec(&["rm", "-f", "/etc/apt/sources.list"]);
        assert!(rm.status.success(), "{}", text(&rm));
        c.write(
            "/etc/apt/sources.list.d/hla.list",
            &format!("deb [trusted=yes] file:{WORK_DIR}/repo ./\n"),
        );
        let lab = AptLab { c, debs };
        lab.publish(&["hla-hello_1.0", "hla-extra_2.0"]);
        lab.write("desired/hosts/lab.yaml", HOST);
        lab
    }

    fn write(&self, rel: &str, content: &str) {
        let p = self.c.work_dir().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    fn publish(&self, stems: &[&str]) {
        let debs: Vec<PathBuf> = stems
            .iter()
            .map(|s| self.debs.join(format!("{s}_all.deb")))
            .collect();
        let refs: Vec<&Path> = debs.iter().map(PathBuf::as_path).collect();
        publish(&self.c.work_dir().join("repo"), &refs);
    }

    fn module(&self, resources: &str) {
        self.write(
            "desired/modules/pkgs/module.yaml",
            &format!("params: {{}}\nresources:\n{resources}"),
        );
    }

    /// `agent CMD --repo ... --host lab --state-dir ...` inside.
    fn agent(&self, cmd: &str, extra: &[&str]) -> Output {
        let repo = format!("{WORK_DIR}/desired");
        let state = format!("{WORK_DIR}/state");
        let mut args = vec![cmd, "--repo", &repo, "--host", "lab", "--state-dir", &state];
        args.extend_from_slice(extra);
        self.c.agent(&args)
    }

    /// Applies and checks it worked; returns the output text.
    fn apply(&self, step: &str) -> String {
        let started = Instant::now();
        let out = self.agent("apply", &[]);
        eprintln!(
            "package_apt: apply ({step}) took {:.2}s",
            started.elapsed().as_secs_f64()
        );
        assert!(out.status.success(), "apply ({step}): {}", text(&out));
        stdout(&out)
    }

    /// `plan --detailed-exitcode`: (exit code, text).
    fn plan(&self) -> (i32, String) {
        let out = self.agent("plan", &["--detailed-exitcode"]);
        let code = out.status.code().unwrap_or(-1);
        assert!(code == 0 || code == 2, "plan: {}", text(&out));
        (code, stdout(&out))
    }

    fn assert_nothing_to_do(&self, step: &str) {
        let (code, plan) = self.plan();
        assert_eq!(code, 0, "after {step}, nothing to do:\n{plan}");
        assert!(plan.contains("No changes"), "{plan}");
    }

    /// dpkg's view: the installed version of `name`, if installed.
    fn installed(&self, name: &str) -> Option<String> {
        let out = self
            .c
            .exec(&["dpkg-query", "-W", "-f", "${Status}\\t${Version}", name]);
        let s = stdout(&out);
        let (status, version) = s.split_once('\t')?;
        (status == "install ok installed").then(|| version.to_string())
    }

    /// The file the package ships, as the container sees it.
    fn shipped(&self) -> Option<String> {
        let out = self.c.exec(&["cat", "/usr/share/hla-hello/version"]);
        out.status
            .success()
            .then(|| stdout(&out).trim().to_string())
    }
}

#[test]
fn apt_installs_upgrades_pins_removes_and_prunes_a_real_package() {
    let started = Instant::now();
    let lab = AptLab::new();
    assert_eq!(lab.installed("hla-hello"), None);

    // 1. Present: apt has never read the local repository, so the install
    //    fails with "Unable to locate package", the agent refreshes the
    //    index once and retries.
    lab.module("  - package: hla-hello\n");
    let (code, plan) = lab.plan();
    assert_eq!(code, 2, "{plan}");
    assert!(plan.contains("package:hla-hello"), "{plan}");
    assert!(plan.contains("state: absent -> present"), "{plan}");
    lab.apply("install");
    assert_eq!(lab.installed("hla-hello").as_deref(), Some("1.0"));
    assert_eq!(lab.shipped().as_deref(), Some("1.0"));
    lab.assert_nothing_to_do("install");

    // 2. Latest: 1.1 is published. The plan compares with the index the
    //    host has; once apt's index is refreshed (apt's daily timer does it
    //    on a Debian host), the plan shows the upgrade and apply makes it.
    lab.publish(&["hla-hello_1.0", "hla-hello_1.1", "hla-extra_2.0"]);
    lab.module("  - package: hla-hello\n    state: latest\n");
    let update = lab.c.exec(&["apt-get", "update", "-q"]);
    assert!(update.status.success(), "{}", text(&update));
    let (code, plan) = lab.plan();
    assert_eq!(code, 2, "{plan}");
    assert!(plan.contains("version: 1.0 -> 1.1"), "{plan}");
    lab.apply("latest");
    assert_eq!(lab.installed("hla-hello").as_deref(), Some("1.1"));
    assert_eq!(lab.shipped().as_deref(), Some("1.1"));
    lab.assert_nothing_to_do("latest");

    // 3. A version pin: exactly 1.0 (a downgrade).
    lab.module("  - package: hla-hello\n    version: \"1.0\"\n");
    let (code, plan) = lab.plan();
    assert_eq!(code, 2, "{plan}");
    assert!(plan.contains("version: 1.1 -> 1.0"), "{plan}");
    lab.apply("pin");
    assert_eq!(lab.installed("hla-hello").as_deref(), Some("1.0"));
    lab.assert_nothing_to_do("pin");

    // 4. Absent: removed.
    lab.module("  - package: hla-hello\n    state: absent\n");
    lab.apply("absent");
    assert_eq!(lab.installed("hla-hello"), None);
    assert_eq!(lab.shipped(), None);
    lab.assert_nothing_to_do("absent");

    // 5. Back to present (the newest candidate), then out of the module:
    //    the agent installed it, so prune removes it.
    lab.module("  - package: hla-hello\n");
    lab.apply("present again");
    assert_eq!(lab.installed("hla-hello").as_deref(), Some("1.1"));
    lab.write(
        "desired/modules/pkgs/module.yaml",
        "params: {}\nresources: []\n",
    );
    let (code, plan) = lab.plan();
    assert_eq!(code, 2, "{plan}");
    assert!(plan.contains("package:hla-hello"), "{plan}");
    lab.apply("prune");
    assert_eq!(
        lab.installed("hla-hello"),
        None,
        "pruned: the agent installed it"
    );
    lab.assert_nothing_to_do("prune");
    eprintln!(
        "package_apt: whole scenario (boot included) {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn apt_adopts_a_package_installed_before_and_prune_forgets_it() {
    let lab = AptLab::new();
    // Installed by hand before the agent knew it.
    let update = lab.c.exec(&["apt-get", "update", "-q"]);
    assert!(update.status.success(), "{}", text(&update));
    let by_hand = lab.c.exec_env(
        &["apt-get", "install", "-y", "-q", "hla-extra"],
        &[("DEBIAN_FRONTEND", "noninteractive")],
        std::time::Duration::from_secs(180),
    );
    assert!(by_hand.status.success(), "{}", text(&by_hand));
    assert_eq!(lab.installed("hla-extra").as_deref(), Some("2.0"));

    lab.module("  - package: hla-extra\n");
    lab.assert_nothing_to_do("adopting a present package");
    lab.apply("adopt");
    lab.write(
        "desired/modules/pkgs/module.yaml",
        "params: {}\nresources: []\n",
    );
    let out = lab.apply("forget");
    assert!(out.contains("package:hla-extra"), "{out}");
    assert_eq!(
        lab.installed("hla-extra").as_deref(),
        Some("2.0"),
        "a package present before the agent is forgotten, never removed"
    );
}

#[test]
fn apt_reports_an_unknown_package_with_apts_message() {
    let lab = AptLab::new();
    lab.module("  - package: hla-nonexistent\n");
    let out = lab.agent("apply", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let all = format!("{}{}", stdout(&out), stderr(&out));
    assert!(all.contains("package:hla-nonexistent"), "{all}");
    assert!(
        all.contains("Unable to locate package hla-nonexistent"),
        "{all}"
    );
    assert!(
        all.contains("check the name and `version`, or add the apt source"),
        "{all}"
    );
}

/// Stand-ins for the Linux package manager tools on PATH: each records its
/// call. Used to prove sandbox mode calls none. (Homebrew is never looked
/// up on PATH but at its fixed locations: the macOS half is proved by the
/// control below, and at the command boundary in the package kind's unit
/// tests.)
fn recording_tools(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let log = dir.join("calls.log");
    for tool in ["dpkg-query", "dpkg", "apt-get", "apt-cache", "apt", "sudo"] {
        let p = bin.join(tool);
        std::fs::write(
            &p,
            format!(
                "#!/bin/sh\necho \"{tool} $*\" >> '{}'\nexit 0\n",
                log.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    log
}

#[test]
fn sandbox_plan_and_apply_say_packages_are_not_checked_and_call_no_package_manager() {
    for (platform, resources) in [
        (
            "linux",
            "  - package: jq\n    state: latest\n  - package: hla-hello\n    version: \"1.0\"\n",
        ),
        (
            "macos",
            "  - package: firefox\n    cask: true\n  - package: postgresql\n    version: \"15\"\n",
        ),
    ] {
        let lab = Lab::empty();
        lab.write(
            "hosts/lab.yaml",
            &format!("platform: {platform}\nroots: [/srv]\nmodules:\n  - name: pkgs\n"),
        );
        lab.write(
            "modules/pkgs/module.yaml",
            &format!("params: {{}}\nresources:\n{resources}"),
        );
        let log = recording_tools(lab.tmp.path());
        let path = format!(
            "{}:{}",
            lab.tmp.path().join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let repo = lab.repo();
        let root = lab.root();
        for cmd in ["plan", "apply"] {
            let out = agent()
                .env("PATH", &path)
                .args([
                    cmd,
                    "--repo",
                    repo.to_str().unwrap(),
                    "--root",
                    root.to_str().unwrap(),
                    "--host",
                    "lab",
                ])
                .output()
                .unwrap();
            assert!(out.status.success(), "{platform} {cmd}: {}", text(&out));
            if cmd == "plan" {
                let plan = stdout(&out);
                for id in resources
                    .lines()
                    .filter_map(|l| l.trim().strip_prefix("- package: "))
                {
                    assert!(
                        plan.contains(&format!(
                            "package:{id}  (module pkgs) not checked: package managers are skipped in sandbox mode (--root)"
                        )),
                        "{platform}: {id} carries the note:\n{plan}"
                    );
                }
            }
        }
        let json = agent()
            .env("PATH", &path)
            .args([
                "plan",
                "--json",
                "--repo",
                repo.to_str().unwrap(),
                "--root",
                root.to_str().unwrap(),
                "--host",
                "lab",
            ])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
        for r in v["resources"].as_array().unwrap() {
            assert_eq!(r["classification"], "not_checked", "{r}");
            assert_eq!(r["reason"]["type"], "not_checked", "{r}");
            assert_eq!(
                r["reason"]["why"],
                "not checked: package managers are skipped in sandbox mode (--root)"
            );
        }
        assert!(
            !log.exists(),
            "{platform}: a package manager ran in sandbox mode: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        // Control: the same plan without --root does reach for the package
        // manager, so the silence above means something.
        let state = lab.tmp.path().join("state");
        let out = agent()
            .env("PATH", &path)
            .args(["plan", "--repo", repo.to_str().unwrap(), "--host", "lab"])
            .arg("--state-dir")
            .arg(&state)
            .output()
            .unwrap();
        if platform == "linux" {
            // The recording tools ran.
            assert!(out.status.success(), "{}", text(&out));
            let calls = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(calls.contains("dpkg-query -W"), "{calls}");
        } else {
            // Outside a sandbox, a macOS host's packages would be looked at
            // (what sandbox mode must not do): on this Linux machine the
            // agent refuses that once, pointing at the sandbox.
            assert_eq!(out.status.code(), Some(1), "{}", text(&out));
            assert!(
                text(&out).contains("is a macOS host and this machine runs Linux"),
                "macOS without --root is refused here: {}",
                text(&out)
            );
        }
    }
}
