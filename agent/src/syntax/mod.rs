//! The syntax every file the agent reads shares: YAML with line numbers
//! and bounds (`yaml.rs`), diagnostics with file:line (`diag.rs`), and the
//! small value rules used across kinds and configs. The lowest layer above
//! the filesystem: it knows no stage.

pub mod diag;
pub mod yaml;

use std::time::Duration;

use diag::Diagnostics;
use yaml::{MapReader, Value};

/// Characters no managed path or root may hold: control characters (a
/// newline would forge a line of the plan or the log, a NUL cuts the path
/// short in the kernel) and the invisible or bidirectional formatting ones
/// that make a path read as another (U+200B..U+200F, U+202A..U+202E,
/// U+2060..U+2064, U+2066..U+2069, U+FEFF).
pub fn unsafe_path_char(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{2069}'
            | '\u{FEFF}')
}

pub const UNSAFE_CHAR_HINT: &str =
    "paths may not hold control characters (newline, tab, NUL, ...) or invisible formatting characters; rename the path";

/// A duration: whole seconds, or a string such as `90s`, `5m`, `1h`.
pub fn duration(r: &mut MapReader<'_>, key: &str, diags: &mut Diagnostics) -> Option<Duration> {
    duration_at_least(r, key, Duration::from_secs(1), diags)
}

/// [`duration`] with another lower bound.
pub fn duration_at_least(
    r: &mut MapReader<'_>,
    key: &str,
    min: Duration,
    diags: &mut Diagnostics,
) -> Option<Duration> {
    let node = r.take(key)?;
    let d = match &node.value {
        Value::Int(n) if *n > 0 => Some(Duration::from_secs(*n as u64)),
        Value::Str(s) => humantime::parse_duration(s).ok(),
        _ => None,
    };
    match d {
        Some(d) if d >= min => Some(d),
        _ => {
            diags.push(
                r.diag(
                    node.line,
                    format!(
                        "`{key}` must be a duration of at least {}",
                        humantime::format_duration(min)
                    ),
                )
                .hint("seconds (60) or a string such as \"90s\", \"5m\""),
            );
            None
        }
    }
}
