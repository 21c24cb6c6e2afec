//! The agent's 1Password Connect client against the Connect stand-in
//! (`homelab_agent_tests::connect_standin`, a real HTTP server on 127.0.0.1):
//! name/id resolution, field selection, retries, and every error the user
//! can see (insta snapshots, port and ids redacted). No error text or
//! `Debug` output may contain a secret value or the token.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use homelab_agent::secrets::connect::{ConnectClient, ConnectConfig, ConnectError, Item};
use homelab_agent::secrets::Reference;
use homelab_agent_tests::connect_standin::{ConnectStandIn, CONNECT_VERSION};

const TOKEN: &str = "eyJhbGciOiJFUzI1NiJ9.connect-token-ZQ8s7Jx2";
const APP_PASSWORD: &str = "pg-app-password-9f3k";
const ADMIN_PASSWORD: &str = "pg-admin-password-77xq";
const ROTATED: &str = "pg-rotated-password-c4w1";
const API_KEY: &str = "api-key-value-Lm2P";
/// Every string that must never show up in an error or `Debug` output.
const SECRETS: &[&str] = &[
    TOKEN,
    APP_PASSWORD,
    ADMIN_PASSWORD,
    ROTATED,
    API_KEY,
    "connect-token-ZQ8s7Jx2",
];

/// A stand-in with a `homelab` vault holding `postgres` (top-level
/// username/password plus an `admin` section) and `api` (section `prod`).
struct Fixture {
    standin: ConnectStandIn,
    tmp: tempfile::TempDir,
    vault: String,
    postgres: String,
    api: String,
}

impl Fixture {
    fn new() -> Fixture {
        let standin = ConnectStandIn::start(TOKEN);
        let vault = standin.add_vault("homelab");
        standin.add_vault("other");
        let postgres = standin.add_item(
            &vault,
            "postgres",
            &[("username", "app"), ("password", APP_PASSWORD)],
        );
        let api = standin.add_item_with_section(
            &vault,
            "api",
            "prod",
            &[("key", API_KEY), ("endpoint", "https://api.lan")],
        );
        let tmp = tempfile::tempdir().unwrap();
        write_token(&tmp.path().join("token"), TOKEN, 0o600);
        Fixture {
            standin,
            tmp,
            vault,
            postgres,
            api,
        }
    }

    fn token_file(&self) -> PathBuf {
        self.tmp.path().join("token")
    }

    fn config(&self) -> ConnectConfig {
        ConnectConfig::new(self.standin.url(), self.token_file())
    }

    fn client(&self) -> ConnectClient {
        ConnectClient::new(&self.config()).expect("client")
    }

    /// Replaces the port, the temp dir and the fixture's ids with placeholders.
    fn redact(&self, text: &str, extra: &[(&str, &str)]) -> String {
        let mut text = text
            .replace(
                &format!("127.0.0.1:{}", self.standin.port()),
                "127.0.0.1:[PORT]",
            )
            .replace(self.tmp.path().to_str().unwrap(), "[TMP]")
            .replace(&self.vault, "[VAULT_ID]")
            .replace(&self.postgres, "[POSTGRES_ID]")
            .replace(&self.api, "[API_ID]");
        for (from, to) in extra {
            text = text.replace(from, to);
        }
        text
    }
}

