//! `agent install-service` / `uninstall-service` without a service manager:
//! `--dry-run` prints the unit and writes nothing; `--root` writes only the
//! unit file and removes it again. The real systemd run is in `systemd.rs`.

use homelab_agent_tests::{agent, stderr, stdout};

/// The unit file's metadata and content, or `None` when absent.
fn snapshot(path: &std::path::Path) -> Option<(std::time::SystemTime, Vec<u8>)> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    Some((
        meta.modified().unwrap(),
        std::fs::read(path).unwrap_or_default(),
    ))
}

#[test]
fn dry_run_prints_the_unit_and_writes_nothing() {
    // Without --root, a dry run names the system path and leaves it as it
    // was (on this machine: absent, or whatever an admin put there).
    let system_unit = std::path::Path::new("/etc/systemd/system/homelab-agent.service");
    let before = snapshot(system_unit);
    let dir = tempfile::tempdir().unwrap();
    let out = agent()
        .args([
            "install-service",
            "--dry-run",
            "--config",
            "/etc/homelab-agent/agent.yaml",
        ])
        .args(["--binary", "/usr/local/bin/agent"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("/etc/systemd/system/homelab-agent.service (would be written)"),
        "{text}"
    );
    assert!(
        text.contains("ExecStart=/usr/local/bin/agent run --config /etc/homelab-agent/agent.yaml")
    );
    assert!(text.contains("Restart=on-failure"));
    assert!(text.contains("WantedBy=multi-user.target"));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    assert_eq!(
        snapshot(system_unit),
        before,
        "the dry run touched {}",
        system_unit.display()
    );

    // With --root, where a write would land in the sandbox: the dry run
    // names the sandboxed path and the sandbox stays empty.
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let config = dir.path().join("agent.yaml");
    std::fs::write(&config, "repo: /srv/homelab\nhost: sifaka\n").unwrap();
    let out = agent()
        .args(["install-service", "--dry-run", "--config"])
        .arg(&config)
        .arg("--root")
        .arg(&root)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let unit = root.join("etc/systemd/system/homelab-agent.service");
    assert!(
        stdout(&out).contains(&format!("{} (would be written)", unit.display())),
        "{}",
        stdout(&out)
    );
    assert!(
        homelab_agent_tests::tree(&root).is_empty(),
        "the dry run wrote {:?}",
        homelab_agent_tests::tree(&root).keys().collect::<Vec<_>>()
    );
}

#[test]
fn root_writes_the_unit_and_uninstall_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let config = dir.path().join("agent.yaml");
    std::fs::write(&config, "repo: /srv/homelab\nhost: sifaka\n").unwrap();
    let unit = root.join("etc/systemd/system/homelab-agent.service");

    let out = agent()
        .args(["install-service", "--config"])
        .arg(&config)
        .arg("--root")
        .arg(&root)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("installed:"), "{}", stdout(&out));
    let text = std::fs::read_to_string(&unit).unwrap();
    assert!(
        text.contains(&format!("run --config {}", config.display())),
        "{text}"
    );

    // Again: nothing to do.
    let out = agent()
        .args(["install-service", "--config"])
        .arg(&config)
        .arg("--root")
        .arg(&root)
        .output()
        .unwrap();
    assert!(stdout(&out).contains("up to date:"), "{}", stdout(&out));

    let out = agent()
        .args(["uninstall-service", "--root"])
        .arg(&root)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("removed: homelab-agent"));
    assert!(!unit.exists());
    let out = agent()
        .args(["uninstall-service", "--root"])
        .arg(&root)
        .output()
        .unwrap();
    assert!(stdout(&out).contains("not installed"));
}

#[test]
fn a_config_that_does_not_load_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.yaml");
    std::fs::write(&config, "repo: /srv/homelab\nhots: sifaka\n").unwrap();
    let out = agent()
        .args(["install-service", "--config"])
        .arg(&config)
        .arg("--root")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("hots"), "{err}");
    assert!(!dir.path().join("etc").exists());
}

/// A new host from the repository alone (README, "Reference homelab"): the
/// binary, one token file and one command. `install-service --repo URL
/// --host NAME` fetches the repository from a real git smart-HTTP server
/// (private here, so its Forgejo token is passed), copies agents/NAME.yaml to
/// the config path and installs the unit running with it. Again: nothing to
/// do. A host with no agent config, or a file written for another host,
/// changes nothing.
#[test]
fn install_service_takes_the_hosts_agent_config_from_the_repository() {
    use homelab_agent_tests::git_server::{GitServer, WorkClone};
    use std::os::unix::fs::PermissionsExt;
    let server = GitServer::start();
    server.create_repo("eblume", "homelab");
    let dir = tempfile::tempdir().unwrap();
    let op_token = dir.path().join("op-connect-token");
    std::fs::write(&op_token, "a-connect-token").unwrap();
    std::fs::set_permissions(&op_token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let agent_yaml = format!(
        "repo: {url}\nref: main\nhost: lab\nlisten: 127.0.0.1:0\nonepassword:\n  connect_url: http://127.0.0.1:9\n  token_file: {}\n",
        op_token.display(),
        url = server.url("eblume", "homelab")
    );
    let work = WorkClone::clone_from(&server, "eblume", "homelab", &dir.path().join("work"));
    work.write("agents/lab.yaml", &agent_yaml);
    work.write("agents/other.yaml", &agent_yaml);
    work.commit("agent configs");
    work.push("main");
    let forge_token = server.write_token_file(dir.path());

    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let config = dir.path().join("etc/agent.yaml");
    let install = |host: &str| {
        agent()
            .args([
                "install-service",
                "--repo",
                &server.url("eblume", "homelab"),
            ])
            .args(["--host", host, "--token-file"])
            .arg(&forge_token)
            .arg("--config")
            .arg(&config)
            .arg("--root")
            .arg(&root)
            .output()
            .unwrap()
    };
    let out = install("lab");
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "config: {} (from agents/lab.yaml)",
            config.display()
        )),
        "{text}"
    );
    assert!(text.contains("installed:"), "{text}");
    assert_eq!(std::fs::read_to_string(&config).unwrap(), agent_yaml);
    let mode = std::fs::metadata(&config).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);
    let unit =
        std::fs::read_to_string(root.join("etc/systemd/system/homelab-agent.service")).unwrap();
    assert!(
        unit.contains(&format!("run --config {}", config.display())),
        "{unit}"
    );

    let out = install("lab");
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("up to date: ") && !text.contains("installed:"),
        "{text}"
    );

    // No agents/ghost.yaml; agents/other.yaml says `host: lab`.
    std::fs::remove_file(&config).unwrap();
    for (host, needle) in [
        ("ghost", "there is no agents/ghost.yaml"),
        ("other", "agents/other.yaml in "),
    ] {
        let out = install(host);
        assert_eq!(out.status.code(), Some(1), "{host}");
        let err = stderr(&out);
        assert!(err.contains(needle), "{err}");
        assert!(
            !err.contains(server.token()),
            "the token never shows: {err}"
        );
        assert!(!config.exists(), "{host}: nothing written");
    }
    assert!(stderr(&install("other")).contains("says `host: lab`, not other"));
}
