//! The reference modules against the real tools they configure: files are
//! rendered by the real agent (`agent apply --root` on a sandbox, secrets
//! from the 1Password Connect stand-in), then the tools run on them:
//!
//! - borgmatic: the rendered config passes `validate-borgmatic-config` (the
//!   agent already ran it as the file's `validate:`), and a full borgmatic
//!   run (prune, compact, create, check) backs up into a local borg repo,
//!   reading the passphrase the agent wrote; `borg list` (passphrase from the
//!   environment) shows the archive and `borg extract` gives the data back.
//! - pg-backup: the rendered script dumps a real PostgreSQL 15 database over
//!   TCP with the password from its pgpass file, the dump passes
//!   `pg_restore --list` and restores, retention deletes only old dumps, and
//!   a deliberately corrupted dump is detected and deleted.
//! - caddy: the rendered Caddyfile passes `caddy validate`, and a real Caddy
//!   serving it sends `/stream/*` to nginx streamers and everything else to
//!   the web app; a broken template makes `agent apply` fail validation with
//!   Caddy's message while the live Caddyfile stays as it was and the rest of
//!   the host converges.
//!
//! Test hosts keep their managed paths under a "world" directory, which is
//! linked to its place in the sandbox after the first apply (see
//! [`link_world`]), so the tools find the files the rendered configs name.
//! Every server is on 127.0.0.1, every wait has a deadline.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use homelab_agent_tests::connect_standin::ConnectStandIn;
use homelab_agent_tests::ports::start_on_reserved_ports;
use homelab_agent_tests::real_tools::{
    caddy, caddy_env, http_get, link_world, nginx, run_bounded, Postgres, PG_BIN,
};
use homelab_agent_tests::{copy_dir, stderr, stdout, tree, workspace, Lab};

const TOKEN: &str = "real-tools-connect-token";
const BORG_PASSPHRASE: &str = "correct-horse-battery-staple-4711";
const PG_PASSWORD: &str = "backup-role-password-0815";

/// A copy of the reference modules, one test host, a sandbox root, the
/// world directory and a Connect stand-in holding the reference items.
struct ToolLab {
    lab: Lab,
    _connect: ConnectStandIn,
}

impl ToolLab {
    fn new(host_yaml: impl Fn(&Path) -> String) -> ToolLab {
        let connect = ConnectStandIn::start(TOKEN);
        let vault = connect.add_vault("homelab");
        connect.add_item(&vault, "borgmatic", &[("passphrase", BORG_PASSPHRASE)]);
        connect.add_item(&vault, "postgres-backup", &[("password", PG_PASSWORD)]);
        let lab = ToolLab {
            lab: Lab::empty(),
            _connect: connect,
        };
        copy_dir(&workspace().join("modules"), &lab.repo().join("modules"));
        lab.write("hosts/lab.yaml", &host_yaml(&lab.world()));
        let token_file = lab.lab.write_private("op-token", TOKEN);
        lab.lab.write_config(
            "lab",
            &format!(
                "onepassword:\n  connect_url: {}\n  token_file: {}\n",
                lab._connect.url(),
                token_file.display()
            ),
        );
        lab
    }

    fn repo(&self) -> PathBuf {
        self.lab.repo()
    }
    fn root(&self) -> PathBuf {
        self.lab.root()
    }
    /// Where the test host's managed paths live (a symlink into the sandbox
    /// after [`ToolLab::apply_and_link`]).
    fn world(&self) -> PathBuf {
        self.lab.tmp.path().join("world")
    }
    fn write(&self, rel: &str, content: &str) {
        self.lab.write(rel, content)
    }
    /// A host path's place in the sandbox.
    fn in_root(&self, path: &Path) -> PathBuf {
        self.root().join(path.strip_prefix("/").unwrap())
    }

    fn apply(&self) -> Output {
        self.lab.with_config(&["apply"])
    }

