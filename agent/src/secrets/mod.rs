//! Secrets: `op://vault/item[/section]/field` references resolved through
//! 1Password Connect, held in memory only.
//!
//! Owns: the [`SecretValue`] type (prints as a redaction marker), the
//! reference syntax ([`Reference`]), and (in `connect.rs`) the Connect REST
//! client. Leaves to others: where values are written (resources call
//! [`SecretValue::expose`], the one greppable way to get the plain text).

use std::fmt;

pub mod cache;
pub mod connect;
pub mod resolve;

/// What a secret prints as, anywhere.
pub const REDACTED: &str = "[redacted]";

/// A secret value. `Debug`, `Display` and `Serialize` print [`REDACTED`];
/// [`SecretValue::expose`] is the only way to the plain text, used only
/// where a value is written to its destination. Zeroed on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(String);

impl SecretValue {
    pub fn new(value: impl Into<String>) -> SecretValue {
        SecretValue(value.into())
    }

    /// The plain text. Call only to write the value where it belongs.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Drop for SecretValue {
    fn drop(&mut self) {
        // SAFETY: overwriting with zero bytes keeps the String valid UTF-8.
        unsafe {
            for b in self.0.as_bytes_mut() {
                std::ptr::write_volatile(b, 0);
            }
        }
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl serde::Serialize for SecretValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

/// A parsed `op://vault/item[/section]/field` reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Reference {
    pub vault: String,
    pub item: String,
    pub section: Option<String>,
    pub field: String,
}

/// Why a reference does not parse; names the bad part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("`{0}` is not a secret reference: it must start with op://")]
    Scheme(String),
    #[error("`{reference}` has {count} part(s) after op://; write op://vault/item/field or op://vault/item/section/field")]
    Parts { reference: String, count: usize },
    #[error("`{reference}`: the {part} is empty")]
    Empty {
        reference: String,
        part: &'static str,
    },
    #[error("`{reference}`: the {part} `{value}` has the character {ch:?}; names may hold letters, digits, `-`, `_`, `.` and spaces (use the item's id otherwise)")]
    Character {
        reference: String,
        part: &'static str,
        value: String,
        ch: char,
    },
    #[error(
        "`{reference}`: query parameters (`?{query}`) are not supported by Connect references"
    )]
    Query { reference: String, query: String },
}

impl Reference {
    /// Parses strictly: the op CLI's syntax, segments of `a-zA-Z0-9-_.` and space.
    pub fn parse(text: &str) -> Result<Reference, ReferenceError> {
        let Some(rest) = text.strip_prefix("op://") else {
            return Err(ReferenceError::Scheme(text.to_string()));
        };
        if let Some((_, query)) = rest.split_once('?') {
            return Err(ReferenceError::Query {
                reference: text.to_string(),
                query: query.to_string(),
            });
        }
        let parts: Vec<&str> = rest.split('/').collect();
        let names: &[&'static str] = match parts.len() {
            3 => &["vault", "item", "field"],
            4 => &["vault", "item", "section", "field"],
            count => {
                return Err(ReferenceError::Parts {
                    reference: text.to_string(),
                    count,
                })
            }
        };
        for (value, part) in parts.iter().zip(names) {
            if value.trim().is_empty() {
                return Err(ReferenceError::Empty {
                    reference: text.to_string(),
                    part,
                });
            }
            if let Some(ch) = value
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ' ')))
            {
                return Err(ReferenceError::Character {
                    reference: text.to_string(),
                    part,
                    value: value.to_string(),
                    ch,
                });
            }
        }
        Ok(Reference {
            vault: parts[0].to_string(),
            item: parts[1].to_string(),
            section: (parts.len() == 4).then(|| parts[2].to_string()),
            field: parts[parts.len() - 1].to_string(),
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.section {
            Some(s) => write!(f, "op://{}/{}/{}/{}", self.vault, self.item, s, self.field),
            None => write!(f, "op://{}/{}/{}", self.vault, self.item, self.field),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_values_never_print() {
        let s = SecretValue::new("hunter2");
        assert_eq!(
            format!("{s} {s:?} {:?}", Some(&s)),
            "[redacted] [redacted] Some([redacted])"
        );
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"[redacted]\"");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn references_parse_strictly() {
        let r = Reference::parse("op://homelab/borgmatic/passphrase").unwrap();
        assert_eq!(
            (
                r.vault.as_str(),
                r.item.as_str(),
                r.section.as_deref(),
                r.field.as_str()
            ),
            ("homelab", "borgmatic", None, "passphrase")
        );
        let r = Reference::parse("op://homelab/postgres backup/admin/password").unwrap();
        assert_eq!(r.section.as_deref(), Some("admin"));
        assert_eq!(r.to_string(), "op://homelab/postgres backup/admin/password");
        for (bad, want) in [
            ("homelab/x/y", "must start with op://"),
            ("op://homelab/x", "2 part(s)"),
            ("op://a/b/c/d/e", "5 part(s)"),
            ("op://homelab//password", "the item is empty"),
            (
                "op://homelab/it*em/password",
                "the item `it*em` has the character '*'",
            ),
            (
                "op://homelab/item/password?attribute=otp",
                "query parameters",
            ),
        ] {
            let err = Reference::parse(bad).unwrap_err().to_string();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }
}