fn write_token(path: &Path, token: &str, mode: u32) {
    std::fs::write(path, format!("{token}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn reference(text: &str) -> Reference {
    Reference::parse(text).unwrap()
}

/// Fails when any text holds a secret value or the token.
fn assert_no_secrets(texts: &[String]) {
    for text in texts {
        for secret in SECRETS {
            assert!(
                !text.contains(secret),
                "secret {secret:?} leaked into: {text}"
            );
        }
    }
}

/// The error's message and its `Debug`, for the leak check.
fn both(e: &ConnectError) -> [String; 2] {
    [e.to_string(), format!("{e:?}")]
}

#[test]
fn resolves_vaults_items_and_fields_by_name_and_id() {
    let fx = Fixture::new();
    let client = fx.client();
    let mut printed = vec![format!("{client:?}")];

    // Vault by name (one filtered list), by id, case-insensitively (the
    // stand-in's filter is exact, so the client falls back to the full list).
    assert_eq!(client.vault_id("homelab").unwrap(), fx.vault);
    assert_eq!(client.requests_made(), 1);
    let seen = fx.standin.last_request().unwrap();
    assert_eq!(seen.path, "/v1/vaults");
    assert_eq!(
        seen.raw_query.as_deref(),
        Some("filter=title%20eq%20%22homelab%22")
    );
    assert_eq!(seen.filter.as_deref(), Some("title eq \"homelab\""));
    assert_eq!(
        seen.user_agent.as_deref(),
        Some(concat!("homelab-agent/", env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(seen.content_type.as_deref(), Some("application/json"));
    assert_eq!(client.vault_id(&fx.vault).unwrap(), fx.vault);
    assert_eq!(client.vault_id("HomeLab").unwrap(), fx.vault);
    let spaced = fx.standin.add_vault("Home Lab");
    assert_eq!(client.vault_id("Home Lab").unwrap(), spaced);
    assert_eq!(
        fx.standin.last_request().unwrap().filter.as_deref(),
        Some("title eq \"Home Lab\"")
    );

    // Item by title (list + get), by id (get), case-insensitively.
    let before = client.requests_made();
    let item = client.item(&fx.vault, "postgres").unwrap();
    assert_eq!(client.requests_made() - before, 2);
    assert_eq!(
        (item.id.as_str(), item.title.as_str(), item.version),
        (fx.postgres.as_str(), "postgres", 1)
    );
    assert_eq!(item.vault_id, fx.vault);
    assert!(item.sections.is_empty());
    let password = item.fields.iter().find(|f| f.id == "password").unwrap();
    assert_eq!(
        (password.kind.as_str(), password.purpose.as_deref()),
        ("CONCEALED", Some("PASSWORD"))
    );
    assert_eq!(password.section_id, None);
    let before = client.requests_made();
    let by_id = client.item(&fx.vault, &fx.postgres).unwrap();
    assert_eq!(client.requests_made() - before, 1);
    assert_eq!(by_id.id, fx.postgres);
    assert_eq!(client.item(&fx.vault, "POSTGRES").unwrap().id, fx.postgres);

    // Fields: by label, by id, case-insensitively; no section needed.
    let get = |item: &Item, r: &str| item.field(&reference(r)).unwrap().expose().to_string();
    assert_eq!(get(&item, "op://homelab/postgres/password"), APP_PASSWORD);
    assert_eq!(get(&item, "op://homelab/postgres/PassWord"), APP_PASSWORD);
    assert_eq!(get(&item, "op://homelab/postgres/username"), "app");

    // A sectioned item: by section label or id, field by label or id.
    let api = client.item(&fx.vault, "api").unwrap();
    assert_eq!(api.sections.len(), 1);
    let section = &api.sections[0];
    assert_eq!(section.label.as_deref(), Some("prod"));
    let key = api
        .fields
        .iter()
        .find(|f| f.label.as_deref() == Some("key"))
        .unwrap();
    assert_eq!(key.section_id.as_deref(), Some(section.id.as_str()));
    assert_eq!(key.id.len(), 26);
    assert_eq!(get(&api, "op://homelab/api/prod/key"), API_KEY);
    assert_eq!(get(&api, "op://homelab/api/PROD/Key"), API_KEY);
    assert_eq!(
        get(&api, &format!("op://homelab/api/{}/key", section.id)),
        API_KEY
    );
    assert_eq!(
        get(&api, &format!("op://homelab/api/prod/{}", key.id)),
        API_KEY
    );
    assert_eq!(get(&api, "op://homelab/api/key"), API_KEY);
    assert_eq!(
        get(&api, "op://homelab/api/prod/endpoint"),
        "https://api.lan"
    );

    // Rotation: a new value and a bumped version.
    fx.standin.set_field(&fx.postgres, "password", ROTATED);
    let rotated = client.item(&fx.vault, &fx.postgres).unwrap();
    assert_eq!(rotated.version, 2);
    assert_eq!(get(&rotated, "op://homelab/postgres/password"), ROTATED);

    // Every /v1 request the client made reached the stand-in.
    assert_eq!(fx.standin.requests(), client.requests_made());

    printed.extend([
        format!("{item:?}"),
        format!("{api:?}"),
        format!("{rotated:?}"),
        format!("{:?}", fx.config()),
    ]);
    assert!(printed[1].contains("[redacted]"), "{}", printed[1]);
    assert_no_secrets(&printed);
}

#[test]
fn error_messages() {
    let fx = Fixture::new();
    let client = fx.client();
    let mut printed = Vec::new();
    let mut check = |name: &str, e: ConnectError, extra: &[(&str, &str)]| {
        printed.extend(both(&e));
        insta::assert_snapshot!(name, fx.redact(&e.to_string(), extra));
        e
    };

    // 401: a token the server does not know.
    let bad = fx.tmp.path().join("bad-token");
    write_token(&bad, "not-the-token", 0o600);
    let wrong = ConnectClient::new(&ConnectConfig::new(fx.standin.url(), &bad)).unwrap();
    let e = check("unauthorized", wrong.vault_id("homelab").unwrap_err(), &[]);
    assert!(matches!(e, ConnectError::Unauthorized { .. }));
    assert_eq!(wrong.requests_made(), 1, "401 is not retried");

    // 404: vault by name (filtered, then full list) and by id.
    let e = check(
        "vault_not_found",
        client.vault_id("nosuchvault").unwrap_err(),
        &[],
    );
    assert!(matches!(e, ConnectError::NotFound { what: "vault", .. }));
    let e = check(
        "vault_id_not_found",
        client.vault_id("zzzzzzzzzzzzzzzzzzzzzzzzzz").unwrap_err(),
        &[],
    );
    assert!(matches!(e, ConnectError::NotFound { what: "vault", .. }));
    let e = check(
        "item_vault_not_found",
        client
            .item("zzzzzzzzzzzzzzzzzzzzzzzzzz", "postgres")
            .unwrap_err(),
        &[],
    );
    assert!(matches!(e, ConnectError::NotFound { what: "vault", .. }));

    // 404: item by title and by id (an id-shaped miss falls back to titles).
    let e = check(
        "item_not_found",
        client.item(&fx.vault, "mysql").unwrap_err(),
        &[],
    );
    assert!(matches!(e, ConnectError::NotFound { what: "item", .. }));
    let before = fx.standin.requests();
    let e = check(
        "item_id_not_found",
        client
            .item(&fx.vault, "zzzzzzzzzzzzzzzzzzzzzzzzzz")
            .unwrap_err(),
        &[],
    );
    assert!(matches!(e, ConnectError::NotFound { what: "item", .. }));
    assert_eq!(
        fx.standin.requests() - before,
        3,
        "get by id, filtered list, full list"
    );

    // Two items with one title: both ids listed.
    let one = fx
        .standin
        .add_item(&fx.vault, "backup", &[("password", "dup-one")]);
    let two = fx
        .standin
        .add_item(&fx.vault, "backup", &[("password", "dup-two")]);
    let e = check(
        "ambiguous_item",
        client.item(&fx.vault, "backup").unwrap_err(),
        &[(&one, "[BACKUP_1]"), (&two, "[BACKUP_2]")],
    );
    match &e {
        ConnectError::Ambiguous { ids, .. } => assert_eq!(ids, &[one.clone(), two.clone()]),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        client.item(&fx.vault, &one).unwrap().id,
        one,
        "an id still works"
    );

    // Field not found: labels listed, values not.
    let postgres = client.item(&fx.vault, "postgres").unwrap();
    let e = check(
        "field_not_found",
        postgres
            .field(&reference("op://homelab/postgres/pasword"))
            .unwrap_err(),
        &[],
    );
    match &e {
        ConnectError::FieldNotFound { available, .. } => {
            assert_eq!(available, &["username", "password"])
        }
        other => panic!("{other:?}"),
    }
    let api = client.item(&fx.vault, "api").unwrap();
    check(
        "section_not_found",
        api.field(&reference("op://homelab/api/staging/key"))
            .unwrap_err(),
        &[],
    );

    // Two fields matching case-insensitively.
    let twin = fx.standin.add_item(
        &fx.vault,
        "twin",
        &[("token", API_KEY), ("Token", ADMIN_PASSWORD)],
    );
    let twin_item = client.item(&fx.vault, &twin).unwrap();
    let ids: Vec<(String, String)> = twin_item
        .fields
        .iter()
        .enumerate()
        .map(|(n, f)| (f.id.clone(), format!("[FIELD_{}]", n + 1)))
        .collect();
    let ids: Vec<(&str, &str)> = ids.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let e = check(
        "ambiguous_field",
        twin_item
            .field(&reference("op://homelab/twin/token"))
            .unwrap_err(),
        &ids,
    );
    assert!(matches!(e, ConnectError::AmbiguousField { .. }));

    // 403: the token is not scoped to the vault (which also drops out of
    // the vault list, so by name it is "not found ... granted access").
    fx.standin.deny_vault(&fx.vault);
    let e = check(
        "forbidden_vault",
        client.vault_id(&fx.vault).unwrap_err(),
        &[],
    );
    assert!(matches!(e, ConnectError::Forbidden { .. }));
    let e = check(
        "forbidden_item",
        client.item(&fx.vault, "postgres").unwrap_err(),
        &[],
    );
    assert!(matches!(e, ConnectError::Forbidden { .. }));
    let e = client.vault_id("homelab").unwrap_err();
    assert!(matches!(e, ConnectError::NotFound { .. }), "{e}");
    printed.extend(both(&e));

    printed.push(format!("{postgres:?} {api:?} {twin_item:?}"));
    assert_no_secrets(&printed);
}

#[test]
fn token_file_is_checked() {
    let fx = Fixture::new();
    let mut printed = Vec::new();

    write_token(&fx.token_file(), TOKEN, 0o644);
    let e = ConnectClient::new(&fx.config()).unwrap_err();
    assert!(matches!(
        e,
        ConnectError::TokenFilePermissions { mode: 0o644, .. }
    ));
    assert!(e.to_string().contains("chmod 600"));
    insta::assert_snapshot!("token_file_mode", fx.redact(&e.to_string(), &[]));
    printed.extend(both(&e));

    write_token(&fx.token_file(), TOKEN, 0o640);
    let e = ConnectClient::new(&fx.config()).unwrap_err();
    assert!(matches!(
        e,
        ConnectError::TokenFilePermissions { mode: 0o640, .. }
    ));
    printed.extend(both(&e));

    let missing = ConnectConfig::new(fx.standin.url(), fx.tmp.path().join("missing"));
    let e = ConnectClient::new(&missing).unwrap_err();
    insta::assert_snapshot!("token_file_missing", fx.redact(&e.to_string(), &[]));
    printed.extend(both(&e));

    write_token(&fx.token_file(), "  ", 0o600);
    let e = ConnectClient::new(&fx.config()).unwrap_err();
    insta::assert_snapshot!("token_file_empty", fx.redact(&e.to_string(), &[]));
    printed.extend(both(&e));

    write_token(&fx.token_file(), "bad\u{7f}token-ZQ8s7Jx2", 0o600);
    let e = ConnectClient::new(&fx.config()).unwrap_err();
    assert!(matches!(e, ConnectError::TokenFile { .. }), "{e}");
    assert!(
        !e.to_string().contains("token-ZQ8s7Jx2") && !format!("{e:?}").contains("token-ZQ8s7Jx2")
    );

    for url in [
        "ftp://127.0.0.1:1",
        "http://127.0.0.1:8080/v1/",
        "not a url",
    ] {
        let e = ConnectClient::new(&ConnectConfig::new(url, fx.token_file())).unwrap_err();
        assert!(matches!(e, ConnectError::Url { .. }), "{url}: {e}");
    }
    let e = ConnectClient::new(&ConnectConfig::new(
        "http://127.0.0.1:8080/v1",
        fx.token_file(),
    ))
    .unwrap_err();
    insta::assert_snapshot!("url_with_v1", e.to_string());

    // 0600 (and 0400) are fine; surrounding whitespace is trimmed.
    write_token(&fx.token_file(), &format!("  {TOKEN}  "), 0o400);
    let client = ConnectClient::new(&fx.config()).unwrap();
    assert_eq!(client.vault_id("homelab").unwrap(), fx.vault);
    printed.push(format!("{client:?}"));
    assert_no_secrets(&printed);
}

#[test]
fn retries_then_succeeds_or_gives_up() {
    let fx = Fixture::new();
    let client = fx.client();
    let mut printed = Vec::new();

    // 429 twice, then success: three requests, one answer.
    fx.standin.fail_next(429, 2);
    let t0 = Instant::now();
    assert_eq!(client.vault_id(&fx.vault).unwrap(), fx.vault);
    assert_eq!(fx.standin.requests(), 3);
    assert_eq!(client.requests_made(), 3);
    // Backoff 100 ms + 200 ms, jittered ±25 %.
    assert!(
        t0.elapsed() >= Duration::from_millis(225),
        "{:?}",
        t0.elapsed()
    );

    // 503 once in the middle of a title lookup.
    fx.standin.fail_next(503, 1);
    assert_eq!(client.item(&fx.vault, "postgres").unwrap().id, fx.postgres);

    // 500 ten times: four attempts, then a Server error.
    fx.standin.fail_next(500, 10);
    let before = fx.standin.requests();
    let e = client.vault_id(&fx.vault).unwrap_err();
    assert_eq!(fx.standin.requests() - before, 4);
    assert!(
        matches!(
            e,
            ConnectError::Server {
                status: 500,
                attempts: 4,
                ..
            }
        ),
        "{e:?}"
    );
    insta::assert_snapshot!("server_error_500", fx.redact(&e.to_string(), &[]));
    printed.extend(both(&e));
    fx.standin.fail_next(500, 0);
    assert_eq!(client.vault_id(&fx.vault).unwrap(), fx.vault);

    // 429 throughout: also a Server error naming the status.
    fx.standin.fail_next(429, 4);
    let e = client.item(&fx.vault, &fx.postgres).unwrap_err();
    insta::assert_snapshot!("server_error_429", fx.redact(&e.to_string(), &[]));
    printed.extend(both(&e));
    assert_no_secrets(&printed);
}

#[test]
fn stopped_connect_is_unreachable_then_back() {
    let mut fx = Fixture::new();
    let client = fx.client();
    assert_eq!(client.vault_id("homelab").unwrap(), fx.vault);

    fx.standin.stop();
    let before = client.requests_made();
    let t0 = Instant::now();
    let (client, e) = without_hanging(move || {
        let e = client.vault_id("homelab").unwrap_err();
        (client, e)
    });
    let took = t0.elapsed();
    assert!(
        matches!(e, ConnectError::Unreachable { attempts: 4, .. }),
        "{e:?}"
    );
    assert_eq!(client.requests_made() - before, 4);
    // Backoff 100 + 200 + 400 ms, jittered ±25 %, between the attempts.
    assert!(took >= Duration::from_millis(525), "{took:?}");
    insta::assert_snapshot!("unreachable", fx.redact(&e.to_string(), &[]));
    assert_no_secrets(&both(&e));

    // Back on the same port, with the same data.
    fx.standin.restart();
    assert_eq!(client.vault_id("homelab").unwrap(), fx.vault);
    assert_eq!(client.item(&fx.vault, "postgres").unwrap().id, fx.postgres);
}

/// Runs `f` on a thread; fails the test if it has not returned after
/// [`homelab_agent_tests::HANG_LIMIT`] (a bound that only stops a hang:
/// how fast the client gives up is not asserted).
fn without_hanging<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(homelab_agent_tests::HANG_LIMIT)
        .expect("the Connect client never returned")
}

/// A server on 127.0.0.1 that answers every request with `response` (a
/// whole HTTP response), or never answers when `None`. Runs until the test
/// process ends.
fn raw_server(response: Option<String>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 4096];
            let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = conn.read(&mut buf);
            match &response {
                Some(r) => {
                    let _ = conn.write_all(r.as_bytes());
                }
                None => held.push(conn), // keep it open, say nothing
            }
        }
    });
    url
}

