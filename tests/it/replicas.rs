//! Several gateways sharing one Redis: API keys made, revoked and used across
//! replicas, and what each replica does while Redis is away.

use std::time::Duration;

use serde_json::json;

use crate::harness::*;

const ADMIN_KEY: &str = "replica-admin-key-0123456789";

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
fn admin(gw: &Gateway, method: &str, path: &str, body: &str) -> RawResponse {
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
