//! The command line: `check`'s reports, `run`'s exit codes, `version`, `demo`,
//! `protect`, and the files shipped in conf/ and systemd/.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::*;

/// The repository root: where `conf/` and `systemd/` live.
fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Writes `yaml` to a temp dir and runs `gatewarden <command> -c FILE` there with
/// `env` set; returns the output and its stdout and stderr as text.
fn with_config(command: &str, yaml: &str, env: &[(&str, &str)]) -> (Output, String, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("g.yaml"), yaml).unwrap();
    let mut cmd = Command::new(bin());
    cmd.args([command, "-c", "g.yaml"])
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start gatewarden");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("gatewarden {command} did not exit in time");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

/// The line of `report` about `path`, which must also carry `(line N)`.
fn problem<'a>(report: &'a str, path: &str, line: usize) -> &'a str {
    let found = report
        .lines()
        .find(|l| {
            l.trim_start()
                .starts_with(&format!("{path} (line {line}):"))
        })
        .unwrap_or_else(|| panic!("no problem reported at `{path} (line {line})` in:\n{report}"));
    found
}

#[test]
fn check_accepts_a_good_config_and_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("g.yaml"),
        public(loopback(9))
            .listen(loopback(8080))
            .admin_at(loopback(9091))
            .to_yaml(),
    )
    .unwrap();
    let out = run_cli(&["check", "-c", "g.yaml"], dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("ok: 1 routes, 1 upstreams, 0 plugins"),
        "{stdout}"
    );
}

/// One file with six unrelated mistakes: all of them come back in one run, each with
/// its key path and line, so a user fixes the file in one pass.
const BROKEN: &str = "\
listeners:
  - address: 127.0.0.1:1
    tsl: {}
upstreams:
  app:
    backends: [127.0.0.1:9]
    health_check: { kind: http, intervl: 5s }
  from_env:
    backends: ['${env:GW_CLI_TEST_SURELY_UNSET}']
  from_file:
    backends: ['127.0.0.1:${file:/nonexistent/gatewarden-cli-test/port}']
routes:
  - name: r
    access: publik
    upstream: app
  - name: r2
    match: { path_prefix: /two }
    upstream: ghost
    access: public
";

#[test]
fn check_reports_every_problem_at_once_with_path_and_line() {
    let (out, stdout, stderr) = with_config("check", BROKEN, &[]);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        !stdout.contains("ok:"),
        "a broken file must not be called ok: {stdout}"
    );
    assert!(stderr.contains("6 problems"), "{stderr}");
    problem(&stderr, "listeners[0].tsl", 3);
    problem(&stderr, "upstreams.app.health_check.intervl", 7);
    problem(&stderr, "upstreams.from_env.backends[0]", 9);
    problem(&stderr, "upstreams.from_file.backends[0]", 11);
    assert!(problem(&stderr, "routes[0].access", 14).contains("publik"));
    assert!(problem(&stderr, "routes[1].upstream", 18).contains("ghost"));
}

#[test]
fn check_names_an_unknown_nested_key_by_its_path() {
    let (out, _, stderr) = with_config("check", BROKEN, &[]);
    assert_eq!(out.status.code(), Some(1));
    let line = problem(&stderr, "upstreams.app.health_check.intervl", 7);
    assert!(line.contains("unknown field `intervl`"), "{line}");
    // The message says what would have been accepted.
    assert!(line.contains("interval"), "{line}");
}

#[test]
fn check_names_a_missing_environment_variable() {
    let (out, _, stderr) = with_config("check", BROKEN, &[]);
    assert_eq!(out.status.code(), Some(1));
    let line = problem(&stderr, "upstreams.from_env.backends[0]", 9);
    assert!(line.contains("GW_CLI_TEST_SURELY_UNSET"), "{line}");
    // Reported once, as a missing variable, not again as a bad address.
    assert_eq!(
        stderr.matches("upstreams.from_env.backends[0]").count(),
        1,
        "{stderr}"
    );
}

#[test]
fn check_names_a_missing_file() {
    let (out, _, stderr) = with_config("check", BROKEN, &[]);
    assert_eq!(out.status.code(), Some(1));
    let line = problem(&stderr, "upstreams.from_file.backends[0]", 11);
    assert!(
        line.contains("/nonexistent/gatewarden-cli-test/port"),
        "{line}"
    );
    assert_eq!(
        stderr.matches("upstreams.from_file.backends[0]").count(),
        1,
        "{stderr}"
    );
}

