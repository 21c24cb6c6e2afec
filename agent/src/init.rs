//! `agent init`: starts a homelab repository for the machine it runs on.
//!
//! Writes `hosts/<this host>.yaml` (the detected platform, roots for the
//! example), `modules/hello/` (one directory and one templated file),
//! `agent.yaml` (an agent config that follows the repository) and
//! `README.md` (pushing it to Forgejo, the webhook, `agent
//! install-service`). Every file is created with `O_EXCL`: one that exists
//! (or a symlink in its place) is kept as it is and reported, so running
//! `init` again never overwrites anything.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use clap::Args;

use crate::resources::Platform;

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Directory of the new repository (created if missing).
    #[arg(default_value = ".", value_name = "DIR")]
    pub dir: PathBuf,
    /// The host's name (hosts/NAME.yaml). Default: this machine's short hostname.
    #[arg(long, value_name = "NAME")]
    pub host: Option<String>,
}

/// Errors starting a repository. Nothing already there is changed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("cannot read this machine's hostname ({0}); pass --host NAME")]
    Hostname(#[source] nix::Error),
    #[error("`{name}` cannot be a host name: {why}\n  pass --host NAME with letters, digits, `-`, `_` or `.` (at most 63, not starting with `.` or `-`)")]
    HostName { name: String, why: &'static str },
    #[error("cannot create {path}: {source}\n  nothing was overwritten; fix the path and run `agent init` again")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the current directory: {0}")]
    CurrentDir(#[source] std::io::Error),
}

/// What `init` found out about this machine.
#[derive(Debug, Clone)]
pub struct Machine {
    pub host: String,
    pub platform: Platform,
    /// e.g. "Debian GNU/Linux 12 (bookworm)", "Synology DSM 7.2.1", "macOS".
    pub os: String,
    pub arch: &'static str,
    pub synology: bool,
}

/// One file and whether it was written or kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Wrote(PathBuf),
    Kept(PathBuf),
}

/// The host name rules: a file name under hosts/, and a hostname.
pub fn check_host_name(name: &str) -> Result<(), InitError> {
    let why = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > 63 {
        Some("it is longer than 63 characters")
    } else if name.starts_with(['.', '-']) {
        Some("it starts with `.` or `-`")
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Some("it holds a character other than letters, digits, `-`, `_` and `.`")
    } else {
        None
    };
    match why {
        Some(why) => Err(InitError::HostName {
            name: name.escape_debug().to_string(),
            why,
        }),
        None => Ok(()),
    }
}

/// Reads at most 64 KiB of a small system file (os-release, VERSION).
fn read_small(path: &str) -> Option<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(64 * 1024)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

/// `KEY=value` or `KEY="value"` from an os-release or DSM VERSION file.
fn shell_var(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
    })
}

/// Detects this machine: platform, OS, architecture, Synology DSM.
pub fn detect(host: Option<String>) -> Result<Machine, InitError> {
    let host = match host {
        Some(h) => h,
        None => {
            let name = nix::unistd::gethostname().map_err(InitError::Hostname)?;
            let name = name.to_string_lossy();
            name.split('.').next().unwrap_or(&name).to_string()
        }
    };
    check_host_name(&host)?;
    let platform = crate::install::this_platform();
    // DSM keeps its version in /etc.defaults/VERSION (productversion="7.2.1").
    let dsm = read_small("/etc.defaults/VERSION")
        .filter(|t| t.contains("productversion") || t.contains("majorversion"));
    let synology = platform == Platform::Linux && dsm.is_some();
    let os = match (platform, &dsm) {
        (Platform::Macos, _) => "macOS".to_string(),
        (Platform::Linux, Some(v)) => format!(
            "Synology DSM {}",
            shell_var(v, "productversion")
                .or_else(|| shell_var(v, "majorversion"))
                .unwrap_or_default()
        ),
        (Platform::Linux, None) => read_small("/etc/os-release")
            .and_then(|t| shell_var(&t, "PRETTY_NAME"))
            .unwrap_or_else(|| "Linux".to_string()),
    };
    Ok(Machine {
        host,
        platform,
        os: os.chars().filter(|c| !c.is_control()).take(80).collect(),
        arch: std::env::consts::ARCH,
        synology,
    })
}

/// Where the example module writes: a place the agent may own whole.
fn example_dir(m: &Machine) -> &'static str {
    match m.platform {
        // Homebrew's prefix on Apple silicon; /usr/local on Intel Macs.
        Platform::Macos if m.arch == "aarch64" => "/opt/homebrew/etc/homelab",
        Platform::Macos => "/usr/local/etc/homelab",
        // DSM rewrites /etc on updates; volumes survive them.
        Platform::Linux if m.synology => "/volume1/homelab",
        Platform::Linux => "/etc/homelab",
    }
}

