//! Tests of the git smart-HTTP test harness itself (no agent involved):
//! push through a real lighttpd + git-http-backend with basic auth, auth
//! refused without the token, "server down, then back", SSH-signed commits,
//! and the Forgejo push webhook signature.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use homelab_agent_tests::git_server::{
    forgejo_push, generate_ssh_key, git, http_get, http_request, ls_remote, new_uuid, GitServer,
    WorkClone,
};
use sha2::Sha256;

#[test]
fn push_auth_and_restart() {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let mut server = GitServer::start();
    server.create_repo("ops", "homelab");
    let auth_url = server.url_with_auth("ops", "homelab");
    assert_eq!(
        server.url("ops", "homelab"),
        format!("http://127.0.0.1:{}/ops/homelab.git", server.port())
    );
    assert!(auth_url.contains(server.token()) && !server.url("ops", "homelab").contains('@'));
    assert_eq!(server.token().len(), 40);

    // Empty repo: clone, two commits, two pushes.
    let work = WorkClone::clone_from(&server, "ops", "homelab", &tmp.path().join("work"));
    work.write("hosts/lab.yaml", "platform: linux\n");
    let first = work.commit("first");
    work.push("main");
    work.write("hosts/lab.yaml", "platform: linux\nroots: [/srv]\n");
    let second = work.commit("second");
    assert_ne!(first, second);
    assert_eq!(second.len(), 40);
    assert_eq!(work.head(), second);
    work.push("main");

    let refs = ls_remote(&auth_url).unwrap_or_else(|e| panic!("{e}\n{}", server.log()));
    assert_eq!(refs.get("refs/heads/main"), Some(&second), "{refs:?}");
    assert_eq!(refs.get("HEAD"), Some(&second), "{refs:?}");
    // The bare repo on disk agrees.
    let out = git()
        .arg("-C")
        .arg(server.repo_path("ops", "homelab"))
        .args(["rev-parse", "main~1"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), first);

    // A second branch from the same clone.
    work.push("staging");
    assert_eq!(
        ls_remote(&auth_url).unwrap().get("refs/heads/staging"),
        Some(&second)
    );

    // No credentials: 401 from the server, git fails (and does not prompt).
    let (status, _) = http_get(
        &server.addr(),
        "/ops/homelab.git/info/refs?service=git-upload-pack",
    );
    assert_eq!(status, 401);
    let err = ls_remote(&server.url("ops", "homelab")).unwrap_err();
    assert!(err.contains("terminal prompts disabled"), "{err}");
    // Wrong token: refused too.
    let wrong = auth_url.replace(server.token(), "0000000000000000000000000000000000000000");
    let err = ls_remote(&wrong).unwrap_err();
    assert!(err.contains("Authentication failed"), "{err}");
    // Unknown repo: not found.
    assert!(ls_remote(&server.url_with_auth("ops", "nope")).is_err());
    let (status, _) = homelab_agent_tests::git_server::http_post(
        &server.addr(),
        "/ops/homelab.git/git-upload-pack",
        &[(
            "Content-Type".into(),
            "application/x-git-upload-pack-request".into(),
        )],
        b"0000",
    );
    assert_eq!(status, 401);

    // Token file: 0600, holds the token.
    let token_file = server.write_token_file(tmp.path());
    let meta = std::fs::metadata(&token_file).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::read_to_string(&token_file).unwrap().trim(),
        server.token()
    );

    // Down, then back on the same port with the same repos.
    let port = server.port();
    server.stop();
    assert!(!server.is_running());
    let err = ls_remote(&auth_url).unwrap_err();
    assert!(
        err.contains("Failed to connect") || err.contains("refused"),
        "{err}"
    );
    assert!(http_request("GET", &server.addr(), "/", &[], &[]).is_err());
    server.restart();
    assert_eq!(server.port(), port);
    assert!(server.is_running());
    assert_eq!(
        ls_remote(&auth_url).unwrap().get("refs/heads/main"),
        Some(&second)
    );
    // Pushing still works after the restart.
    let third = work.commit("third (empty)");
    work.push("main");
    assert_eq!(
        ls_remote(&auth_url).unwrap().get("refs/heads/main"),
        Some(&third)
    );

    // Drop kills lighttpd: the port refuses connections afterwards.
    let addr = server.addr();
    drop(server);
    assert!(http_request("GET", &addr, "/", &[], &[]).is_err());

    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
}