fn http_response(status: &str, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[test]
fn timeouts_bad_bodies_and_proxies() {
    let tmp = tempfile::tempdir().unwrap();
    let token = tmp.path().join("token");
    write_token(&token, TOKEN, 0o600);
    let mut printed = Vec::new();
    let id = "abcdefghijklmnopqrstuvwxyz";

    // No answer: each attempt ends at the timeout; four attempts.
    let url = raw_server(None);
    let client = ConnectClient::new(&ConnectConfig {
        url: url.clone(),
        token_file: token.clone(),
        timeout: Duration::from_millis(200),
    })
    .unwrap();
    // Each attempt ends (at the timeout: four of 200 ms and the backoff
    // between them at least), instead of waiting for the silent server.
    let t0 = Instant::now();
    let e = without_hanging(move || client.vault_id(id).unwrap_err());
    let took = t0.elapsed();
    assert!(
        matches!(e, ConnectError::Unreachable { attempts: 4, .. }),
        "{e:?}"
    );
    assert!(took >= Duration::from_millis(1300), "{took:?}");
    insta::assert_snapshot!(
        "timeout",
        e.to_string().replace(&url, "http://127.0.0.1:[PORT]")
    );
    printed.extend(both(&e));

    // A 200 whose body is not a Connect item: the error does not quote it
    // (serde's own message would: `invalid type: string "..."`).
    let body = format!(
        r#"{{"id":"{id}","title":"x","version":"{APP_PASSWORD}","vault":{{"id":"{id}"}},"fields":[{{"id":"password","type":"CONCEALED","value":"{ADMIN_PASSWORD}"}}]}}"#
    );
    let url = raw_server(Some(http_response("200 OK", "application/json", &body)));
    let client = ConnectClient::new(&ConnectConfig::new(url.clone(), token.clone())).unwrap();
    let e = client.item(id, id).unwrap_err();
    assert!(matches!(e, ConnectError::BadResponse { .. }), "{e:?}");
    insta::assert_snapshot!(
        "bad_response",
        e.to_string().replace(&url, "http://127.0.0.1:[PORT]")
    );
    printed.extend(both(&e));

    // A proxy's non-JSON 502 page: falls back to the status text, and the
    // page (which could echo anything) is not quoted.
    let url = raw_server(Some(http_response(
        "502 Bad Gateway",
        "text/html",
        &format!("<html>upstream said {APP_PASSWORD}</html>"),
    )));
    let client = ConnectClient::new(&ConnectConfig::new(url.clone(), token.clone())).unwrap();
    let e = client.vault_id("homelab").unwrap_err();
    assert!(
        matches!(
            e,
            ConnectError::Server {
                status: 502,
                attempts: 4,
                ..
            }
        ),
        "{e:?}"
    );
    insta::assert_snapshot!(
        "non_json_error",
        e.to_string().replace(&url, "http://127.0.0.1:[PORT]")
    );
    printed.extend(both(&e));
    assert_no_secrets(&printed);
}

/// A minimal HTTP GET returning (status, headers lower-cased, body).
fn get(url: &str, path: &str, auth: Option<&str>) -> (u16, Vec<(String, String)>, String) {
    let addr = url.trim_start_matches("http://");
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let auth = auth
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    conn.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

#[test]
fn stand_in_speaks_the_connect_protocol() {
    let fx = Fixture::new();
    let url = fx.standin.url();
    let json = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();

    let (status, headers, body) = get(&url, "/heartbeat", None);
    assert_eq!((status, body.as_str()), (200, "."));
    assert!(headers.contains(&("1password-connect-version".into(), CONNECT_VERSION.into())));
    let (status, _, body) = get(&url, "/health", None);
    assert_eq!(status, 200);
    assert_eq!(json(&body)["dependencies"][0]["status"], "ACTIVE");
    assert_eq!(
        fx.standin.requests(),
        0,
        "health endpoints are not data requests"
    );

    let (status, _, body) = get(&url, "/v1/vaults", None);
    assert_eq!(
        (status, json(&body)),
        (
            401,
            serde_json::json!({"status": 401, "message": "Invalid token signature"})
        )
    );
    let (status, _, body) = get(&url, "/v1/vaults", Some("wrong"));
    assert_eq!(status, 401, "{body}");

    // Both filter spellings, %20 and + encodings; exact match.
    for q in [
        "name%20eq%20%22homelab%22",
        "title+eq+%22homelab%22",
        "title%20eq%20\"homelab\"",
    ] {
        let (status, _, body) = get(&url, &format!("/v1/vaults?filter={q}"), Some(TOKEN));
        let list = json(&body);
        assert_eq!(status, 200);
        assert_eq!(list.as_array().unwrap().len(), 1, "{q}: {body}");
        assert_eq!(list[0]["id"], fx.vault.as_str());
        assert_eq!(list[0]["items"], 2);
    }
    let (_, _, body) = get(&url, "/v1/vaults", Some(TOKEN));
    assert_eq!(json(&body).as_array().unwrap().len(), 2);

    // Summaries have no fields; the full item does, sections labelled.
    let (_, _, body) = get(
        &url,
        &format!(
            "/v1/vaults/{}/items?filter=title%20eq%20%22api%22",
            fx.vault
        ),
        Some(TOKEN),
    );
    let list = json(&body);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert!(list[0].get("fields").is_none() && list[0].get("sections").is_none());
    assert_eq!(list[0]["vault"]["id"], fx.vault.as_str());
    let (status, _, body) = get(
        &url,
        &format!("/v1/vaults/{}/items/{}", fx.vault, fx.api),
        Some(TOKEN),
    );
    assert_eq!(status, 200);
    let item = json(&body);
    assert_eq!(item["version"], 1);
    assert!(item["createdAt"].as_str().unwrap().ends_with('Z'));
    assert_eq!(item["fields"][0]["section"]["label"], "prod");
    assert_eq!(
        item["fields"][0]["section"]["id"],
        item["sections"][0]["id"]
    );

    // 404 / 403 messages.
    let missing = "zzzzzzzzzzzzzzzzzzzzzzzzzz";
    let (status, _, body) = get(&url, &format!("/v1/vaults/{missing}"), Some(TOKEN));
    assert_eq!(
        (status, json(&body)["message"].as_str().unwrap()),
        (404, format!("vault {missing} not found").as_str())
    );
    let (status, _, body) = get(
        &url,
        &format!("/v1/vaults/{}/items/{missing}", fx.vault),
        Some(TOKEN),
    );
    assert_eq!(
        (status, json(&body)["message"].as_str().unwrap()),
        (404, format!("item {missing} not found").as_str())
    );
    fx.standin.deny_vault(&fx.vault);
    let (status, _, body) = get(&url, &format!("/v1/vaults/{}/items", fx.vault), Some(TOKEN));
    assert_eq!(status, 403, "{body}");
    let (_, _, body) = get(&url, "/v1/vaults", Some(TOKEN));
    assert_eq!(
        json(&body).as_array().unwrap().len(),
        1,
        "denied vaults are not listed"
    );

    fx.standin.fail_next(503, 1);
    let (status, _, body) = get(&url, "/v1/vaults", Some(TOKEN));
    assert_eq!((status, json(&body)["status"].as_u64()), (503, Some(503)));
    assert_eq!(get(&url, "/v1/vaults", Some(TOKEN)).0, 200);
}
