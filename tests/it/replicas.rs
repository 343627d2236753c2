//! Several gateways sharing one Redis: API keys made, revoked and used across
//! replicas, and what each replica does while Redis is away.

use std::time::Duration;

use serde_json::json;

use crate::harness::*;

pub(crate) const ADMIN_KEY: &str = "replica-admin-key-0123456789";

/// A replica: keys in the shared Redis, one route for users.
fn replica(redis: &Redis, upstream: std::net::SocketAddr) -> Gateway {
    Gateway::start(
        Config::new()
            .admin_key(ADMIN_KEY)
            .set("redis", json!({ "url": redis.url() }))
            .upstream("app", Upstream::to(upstream))
            .plugin("keys", "api_key", json!({ "store": "redis" }))
            .route(Route::new("app", "app", "user").plugins(&["keys"])),
    )
}

/// Sends an admin request with the admin key.
pub(crate) fn admin(gw: &Gateway, method: &str, path: &str, body: &str) -> RawResponse {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {ADMIN_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    raw(gw.admin, &request).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn status_with_key(gw: &Gateway, key: &str) -> u16 {
    get(gw.addr, "/", &[&format!("Authorization: Bearer {key}")]).status
}

/// Waits (briefly) for every replica to answer `status` to `key`.
fn all_answer(replicas: &[&Gateway], key: &str, status: u16, what: &str) {
    for (i, gw) in replicas.iter().enumerate() {
        poll_until(
            &format!("replica {i} to answer {status}: {what}"),
            Duration::from_secs(2),
            || status_with_key(gw, key) == status,
        );
    }
}

#[test]
fn replicas_share_keys_through_redis_and_keep_serving_while_it_is_away() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let binary = tool(&["redis-server"]).expect("redis-server");
    let up = Upstreams::start(1);
    let replicas: Vec<Gateway> = (0..3).map(|_| replica(&redis, up.addr(0))).collect();
    let [first, second, third] = [&replicas[0], &replicas[1], &replicas[2]];

    // Made on the first replica, accepted by the third.
    let made = admin(
        first,
        "POST",
        "/admin/keys",
        r#"{"name":"ci","subject":"robot"}"#,
    );
    assert_eq!(made.status, 201, "{made:?}");
    let made = made.json();
    let key = made["key"].as_str().unwrap().to_string();
    let id = made["id"].as_str().unwrap().to_string();
    all_answer(
        &[third, second, first],
        &key,
        200,
        "a key made on the first",
    );
    let listed = admin(third, "GET", "/admin/keys", "").json();
    let stored = listed.to_string();
    assert!(stored.contains(&id) && !stored.contains(&key), "{stored}");

    // Revoked on the second, refused by the first.
    let revoked = admin(second, "DELETE", &format!("/admin/keys/{id}"), "");
    assert_eq!(revoked.status, 200, "{revoked:?}");
    all_answer(
        &[first, third, second],
        &key,
        401,
        "a key revoked on the second",
    );

    // The last active admin key of the whole store stays.
    let boss = admin(
        first,
        "POST",
        "/admin/keys",
        r#"{"name":"boss","role":"admin"}"#,
    )
    .json();
    let boss_id = boss["id"].as_str().unwrap();
    let refused = admin(third, "DELETE", &format!("/admin/keys/{boss_id}"), "");
    assert_eq!(refused.status, 409, "{refused:?}");

    // Redis away: the keys already loaded keep working, changes are refused.
    let kept = admin(first, "POST", "/admin/keys", r#"{"name":"kept"}"#).json();
    let kept = kept["key"].as_str().unwrap().to_string();
    all_answer(
        &[first, second, third],
        &kept,
        200,
        "a key made before Redis went away",
    );
    redis.kill();
    for gw in &replicas {
        assert_eq!(
            status_with_key(gw, &kept),
            200,
            "fail-static while Redis is down"
        );
        assert_eq!(
            status_with_key(gw, &key),
            401,
            "a revoked key stays revoked"
        );
    }
    let refused = admin(second, "POST", "/admin/keys", r#"{"name":"late"}"#);
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(refused.json()["error"]
        .as_str()
        .unwrap()
        .contains("unavailable"));
    let failures = |gw: &Gateway| -> u64 {
        let text = String::from_utf8(get(gw.admin, "/metrics", &[]).body).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("gatewarden_key_store_errors_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    poll_until(
        "the replicas to count Redis away",
        Duration::from_secs(5),
        || replicas.iter().all(|gw| failures(gw) > 0),
    );

    // Back, empty (it saved nothing): a key made meanwhile with the CLI is picked up.
    let back = Redis::start_on(&binary, redis.port);
    let dir = tempfile::tempdir().unwrap();
    let out = run_cli(
        &[
            "key",
            "new",
            "--redis",
            &back.url(),
            "--name",
            "cli",
            "--subject",
            "ops",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{out:?}");
    let from_cli = String::from_utf8(out.stdout).unwrap().trim().to_string();
    all_answer(
        &[first, second, third],
        &from_cli,
        200,
        "a key made by the CLI after Redis came back",
    );
    let out = run_cli(&["key", "list", "--redis", &back.url()], dir.path());
    let listed = String::from_utf8(out.stdout).unwrap();
    assert!(listed.contains("cli") && listed.contains("ops"), "{listed}");
}

#[test]
fn a_keys_file_moves_into_redis_with_key_import() {
    let Some(redis) = Redis::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.yaml");
    let key = crate::identity::key_new(&file, &["--name", "moved", "--subject", "alice"]);
    let import = |expect: &str| {
        let out = run_cli(
            &[
                "key",
                "import",
                "--file",
                "keys.yaml",
                "--redis",
                &redis.url(),
            ],
            dir.path(),
        );
        assert!(out.status.success(), "{out:?}");
        let said = String::from_utf8(out.stdout).unwrap();
        assert!(said.contains(expect), "{said}");
    };
    import("imported 1 of 1");
    // A second import adds nothing and changes nothing.
    import("imported 0 of 1");
    let up = Upstreams::start(1);
    let gw = replica(&redis, up.addr(0));
    assert_eq!(status_with_key(&gw, &key), 200);
    let resp = get(gw.addr, "/", &[&format!("Authorization: Bearer {key}")]);
    assert_eq!(resp.status, 200);
}

const SESSION_SECRET: &str = "a-session-secret-shared-by-the-replicas";

/// A replica with a PIN login in front of one route for users; `redis` shares the
/// revocation list (and the lockout), `settings` adds to the `pin_gate` block.
fn pin_replica(
    redis: Option<&str>,
    upstream: std::net::SocketAddr,
    settings: serde_json::Value,
) -> Gateway {
    let mut pin = json!({ "pin_hash": crate::identity::pin_hash(), "secret": SESSION_SECRET });
    if let (Some(pin), serde_json::Value::Object(more)) = (pin.as_object_mut(), settings) {
        pin.extend(more);
    }
    let config = pin_config(upstream, pin);
    Gateway::start(match redis {
        Some(url) => config.set("redis", json!({ "url": url })),
        None => config,
    })
}

/// The admin key and a PIN login (the `pin_gate` block `pin`) in front of one route
/// for users.
pub(crate) fn pin_config(upstream: std::net::SocketAddr, pin: serde_json::Value) -> Config {
    Config::new()
        .admin_key(ADMIN_KEY)
        .upstream("app", Upstream::to(upstream))
        .plugin("pin", "pin_gate", pin)
        .route(Route::new("app", "app", "user").plugins(&["pin"]))
}

fn with_cookie(gw: &Gateway, cookie: &str) -> u16 {
    get(gw.addr, "/", &[&format!("Cookie: {cookie}")]).status
}

fn logout(gw: &Gateway, cookie: &str) -> RawResponse {
    raw(
        gw.addr,
        &format!(
            "POST /.gatewarden/logout HTTP/1.1\r\nHost: localhost\r\nCookie: {cookie}\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    )
    .unwrap()
}

#[test]
fn sessions_are_revoked_on_every_replica_by_logout_and_by_subject() {
    let Some(redis) = Redis::start() else {
        return;
    };
    let up = Upstreams::start(1);
    let url = redis.url();
    let replicas: Vec<Gateway> = (0..3)
        .map(|_| pin_replica(Some(&url), up.addr(0), json!({})))
        .collect();
    let [first, second, third] = [&replicas[0], &replicas[1], &replicas[2]];

    // Logged in on the first, logged out on the second: the cookie's copies are
    // refused everywhere, at once.
    let copied = crate::identity::session(first.addr);
    for gw in &replicas {
        assert_eq!(with_cookie(gw, &copied), 200);
    }
    assert_eq!(logout(second, &copied).status, 303);
    for gw in &replicas {
        assert_eq!(
            with_cookie(gw, &copied),
            401,
            "a session reused after its logout"
        );
    }

    // Sign out everywhere: every session of `pin` ends; bob's stays.
    let again = crate::identity::session(third.addr);
    let bob = format!(
        "gatewarden={}",
        crate::identity::mint(SESSION_SECRET, "bob", "user", 3600)
    );
    assert_eq!(with_cookie(first, &again), 200);
    assert_eq!(with_cookie(first, &bob), 200);
    let revoked = admin(
        third,
        "POST",
        "/admin/sessions/revoke",
        r#"{"subject":"pin"}"#,
    );
    assert_eq!(revoked.status, 200, "{revoked:?}");
    for gw in &replicas {
        assert_eq!(with_cookie(gw, &again), 401, "pin signed out everywhere");
        assert_eq!(with_cookie(gw, &bob), 200, "bob stays signed in");
    }
    // A session forged with another id (or any other change) fails its signature.
    let token = again.split_once('=').unwrap().1;
    let forged = format!("gatewarden={}x", token);
    assert_eq!(with_cookie(second, &forged), 401);
    // Signing in again, in a later second than the revocation, works.
    std::thread::sleep(Duration::from_millis(1100));
    let fresh = crate::identity::session(second.addr);
    assert_eq!(with_cookie(first, &fresh), 200);
    let bad = admin(first, "POST", "/admin/sessions/revoke", r#"{"who":"pin"}"#);
    assert_eq!(bad.status, 400, "{bad:?}");
}

#[test]
fn a_session_check_fails_closed_when_redis_answers_garbage_unless_told_otherwise() {
    let up = Upstreams::start(1);
    // An HTTP server where Redis should be: every reply is garbage to a Redis client.
    let not_redis = format!("redis://{}/0", up.addr(0));
    let closed = pin_replica(Some(&not_redis), up.addr(0), json!({}));
    let open = pin_replica(
        Some(&not_redis),
        up.addr(0),
        json!({ "on_revocation_error": "allow" }),
    );
    let bob = format!(
        "gatewarden={}",
        crate::identity::mint(SESSION_SECRET, "bob", "user", 3600)
    );
    let refused = get(closed.addr, "/", &[&format!("Cookie: {bob}")]);
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(with_cookie(&open, &bob), 200);
}

#[test]
fn without_redis_a_logout_revokes_the_session_in_this_gateway_across_reloads() {
    let up = Upstreams::start(1);
    let gw = pin_replica(None, up.addr(0), json!({}));
    let copied = crate::identity::session(gw.addr);
    let other = crate::identity::session(gw.addr);
    assert_eq!(logout(&gw, &copied).status, 303);
    assert_eq!(with_cookie(&gw, &copied), 401);
    assert_eq!(
        with_cookie(&gw, &other),
        200,
        "only the session logged out ends"
    );
    // A reload that changes the plugin builds a new instance: the list stays.
    gw.rewrite(
        Config::new()
            .admin_key(ADMIN_KEY)
            .upstream("app", Upstream::to(up.addr(0)))
            .plugin(
                "pin",
                "pin_gate",
                json!({ "pin_hash": crate::identity::pin_hash(), "secret": SESSION_SECRET, "session_ttl": "2d" }),
            )
            .route(Route::new("app", "app", "user").plugins(&["pin"])),
    );
    let reloaded = admin(&gw, "POST", "/admin/reload", "");
    assert_eq!(reloaded.status, 200, "{reloaded:?}");
    assert_eq!(
        with_cookie(&gw, &copied),
        401,
        "still revoked after the reload"
    );
    assert_eq!(with_cookie(&gw, &other), 200);
}

/// An OpenAI-style upstream: a completion answers JSON reporting 5 prompt and 7
/// completion tokens, or, when the body asks for `"stream":true`, an SSE stream whose
/// last chunk reports 3 and 4.
fn fake_llm() -> crate::llm_route::ScriptedUpstream {
    crate::llm_route::ScriptedUpstream::start(|seen, out| {
        let (content_type, body) = if String::from_utf8_lossy(&seen.body)
            .contains("\"stream\":true")
        {
            (
                "text/event-stream",
                "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n\
                 data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4,\"total_tokens\":7}}\n\n\
                 data: [DONE]\n\n",
            )
        } else {
            (
                "application/json",
                r#"{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#,
            )
        };
        let head = format!("HTTP/1.1 200 OK\r\ncontent-type: {content_type}");
        crate::llm_route::write_sized(out, &head, &[body.as_bytes()])
    })
}

/// A replica whose `/v1/` route counts LLM tokens for API-key callers.
fn llm_replica(
    redis: Option<&Redis>,
    upstream: std::net::SocketAddr,
    keys: &std::path::Path,
) -> Gateway {
    let keys = match redis {
        Some(_) => json!({ "store": "redis" }),
        None => json!({ "keys_file": keys }),
    };
    let config = Config::new()
        .admin_key(ADMIN_KEY)
        .upstream("llm", Upstream::to(upstream))
        .plugin("keys", "api_key", keys)
        .plugin("tokens", "llm_budget", json!({}))
        .route(
            Route::new("llm", "llm", "user")
                .path_prefix("/v1/")
                .plugins(&["keys", "tokens"]),
        );
    Gateway::start(match redis {
        Some(r) => config.set("redis", json!({ "url": r.url() })),
        None => config,
    })
}

fn complete(gw: &Gateway, key: &str, stream: bool) {
    let body = format!(r#"{{"model":"m","stream":{stream}}}"#);
    let resp = raw(
        gw.addr,
        &format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .unwrap();
    assert_eq!(resp.status, 200, "{resp:?}");
}

/// The totals `GET /admin/usage?subject=` answers today.
fn usage_of(gw: &Gateway, subject: &str) -> serde_json::Value {
    let resp = admin(gw, "GET", &format!("/admin/usage?subject={subject}"), "");
    assert_eq!(resp.status, 200, "{resp:?}");
    resp.json()
}

#[test]
fn usage_through_two_replicas_adds_up_to_what_the_upstream_reported() {
    let Some(redis) = Redis::start() else {
        return;
    };
    let llm = fake_llm();
    let dir = tempfile::tempdir().unwrap();
    let new_key = |name: &str| {
        let out = run_cli(
            &[
                "key",
                "new",
                "--redis",
                &redis.url(),
                "--name",
                name,
                "--subject",
                name,
            ],
            dir.path(),
        );
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let (alice, bob) = (new_key("alice"), new_key("bob"));
    let one = llm_replica(Some(&redis), llm.addr, dir.path());
    let two = llm_replica(Some(&redis), llm.addr, dir.path());
    // alice: two plain answers (5 + 7 each) and one stream (3 + 4), over both replicas.
    complete(&one, &alice, false);
    complete(&two, &alice, false);
    complete(&two, &alice, true);
    // bob: one plain answer, and one refused request (no key counts as nobody's).
    complete(&one, &bob, false);
    assert_eq!(get(one.addr, "/v1/models", &[]).status, 401);

    poll_until(
        "both replicas' counts to reach Redis",
        Duration::from_secs(5),
        || usage_of(&one, "alice")["totals"]["requests"] == 3,
    );
    let alice_usage = usage_of(&two, "alice");
    let totals = &alice_usage["totals"];
    assert_eq!(totals["responses"]["2xx"], 3, "{alice_usage}");
    assert_eq!(
        totals["tokens"],
        json!({ "prompt": 13, "completion": 18, "total": 31 })
    );
    let rows = alice_usage["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "one day, one route, one key: {alice_usage}");
    assert_eq!(rows[0]["route"], "llm");
    assert!(rows[0]["key_id"].as_str().unwrap().starts_with("k_"));
    assert!(
        rows[0]["bytes_in"].as_u64().unwrap() > 0 && rows[0]["bytes_out"].as_u64().unwrap() > 0
    );
    poll_until(
        "bob's request to be counted",
        Duration::from_secs(2),
        || usage_of(&one, "bob")["totals"]["requests"] == 1,
    );
    let bob_usage = usage_of(&one, "bob");
    assert_eq!(bob_usage["totals"]["tokens"]["total"], 12, "{bob_usage}");
    poll_until(
        "the refused request to be counted",
        Duration::from_secs(2),
        || usage_of(&one, "-")["totals"]["responses"]["4xx"] == 1,
    );
    let nobody = usage_of(&one, "-");
    assert_eq!(nobody["totals"]["responses"]["4xx"], 1, "{nobody}");

    // The same numbers from the command line, from Redis and from an admin listener.
    let table = run_cli(
        &["usage", "--redis", &redis.url(), "--subject", "alice"],
        dir.path(),
    );
    let text = String::from_utf8(table.stdout).unwrap();
    assert!(
        table.status.success() && text.contains("alice") && text.contains(" 31"),
        "{text}"
    );
    let mut cmd = std::process::Command::new(bin());
    let out = cmd
        .args([
            "usage",
            "--admin",
            &format!("http://{}", two.admin),
            "--subject",
            "bob",
        ])
        .env("GATEWARDEN_ADMIN_KEY", ADMIN_KEY)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success() && text.contains("bob") && text.contains(" 12"),
        "{text}"
    );
    let bad = admin(
        &one,
        "GET",
        "/admin/usage?from=2026-02-02&to=2026-01-01",
        "",
    );
    assert_eq!(bad.status, 400);
    // Prometheus never gets a subject or a key as a label.
    let metrics = String::from_utf8(get(one.admin, "/metrics", &[]).body).unwrap();
    assert!(
        !metrics.contains("alice") && !metrics.contains(&alice[..8]),
        "{metrics}"
    );
}

#[test]
fn without_redis_a_gateway_keeps_its_own_usage() {
    let llm = fake_llm();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    let key = crate::identity::key_new(&keys, &["--name", "carol", "--subject", "carol"]);
    let gw = llm_replica(None, llm.addr, &keys);
    complete(&gw, &key, true);
    complete(&gw, &key, false);
    // A request is counted in its logging phase, just after its response went out.
    poll_until(
        "both requests to be counted",
        Duration::from_secs(2),
        || usage_of(&gw, "carol")["totals"]["requests"] == 2,
    );
    let usage = usage_of(&gw, "carol");
    assert_eq!(usage["totals"]["requests"], 2, "{usage}");
    assert_eq!(usage["totals"]["tokens"]["total"], 19, "{usage}");
}
