//! Credentials embedded in URLs (`https://user:token@host/...`), hidden
//! wherever text leaves the agent: errors printed by the CLI, log lines,
//! `/api/status` and `/readyz`, refusals kept in state, Loki events and
//! `agent validate`. One function, [`url_credentials`], applied at each of
//! those boundaries, so a URL that reaches a message by a path nobody
//! thought of (an error of gix or reqwest quoting the URL it was given) is
//! covered too.
//!
//! What is hidden: the password of any `scheme://user:password@`, and the
//! whole user part of an `http(s)://user@` (forges take a token as the user
//! name alone: `https://<token>@github.com/...`). An ssh user
//! (`ssh://git@host`, `git@host:owner/repo`) is a login name, not a
//! credential, and stays.
//!
//! Hand-written rather than a URL parser: it scans free text (error
//! messages, log lines) for every URL-looking span, where a parser wants one
//! well-formed URL.

use std::borrow::Cow;

/// What replaces a hidden credential.
pub const MASK: &str = "***";

/// `text` with the credentials of every URL in it replaced by [`MASK`].
/// Borrowed when there is nothing to hide (the common case).
pub fn url_credentials(text: &str) -> Cow<'_, str> {
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    let mut out = String::new();
    // Up to where `text` has been copied to `out`.
    let mut copied = 0;
    let mut search = 0;
    while let Some(found) = text[search..].find("://") {
        let sep = search + found;
        let authority_start = sep + 3;
        // The scheme: letters, digits, `+`, `-`, `.` before `://`.
        let scheme_start = text[..sep]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |i| i + 1);
        let scheme = &text[scheme_start..sep];
        // The authority ends at the path, query, fragment, or anything that
        // cannot be in a URL (space, quotes, brackets of prose).
        let authority_end = text[authority_start..]
            .find(|c: char| {
                matches!(
                    c,
                    '/' | '?' | '#' | '"' | '\'' | '`' | '<' | '>' | '\\' | '(' | ')'
                ) || c.is_whitespace()
                    || c.is_control()
            })
            .map_or(text.len(), |i| authority_start + i);
        search = authority_start;
        let authority = &text[authority_start..authority_end];
        let Some(at) = authority.rfind('@') else {
            continue;
        };
        let userinfo = &authority[..at];
        if userinfo.is_empty() || userinfo == MASK || userinfo.ends_with(":***") {
            continue;
        }
        let ssh = scheme.to_ascii_lowercase().contains("ssh");
        let hidden = match userinfo.find(':') {
            Some(colon) => format!("{}:{MASK}", &userinfo[..colon]),
            None if ssh || scheme.is_empty() => continue,
            None => MASK.to_string(),
        };
        out.push_str(&text[copied..authority_start]);
        out.push_str(&hidden);
        copied = authority_start + at;
        search = authority_end.max(authority_start + 1);
    }
    if copied == 0 {
        return Cow::Borrowed(text);
    }
    out.push_str(&text[copied..]);
    Cow::Owned(out)
}

/// [`url_credentials`] as an owned string (for error values and records).
pub fn url_credentials_owned(text: &str) -> String {
    url_credentials(text).into_owned()
}

/// A log writer that hides URL credentials in every line it is given: the
/// daemon's and the CLI's `tracing` output goes through it, so no log line
/// (text or JSON) carries one, whatever field it came in.
pub struct RedactingWriter<W>(pub W);

impl<W: std::io::Write> std::io::Write for RedactingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // tracing-subscriber's fmt layer writes each event whole, so a URL
        // is never split between two calls.
        match std::str::from_utf8(buf) {
            Ok(text) => match url_credentials(text) {
                Cow::Borrowed(_) => self.0.write_all(buf),
                Cow::Owned(clean) => self.0.write_all(clean.as_bytes()),
            },
            Err(_) => self.0.write_all(buf),
        }
        .map(|()| buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, want: &str) {
        assert_eq!(url_credentials(input), want, "input: {input}");
    }

    #[test]
    fn passwords_and_token_users_are_hidden() {
        check(
            "https://ann:tok3n@git.lan/o/r.git",
            "https://ann:***@git.lan/o/r.git",
        );
        check(
            "https://ghp_abc123@github.com/o/r",
            "https://***@github.com/o/r",
        );
        check(
            "cannot fetch `main` from http://u:p%40ss@127.0.0.1:8080/r.git: refused",
            "cannot fetch `main` from http://u:***@127.0.0.1:8080/r.git: refused",
        );
        // Two URLs in one line, one quoted.
        check(
            "a \"https://x:y@h1\" and (http://z@h2:1/p)",
            "a \"https://x:***@h1\" and (http://***@h2:1/p)",
        );
        // A password holding `@`: everything up to the last `@` of the authority.
        check("https://u:a@b@host/r", "https://u:***@host/r");
        // In a JSON log line.
        check(
            r#"{"repo":"https://u:secret@h/r.git","x":1}"#,
            r#"{"repo":"https://u:***@h/r.git","x":1}"#,
        );
    }

    #[test]
    fn what_is_not_a_credential_stays() {
        for text in [
            "ssh://git@forge.lan/o/r.git",
            "git@forge.lan:o/r.git",
            "https://forge.lan/o/r.git",
            "file:///srv/repo",
            "mailto: ann@lan",
            "no url at all",
            "https://h/path@with-at",
            "https://h?q=a@b",
            "https://u:***@h/already-hidden",
            "https://***@h/already-hidden",
            "",
            "://",
            "x://@h",
        ] {
            check(text, text);
        }
        assert!(matches!(
            url_credentials("https://forge.lan/o/r.git"),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn the_writer_hides_credentials_in_what_it_writes() {
        use std::io::Write;
        let mut w = RedactingWriter(Vec::new());
        w.write_all(b"repo=https://u:tok@h/r.git\n").unwrap();
        assert_eq!(w.0, b"repo=https://u:***@h/r.git\n");
    }
}