fn host_file(m: &Machine) -> String {
    let dir = example_dir(m);
    let more_roots = match m.platform {
        Platform::Macos => "/opt/homebrew/etc/caddy, /Users/you/.config/zot",
        Platform::Linux if m.synology => "/volume1/docker/caddy, /volume1/backups",
        Platform::Linux => "/etc/caddy, /etc/borgmatic",
    };
    format!(
        "# What {host} runs. Written by `agent init` on {os} ({arch}).\n\
         platform: {platform}\n\
         # The only paths the agent may touch: add one for each place a module manages\n\
         # (e.g. {more_roots}). Everything outside them is refused.\n\
         roots: [{dir}]\n\
         # Templates see vars.* (e.g. vars.domain).\n\
         vars: {{}}\n\
         modules:\n  \
           - name: hello\n    \
             params: {{dir: {dir}}}\n",
        host = m.host,
        os = m.os,
        arch = m.arch,
        platform = m.platform.name(),
    )
}

const MODULE: &str = r#"# An example module: one directory and one templated file. Copy it to start your
# own (`agent kinds` lists every resource kind: file, directory, symlink, absent,
# service, schedule, package).
description: "Example: a greeting file"
params:
  dir: {type: string, required: true, doc: "directory the file goes into (inside the host's roots)"}
  greeting: {type: string, default: "converged by homelab-agent", doc: "what the file says"}
resources:
  - directory: "{{ params.dir }}"
    mode: "0755"
  - file: "{{ params.dir }}/hello.txt"
    template: hello.txt.j2
    mode: "0644"
"#;

const TEMPLATE: &str = "{{ host.name }} ({{ host.platform }}): {{ params.greeting }}\n";

fn agent_config(m: &Machine, repo: &Path) -> String {
    let config = match m.platform {
        Platform::Macos => "/usr/local/etc/homelab-agent",
        Platform::Linux => "/etc/homelab-agent",
    };
    format!(
        "# The agent config for {host}: `agent run --config FILE` follows the repository\n\
         # below and converges this host on every change. Install it (README.md):\n\
         #   sudo install -D -m 600 agent.yaml {config}/agent.yaml\n\
         #   sudo agent install-service\n\
         # Until the repository is on Forgejo it follows this directory (uncommitted\n\
         # edits included); then set `repo:` to its URL and uncomment the lines below.\n\
         repo: {repo}\n\
         # repo: https://forgejo.example.org/you/homelab.git\n\
         ref: main\n\
         host: {host}\n\
         poll_interval: 60s\n\
         listen: 127.0.0.1:9464\n\
         # token_file: {config}/forgejo-token            # a Forgejo token (read:repository), chmod 600\n\
         # webhook_secret_file: {config}/webhook-secret  # chmod 600: openssl rand -hex 32\n",
        host = m.host,
        repo = yaml_scalar(&repo.to_string_lossy()),
    )
}

/// A path as a YAML scalar: plain when safe, else double-quoted.
fn yaml_scalar(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-' | '+' | '@'));
    if plain {
        s.to_string()
    } else {
        serde_json::to_string(s).unwrap_or_default()
    }
}