    /// The first apply (must succeed and skip nothing), then the world link.
    fn apply_and_link(&self) {
        let out = self.apply();
        assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
        assert!(
            stdout(&out).contains(" 0 skipped"),
            "every secret resolved: {}",
            stdout(&out)
        );
        link_world(&self.root(), &self.world());
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------- borgmatic

#[test]
fn borgmatic_config_validates_and_backs_up_into_a_local_borg_repo() {
    let lab = ToolLab::new(|w| {
        format!(
            "platform: linux
roots: [{w}]
modules:
  - name: borgmatic
    params:
      user: root
      group: root
      config_dir: {w}/borgmatic
      source_directories: [{w}/src]
      repositories: [{w}/repo]
      exclude_patterns: [\"*.tmp\"]
      keep_daily: 3
      checks: [{{name: repository}}, {{name: archives, frequency: 1 month}}]
      before_backup: [\"echo hooked > {w}/src/hook.txt\"]
",
            w = w.display()
        )
    });
    lab.apply_and_link();
    let w = lab.world();
    let config = w.join("borgmatic/config.yaml");
    // Written by the agent: the passphrase file private, from 1Password.
    assert_eq!(
        std::fs::read_to_string(w.join("borgmatic/passphrase")).unwrap(),
        BORG_PASSPHRASE
    );
    let validate = run_bounded(
        Command::new("validate-borgmatic-config")
            .arg("-c")
            .arg(&config),
        Duration::from_secs(60),
    );
    assert!(validate.status.success(), "{}", text(&validate));

    std::fs::create_dir_all(w.join("src/docs")).unwrap();
    std::fs::write(w.join("src/docs/agent.toml"), "hello from the agent\n").unwrap();
    std::fs::write(w.join("src/scratch.tmp"), "excluded\n").unwrap();
    let home = lab.lab.tmp.path().join("home");
    let borgmatic = |args: &[&str]| {
        // --log-file: borgmatic 1.7.7 mistakes this image's /var/run/log
        // directory for a syslog socket and prints a traceback per line.
        let log = lab.lab.tmp.path().join("borgmatic.log");
        let out = run_bounded(
            Command::new("borgmatic")
                .arg("--log-file")
                .arg(&log)
                .arg("-c")
                .arg(&config)
                .args(args)
                .env("HOME", &home)
                .env("BORG_BASE_DIR", lab.lab.tmp.path().join("borg-base"))
                .env_remove("BORG_PASSPHRASE"),
            Duration::from_secs(180),
        );
        assert!(
            out.status.success(),
            "borgmatic {args:?}: {}\n{}",
            text(&out),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    };
    borgmatic(&["rcreate", "--encryption", "repokey-blake2"]);
    // The default actions: prune, compact, create, check.
    borgmatic(&[]);

    let borg = |args: &[&str]| {
        run_bounded(
            Command::new("borg")
                .args(args)
                .env("HOME", &home)
                .env("BORG_BASE_DIR", lab.lab.tmp.path().join("borg-base"))
                .env("BORG_PASSPHRASE", BORG_PASSPHRASE),
            Duration::from_secs(60),
        )
    };
    let repo = w.join("repo");
    let list = borg(&["list", "--short", repo.to_str().unwrap()]);
    assert!(list.status.success(), "{}", text(&list));
    let archives: Vec<String> = stdout(&list).lines().map(str::to_string).collect();
    let hostname = nix::unistd::gethostname().unwrap().into_string().unwrap();
    assert_eq!(archives.len(), 1, "{archives:?}");
    assert!(
        archives[0].starts_with(&format!("{hostname}-")),
        "{archives:?}"
    );

    let archive = format!("{}::{}", repo.display(), archives[0]);
    let src = w.join("src");
    let rel = |p: &str| src.join(p).strip_prefix("/").unwrap().display().to_string();
    let extracted = borg(&["extract", "--stdout", &archive, &rel("docs/agent.toml")]);
    assert!(extracted.status.success(), "{}", text(&extracted));
    assert_eq!(stdout(&extracted), "hello from the agent\n");
    let hook = borg(&["extract", "--stdout", &archive, &rel("hook.txt")]);
    assert_eq!(
        stdout(&hook),
        "hooked\n",
        "before_backup ran first: {}",
        text(&hook)
    );
    let listing = borg(&["list", "--short", &archive]);
    assert!(
        !stdout(&listing).contains("scratch.tmp"),
        "exclude_patterns: {}",
        stdout(&listing)
    );
    // A wrong passphrase opens nothing: the repo really is encrypted.
    let wrong = run_bounded(
        Command::new("borg")
            .args(["list", repo.to_str().unwrap()])
            .env("HOME", &home)
            .env("BORG_BASE_DIR", lab.lab.tmp.path().join("borg-base"))
            .env("BORG_PASSPHRASE", "not-it")
            .env("BORG_DISPLAY_PASSPHRASE", "no"),
        Duration::from_secs(60),
    );
    assert!(!wrong.status.success());
}

// ---------------------------------------------------------------- pg-backup

/// `<db>-YYYY-MM-DD-HHMMSS.dump` files in `dir`, sorted.
fn dumps(dir: &Path, db: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("{db}-")) && n.ends_with(".dump"))
        .collect();
    names.sort();
    names
}

fn set_age_days(path: &Path, days: u64) {
    let t = std::time::SystemTime::now() - Duration::from_secs(days * 86_400);
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(t).unwrap();
}

#[test]
fn pg_backup_dumps_verifies_prunes_and_deletes_a_corrupt_dump() {
    let pg = Postgres::start();
    pg.sql(
        "postgres",
        &format!("CREATE ROLE backup LOGIN PASSWORD '{PG_PASSWORD}' IN ROLE pg_read_all_data"),
    );
    pg.sql("postgres", "CREATE DATABASE ginflix");
    pg.sql("postgres", "CREATE DATABASE vlog");
    pg.sql(
        "ginflix",
        "CREATE TABLE movies (id serial PRIMARY KEY, title text NOT NULL, link text);
         INSERT INTO movies (title, link) VALUES ('Stock footage', 'http://localhost/stream/stock.mp4'), ('Sintel', 'http://localhost/stream/sintel.mp4');",
    );
    pg.sql(
        "vlog",
        "CREATE TABLE videos (id serial PRIMARY KEY, slug text); INSERT INTO videos (slug) VALUES ('intro');",
    );

    let port = pg.port;
    let lab = ToolLab::new(|w| {
        format!(
            "platform: linux
roots: [{w}]
modules:
  - name: pg-backup
    params:
      host: 127.0.0.1
      port: {port}
      user: backup
      sslmode: disable
      databases: [ginflix, vlog]
      backup_dir: {w}/backups
      retention_days: 7
      pg_bin_dir: {PG_BIN}
      config_dir: {w}/etc/pg-backup
      script_path: {w}/bin/pg-backup
      metrics_file: {w}/backups/pg_backup.prom
      owner: root
      group: root
",
            w = w.display()
        )
    });
    lab.apply_and_link();
    let w = lab.world();
    let backups = w.join("backups");
    let env_file = w.join("etc/pg-backup/pg-backup.env");
    let script = w.join("bin/pg-backup");
    let backup = |env: &Path| {
        run_bounded(
            Command::new(&script)
                .arg("-c")
                .arg(env)
                .env_remove("PGPASSWORD")
                .env_remove("PGPASSFILE")
                .env("HOME", lab.lab.tmp.path()),
            Duration::from_secs(120),
        )
    };

    // 1. A run dumps both databases over TCP (SCRAM password from pgpass).
    let out = backup(&env_file);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("done: 2 verified"), "{}", text(&out));
    let first = dumps(&backups, "ginflix");
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(dumps(&backups, "vlog").len(), 1);
    let dump = backups.join(&first[0]);
    let toc = run_bounded(
        Command::new(format!("{PG_BIN}/pg_restore"))
            .arg("--list")
            .arg(&dump),
        Duration::from_secs(30),
    );
    assert!(toc.status.success(), "{}", text(&toc));
    assert!(
        stdout(&toc).contains("TABLE public movies"),
        "{}",
        stdout(&toc)
    );
    // ... and it restores.
    pg.sql("postgres", "CREATE DATABASE restored");
    let restore = run_bounded(
        Command::new(format!("{PG_BIN}/pg_restore"))
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
            .args(["-d", "restored", "--no-owner", "--exit-on-error"])
            .arg(&dump)
            .env("PGPASSWORD", &pg.password),
        Duration::from_secs(30),
    );
    assert!(restore.status.success(), "{}", text(&restore));
    assert_eq!(
        pg.sql(
            "restored",
            "SELECT string_agg(title, ',' ORDER BY id) FROM movies"
        ),
        "Stock footage,Sintel"
    );
    let metrics = std::fs::read_to_string(backups.join("pg_backup.prom")).unwrap();
    assert!(
        metrics.contains("pg_backup_databases{outcome=\"verified\"} 2"),
        "{metrics}"
    );

    // 2. Retention: dumps older than 7 days go after the next verified dump;
    //    newer ones and files that are not dumps stay.
    let old = backups.join("ginflix-2020-01-01-020000.dump");
    let recent = backups.join("ginflix-2020-01-05-020000.dump");
    let other = backups.join("notes.txt");
    for (path, days) in [(&old, 10), (&recent, 3), (&other, 30)] {
        std::fs::copy(&dump, path).unwrap();
        set_age_days(path, days);
    }
    std::thread::sleep(Duration::from_millis(1100)); // a new timestamp for the next dump
    let out = backup(&env_file);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("pruned"), "{}", text(&out));
    assert!(!old.exists(), "the 10-day-old dump is pruned");
    assert!(recent.exists() && other.exists());
    let good = dumps(&backups, "ginflix");
    assert_eq!(good.len(), 3, "{good:?}"); // recent + two verified runs

    // 3. A corrupt dump (pg_dump's output cut to 64 bytes by a wrapper) is
    //    detected by pg_restore --list and deleted; nothing is pruned.
    let bin = lab.lab.tmp.path().join("corrupting-bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(
        bin.join("pg_dump"),
        format!(
            "#!/bin/sh\n{PG_BIN}/pg_dump \"$@\" || exit $?\nfor a; do case $a in --file=*) f=${{a#--file=}};; esac; done\nhead -c 64 \"$f\" > \"$f.cut\" && mv \"$f.cut\" \"$f\"\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        bin.join("pg_dump"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink(format!("{PG_BIN}/pg_restore"), bin.join("pg_restore")).unwrap();
    let env = std::fs::read_to_string(&env_file).unwrap();
    assert!(env.contains(&format!("PG_BIN_DIR='{PG_BIN}'")), "{env}");
    let corrupt_env = lab.lab.tmp.path().join("corrupt.env");
    std::fs::write(
        &corrupt_env,
        env.replace(
            &format!("PG_BIN_DIR='{PG_BIN}'"),
            &format!("PG_BIN_DIR='{}'", bin.display()),
        ),
    )
    .unwrap();
    set_age_days(&recent, 10); // would be pruned by a verified dump
    std::thread::sleep(Duration::from_millis(1100));
    let before = tree(&backups);
    let out = backup(&corrupt_env);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let log = text(&out);
    assert!(
        log.contains("FAILED: ginflix dump does not pass pg_restore --list; corrupt dump removed"),
        "{log}"
    );
    assert!(
        log.contains("done: 0 verified, 2 failed: ginflix vlog"),
        "{log}"
    );
    let after = tree(&backups);
    let dumps_before: Vec<_> = before
        .keys()
        .filter(|k| !k.ends_with("pg_backup.prom"))
        .collect();
    let dumps_after: Vec<_> = after
        .keys()
        .filter(|k| !k.ends_with("pg_backup.prom"))
        .collect();
    assert_eq!(
        dumps_after, dumps_before,
        "no corrupt dump or .partial left, and no good dump pruned"
    );
    assert!(recent.exists(), "retention never runs after a failed dump");
}

// ---------------------------------------------------------------- caddy

/// A small module beside caddy, to show the rest of the host converging
/// while the Caddyfile is refused.
const MOTD_MODULE: &str = "params:\n  text: {type: string, required: true}\n  path: {type: string, required: true}\nresources:\n  - file: \"{{ params.path }}\"\n    content: \"{{ params.text }}\\n\"\n";

#[test]
fn caddyfile_validates_routes_stream_and_web_and_a_broken_template_changes_nothing() {
    // Two nginx streamers holding the same video, nginx as the web app, on
    // ports from the shared allocator (others when one was taken).
    let serve = tempfile::tempdir().unwrap();
    let video: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let www = serve.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("stock.mp4"), &video).unwrap();
    let (upstreams, _nginx) = start_on_reserved_ports("nginx", 3, |p| {
        let servers = format!(
            "server {{ listen 127.0.0.1:{}; root {www}; add_header X-Streamer s1; }}\n\
             server {{ listen 127.0.0.1:{}; root {www}; add_header X-Streamer s2; }}\n\
             server {{ listen 127.0.0.1:{}; location / {{ default_type text/plain; return 200 \"ginflix web: $request_uri\\n\"; }} }}",
            p[0],
            p[1],
            p[2],
            www = www.display()
        );
        nginx(&serve.path().join("nginx"), &servers, p).map(|d| (p.to_vec(), d))
    });
    let (s1, s2, web_port) = (upstreams[0], upstreams[1], upstreams[2]);
    // Caddy's own ports are in the host file the agent renders the
    // Caddyfile from: when one was taken, the host is rendered again.
    let host_yaml = |w: &Path, caddy_port: u16, admin_port: u16| {
        format!(
            "platform: linux
roots: [/etc/caddy, {w}]
modules:
  - name: caddy
    params:
      sites:
        - address: \"http://127.0.0.1:{caddy_port}\"
          # these streamers serve the videos at their root: strip /stream
          routes: [{{path: \"/stream/*\", strip: true, upstreams: [\"127.0.0.1:{s1}\", \"127.0.0.1:{s2}\"]}}]
          upstreams: [\"127.0.0.1:{web_port}\"]
      bind: [127.0.0.1]
      admin: \"127.0.0.1:{admin_port}\"
      log_dir: {w}/log
      access_log: {w}/log/ginflix-access.log
      user: root
      group: root
  - name: motd
    params: {{text: hello, path: {w}/motd}}
",
            w = w.display()
        )
    };
    let lab = ToolLab::new(|w| host_yaml(w, 1, 2));
    lab.write("modules/motd/module.yaml", MOTD_MODULE);
    let caddy_dir = lab.lab.tmp.path().join("caddy");
    std::fs::create_dir_all(&caddy_dir).unwrap();
    // The agent runs `caddy validate` itself; keep its state out of $HOME.
    let apply_env = |cmd: &mut Command| {
        caddy_env(cmd, &caddy_dir);
    };
    let apply = || {
        let mut cmd = homelab_agent_tests::agent();
        cmd.args(["apply", "--config", lab.lab.config().to_str().unwrap()]);
        apply_env(&mut cmd);
        run_bounded(&mut cmd, Duration::from_secs(120))
    };
    let caddyfile = lab.in_root(Path::new("/etc/caddy/Caddyfile"));
    let (caddy_port, proxy) = start_on_reserved_ports("caddy", 2, |p| {
        lab.write("hosts/lab.yaml", &host_yaml(&lab.world(), p[0], p[1]));
        let out = apply();
        assert!(out.status.success(), "{}", text(&out));
        if !lab.world().exists() {
            link_world(&lab.root(), &lab.world());
        }
        let rendered = std::fs::read_to_string(&caddyfile).unwrap();
        assert!(rendered.contains("\tbind 127.0.0.1\n"), "{rendered}");

        // caddy validate on the rendered file, as the agent ran it.
        let mut validate = Command::new("caddy");
        validate
            .args(["validate", "--adapter", "caddyfile", "--config"])
            .arg(&caddyfile);
        caddy_env(&mut validate, &caddy_dir);
        let out = run_bounded(&mut validate, Duration::from_secs(60));
        assert!(out.status.success(), "{}", text(&out));
        caddy(&caddy_dir, &caddyfile, p[0]).map(|d| (p[0], d))
    });

    let r = http_get(caddy_port, "/stream/stock.mp4", &[]);
    assert_eq!(r.status, 200, "{r:?} {}", proxy.log_text());
    assert!(r.body == video, "the streamer's file, /stream stripped");
    assert!(matches!(r.header("X-Streamer"), Some("s1" | "s2")), "{r:?}");
    let r = http_get(
        caddy_port,
        "/stream/stock.mp4",
        &[("Range", "bytes=100-199")],
    );
    assert_eq!(r.status, 206, "range requests pass through: {r:?}");
    assert_eq!(r.body, video[100..200]);
    let r = http_get(caddy_port, "/admin/login/?next=/admin/", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "ginflix web: /admin/login/?next=/admin/\n");
    assert_eq!(http_get(caddy_port, "/", &[]).text(), "ginflix web: /\n");
    assert_eq!(
        http_get(caddy_port, "/streaming", &[]).text(),
        "ginflix web: /streaming\n",
        "only /stream/* goes to the streamers"
    );
    // Both streamers serve (20 sequential requests: a miss is a 2^-19 chance).
    let seen: std::collections::BTreeSet<String> = (0..20)
        .filter_map(|_| {
            http_get(caddy_port, "/stream/stock.mp4", &[("Range", "bytes=0-0")])
                .header("X-Streamer")
                .map(str::to_string)
        })
        .collect();
    assert_eq!(
        seen.len(),
        2,
        "least_conn picks at random among idle streamers: {seen:?}"
    );
    // The access log is where the module put it (JSON lines).
    let log = lab.world().join("log/ginflix-access.log");
    assert!(
        homelab_agent_tests::real_tools::wait_until(Duration::from_secs(5), || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("\"uri\":\"/stream/stock.mp4\""))
        }),
        "access log: {:?}",
        std::fs::read_to_string(&log)
    );

    // A broken template (a misspelt directive), and a new motd.
    let template = lab.repo().join("modules/caddy/templates/Caddyfile.j2");
    let good = std::fs::read_to_string(&template).unwrap();
    let broken = good.replacen(
        "\t\treverse_proxy {{ site.upstreams",
        "\t\treverse_proxyy {{ site.upstreams",
        1,
    );
    assert_ne!(good, broken);
    std::fs::write(&template, broken).unwrap();
    let host = std::fs::read_to_string(lab.repo().join("hosts/lab.yaml")).unwrap();
    lab.write(
        "hosts/lab.yaml",
        &host.replace("text: hello", "text: bonjour"),
    );
    let etc = tree(&lab.in_root(Path::new("/etc/caddy")));
    let out = apply();
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(all.contains("failed file:/etc/caddy/Caddyfile: validate: `/usr/bin/caddy validate --adapter caddyfile --config "), "{all}");
    assert!(
        all.contains("unrecognized directive: reverse_proxyy"),
        "Caddy's own message: {all}"
    );
    assert!(
        all.contains("/etc/caddy/Caddyfile was left untouched"),
        "{all}"
    );
    assert_eq!(
        tree(&lab.in_root(Path::new("/etc/caddy"))),
        etc,
        "the live Caddyfile is byte-for-byte what it was, and no temp file is left"
    );
    assert_eq!(
        std::fs::read_to_string(lab.world().join("motd")).unwrap(),
        "bonjour\n",
        "the rest of the host converged"
    );
    // The proxy still serves the last good config.
    assert_eq!(http_get(caddy_port, "/", &[]).text(), "ginflix web: /\n");
}