#[test]
fn two_servers_side_by_side() {
    let a = GitServer::start();
    let b = GitServer::start();
    assert_ne!(a.port(), b.port());
    assert_ne!(a.token(), b.token());
    a.create_repo("ops", "homelab");
    b.create_repo("ops", "homelab");
    // a's token does not open b.
    let cross = b
        .url_with_auth("ops", "homelab")
        .replace(b.token(), a.token());
    assert!(ls_remote(&cross).is_err());
    assert!(ls_remote(&b.url_with_auth("ops", "homelab")).is_ok());
}

#[test]
fn ssh_signed_commit() {
    if std::process::Command::new("ssh-keygen")
        .arg("-?")
        .output()
        .is_err()
    {
        panic!("ssh-keygen missing: apt-get install -y openssh-client (see .ci/run)");
    }
    let tmp = tempfile::tempdir().unwrap();
    let server = GitServer::start();
    server.create_repo("ops", "signed");
    let key = generate_ssh_key(&tmp.path().join("keys"), "signer");
    let work = WorkClone::clone_from(&server, "ops", "signed", &tmp.path().join("work"));
    work.write("a.txt", "a\n");
    let id = work.commit_signed("signed", &key);
    work.push("main");
    let raw = work.git(&["cat-file", "commit", &id]);
    assert!(
        raw.contains("gpgsig -----BEGIN SSH SIGNATURE-----"),
        "{raw}"
    );

    // git verifies it against an allowed-signers file holding the public key.
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let allowed = tmp.path().join("allowed_signers");
    std::fs::write(&allowed, format!("pusher@homelab.test {public}")).unwrap();
    let out = work.git(&[
        "-c",
        &format!("gpg.ssh.allowedSignersFile={}", allowed.display()),
        "log",
        "-1",
        "--format=%G?",
        &id,
    ]);
    assert_eq!(out.trim(), "G");
    assert_eq!(
        ls_remote(&server.url_with_auth("ops", "signed"))
            .unwrap()
            .get("refs/heads/main"),
        Some(&id)
    );
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {name} header in {headers:?}"))
}