/// An identity plugin that cannot be built (its keys file is missing) is reported once,
/// as what it is; the routes that use it are not also said to lack an identity plugin.
/// A route that really has none still is.
#[test]
fn a_broken_identity_plugin_is_reported_without_follow_on_errors() {
    let yaml = "upstreams:
  app: { backends: ['127.0.0.1:9'] }
plugins:
  keys: { type: api_key, keys_file: /nonexistent/gatewarden-cli-test/keys.yaml }
routes:
  - { name: app, upstream: app, plugins: [keys] }
  - { name: bare, upstream: app, match: { path_prefix: /bare } }
";
    let (out, _, stderr) = with_config("check", yaml, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.lines().any(
            |l| l.trim_start().starts_with("plugins.keys (type: api_key)")
                && l.contains("does not exist")
        ),
        "{stderr}"
    );
    assert!(
        !stderr.contains("routes[0]"),
        "a follow-on error for the route using the plugin:\n{stderr}"
    );
    let line = problem(&stderr, "routes[1].access", 7);
    assert!(line.contains("no identity plugin"), "{line}");
    assert!(stderr.contains("2 problems"), "{stderr}");
}

#[test]
fn check_gives_the_line_of_invalid_yaml() {
    let yaml = "upstreams:\n  app: { backends: [127.0.0.1:9] }\nroutes: [\n  - name: x\n";
    let (out, stdout, stderr) = with_config("check", yaml, &[]);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("not valid YAML"), "{stderr}");
    assert!(
        stderr.lines().any(|l| l.trim_start().starts_with("line ")),
        "no line number in:\n{stderr}"
    );
}

#[test]
fn check_never_prints_secrets_it_expanded() {
    let secret = "sk-Qx7-s3cr";
    // An admin key that is too short, and a header value that is not a valid template
    // (the stray `}`): both are errors about values that came from the environment.
    let yaml = Config::new()
        .listen(loopback(2))
        .admin_at(loopback(1))
        .admin_key("${env:GW_CLI_TEST_SECRET}")
        .upstream("app", Upstream::to(loopback(9)))
        .plugin(
            "inject",
            "headers",
            json!({ "request": { "set": { "Authorization": "Bearer ${env:GW_CLI_TEST_SECRET}}" } } }),
        )
        .route(Route::public("app", "app").plugins(&["inject"]))
        .to_yaml();
    let (out, stdout, stderr) = with_config("check", &yaml, &[("GW_CLI_TEST_SECRET", secret)]);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("admin.api_key"), "{stderr}");
    assert!(stderr.contains("plugins.inject"), "{stderr}");
    assert!(
        !stdout.contains(secret) && !stderr.contains(secret),
        "secret printed:\n{stdout}{stderr}"
    );
}

#[test]
fn check_without_a_file_argument_uses_conf_gatewarden_yaml() {
    let copy = shipped_conf_copy();
    let out = run_with_env(&["check"], copy.dir.path(), &copy.env());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("ok: "), "{stdout}");
    // Without the secrets it documents, the default config names what is missing.
    let out = run_with_env(&["check"], copy.dir.path(), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("GATEWARDEN_PIN_HASH"), "{stderr}");
}

#[test]
fn run_with_a_bad_config_exits_2_prints_the_problems_and_serves_nothing() {
    let port = free_port();
    let yaml = BROKEN.replace("127.0.0.1:1\n", &format!("127.0.0.1:{port}\n"));
    let (out, stdout, stderr) = with_config("run", &yaml, &[]);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    problem(&stderr, "routes[0].access", 14);
    problem(&stderr, "listeners[0].tsl", 3);
    assert!(
        TcpStream::connect_timeout(&loopback(port), Duration::from_millis(500)).is_err(),
        "something listens on the port of a config that was refused"
    );
}

#[test]
fn version_prints_the_version() {
    let out = run_cli(&["version"], &repo());
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with(&format!("gatewarden {}", env!("CARGO_PKG_VERSION"))),
        "{stdout}"
    );
}

