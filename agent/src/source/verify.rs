//! Commit signature verification: SSH signatures against git's `allowed_signers` file.
//!
//! What `git verify-commit` does with `gpg.format=ssh`, in process: take the commit's `gpgsig`
//! header (an armored `SSHSIG`), remove that header and its continuation lines from the raw
//! commit object to get the signed payload, check the signature for namespace `git`, and look
//! the signing key up in the allowed signers (honouring `namespaces=`, `valid-after=` and
//! `valid-before=` at the committer's time, as git passes `-Overify-time`).
//!
//! Not supported: OpenPGP and X.509 signatures ([`VerifyError::NotSsh`]), SSH certificates
//! (`cert-authority` lines are parsed but match no plain key), revocation lists.
//! `valid-after`/`valid-before` times without a `Z` suffix are read as UTC (ssh-keygen reads
//! them in the local time zone).

use std::fmt;
use std::path::{Path, PathBuf};

use gix::ObjectId;
use ssh_key::{HashAlg, PublicKey, SshSig};

use super::git::{short_id, CommitSource};

/// The largest `allowed_signers` file read: a line is 100 to 800 bytes, so
/// 1 MiB holds thousands of keys; anything larger is refused unread.
const MAX_ALLOWED_SIGNERS_BYTES: u64 = 1024 * 1024;

/// The SSHSIG namespace git signs commits in.
const NAMESPACE: &str = "git";

/// Why a commit's signature was not accepted, or the allowed signers could not be read.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read the allowed signers file {}: {source}\n  pass a file in git's allowed_signers format (`principal namespaces=\"git\" ssh-ed25519 AAAA...`)", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}: {reason}\n  expected `principals [options] keytype base64-key [comment]`, e.g. `lab@example.com namespaces=\"git\" ssh-ed25519 AAAA...`", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        /// (Shown in the message, so not also a `source`: the CLI prints
        /// an error's chain.)
        reason: LineError,
    },
    #[error("the allowed signers file {} lists no keys, so no commit could be trusted\n  add a line `<principal> namespaces=\"git\" <public key>` per key allowed to sign", path.display())]
    Empty { path: PathBuf },
    #[error(
        "cannot read commit {} to verify its signature: {reason}",
        short_id(commit)
    )]
    Object { commit: ObjectId, reason: String },
    #[error("commit {} is not signed; it is not trusted\n  sign commits with an SSH key: `git config gpg.format ssh`, `git config user.signingkey ~/.ssh/id_ed25519.pub`, then `git commit -S` (or `git config commit.gpgsign true`)", short_id(commit))]
    Unsigned { commit: ObjectId },
    #[error("commit {} has an {} signature; only SSH signatures are supported (OpenPGP and X.509 are not supported yet)\n  sign with an SSH key instead: `git config gpg.format ssh` and `git config user.signingkey ~/.ssh/id_ed25519.pub`, then re-sign (`git commit --amend -S --no-edit`)", short_id(commit), kind_name(kind))]
    NotSsh {
        commit: ObjectId,
        /// `openpgp` or `x509`.
        kind: &'static str,
    },
    #[error("commit {}: the signature does not verify: {reason}\n  the commit or its signature was changed after signing; do not deploy it, and find out who pushed it", short_id(commit))]
    BadSignature { commit: ObjectId, reason: String },
    #[error("commit {} is signed by key {fingerprint}, which {detail} in the allowed signers file {}\n  if that key may sign this repository, add `<principal> namespaces=\"git\" <its public key>` to the file", short_id(commit), signers.display())]
    UntrustedKey {
        commit: ObjectId,
        fingerprint: String,
        /// Why no line matched, e.g. "is not listed", "is not allowed for namespace git".
        detail: String,
        signers: PathBuf,
    },
}

fn kind_name(kind: &str) -> &'static str {
    match kind {
        "openpgp" => "OpenPGP",
        "x509" => "X.509",
        _ => "unknown",
    }
}

