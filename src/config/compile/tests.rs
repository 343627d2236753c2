use super::*;

fn errors_of(yaml: &str) -> Vec<ConfigError> {
    match compile(yaml, 1) {
        Ok(_) => panic!("expected errors"),
        Err(e) => e,
    }
}

const MINIMAL: &str = "
upstreams:
  app: { backends: [127.0.0.1:3000] }
routes:
  - name: app
    access: public
    upstream: app
";

#[test]
fn a_minimal_config_compiles_with_defaults() {
    let c = compile(MINIMAL, 7).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(
        c.listeners,
        vec![Listener {
            address: "127.0.0.1:8080".parse().unwrap(),
            tls: None
        }]
    );
    assert_eq!(c.snapshot.health_path.as_deref(), Some("/healthz"));
    assert_eq!(c.snapshot.generation, 7);
    assert_eq!(
        c.snapshot.router.routes()[0].max_request_body,
        DEFAULT_MAX_BODY
    );
}

#[test]
fn unknown_keys_are_reported_with_path_and_line() {
    let errs = errors_of(
        "upstreams:\n  app: { backends: [127.0.0.1:3000] }\nroutes:\n  - name: app\n    access: public\n    upstream: app\n    match: { path_prefx: /x }\nlisteners:\n  - address: 127.0.0.1:1\n    tsl: {}\nbogus: 1\n",
    );
    let find = |p: &str| {
        errs.iter()
            .find(|e| e.path.starts_with(p))
            .unwrap_or_else(|| panic!("{p} in {errs:?}"))
    };
    assert_eq!(find("routes[0].match").line, Some(7));
    assert!(find("routes[0].match").message.contains("path_prefx"));
    assert!(find("listeners[0].tsl").message.contains("tsl"));
    assert_eq!(find("listeners[0].tsl").line, Some(10));
    assert_eq!(find("bogus").line, Some(11));
}

#[test]
fn every_problem_is_reported_at_once() {
    let errs = errors_of(
        "upstreams:\n  a: { backends: [], balance: fastest }\nroutes:\n  - name: r1\n    upstream: nope\n    access: public\n  - name: r2\n    upstream: a\n    plugins: [ghost]\n",
    );
    let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
    for p in [
        "upstreams.a.backends",
        "upstreams.a.balance",
        "routes[0].upstream",
        "routes[1].plugins[0]",
    ] {
        assert!(paths.contains(&p), "{p} missing from {paths:?}");
    }
}

#[test]
fn durations_and_sizes_parse_once_and_errors_name_the_setting() {
    let errs = errors_of(
        "upstreams:\n  a:\n    backends: [127.0.0.1:1]\n    read_timeout: 5 minutes\n  b:\n    backends: [127.0.0.1:2]\n    health_check: { kind: tcp, interval: 10 }\nmax_request_body: 10 parsecs\nroutes:\n  - { name: r, upstream: a, access: public, max_request_body: -1 }\n",
    );
    let at = |p: &str| {
        errs.iter()
            .find(|e| e.path == p)
            .unwrap_or_else(|| panic!("{p} in {errs:?}"))
    };
    assert_eq!(at("upstreams.a.read_timeout").line, Some(4));
    assert!(at("upstreams.a.read_timeout")
        .message
        .contains("unknown unit"));
    assert!(at("upstreams.b.health_check.interval")
        .message
        .contains("no unit"));
    assert!(at("max_request_body").message.contains("unknown unit"));
    assert!(at("routes[0].max_request_body")
        .message
        .contains("positive"));

    let c = compile(
        "upstreams:\n  a: { backends: [127.0.0.1:1], read_timeout: 90s }\nmax_request_body: 2MiB\nroutes:\n  - { name: r, upstream: a, access: public, max_request_body: 4096 }\n  - { name: s, upstream: a, access: public, match: { path_prefix: /s } }\n",
        1,
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    let routes = c.snapshot.router.routes();
    let body = |name: &str| {
        routes
            .iter()
            .find(|r| &*r.name == name)
            .map(|r| r.max_request_body)
    };
    assert_eq!(body("r"), Some(4096));
    assert_eq!(body("s"), Some(2 << 20));
}

#[test]
fn a_protected_route_without_identity_is_an_error() {
    let errs = errors_of(
        "upstreams:\n  a: { backends: [127.0.0.1:1] }\nroutes:\n  - { name: r, upstream: a }\n",
    );
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].path, "routes[0].access");
    assert!(errs[0].message.contains("no identity plugin"));
}