/// The 8-digit PIN after `marker` in a process's output.
fn printed_pin(output: &str, marker: &str) -> String {
    let at = output
        .find(marker)
        .unwrap_or_else(|| panic!("no {marker:?} in the output:\n{output}"));
    let pin: String = output[at + marker.len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    assert_eq!(pin.len(), 8, "not an 8-digit PIN in:\n{output}");
    pin
}

/// Logs in through `/.gatewarden/login` and returns the session cookie (`name=value`).
fn pin_login(addr: SocketAddr, pin: &str) -> String {
    let body = format!("pin={pin}&next=%2F");
    let resp = raw(
        addr,
        &format!(
            "POST /.gatewarden/login HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .expect("login");
    assert_eq!(resp.status, 303, "login with the printed PIN: {resp:?}");
    assert_eq!(resp.header("location"), Some("/"));
    resp.header("set-cookie")
        .and_then(|c| c.split(';').next())
        .expect("a session cookie")
        .to_string()
}

#[test]
fn demo_serves_a_page_json_echo_sse_and_websocket_echo() {
    let (listen, admin) = (loopback(free_port()), loopback(free_port()));
    let dir = tempfile::tempdir().unwrap();
    let mut demo = Process::spawn(
        &[
            "demo",
            "--listen",
            &listen.to_string(),
            "--admin",
            &admin.to_string(),
        ],
        dir.path(),
    );
    demo.wait_healthy(admin);
    demo.wait_healthy(listen);
    let output = demo.output();
    assert!(
        output.contains(&format!("http://{listen}/")),
        "demo should print its URL:\n{output}"
    );
    let pin = printed_pin(&output, "sign in with PIN ");

    // Nothing without the PIN: a browser goes to the login page, other clients get 401.
    let page = get(listen, "/", &["Accept: text/html"]);
    assert_eq!(page.status, 302, "{page:?}");
    assert_eq!(page.header("location"), Some("/.gatewarden/login?next=/"));
    assert_eq!(get(listen, "/echo", &[]).status, 401);
    let cookie = format!("Cookie: {}", pin_login(listen, &pin));

    let page = get(listen, "/", &["Accept: text/html", &cookie]);
    assert_eq!(page.status, 200);
    assert!(
        page.header("content-type")
            .is_some_and(|t| t.starts_with("text/html")),
        "{page:?}"
    );
    assert!(String::from_utf8_lossy(&page.body).contains("Gatewarden demo"));
    assert!(page.header("x-request-id").is_some(), "{page:?}");

    let echo = get(listen, "/echo?x=1", &[&cookie]);
    assert_eq!(echo.status, 200);
    let json = echo.json();
    assert_eq!(json["method"], "GET");
    assert_eq!(json["path"], "/echo");
    assert_eq!(json["query"], "x=1");

    let sse = get(listen, "/sse?n=2&interval_ms=100", &[&cookie]);
    assert_eq!(sse.status, 200);
    assert_eq!(sse.header("content-type"), Some("text/event-stream"));
    let events = String::from_utf8_lossy(&sse.body);
    assert_eq!(events.matches("data: ").count(), 2, "{events}");
    assert!(events.contains(r#"data: {"n": 2}"#), "{events}");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cookie_value = cookie.trim_start_matches("Cookie: ").to_string();
    let request = || {
        let mut request = format!("ws://{listen}/ws").into_client_request().unwrap();
        request
            .headers_mut()
            .insert("cookie", cookie_value.parse().unwrap());
        request
    };
    let reply = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), async {
            let (mut ws, _) = ws_connect(request()).await;
            ws.send(Message::text("hello gatewarden")).await.unwrap();
            loop {
                match ws.next().await.expect("stream ended").unwrap() {
                    Message::Text(t) => break t.to_string(),
                    Message::Binary(_) => panic!("binary reply to a text frame"),
                    _ => continue,
                }
            }
        })
        .await
        .expect("websocket echo timed out")
    });
    assert_eq!(reply, "hello gatewarden");
    // And without the session, the same WebSocket is refused.
    let refused = runtime.block_on(tokio_tungstenite::connect_async(format!(
        "ws://{listen}/ws"
    )));
    assert!(
        refused.is_err(),
        "a WebSocket without the session was accepted"
    );
}

#[test]
fn protect_puts_a_loopback_app_behind_the_gateway() {
    let upstreams = Upstreams::start(1);
    let app = upstreams.addr(0);
    let listen = loopback(free_port());
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Process::spawn(
        &[
            "protect",
            &format!("http://{app}"),
            "--listen",
            &listen.to_string(),
        ],
        dir.path(),
    );
    gw.wait_healthy(listen);
    let resp = get(listen, "/echo/through", &[]);
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(served_by(&resp), app.port());
    assert_eq!(resp.json()["path"], "/echo/through");
    assert!(resp.header("x-request-id").is_some(), "{resp:?}");
}

#[test]
fn protect_on_a_non_loopback_address_requires_a_printed_token_or_pin() {
    let upstreams = Upstreams::start(1);
    let app = upstreams.addr(0);
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Process::spawn(
        &[
            "protect",
            &format!("http://{app}"),
            "--listen",
            &format!("0.0.0.0:{port}"),
        ],
        dir.path(),
    );
    // Only ever spoken to over loopback, although it listens on every address.
    let addr = loopback(port);
    gw.wait_healthy(addr);
    let output = gw.output();
    let token = output
        .split_whitespace()
        .find(|w| w.starts_with("gw_"))
        .unwrap_or_else(|| panic!("no token printed:\n{output}"))
        .to_string();
    assert_eq!(token.len(), 46, "{token}");
    let pin = printed_pin(&output, "sign in with PIN ");
    assert_eq!(output.matches(&token).count(), 1, "printed once:\n{output}");
    assert_eq!(output.matches(&pin).count(), 1, "printed once:\n{output}");

    let refused = get(addr, "/echo", &[]);
    assert_eq!(refused.status, 401, "{refused:?}");
    assert!(refused.header("www-authenticate").is_some());
    let browser = get(addr, "/echo", &["Accept: text/html"]);
    assert_eq!(browser.status, 302, "{browser:?}");
    assert_eq!(
        browser.header("location"),
        Some("/.gatewarden/login?next=/echo")
    );
    let mut wrong = token.clone();
    wrong.replace_range(10..11, if &token[10..11] == "x" { "y" } else { "x" });
    assert_eq!(
        get(addr, "/echo", &[&format!("Authorization: Bearer {wrong}")]).status,
        401
    );

    let resp = get(addr, "/echo", &[&format!("Authorization: Bearer {token}")]);
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(served_by(&resp), app.port());
    assert!(
        !resp.json().to_string().contains(&token),
        "the token reached the app"
    );

    let cookie = pin_login(addr, &pin);
    let resp = get(addr, "/echo/after-login", &[&format!("Cookie: {cookie}")]);
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.json()["path"], "/echo/after-login");
}

