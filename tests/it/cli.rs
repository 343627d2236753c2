//! The command line: check, version, run's exit codes.

use crate::harness::*;

#[test]
fn check_accepts_a_good_config_and_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("g.yaml"), simple_config("127.0.0.1:9".parse().unwrap(), "")
            .replace("{listen}", "127.0.0.1:8080")
            .replace("{admin}", "127.0.0.1:9091")).unwrap();
    let out = run_cli(&["check", "-c", "g.yaml"], dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("ok: 1 routes, 1 upstreams, 0 plugins"), "{stdout}");
}
