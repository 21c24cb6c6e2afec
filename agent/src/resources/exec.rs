//! Running host tools (`systemctl`, `launchctl`, `apt-get`, `brew`, a file's
//! `validate:` command) behind one trait, so the command sequences a kind
//! issues can be recorded and checked in tests without the tool.
//!
//! [`SystemRunner`] runs real processes: no shell, a bounded run time (the
//! child is killed when it is over, with every process it started: it runs
//! in its own process group), stdin closed unless given, and stdout and
//! stderr captured (capped at 1 MiB each).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
#[cfg(test)]
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One command to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmd {
    pub program: String,
    pub args: Vec<String>,
    /// Extra environment (on top of the agent's own).
    pub env: Vec<(String, String)>,
    pub timeout: Duration,
}

impl Cmd {
    /// `program args...` with a 60 s limit.
    pub fn new<I, S>(program: &str, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Cmd {
            program: program.to_string(),
            args: args.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            timeout: Duration::from_secs(60),
        }
    }

    pub fn timeout(mut self, timeout: Duration) -> Cmd {
        self.timeout = timeout;
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Cmd {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// `program arg arg` for messages and logs (no quoting: never parsed back).
    pub fn line(&self) -> String {
        std::iter::once(self.program.as_str())
            .chain(self.args.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// What a command did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// The exit code; `None` when killed by a signal or the time limit.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// stderr, or stdout when stderr is empty, trimmed, for error messages.
    pub fn message(&self) -> String {
        let text = if self.stderr.trim().is_empty() {
            &self.stdout
        } else {
            &self.stderr
        };
        let text = text.trim();
        if self.timed_out {
            format!("timed out{}{text}", if text.is_empty() { "" } else { ": " })
        } else {
            text.to_string()
        }
    }
}

/// Errors starting a command (a command that ran and failed is an
/// [`Output`] with a non-zero code, not an error).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(
        "cannot run `{program}`: {source}\n  install it, or check that it is on the agent's PATH"
    )]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

/// Runs commands. The one way resources reach host tools.
pub trait Runner: Send + Sync {
    fn run(&self, cmd: &Cmd) -> Result<Output, ExecError>;
}

/// Runs real processes.
#[derive(Debug, Default)]
pub struct SystemRunner;

const CAP: usize = 1 << 20;

fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            match r.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) if buf.len() < CAP => buf.extend_from_slice(&chunk[..n.min(CAP - buf.len())]),
                Ok(_) => {}
            }
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

impl Runner for SystemRunner {
    fn run(&self, cmd: &Cmd) -> Result<Output, ExecError> {
        let mut child = Command::new(&cmd.program)
            .args(&cmd.args)
            .envs(cmd.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so the time limit also ends what it
            // started (a grandchild holding the pipes would otherwise keep
            // the reads below waiting past the limit).
            .process_group(0)
            .spawn()
            .map_err(|source| ExecError::Spawn {
                program: cmd.program.clone(),
                source,
            })?;
        let out = drain(child.stdout.take().expect("piped"));
        let err = drain(child.stderr.take().expect("piped"));
        let deadline = Instant::now() + cmd.timeout;
        let mut timed_out = false;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() >= deadline => {
                    timed_out = true;
                    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
                    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
                    let _ = child.kill();
                    break child.wait().ok();
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => break None,
            }
        };
        Ok(Output {
            code: if timed_out {
                None
            } else {
                status.and_then(|s| s.code())
            },
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
            timed_out,
        })
    }
}

/// A scripted runner for tests: records every command line and answers
/// from rules (the first rule whose prefix matches the command line wins;
/// no match answers exit 0 with no output). A test double: compiled into
/// the unit tests only, never into the agent binary.
#[cfg(test)]
#[derive(Default, Clone)]
pub struct RecordingRunner {
    log: Arc<Mutex<Vec<String>>>,
    rules: Arc<Mutex<Vec<(String, Output)>>>,
    /// Programs that are not installed: running one fails to start.
    missing: Arc<Mutex<Vec<String>>>,
}

#[cfg(test)]
impl RecordingRunner {
    pub fn new() -> RecordingRunner {
        RecordingRunner::default()
    }