#[test]
fn protect_refuses_urls_that_are_not_http() {
    let out = run_cli(&["protect", "ftp://x"], &repo());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("http://"), "{stderr}");
}

/// The YAML files shipped in conf/.
fn shipped_configs() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("conf"))
        .expect("conf/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    files
}

/// Where the shipped configs keep the keys file: the systemd unit's StateDirectory,
/// writable by the service (it records last use next to the file).
const STATE_DIR: &str = "/var/lib/gatewarden/";
/// Where the shipped configs write audit and access logs (the unit's LogsDirectory).
const LOGS_DIR: &str = "/var/log/gatewarden/";
/// Where the shipped configs keep their other files (the unit's ConfigurationDirectory).
const CONF_DIR: &str = "/etc/gatewarden/";

/// A copy of conf/ in a temp dir, set up as the configs' comments tell a user to:
/// every keys file they name made with `gatewarden key new` (in the temp dir instead
/// of /var/lib/gatewarden), every users file with a user whose hash comes from
/// `gatewarden hash-pin`, and the secrets in the environment variables they name.
struct ConfCopy {
    dir: tempfile::TempDir,
}

/// The environment variables the shipped configs read their secrets from.
const EXAMPLE_VARIABLES: [&str; 6] = [
    "GATEWARDEN_PIN_HASH",
    "GATEWARDEN_SESSION_SECRET",
    "GATEWARDEN_OIDC_CLIENT_SECRET",
    "GATEWARDEN_ADMIN_KEY",
    "LITELLM_MASTER_KEY",
    "LLM_API_KEY",
];

impl ConfCopy {
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "GATEWARDEN_PIN_HASH",
                crate::identity::pin_hash().to_string(),
            ),
            (
                "GATEWARDEN_SESSION_SECRET",
                "a-session-secret-of-more-than-32-bytes".into(),
            ),
            (
                "GATEWARDEN_OIDC_CLIENT_SECRET",
                "an-oidc-client-secret-for-the-test".into(),
            ),
            (
                "GATEWARDEN_ADMIN_KEY",
                "an-admin-api-key-for-the-test".into(),
            ),
            (
                "LITELLM_MASTER_KEY",
                "sk-litellm-master-key-for-the-test".into(),
            ),
            ("LLM_API_KEY", "sk-llm-api-key-for-the-test".into()),
        ]
    }
}