#[test]
fn missing_env_references_are_named() {
    let errs = errors_of(&MINIMAL.replace("127.0.0.1:3000", "'${env:GW_COMPILE_TEST_UNSET}'"));
    assert!(
        errs[0].message.contains("GW_COMPILE_TEST_UNSET"),
        "{errs:?}"
    );
    assert_eq!(errs[0].path, "upstreams.app.backends[0]");
}

#[test]
fn duplicate_matches_and_unnormalised_prefixes_are_errors() {
    let errs = errors_of(
        "upstreams:\n  a: { backends: [127.0.0.1:1] }\nroutes:\n  - { name: r1, upstream: a, access: public, match: { path_prefix: /x } }\n  - { name: r2, upstream: a, access: public, match: { path_prefix: /x } }\n  - { name: r3, upstream: a, access: public, match: { path_prefix: /a/../b } }\n",
    );
    assert!(errs.iter().any(|e| e.path == "routes[1].match"));
    assert!(errs
        .iter()
        .any(|e| e.path == "routes[2].match.path_prefix" && e.message.contains("/b")));
}

#[test]
fn plugin_errors_name_the_plugin_and_field() {
    let errs = errors_of(&format!(
        "{MINIMAL}plugins:\n  f: {{ type: ip_filter, alow: [] }}\n  g: {{ type: nope }}\n"
    ));
    assert!(
        errs.iter()
            .any(|e| e.path == "plugins.f (type: ip_filter)" && e.message.contains("alow")),
        "{errs:?}"
    );
    assert!(errs
        .iter()
        .any(|e| e.path.starts_with("plugins.g") && e.message.contains("unknown plugin type")));
}

#[test]
fn the_client_write_buffer_is_bounded() {
    let with =
        |bytes: usize| format!("server: {{ client_write_buffer_bytes: {bytes} }}\n{MINIMAL}");
    let c = compile(&with(16384), 1).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(c.server.client_write_buffer_bytes, Some(16384));
    let errs = errors_of(&with(MAX_CLIENT_WRITE_BUFFER + 1));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].path, "server.client_write_buffer_bytes");
    assert!(errs[0].message.contains("at most"), "{errs:?}");
}

#[test]
fn a_reload_keeps_the_tracer_only_while_its_section_is_unchanged() {
    let traced = |ratio: &str| {
        format!("{MINIMAL}tracing: {{ otlp_endpoint: 'http://127.0.0.1:4318', sample_ratio: {ratio}, headers: {{ authorization: Bearer collector-token-123 }} }}\n")
    };
    let first = compile(&traced("0.5"), 1).unwrap_or_else(|e| panic!("{e:?}"));
    let tracer = first.snapshot.tracing.clone().unwrap();
    let shown = first.snapshot.masked_config.to_string();
    assert!(!shown.contains("collector-token-123"), "{shown}");
    assert!(shown.contains(crate::config::mask::MASK), "{shown}");
    let same = compile_with(&traced("0.5"), 2, Some(&first.snapshot)).unwrap();
    assert!(Arc::ptr_eq(
        &tracer,
        same.snapshot.tracing.as_ref().unwrap()
    ));
    let changed = compile_with(&traced("0.25"), 3, Some(&same.snapshot)).unwrap();
    assert!(!Arc::ptr_eq(
        &tracer,
        changed.snapshot.tracing.as_ref().unwrap()
    ));
    let off = compile_with(MINIMAL, 4, Some(&changed.snapshot)).unwrap();
    assert!(off.snapshot.tracing.is_none());
    let errs = errors_of(&traced("2"));
    assert_eq!(errs[0].path, "tracing.sample_ratio");
    assert!(errs[0].line.is_some());
}