    /// Answers commands whose line starts with `prefix` with `code`/`stdout`/`stderr`.
    pub fn answer(&self, prefix: &str, code: i32, stdout: &str, stderr: &str) {
        self.rules.lock().unwrap().insert(
            0,
            (
                prefix.to_string(),
                Output {
                    code: Some(code),
                    stdout: stdout.to_string(),
                    stderr: stderr.to_string(),
                    timed_out: false,
                },
            ),
        );
    }

    /// Makes `program` fail to start as a program that is not installed does.
    pub fn missing(&self, program: &str) {
        self.missing.lock().unwrap().push(program.to_string());
    }

    /// Forgets every rule.
    pub fn clear_answers(&self) {
        self.rules.lock().unwrap().clear();
    }

    /// The command lines run so far, and forgets them.
    pub fn take_log(&self) -> Vec<String> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

#[cfg(test)]
impl Runner for RecordingRunner {
    fn run(&self, cmd: &Cmd) -> Result<Output, ExecError> {
        let line = cmd.line();
        self.log.lock().unwrap().push(line.clone());
        if self.missing.lock().unwrap().contains(&cmd.program) {
            return Err(ExecError::Spawn {
                program: cmd.program.clone(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        let rules = self.rules.lock().unwrap();
        Ok(rules
            .iter()
            .find(|(p, _)| line.starts_with(p.as_str()))
            .map(|(_, o)| o.clone())
            .unwrap_or(Output {
                code: Some(0),
                ..Output::default()
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_captures() {
        let out = SystemRunner
            .run(&Cmd::new("sh", ["-c", "echo out; echo err >&2; exit 3"]))
            .unwrap();
        assert_eq!(out.code, Some(3));
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.message(), "err");
    }

    #[test]
    fn kills_at_the_time_limit() {
        let out = SystemRunner
            .run(&Cmd::new("sleep", ["5"]).timeout(Duration::from_millis(100)))
            .unwrap();
        assert!(out.timed_out);
        assert_eq!(out.code, None, "killed, not exited");
    }

    #[test]
    fn the_time_limit_ends_what_the_command_started() {
        // `sleep` is a grandchild holding stdout: killing only `sh` would
        // leave the output readers waiting for it. It tells its pid first.
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let script = format!(
            "sleep 30 & echo $! > {}; wait; echo late",
            pid_file.display()
        );
        let out = SystemRunner
            .run(&Cmd::new("sh", ["-c", script.as_str()]).timeout(Duration::from_millis(500)))
            .unwrap();
        assert!(out.timed_out);
        assert!(!out.stdout.contains("late"), "{}", out.stdout);
        // The grandchild was ended with it (gone, or a zombie awaiting its
        // reaper). The group's SIGKILL is delivered asynchronously: a
        // killed process may still show as running for a moment, so this
        // waits for the kill to land (an unkilled `sleep 30` never does).
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let state = || {
            let stat =
                std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
            let state = stat.rsplit(") ").next().and_then(|s| s.chars().next());
            (state, stat)
        };
        let start = std::time::Instant::now();
        loop {
            let (s, stat) = state();
            if matches!(s, None | Some('Z') | Some('X')) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the grandchild {} is still running: {stat}",
                pid.trim()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn missing_program_says_so() {
        let err = SystemRunner
            .run(&Cmd::new("/nonexistent/tool", ["x"]))
            .unwrap_err();
        assert!(err.to_string().contains("cannot run `/nonexistent/tool`"));
    }

    #[test]
    fn recording_runner_answers_by_prefix() {
        let r = RecordingRunner::new();
        r.answer("launchctl print", 113, "", "Could not find service");
        let out = r
            .run(&Cmd::new("launchctl", ["print", "system/x"]))
            .unwrap();
        assert_eq!(out.code, Some(113));
        assert!(r
            .run(&Cmd::new("launchctl", ["bootstrap"]))
            .unwrap()
            .success());
        assert_eq!(
            r.take_log(),
            vec!["launchctl print system/x", "launchctl bootstrap"]
        );
    }
}