fn shipped_conf_copy() -> ConfCopy {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::create_dir_all(dir.path().join("conf")).unwrap();
    let mut keys_files = Vec::new();
    let mut users_files = Vec::new();
    for entry in std::fs::read_dir(repo().join("conf")).unwrap() {
        let file = entry.unwrap().path();
        let mut bytes = std::fs::read(&file).unwrap();
        if file.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let text = String::from_utf8(bytes)
                .unwrap()
                .replace(STATE_DIR, &format!("{}/", state.display()))
                .replace(LOGS_DIR, &format!("{}/", state.display()))
                .replace(CONF_DIR, &format!("{}/", state.display()));
            // Relative paths resolve against the working directory: the copy's root.
            keys_files.extend(
                text.lines()
                    .filter(|l| !l.trim_start().starts_with('#'))
                    .filter_map(|l| l.split_once("keys_file:"))
                    .map(|(_, v)| v.split(" #").next().unwrap().trim())
                    .map(|v| dir.path().join(v.trim_matches(['"', '\'', ' ', '}', ',']))),
            );
            users_files.extend(
                text.lines()
                    .filter(|l| !l.trim_start().starts_with('#'))
                    .filter_map(|l| l.split_once("users_file:"))
                    .map(|(_, v)| v.split(" #").next().unwrap().trim())
                    .map(|v| dir.path().join(v.trim_matches(['"', '\'', ' ', '}', ',']))),
            );
            bytes = text.into_bytes();
        }
        std::fs::write(
            dir.path().join("conf").join(file.file_name().unwrap()),
            bytes,
        )
        .unwrap();
    }
    for users in users_files {
        let line = format!("alice:{}\n", crate::identity::pin_hash());
        std::fs::write(users, line).unwrap();
    }
    keys_files.sort();
    keys_files.dedup();
    for keys in keys_files {
        let keys = keys.display().to_string();
        let out = run_cli(
            &[
                "key", "new", "--file", &keys, "--name", "ops", "--role", "admin",
            ],
            dir.path(),
        );
        assert!(out.status.success(), "{out:?}");
    }
    ConfCopy { dir }
}