fn readme(m: &Machine) -> String {
    let config = match m.platform {
        Platform::Macos => "/usr/local/etc/homelab-agent",
        Platform::Linux => "/etc/homelab-agent",
    };
    let host = &m.host;
    format!(
        r#"# homelab

Desired state for [homelab-agent](https://forgejo.ops.eblu.me/eblume/homelab-agent):
`hosts/<name>.yaml` says what each host runs, `modules/` holds reusable bundles of
resources, `agent.yaml` is the agent config for {host}. Started with `agent init` on {host}
({os}).

## Try it

```sh
agent validate                                   # every host, without touching one
agent plan  --host {host} --root /tmp/lab        # what would change, in a sandbox
agent apply --host {host} --root /tmp/lab        # converge the sandbox
agent plan  --host {host}                        # the real host (never writes)
```

## Push it to Forgejo

Create an empty repository `homelab` in Forgejo (+ → New Repository), then:

```sh
git init -b main
git add -A && git commit -m "homelab: {host}"
git remote add origin https://forgejo.example.org/you/homelab.git
git push -u origin main
```

Make an access token for the agent (Settings → Applications → Generate New Token, scope
`read:repository`), and a webhook secret:

```sh
sudo install -d -m 700 {config}
printf '%s' 'THE-TOKEN' | sudo tee {config}/forgejo-token >/dev/null
openssl rand -hex 32 | sudo tee {config}/webhook-secret >/dev/null
sudo chmod 600 {config}/forgejo-token {config}/webhook-secret
```

In `agent.yaml`, set `repo:` to the repository's URL and uncomment `token_file:` and
`webhook_secret_file:`.

## Add the webhook

In the repository: Settings → Webhooks → Add webhook → Forgejo. Target URL
`http://{host}:9464/hooks/forgejo` (the agent listens on `listen:`; make it `0.0.0.0:9464`
or put a reverse proxy in front), HTTP method POST, content type `application/json`,
Secret: the content of `{config}/webhook-secret`, Trigger on: push events, Branch filter:
`main`. Forgejo refuses to deliver to LAN addresses until its `app.ini` allows them:

```ini
[webhook]
ALLOWED_HOST_LIST = loopback, private
```

## Run the agent as a service

```sh
sudo install -D -m 600 agent.yaml {config}/agent.yaml
sudo agent validate --config {config}/agent.yaml
sudo agent install-service          # writes, enables and starts the agent's own service
agent status --config {config}/agent.yaml
```

Every push to `main` is now applied within seconds (and every `poll_interval` without the
webhook); hand edits of managed files are healed. `sudo agent uninstall-service` stops it.
"#,
        os = m.os,
    )
}

/// Creates `path` with `content` unless something is there already.
fn create(path: &Path, content: &str, out: &mut Vec<Outcome>) -> Result<(), InitError> {
    let err = |source| InitError::Create {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| InitError::Create {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path);
    match file {
        Ok(mut f) => {
            f.write_all(content.as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(err)?;
            out.push(Outcome::Wrote(path.to_path_buf()));
        }
        // A file, a directory or a (dangling) symlink: kept, never followed.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            out.push(Outcome::Kept(path.to_path_buf()))
        }
        Err(e) => return Err(err(e)),
    }
    Ok(())
}

/// Writes the repository for `machine` into `dir` (absolute), keeping every
/// file that exists.
pub fn write_repo(dir: &Path, machine: &Machine) -> Result<Vec<Outcome>, InitError> {
    let mut out = Vec::new();
    let files = [
        (format!("hosts/{}.yaml", machine.host), host_file(machine)),
        ("modules/hello/module.yaml".to_string(), MODULE.to_string()),
        (
            "modules/hello/templates/hello.txt.j2".to_string(),
            TEMPLATE.to_string(),
        ),
        ("agent.yaml".to_string(), agent_config(machine, dir)),
        ("README.md".to_string(), readme(machine)),
    ];
    for (rel, content) in files {
        create(&dir.join(rel), &content, &mut out)?;
    }
    Ok(out)
}

/// `agent init`: the report to print.
pub fn run(args: &InitArgs) -> Result<String, InitError> {
    let machine = detect(args.host.clone())?;
    let dir = if args.dir.is_absolute() {
        args.dir.clone()
    } else {
        std::env::current_dir()
            .map_err(InitError::CurrentDir)?
            .join(&args.dir)
    };
    let outcomes = write_repo(&dir, &machine)?;
    let mut text = format!(
        "Homelab repository for {} ({}, {} {}) in {}:\n",
        machine.host,
        machine.os,
        machine.platform.name(),
        machine.arch,
        dir.display()
    );
    let kept = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Kept(_)))
        .count();
    for o in &outcomes {
        let line = match o {
            Outcome::Wrote(p) => format!("  wrote {}\n", rel(&dir, p)),
            Outcome::Kept(p) => format!("  kept  {} (it exists; not overwritten)\n", rel(&dir, p)),
        };
        text.push_str(&line);
    }
    if kept == outcomes.len() {
        text.push_str("Nothing written: every file was there already.\n");
    }
    text.push_str(&format!(
        "Next: cd {} && agent plan --host {} --root /tmp/lab; README.md says how to push it to Forgejo and install the service.\n",
        dir.display(),
        machine.host
    ));
    Ok(text)
}

fn rel(dir: &Path, p: &Path) -> String {
    p.strip_prefix(dir).unwrap_or(p).display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(platform: Platform, synology: bool) -> Machine {
        Machine {
            host: "box".into(),
            platform,
            os: "Test OS".into(),
            arch: "aarch64",
            synology,
        }
    }

    #[test]
    fn host_names_are_file_names() {
        assert!(check_host_name("k3s-pi").is_ok());
        assert!(check_host_name("nas_1.lan").is_ok());
        for bad in [
            "",
            "../etc",
            ".hidden",
            "-x",
            "a/b",
            "a b",
            "x\n",
            &"a".repeat(64),
        ] {
            assert!(check_host_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn roots_follow_the_platform() {
        assert!(host_file(&machine(Platform::Linux, false)).contains("roots: [/etc/homelab]"));
        assert!(host_file(&machine(Platform::Linux, true)).contains("roots: [/volume1/homelab]"));
        assert!(host_file(&machine(Platform::Macos, false))
            .contains("roots: [/opt/homebrew/etc/homelab]"));
        assert!(host_file(&machine(Platform::Macos, false)).contains("platform: macos"));
    }

    #[test]
    fn dsm_version_is_read() {
        let text = "majorversion=\"7\"\nminorversion=\"2\"\nproductversion=\"7.2.1\"\n";
        assert_eq!(shell_var(text, "productversion").as_deref(), Some("7.2.1"));
        assert_eq!(
            shell_var(
                "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"",
                "PRETTY_NAME"
            )
            .as_deref(),
            Some("Debian GNU/Linux 12 (bookworm)")
        );
    }

    #[test]
    fn odd_repo_paths_are_quoted() {
        assert_eq!(yaml_scalar("/srv/homelab"), "/srv/homelab");
        assert_eq!(yaml_scalar("/srv/my lab: #1"), "\"/srv/my lab: #1\"");
    }
}