#[test]
fn forgejo_push_signature_verifies() {
    let secret = b"hook-secret";
    let before = "28e1879d029cb852e4844d9c718537df08844e03";
    let after = "bffeb74224043ba2feb48d137756c8a9331c449a";
    let delivery = new_uuid();
    let (body, headers) = forgejo_push(
        secret,
        "refs/heads/main",
        before,
        after,
        "http://homelab-agent:tok@127.0.0.1:3000/ops/homelab.git",
        &delivery,
    );

    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    mac.update(&body);
    let expected = hex::encode(mac.finalize().into_bytes());
    assert_eq!(header(&headers, "X-Forgejo-Signature"), expected);
    assert_eq!(header(&headers, "X-Gitea-Signature"), expected);
    assert_eq!(header(&headers, "X-Gogs-Signature"), expected);
    assert_eq!(
        header(&headers, "X-Hub-Signature-256"),
        format!("sha256={expected}")
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    mac.update(&body);
    mac.verify_slice(&hex::decode(header(&headers, "x-forgejo-signature")).unwrap())
        .expect("signature verifies");
    let mut wrong = Hmac::<Sha256>::new_from_slice(b"other").unwrap();
    wrong.update(&body);
    assert!(wrong
        .verify_slice(&hex::decode(&expected).unwrap())
        .is_err());

    assert_eq!(header(&headers, "Content-Type"), "application/json");
    for forge in ["Forgejo", "Gitea", "Gogs", "GitHub"] {
        assert_eq!(header(&headers, &format!("X-{forge}-Event")), "push");
        assert_eq!(header(&headers, &format!("X-{forge}-Delivery")), delivery);
    }
    assert_eq!(delivery.len(), 36);
    assert_eq!(&delivery[14..15], "4");

    // Pretty-printed JSON, like Forgejo; credentials stripped from URLs.
    let text = String::from_utf8(body.clone()).unwrap();
    assert!(text.starts_with("{\n  \""), "{text}");
    assert!(!text.contains("tok@"), "{text}");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["ref"], "refs/heads/main");
    assert_eq!(v["before"], before);
    assert_eq!(v["after"], after);
    assert_eq!(v["commits"][0]["id"], after);
    assert_eq!(v["total_commits"], 1);
    assert_eq!(v["head_commit"]["id"], after);
    assert_eq!(v["repository"]["full_name"], "ops/homelab");
    assert_eq!(v["repository"]["name"], "homelab");
    assert_eq!(
        v["repository"]["clone_url"],
        "http://127.0.0.1:3000/ops/homelab.git"
    );
    assert_eq!(
        v["repository"]["html_url"],
        "http://127.0.0.1:3000/ops/homelab"
    );
    assert_eq!(v["repository"]["ssh_url"], "git@127.0.0.1:ops/homelab.git");
    assert_eq!(
        v["compare_url"],
        "http://127.0.0.1:3000/ops/homelab/compare/28e1879d02...bffeb74224"
    );
    assert_eq!(v["pusher"]["login"], "ann");
    assert_eq!(v["sender"]["login"], "ann");
    let ts = v["commits"][0]["timestamp"].as_str().unwrap();
    assert!(
        ts.len() == 20 && ts.ends_with('Z') && ts.starts_with("20"),
        "{ts}"
    );

    // No secret: the signature headers are present but empty.
    let (_, headers) = forgejo_push(
        b"",
        "refs/heads/main",
        before,
        after,
        "http://h/o/r.git",
        "d",
    );
    assert_eq!(header(&headers, "X-Forgejo-Signature"), "");
    assert_eq!(header(&headers, "X-Hub-Signature-256"), "sha256=");
    // Branch deletion: no commits, head_commit null.
    let zeros = "0".repeat(40);
    let (body, _) = forgejo_push(
        secret,
        "refs/heads/gone",
        after,
        &zeros,
        "http://h/o/r.git",
        "d",
    );
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["total_commits"], 0);
    assert!(v["head_commit"].is_null());
}

/// The RFC 4231 case 2 vector from the spec, through the same HMAC as forgejo_push.
#[test]
fn hmac_rfc4231_case_2() {
    let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
    mac.update(b"what do ya want for nothing?");
    assert_eq!(
        hex::encode(mac.finalize().into_bytes()),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
}

/// http_post sends exactly the given bytes and headers, and decodes a chunked reply.
#[test]
fn http_post_raw_exchange() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        // Read until the 5-byte body after the headers has arrived.
        while !req.ends_with(b"\r\n\r\nhello") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "client closed early");
            req.extend_from_slice(&buf[..n]);
        }
        s.write_all(b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            .unwrap();
        String::from_utf8(req).unwrap()
    });
    let headers = vec![("X-Forgejo-Event".to_owned(), "push".to_owned())];
    let (status, body) =
        homelab_agent_tests::git_server::http_post(&addr, "/hooks/forgejo", &headers, b"hello");
    assert_eq!((status, body.as_str()), (202, "abcde"));
    let req = server.join().unwrap();
    assert!(req.starts_with("POST /hooks/forgejo HTTP/1.1\r\n"), "{req}");
    for h in [
        "Content-Length: 5\r\n",
        "Connection: close\r\n",
        "X-Forgejo-Event: push\r\n",
    ] {
        assert!(req.contains(h), "{h:?} missing in {req}");
    }
}