/// Runs the binary in `dir` with exactly the given extra environment, bounded in time.
fn run_with_env(args: &[&str], dir: &std::path::Path, env: &[(&str, String)]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for var in EXAMPLE_VARIABLES {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start gatewarden");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("gatewarden {args:?} did not exit in time");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

#[test]
fn every_shipped_config_passes_check_without_warnings() {
    let files = shipped_configs();
    let names: Vec<_> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in [
        "gatewarden.yaml",
        "open-webui.yaml",
        "litellm.yaml",
        "grafana.yaml",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "conf/{expected} missing: {names:?}"
        );
    }
    let copy = shipped_conf_copy();
    let env = copy.env();
    // What a user reads: the README and the book's chapters.
    let mut docs = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let mut dirs = vec![repo().join("docs/src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("docs/src exists") {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                docs.push_str(&std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    for name in &names {
        let file = format!("conf/{name}");
        let text = std::fs::read_to_string(copy.dir.path().join(&file)).unwrap();
        // Every variable a shipped config needs is one a user is told about.
        let active: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .map(|l| l.split(" #").next().unwrap_or(""))
            .collect();
        for var in active.split("${env:").skip(1) {
            let var = var.split('}').next().unwrap();
            assert!(
                env.iter().any(|(k, _)| *k == var) && docs.contains(var),
                "{file} needs ${{env:{var}}}, which neither the README nor the book documents"
            );
        }
        let out = run_with_env(&["check", "-c", &file], copy.dir.path(), &env);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{file} fails check:\n{stdout}{stderr}"
        );
        assert!(stdout.contains("ok: "), "{file}: {stdout}");
        assert!(
            !stdout.contains("warning:"),
            "{file} has warnings:\n{stdout}"
        );
    }
}

/// `type: NAME` in the active (uncommented) part of a YAML file.
fn plugin_types_used(yaml: &str) -> Vec<String> {
    yaml.lines()
        .map(|l| l.split(" #").next().unwrap_or(""))
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| l.match_indices("type:").map(move |(i, _)| &l[i + 5..]))
        .filter_map(|rest| {
            let name: String = rest
                .trim_start()
                .trim_start_matches(['"', '\''])
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

#[test]
fn every_plugin_type_appears_in_a_shipped_config() {
    let mut used = Vec::new();
    for file in shipped_configs() {
        used.extend(plugin_types_used(&std::fs::read_to_string(&file).unwrap()));
    }
    let missing: Vec<_> = gatewarden_plugins::PLUGIN_TYPES
        .iter()
        .filter(|t| !used.iter().any(|u| u == *t))
        .collect();
    assert!(
        missing.is_empty(),
        "plugin types without an example in conf/*.yaml: {missing:?}"
    );
    assert!(
        plugin_types_used("  a: { type: headers }\n  # type: ip_filter\n  b: 1 # type: nope\n")
            == ["headers"],
        "the scan must ignore commented-out examples"
    );
}

/// The unit file, with its directives as (key, value) pairs.
fn unit_directives(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// A duration of the unit file (`150s`, `2min`, `2min 30s`, `90`), in seconds.
fn unit_seconds(value: &str) -> u64 {
    let mut total = 0;
    for part in value.split_whitespace() {
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        let n: u64 = digits
            .parse()
            .unwrap_or_else(|_| panic!("not a duration: {value}"));
        total += match &part[digits.len()..] {
            "" | "s" | "sec" => n,
            "m" | "min" => n * 60,
            "h" | "hr" => n * 3600,
            unit => panic!("unit {unit:?} in {value}"),
        };
    }
    total
}

/// Every shipped config's longest stop (grace period, then the runtimes' own timeout)
/// fits in the time the unit gives a stop before SIGKILL, with room for the process to
/// write out what it holds.
#[test]
fn every_shipped_config_stops_within_the_units_timeout() {
    const MARGIN: u64 = 10;
    let unit = std::fs::read_to_string(repo().join("systemd/gatewarden.service")).unwrap();
    let timeout = unit_directives(&unit)
        .into_iter()
        .find(|(k, _)| k == "TimeoutStopSec")
        .map(|(_, v)| unit_seconds(&v))
        .expect("TimeoutStopSec in the unit");
    assert_eq!(unit_seconds("2min 30s"), 150);
    for file in shipped_configs() {
        let yaml: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let server = &yaml["server"];
        // Unset: the defaults, 300 s and 5 s.
        let grace = server["grace_period_seconds"].as_u64().unwrap_or(300);
        let runtimes = server["graceful_shutdown_timeout_seconds"]
            .as_u64()
            .unwrap_or(5);
        assert!(
            grace + runtimes + MARGIN < timeout,
            "{}: a stop may take {grace} s + {runtimes} s, the unit's TimeoutStopSec is {timeout} s",
            file.display()
        );
    }
}

#[test]
fn systemd_unit_is_hardened_and_verifies() {
    let path = repo().join("systemd/gatewarden.service");
    let text = std::fs::read_to_string(&path).expect("systemd/gatewarden.service");
    let directives = unit_directives(&text);
    let has = |key: &str, value: &str| directives.iter().any(|(k, v)| k == key && v == value);
    for (key, value) in [
        ("User", "gatewarden"),
        (
            "ExecStartPre",
            "/usr/local/bin/gatewarden check -c /etc/gatewarden/gatewarden.yaml",
        ),
        (
            "ExecStart",
            "/usr/local/bin/gatewarden run -c /etc/gatewarden/gatewarden.yaml",
        ),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
    ] {
        assert!(has(key, value), "{key}={value} missing from the unit");
    }

    let verify = Command::new("systemd-analyze").arg("--version").output();
    if !verify.is_ok_and(|o| o.status.success()) {
        eprintln!("skipping `systemd-analyze verify`: systemd-analyze is not installed");
        return;
    }
    // verify insists that the binaries exist, so point the unit at the one under test.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("gatewarden.service");
    std::fs::write(&copy, text.replace("/usr/local/bin/gatewarden", bin())).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {stderr}");
    // Unknown or misspelt keys are only warnings ("ignoring"), which would silently
    // drop a hardening setting.
    assert!(
        stderr.trim().is_empty(),
        "systemd-analyze verify complains:\n{stderr}"
    );
}