#[test]
fn shards_are_a_count_or_auto_within_what_an_upgrade_hands_over() {
    let with = |shards: &str, listeners: &str| {
        format!("server: {{ shards: {shards} }}\nlisteners: [{listeners}]\n{MINIMAL}")
    };
    let one = "{ address: 127.0.0.1:8080 }";
    let c = compile(&with("4", one), 1).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(c.server.shards, Some(Shards::Count(4)));
    let c = compile(&with("auto", one), 1).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(c.server.shards, Some(Shards::Auto));
    for bad in ["0", "-1", "many", "2.5"] {
        let errs = errors_of(&with(bad, one));
        assert_eq!(errs.len(), 1, "{bad}: {errs:?}");
        assert_eq!(errs[0].path, "server.shards", "{bad}: {errs:?}");
    }
    let errs = errors_of(&with("33", one));
    assert_eq!(errs[0].path, "server.shards");
    assert!(errs[0].message.contains("at most 32"), "{errs:?}");
    let errs = errors_of(&with("2", "{ address: 127.0.0.1:0 }"));
    assert!(errs[0].message.contains("port 0"), "{errs:?}");
    // One shard is no sharding: port 0 is fine.
    compile(&with("1", "{ address: 127.0.0.1:0 }"), 1).unwrap_or_else(|e| panic!("{e:?}"));
}

#[test]
fn threads_beside_shards_are_a_warning() {
    let c = compile(
        &format!("server: {{ shards: 2, threads: 4 }}\n{MINIMAL}"),
        1,
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    assert!(
        c.warnings.iter().any(|w| w.starts_with("server.threads")),
        "{:?}",
        c.warnings
    );
}

#[test]
fn the_console_login_names_a_plugin_that_keeps_login_sessions() {
    let pin_hash = gatewarden_plugins::pin_gate::hash_pin("2468").unwrap();
    let config = |console: &str| {
        format!(
            "admin:\n  address: 127.0.0.1:9091\n  console: {console}\nplugins:\n  pin: {{ type: pin_gate, pin_hash: '{pin_hash}', secret: 0123456789abcdef0123456789abcdef, role: admin }}\n  keys: {{ type: api_key, admin_key: an-admin-key-of-some-length }}\n{MINIMAL}"
        )
    };
    let c = compile(
        &config("{ login: pin, login_url: 'https://gw.example.com/.gatewarden/login' }"),
        1,
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    let login = c.snapshot.console_login.expect("a console login");
    assert_eq!(login.name, "pin");
    assert_eq!(
        login.url.as_deref(),
        Some("https://gw.example.com/.gatewarden/login")
    );
    assert!(login.sessions().is_some());
    assert!(c.snapshot.admin_api_key.is_none());

    for (console, message) in [
        ("{ login: ghost }", "no plugin named \"ghost\""),
        ("{ login: keys }", "these do: pin"),
        (
            "{ login: pin, login_url: /.gatewarden/login }",
            "not an http:// or https:// URL",
        ),
        (
            "{ login: pin, login_url: 'ftp://gw.example.com/' }",
            "not an http:// or https:// URL",
        ),
        ("{ logn: pin }", "logn"),
    ] {
        let errs = errors_of(&config(console));
        let found = errs
            .iter()
            .find(|e| e.path.starts_with("admin.console"))
            .unwrap_or_else(|| panic!("{console}: {errs:?}"));
        assert!(found.message.contains(message), "{console}: {found:?}");
        assert_eq!(found.line, Some(3), "{console}: {found:?}");
    }
}
