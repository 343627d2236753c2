//! `basic_auth` end to end: a users file with bcrypt and argon2 hashes, the challenge
//! browsers answer with their prompt, identity headers, admin users, the lockout and
//! the file's reload.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::json;

use crate::harness::*;
use crate::identity::{pin_hash, PIN};

fn basic(user: &str, password: &str) -> String {
    format!(
        "Authorization: Basic {}",
        B64.encode(format!("{user}:{password}"))
    )
}

#[test]
fn basic_auth_users_reach_their_routes_and_wrong_passwords_are_locked_out() {
    let upstream = RecordingUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.htpasswd");
    // alice: bcrypt, as `htpasswd -B` makes it; bob: argon2, from `gatewarden hash-pin`.
    let alice_hash = bcrypt::hash("correct horse", 5).unwrap();
    std::fs::write(
        &users,
        format!("# the team\nalice:{alice_hash}\nbob:{}\n", pin_hash()),
    )
    .unwrap();
    let gw = Gateway::start(
        Config::new()
            .with_admin()
            .set("trusted_proxies", json!(["127.0.0.1/32"]))
            .upstream("app", Upstream::to(upstream.addr))
            .plugin(
                "team",
                "basic_auth",
                json!({
                    "users_file": users,
                    "realm": "Team",
                    "admin_users": ["alice"],
                    "lockout": { "max_failures": 3, "window": "10m", "ban": "15m" },
                }),
            )
            .plugin(
                "who",
                "headers",
                json!({ "request": { "set": { "X-Webauth-User": "{identity.subject}" } } }),
            )
            .route(
                Route::new("admin", "app", "admin")
                    .path_prefix("/admin")
                    .plugins(&["team", "who"]),
            )
            .route(
                Route::new("app", "app", "user")
                    .path_prefix("/")
                    .plugins(&["team", "who"]),
            ),
    );

    // No credentials: the Basic challenge, which makes browsers prompt.
    let resp = get(gw.addr, "/app/x", &["Accept: text/html"]);
    assert_eq!(resp.status, 401);
    assert_eq!(
        resp.header("www-authenticate"),
        Some("Basic realm=\"Team\", charset=\"UTF-8\"")
    );

    // The right passwords, as curl sends them: through, as the user, without the header.
    for (user, password, target) in [
        ("alice", "correct horse", "/app/a"),
        ("alice", "correct horse", "/admin/a"),
        ("bob", PIN, "/app/b"),
    ] {
        let resp = get(gw.addr, target, &[&basic(user, password)]);
        assert_eq!(resp.status, 200, "{user} {target}: {resp:?}");
        let seen = upstream
            .requests()
            .into_iter()
            .rfind(|r| r.target() == target)
            .expect("reached the upstream");
        let webauth: Vec<_> = seen
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("x-webauth-user"))
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(webauth, [user]);
        assert!(
            !seen
                .headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case("authorization")),
            "the credential went upstream"
        );
    }
    assert_eq!(get(gw.addr, "/admin/b", &[&basic("bob", PIN)]).status, 403);

    // Wrong passwords: 401 with the challenge, then the lockout, the right one included.
    let wrong = get(gw.addr, "/app/x", &[&basic("alice", "wrong")]);
    assert_eq!(wrong.status, 401);
    assert!(wrong
        .header("www-authenticate")
        .is_some_and(|c| c.starts_with("Basic")));
    assert_eq!(
        get(gw.addr, "/app/x", &[&basic("mallory", "x")]).status,
        401
    );
    let banned = get(gw.addr, "/app/x", &[&basic("alice", "wrong again")]);
    assert_eq!(banned.status, 429);
    assert!(banned.header("retry-after").is_some());
    assert_eq!(
        get(gw.addr, "/app/x", &[&basic("alice", "correct horse")]).status,
        429
    );

    // A user added to the file can sign in within seconds, from another address.
    let carol = format!("carol:{}\n", pin_hash());
    let mut text = std::fs::read_to_string(&users).unwrap();
    text.push_str(&carol);
    std::fs::write(&users, text).unwrap();
    // Each try from another address: tries before the reload are failures that count.
    let mut attempt = 0;
    poll_until("carol to be known", Duration::from_secs(10), || {
        attempt += 1;
        let client = format!("X-Forwarded-For: 198.51.100.{attempt}");
        get(gw.addr, "/app/c", &[&basic("carol", PIN), &client]).status == 200
    });
    let secrets = ["correct horse", PIN, alice_hash.as_str()];
    let output = gw.output();
    for secret in secrets {
        assert!(!output.contains(secret), "{secret} in the gateway's output");
    }
}