/// Who signed an accepted commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The principals field of the matching allowed-signers line (e.g. `lab@example.com`).
    pub principal: String,
    /// `SHA256:...` of the signing key, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
}

/// One line of an allowed signers file.
#[derive(Clone)]
struct Signer {
    principals: String,
    key: PublicKey,
    namespaces: Option<Vec<String>>,
    valid_after: Option<i64>,
    valid_before: Option<i64>,
    cert_authority: bool,
}

/// Keys allowed to sign, parsed from git's `gpg.ssh.allowedSignersFile` format.
#[derive(Clone)]
pub struct AllowedSigners {
    path: PathBuf,
    signers: Vec<Signer>,
}

impl fmt::Debug for AllowedSigners {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AllowedSigners")
            .field("path", &self.path)
            .field("keys", &self.signers.len())
            .finish()
    }
}

impl AllowedSigners {
    /// Reads `path`: lines `principals [options] keytype base64-key [comment]`; `#` comments and
    /// blank lines are ignored; options are `namespaces="..."`, `valid-after="..."`,
    /// `valid-before="..."` and `cert-authority`. A bad line is an error naming `path:line`.
    pub fn load(path: &Path) -> Result<AllowedSigners, VerifyError> {
        let text =
            crate::source::read_limited(path, MAX_ALLOWED_SIGNERS_BYTES).map_err(|source| {
                VerifyError::Read {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
        AllowedSigners::parse(&text, path)
    }

    /// Parses the file's text; `path` is for messages.
    pub fn parse(text: &str, path: &Path) -> Result<AllowedSigners, VerifyError> {
        let mut signers = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let signer = parse_line(line).map_err(|reason| VerifyError::Parse {
                path: path.to_path_buf(),
                line: index + 1,
                reason,
            })?;
            signers.push(signer);
        }
        if signers.is_empty() {
            return Err(VerifyError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(AllowedSigners {
            path: path.to_path_buf(),
            signers,
        })
    }

    /// The file these signers came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of key lines.
    pub fn len(&self) -> usize {
        self.signers.len()
    }

    /// Always false for a loaded file (an empty one is refused).
    pub fn is_empty(&self) -> bool {
        self.signers.is_empty()
    }
}

/// Splits off the next whitespace-separated token; double quotes group (and are kept).
fn next_token(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start();
    if s.is_empty() {
        return None;
    }
    let mut in_quotes = false;
    for (i, c) in s.char_indices() {
        match c {
            '"' => in_quotes = !in_quotes,
            c if c.is_whitespace() && !in_quotes => return Some((&s[..i], &s[i..])),
            _ => {}
        }
    }
    Some((s, ""))
}

fn unquote(s: &str) -> &str {
    s.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(s)
}

fn is_key_type(token: &str) -> bool {
    token.parse::<ssh_key::Algorithm>().is_ok() || token.contains("-cert-v01@openssh.com")
}

/// Why a line of `allowed_signers` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("empty line")]
    Empty,
    #[error("the principals field is empty")]
    NoPrincipals,
    #[error("a public key is missing after the {0}")]
    NoKey(&'static str),
    #[error(
        "`{0}` is a certificate; list the plain public key (or the CA key with cert-authority)"
    )]
    Certificate(String),
    #[error("the base64 key data is missing after `{0}`")]
    NoKeyData(String),
    #[error("cannot parse the `{key_type}` public key: {source}")]
    Key {
        key_type: String,
        #[source]
        source: ssh_key::Error,
    },
    #[error("unbalanced quotes in the options `{0}`")]
    Quotes(String),
    #[error("unknown option `{option}` (or `{field}` is not a key type); known options: namespaces=\"...\", valid-after=\"...\", valid-before=\"...\", cert-authority")]
    UnknownOption { option: String, field: String },
    #[error("`{0}` is not a time (YYYYMMDD, YYYYMMDDHHMM or YYYYMMDDHHMMSS, optional Z)")]
    Time(String),
}

fn parse_line(line: &str) -> Result<Signer, LineError> {
    let (principals, rest) = next_token(line).ok_or(LineError::Empty)?;
    let principals = unquote(principals).to_string();
    if principals.is_empty() {
        return Err(LineError::NoPrincipals);
    }
    let (second, mut rest) = next_token(rest).ok_or(LineError::NoKey("principals"))?;
    let mut options = Options::default();
    let key_type = if is_key_type(second) {
        second
    } else {
        parse_options(second, &mut options)?;
        let (key_type, after) = next_token(rest).ok_or(LineError::NoKey("options"))?;
        rest = after;
        key_type
    };
    if key_type.contains("-cert-v01@openssh.com") {
        return Err(LineError::Certificate(key_type.to_string()));
    }
    let (base64, _comment) =
        next_token(rest).ok_or_else(|| LineError::NoKeyData(key_type.to_string()))?;
    let key = PublicKey::from_openssh(&format!("{key_type} {base64}")).map_err(|source| {
        LineError::Key {
            key_type: key_type.to_string(),
            source,
        }
    })?;
    Ok(Signer {
        principals,
        key,
        namespaces: options.namespaces,
        valid_after: options.valid_after,
        valid_before: options.valid_before,
        cert_authority: options.cert_authority,
    })
}

/// The options field of a line.
#[derive(Default)]
struct Options {
    namespaces: Option<Vec<String>>,
    valid_after: Option<i64>,
    valid_before: Option<i64>,
    cert_authority: bool,
}

fn parse_options(field: &str, signer: &mut Options) -> Result<(), LineError> {
    // Split on commas outside quotes.
    let mut options = Vec::new();
    let mut start = 0;
    let mut in_quotes = false;
    for (i, c) in field.char_indices() {
        match c {
            '"' => in_quotes = !in_quotes,
            ',' if !in_quotes => {
                options.push(&field[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if in_quotes {
        return Err(LineError::Quotes(field.to_string()));
    }
    options.push(&field[start..]);
    for option in options {
        let (name, value) = match option.split_once('=') {
            Some((name, value)) => (name, Some(unquote(value))),
            None => (option, None),
        };
        match (name.to_ascii_lowercase().as_str(), value) {
            ("cert-authority", None) => signer.cert_authority = true,
            ("namespaces", Some(v)) => {
                signer.namespaces = Some(
                    v.split(',')
                        .map(|n| n.trim().to_string())
                        .filter(|n| !n.is_empty())
                        .collect(),
                )
            }
            ("valid-after", Some(v)) => signer.valid_after = Some(parse_time(v)?),
            ("valid-before", Some(v)) => signer.valid_before = Some(parse_time(v)?),
            _ => {
                return Err(LineError::UnknownOption {
                    option: option.to_string(),
                    field: field.to_string(),
                })
            }
        }
    }
    Ok(())
}

/// `YYYYMMDD[HHMM[SS]][Z]` as seconds since the epoch (UTC).
fn parse_time(s: &str) -> Result<i64, LineError> {
    let bad = || LineError::Time(s.to_string());
    let digits = s.strip_suffix(['Z', 'z']).unwrap_or(s);
    if !digits.bytes().all(|b| b.is_ascii_digit()) || ![8, 12, 14].contains(&digits.len()) {
        return Err(bad());
    }
    let num =
        |r: std::ops::Range<usize>| digits.get(r).map_or(0, |d| d.parse::<i64>().unwrap_or(0));
    let (y, m, d) = (num(0..4), num(4..6), num(6..8));
    let (hh, mm, ss) = (num(8..10), num(10..12), num(12..14));
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return Err(bad());
    }
    // Days from civil (Howard Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(days * 86_400 + hh * 3_600 + mm * 60 + ss)
}

/// What kind of signature an armored block is.
fn signature_kind(sig: &[u8]) -> Option<&'static str> {
    let text = String::from_utf8_lossy(sig);
    let text = text.trim_start();
    if text.starts_with("-----BEGIN SSH SIGNATURE-----") {
        Some("ssh")
    } else if text.starts_with("-----BEGIN PGP SIGNATURE-----")
        || text.starts_with("-----BEGIN PGP MESSAGE-----")
    {
        Some("openpgp")
    } else if text.starts_with("-----BEGIN SIGNED MESSAGE-----") {
        Some("x509")
    } else {
        None
    }
}

/// Verifies the `gpgsig` header of `commit`: an SSH signature over the commit object without
/// that header, in namespace `git`, by a key in `signers` that is allowed for namespace `git`
/// at the committer's time.
pub fn verify_commit(
    repo: &gix::Repository,
    commit: ObjectId,
    signers: &AllowedSigners,
) -> Result<Verified, VerifyError> {
    let object_error = |reason: String| VerifyError::Object { commit, reason };
    let object = repo
        .find_commit(commit)
        .map_err(|e| object_error(format!("{e:#}")))?;
    let (signature, payload) = match object.signature() {
        Ok(Some((sig, signed))) => (sig.into_owned(), signed.to_bstring()),
        Ok(None) => return Err(VerifyError::Unsigned { commit }),
        Err(e) => return Err(object_error(format!("{e:#}"))),
    };
    match signature_kind(&signature) {
        Some("ssh") => {}
        Some(kind @ ("openpgp" | "x509")) => return Err(VerifyError::NotSsh { commit, kind }),
        _ => {
            return Err(VerifyError::BadSignature {
                commit,
                reason: "the gpgsig header holds no known signature format".into(),
            })
        }
    }
    let sig = SshSig::from_pem(&signature[..]).map_err(|e| VerifyError::BadSignature {
        commit,
        reason: format!("cannot parse the SSH signature: {e}"),
    })?;
    let key = PublicKey::new(sig.public_key().clone(), "");
    let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
    if sig.namespace() != NAMESPACE {
        return Err(VerifyError::BadSignature {
            commit,
            reason: format!(
                "it was made for namespace `{}`, not `{NAMESPACE}` (key {fingerprint})",
                sig.namespace()
            ),
        });
    }
    key.verify(NAMESPACE, &payload, &sig)
        .map_err(|e| VerifyError::BadSignature {
            commit,
            reason: format!("{e} (key {fingerprint})"),
        })?;

    // The signature is sound; is the key trusted, for git, at the time of the commit?
    let time = object.time().map(|t| t.seconds).ok();
    let mut detail = "is not listed";
    for signer in &signers.signers {
        if signer.cert_authority || signer.key.key_data() != key.key_data() {
            continue;
        }
        if let Some(namespaces) = &signer.namespaces {
            if !namespaces.iter().any(|n| n == NAMESPACE || n == "*") {
                detail = "is not allowed for namespace \"git\" (see its namespaces= option)";
                continue;
            }
        }
        let after_ok = signer
            .valid_after
            .is_none_or(|t| time.is_some_and(|c| c >= t));
        let before_ok = signer
            .valid_before
            .is_none_or(|t| time.is_some_and(|c| c <= t));
        if !(after_ok && before_ok) {
            detail =
                "was not valid at the commit's time (see its valid-after=/valid-before= options)";
            continue;
        }
        return Ok(Verified {
            principal: signer.principals.clone(),
            fingerprint,
        });
    }
    Err(VerifyError::UntrustedKey {
        commit,
        fingerprint,
        detail: detail.to_string(),
        signers: signers.path.clone(),
    })
}

/// [`verify_commit`] for the commit a [`CommitSource`] reads.
pub fn verify_source(
    source: &CommitSource,
    signers: &AllowedSigners,
) -> Result<Verified, VerifyError> {
    verify_commit(&source.repository(), source.commit_id(), signers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::git::tests::{commit_all, git, init_repo, write};
    use crate::source::git::{GitCache, GitOptions};
    use homelab_agent_tests::git_server::generate_ssh_key;
    use std::io::Write as _;
    use std::process::{Command, Stdio};

    struct Lab {
        tmp: tempfile::TempDir,
        work: PathBuf,
        key_a: PathBuf,
        key_b: PathBuf,
        signers: PathBuf,
    }

    fn pubkey(key: &Path) -> String {
        std::fs::read_to_string(key.with_extension("pub"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// `SHA256:...` as ssh-keygen prints it.
    fn ssh_fingerprint(key: &Path) -> String {
        let out = Command::new("ssh-keygen")
            .arg("-lf")
            .arg(key.with_extension("pub"))
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        text.split_whitespace().nth(1).unwrap().to_string()
    }

    fn lab() -> Lab {
        let tmp = tempfile::tempdir().unwrap();
        let work = tmp.path().join("work");
        init_repo(&work);
        let key_a = generate_ssh_key(&tmp.path().join("keys"), "a");
        let key_b = generate_ssh_key(&tmp.path().join("keys"), "b");
        let signers = tmp.path().join("allowed_signers");
        let a = pubkey(&key_a);
        std::fs::write(
            &signers,
            format!("# who may sign the homelab\n\nlab@example.com namespaces=\"git\" {a}\n"),
        )
        .unwrap();
        Lab {
            tmp,
            work,
            key_a,
            key_b,
            signers,
        }
    }

    fn commit_signed(dir: &Path, msg: &str, key: &Path) -> String {
        git(dir, &["add", "-A"]);
        git(
            dir,
            &[
                "-c",
                "gpg.format=ssh",
                "-c",
                &format!("user.signingkey={}", key.display()),
                "commit",
                "-q",
                "-S",
                "--allow-empty",
                "-m",
                msg,
            ],
        );
        git(dir, &["rev-parse", "HEAD"])
    }

    /// Writes a raw commit object; returns its id.
    fn hash_commit(dir: &Path, raw: &[u8]) -> String {
        let mut child = homelab_agent_tests::git_server::git()
            .arg("-C")
            .arg(dir)
            .args([
                "hash-object",
                "-t",
                "commit",
                "-w",
                "--stdin",
                "--literally",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(raw).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    fn raw_commit(dir: &Path, id: &str) -> String {
        git(dir, &["cat-file", "commit", id]) + "\n"
    }

    fn verify(dir: &Path, id: &str, signers: &AllowedSigners) -> Result<Verified, VerifyError> {
        let repo = gix::open(dir).unwrap();
        verify_commit(&repo, ObjectId::from_hex(id.as_bytes()).unwrap(), signers)
    }

    #[test]
    fn signed_unsigned_untrusted_and_tampered_commits() {
        let lab = lab();
        let signers = AllowedSigners::load(&lab.signers).unwrap();
        assert_eq!(signers.len(), 1);

        write(&lab.work, "hosts/lab.yaml", "name: lab\n");
        let good = commit_signed(&lab.work, "signed by a", &lab.key_a);
        let ok = verify(&lab.work, &good, &signers).unwrap();
        assert_eq!(ok.principal, "lab@example.com");
        assert_eq!(ok.fingerprint, ssh_fingerprint(&lab.key_a));
        // git agrees (same payload, same signers file).
        git(
            &lab.work,
            &[
                "-c",
                &format!("gpg.ssh.allowedSignersFile={}", lab.signers.display()),
                "verify-commit",
                &good,
            ],
        );

        let unsigned = commit_all(&lab.work, "not signed");
        let err = verify(&lab.work, &unsigned, &signers).unwrap_err();
        assert!(matches!(err, VerifyError::Unsigned { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(&unsigned[..7]) && msg.contains("gpg.format ssh"),
            "{msg}"
        );

        let by_b = commit_signed(&lab.work, "signed by b", &lab.key_b);
        let err = verify(&lab.work, &by_b, &signers).unwrap_err();
        match &err {
            VerifyError::UntrustedKey { fingerprint, .. } => {
                assert_eq!(*fingerprint, ssh_fingerprint(&lab.key_b))
            }
            other => panic!("{other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains(&by_b[..7]) && msg.contains("allowed_signers"),
            "{msg}"
        );

        // The commit changed after signing: same signature, other message.
        let raw = raw_commit(&lab.work, &good);
        assert!(raw.contains("gpgsig -----BEGIN SSH SIGNATURE-----"));
        let forged = hash_commit(
            &lab.work,
            raw.replace("signed by a", "signed by A").as_bytes(),
        );
        let err = verify(&lab.work, &forged, &signers).unwrap_err();
        assert!(matches!(err, VerifyError::BadSignature { .. }), "{err:?}");
        assert!(err.to_string().contains(&forged[..7]), "{err}");

        // The signature bytes changed: flip one base64 character of its last full line.
        let lines: Vec<&str> = raw.split('\n').collect();
        let end = lines
            .iter()
            .position(|l| l.contains("-----END SSH SIGNATURE-----"))
            .unwrap();
        let mut lines: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        let target = &mut lines[end - 2];
        let pos = target.len() / 2;
        let c = target.as_bytes()[pos];
        let replacement = if c == b'A' { "B" } else { "A" };
        target.replace_range(pos..pos + 1, replacement);
        let corrupted = hash_commit(&lab.work, lines.join("\n").as_bytes());
        let err = verify(&lab.work, &corrupted, &signers).unwrap_err();
        assert!(matches!(err, VerifyError::BadSignature { .. }), "{err:?}");
    }

    #[test]
    fn openpgp_and_x509_are_named_not_supported() {
        let lab = lab();
        let signers = AllowedSigners::load(&lab.signers).unwrap();
        let base = commit_all(&lab.work, "base");
        let raw = raw_commit(&lab.work, &base);
        let (headers, message) = raw.split_once("\n\n").unwrap();
        for (armor, kind) in [
            (
                "-----BEGIN PGP SIGNATURE-----\n \n iQEzBAABCAAdFiEE\n -----END PGP SIGNATURE-----",
                "openpgp",
            ),
            (
                "-----BEGIN SIGNED MESSAGE-----\n MIIG\n -----END SIGNED MESSAGE-----",
                "x509",
            ),
        ] {
            let signed = format!("{headers}\ngpgsig {armor}\n\n{message}");
            let id = hash_commit(&lab.work, signed.as_bytes());
            let err = verify(&lab.work, &id, &signers).unwrap_err();
            match &err {
                VerifyError::NotSsh { kind: k, .. } => assert_eq!(*k, kind),
                other => panic!("{other:?}"),
            }
            let msg = err.to_string();
            assert!(
                msg.contains("not supported yet") && msg.contains("gpg.format ssh"),
                "{msg}"
            );
        }
    }

    #[test]
    fn an_oversized_allowed_signers_file_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("allowed_signers");
        let line = "# a comment line that takes some room in the file\n";
        std::fs::write(
            &path,
            line.repeat(MAX_ALLOWED_SIGNERS_BYTES as usize / line.len() + 1),
        )
        .unwrap();
        let err = AllowedSigners::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("allowed_signers: the file is over the limit of 1,048,576 bytes"),
            "{err}"
        );
    }

    #[test]
    fn allowed_signers_options_and_errors() {
        let lab = lab();
        let a = pubkey(&lab.key_a);
        let b = pubkey(&lab.key_b);
        write(&lab.work, "f", "x");
        let by_a = commit_signed(&lab.work, "a", &lab.key_a);

        // Several principals, quoted options, no options, comments.
        let text = format!(
            "  # comment\n\"ops@example.com,lab@example.com\" namespaces=\"file,git\",valid-after=\"20200101\" {a} laptop\nother@example.com {b}\n"
        );
        let path = lab.tmp.path().join("s1");
        std::fs::write(&path, &text).unwrap();
        let signers = AllowedSigners::load(&path).unwrap();
        assert_eq!(signers.len(), 2);
        assert_eq!(
            verify(&lab.work, &by_a, &signers).unwrap().principal,
            "ops@example.com,lab@example.com"
        );

        // A key allowed only for another namespace is not trusted for git.
        let only_file = AllowedSigners::parse(
            &format!("lab@example.com namespaces=\"file\" {a}\n"),
            Path::new("s2"),
        )
        .unwrap();
        let err = verify(&lab.work, &by_a, &only_file).unwrap_err();
        assert!(matches!(err, VerifyError::UntrustedKey { .. }), "{err:?}");
        assert!(err.to_string().contains("namespace"), "{err}");

        // Expired before the commit was made.
        let expired = AllowedSigners::parse(
            &format!("lab@example.com valid-before=\"20200101Z\" {a}\n"),
            Path::new("s3"),
        )
        .unwrap();
        let err = verify(&lab.work, &by_a, &expired).unwrap_err();
        assert!(err.to_string().contains("valid"), "{err}");
        let current = AllowedSigners::parse(
            &format!(
                "lab@example.com valid-after=\"202001011200\",valid-before=\"99991231\" {a}\n"
            ),
            Path::new("s4"),
        )
        .unwrap();
        assert!(verify(&lab.work, &by_a, &current).is_ok());

        // Bad lines name file:line.
        for (text, line, words) in [
            (
                format!("# c\n\nlab@example.com {a}\nbroken\n"),
                4,
                "public key is missing",
            ),
            (
                format!("lab@example.com bogus=\"1\" {a}\n"),
                1,
                "unknown option",
            ),
            (
                "lab@example.com ssh-ed25519 !!!notbase64\n".to_string(),
                1,
                "cannot parse",
            ),
            (format!("x valid-after=\"2020\" {a}\n"), 1, "not a time"),
        ] {
            let err =
                AllowedSigners::parse(&text, Path::new("/etc/hla/allowed_signers")).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.starts_with(&format!("/etc/hla/allowed_signers:{line}: "))
                    && msg.contains(words),
                "{msg}"
            );
        }
        assert!(matches!(
            AllowedSigners::parse("# nobody\n\n", Path::new("x")),
            Err(VerifyError::Empty { .. })
        ));
        assert!(matches!(
            AllowedSigners::load(&lab.tmp.path().join("missing")),
            Err(VerifyError::Read { .. })
        ));
    }

    #[test]
    fn parse_time_is_utc_seconds() {
        assert_eq!(parse_time("19700101").unwrap(), 0);
        assert_eq!(parse_time("20000301Z").unwrap(), 951_868_800);
        assert_eq!(parse_time("202401021504").unwrap(), 1_704_207_840);
        assert_eq!(parse_time("20240102150405").unwrap(), 1_704_207_845);
        assert!(parse_time("20241301").is_err());
        assert!(parse_time("2024").is_err());
    }

    #[test]
    fn verifies_commits_fetched_into_a_shallow_cache() {
        let lab = lab();
        write(&lab.work, "hosts/lab.yaml", "v1\n");
        commit_signed(&lab.work, "one", &lab.key_a);
        write(&lab.work, "hosts/lab.yaml", "v2\n");
        let head = commit_signed(&lab.work, "two", &lab.key_a);
        let cache = GitCache::open_or_init(
            &lab.tmp.path().join("cache"),
            &format!("file://{}", lab.work.display()),
        )
        .unwrap();
        let id = cache.fetch("main", &GitOptions::default()).unwrap();
        assert_eq!(id.to_string(), head);
        let signers = AllowedSigners::load(&lab.signers).unwrap();
        let ok = verify_commit(&cache.repo().to_thread_local(), id, &signers).unwrap();
        assert_eq!(ok.principal, "lab@example.com");
        let src = cache.source(id).unwrap();
        assert_eq!(verify_source(&src, &signers).unwrap(), ok);
    }
}
