//! The leak checks' needles: a secret value and the forms it could take
//! on its way into a log, a file or a push ([`forms`]), and [`Evidence`],
//! everything the agent printed, served or stored, searched for all of
//! them. Shared by the secrets leak tests and the telemetry ones.

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::{tree, Node};

/// Whether `needle` (non-empty) occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Standard and URL-safe base64, without padding.
fn base64(bytes: &[u8], url_safe: bool) -> String {
    let alphabet: &[u8] = if url_safe {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn percent_encode(s: &str, plus_for_space: bool) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b' ' if plus_for_space => "+".to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A value and the forms it could take on its way into a log or a file:
/// itself, URL- and form-encoded, JSON-escaped (plain and HTML-safe as
/// minijinja's `tojson` writes it), hex, and base64 (standard and URL-safe)
/// at each of the three alignments it can have inside a longer encoding.
pub fn forms(value: &str) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = vec![
        ("raw".into(), value.as_bytes().to_vec()),
        ("url".into(), percent_encode(value, false).into_bytes()),
        ("form".into(), percent_encode(value, true).into_bytes()),
        (
            "json".into(),
            serde_json::to_string(value)
                .unwrap()
                .trim_matches('"')
                .as_bytes()
                .to_vec(),
        ),
        (
            "json-html".into(),
            value
                .replace('&', "\\u0026")
                .replace('<', "\\u003c")
                .replace('>', "\\u003e")
                .replace('\'', "\\u0027")
                .into_bytes(),
        ),
        ("hex".into(), hex::encode(value).into_bytes()),
    ];
    for url_safe in [false, true] {
        for pad in 0..3usize {
            let mut bytes = vec![0u8; pad];
            bytes.extend_from_slice(value.as_bytes());
            let enc = base64(&bytes, url_safe);
            // Only the characters made of the value's bits alone.
            let start = (pad * 8).div_ceil(6);
            let end = (bytes.len() * 8) / 6;
            if end > start + 3 {
                out.push((
                    format!("base64{}+{pad}", if url_safe { "url" } else { "" }),
                    enc.as_bytes()[start..end].to_vec(),
                ));
            }
        }
    }
    out.sort_by(|a, b| a.1.cmp(&b.1));
    out.dedup_by(|a, b| a.1 == b.1);
    out
}

/// Everything the agent printed, served or stored during the leak test.
#[derive(Default)]
pub struct Evidence {
    /// (where, what was there)
    pub items: Vec<(String, Vec<u8>)>,
}

impl Evidence {
    pub fn add(&mut self, what: impl Into<String>, bytes: impl Into<Vec<u8>>) {
        self.items.push((what.into(), bytes.into()));
    }

    pub fn output(&mut self, what: &str, out: &Output) {
        self.add(format!("{what}: stdout"), out.stdout.clone());
        self.add(format!("{what}: stderr"), out.stderr.clone());
    }

    /// Fails listing every place any form ([`forms`]) of any value shows.
    pub fn assert_no_leaks(&self, values: &[&str]) {
        let mut leaks = Vec::new();
        for value in values {
            for (form, needle) in forms(value) {
                for (what, bytes) in &self.items {
                    if contains(bytes, &needle) {
                        let at = bytes
                            .windows(needle.len())
                            .position(|w| w == needle)
                            .unwrap();
                        let context = String::from_utf8_lossy(
                            &bytes
                                [at.saturating_sub(80)..(at + needle.len() + 80).min(bytes.len())],
                        )
                        .into_owned();
                        leaks.push(format!("{value:?} ({form}) in {what}: …{context}…"));
                    }
                }
            }
        }
        assert!(
            leaks.is_empty(),
            "{} leak(s):\n{}",
            leaks.len(),
            leaks.join("\n")
        );
    }

    /// Every file under `dir` except `exclude`.
    pub fn files(&mut self, dir: &Path, exclude: &[PathBuf]) -> usize {
        let mut n = 0;
        for (rel, node) in tree(dir) {
            let path = dir.join(&rel);
            if exclude.contains(&path) {
                continue;
            }
            if let Node::File { content, .. } = node {
                self.add(path.display().to_string(), content);
                n += 1;
            }
        }
        n
    }
}
