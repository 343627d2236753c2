//! The container image: the Dockerfile's runtime stage, built by
//! `scripts/container-image.sh` around the binary under test (no base image is pulled),
//! then run with podman as an orchestrator would: read-only root, published ports.
//!
//! Podman runs here with `--runtime runc` and explicit `--ulimit`s: inside a sandbox
//! without `CAP_SYS_RESOURCE` and with hybrid cgroups (as on the CI machines), crun
//! refuses hybrid cgroups and both runtimes fail to raise the default limits. Neither
//! flag changes what is tested.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `cmd` to its end; panics if it takes longer than `limit`.
pub(crate) fn bounded(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

pub(crate) fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

/// Everything the test made in podman's storage, removed on drop.
struct Podman {
    podman: PathBuf,
    image: String,
    container: String,
    volume: String,
}

impl Podman {
    fn run(&self, args: &[&str]) -> Output {
        bounded(
            Command::new(&self.podman).args(args),
            Duration::from_secs(120),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "podman {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `podman run` with the options every run here needs, then `args`.
    fn run_image(&self, args: &[&str]) -> Output {
        let nofile = hard_limit("Max open files");
        let mut all = vec![
            "--runtime".to_string(),
            "runc".into(),
            "run".into(),
            "--read-only".into(),
            "--ulimit".into(),
            format!("nofile={nofile}:{nofile}"),
            "--ulimit".into(),
            "nproc=4096:4096".into(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        self.run(&all)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run(&["rm", "--force", "--time", "0", &self.container]);
        let _ = self.run(&["volume", "rm", "--force", &self.volume]);
        let _ = self.run(&["image", "unmount", &self.image]);
        let _ = self.run(&["rmi", "--force", &self.image]);
    }
}

/// This process's hard limit named `what` in /proc/self/limits (the most a container
/// started from here may get).
fn hard_limit(what: &str) -> String {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with(what))
        .unwrap_or_else(|| panic!("no {what} in /proc/self/limits"));
    let hard = line[what.len()..].split_whitespace().nth(1).unwrap();
    if hard == "unlimited" {
        "-1".to_string()
    } else {
        hard.to_string()
    }
}

/// The value of the first instruction `name` in the Dockerfile's last stage.
fn runtime_instruction(name: &str) -> String {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let stage = dockerfile.rsplit("\nFROM ").next().unwrap();
    stage
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("the Dockerfile's runtime stage has no {name}"))
        .trim()
        .to_string()
}

/// The files (not directories) under `root`, as absolute paths inside it.
fn files_under(root: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                walk(root, &path, out);
            } else {
                out.insert(format!("/{}", path.strip_prefix(root).unwrap().display()));
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

/// The absolute paths `ldd` lists for the binary under test.
fn ldd_closure() -> BTreeSet<String> {
    let out = bounded(Command::new("ldd").arg(bin()), Duration::from_secs(30));
    assert!(out.status.success(), "ldd: {}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|t| t.starts_with('/'))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_image_runs_as_nonroot_on_a_read_only_root_and_answers_healthz() {
    let Some(podman) = tool(&["podman"]) else {
        return;
    };
    let Some(_runc) = tool(&["runc"]) else {
        return;
    };
    let id = std::process::id();
    let podman = Podman {
        podman,
        image: format!("localhost/gatewarden-test:{id}"),
        container: format!("gatewarden-test-{id}"),
        volume: format!("gatewarden-test-{id}"),
    };

    // Build: the script prints the tag it built.
    let out = bounded(
        Command::new("bash")
            .arg(repo().join("scripts/container-image.sh"))
            .arg(bin())
            .arg(&podman.image),
        Duration::from_secs(300),
    );
    assert!(out.status.success(), "container-image.sh: {}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), podman.image);

    // The image's settings are the Dockerfile's runtime stage.
    let config: serde_json::Value = serde_json::from_str(&podman.ok(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config}}",
        &podman.image,
    ]))
    .unwrap();
    assert_eq!(config["User"], "65532:65532");
    assert_eq!(config["User"], runtime_instruction("USER"));
    let exposed: BTreeSet<String> = config["ExposedPorts"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(
        exposed,
        BTreeSet::from(["8080/tcp".to_string(), "9091/tcp".to_string()]),
        "only the proxy and admin ports"
    );
    let as_json = |v: &serde_json::Value| serde_json::to_string(v).unwrap();
    assert_eq!(
        as_json(&config["Entrypoint"]),
        runtime_instruction("ENTRYPOINT").replace(", ", ",")
    );
    assert_eq!(
        as_json(&config["Cmd"]),
        r#"["run","-c","/etc/gatewarden/gatewarden.yaml"]"#
    );
    assert_eq!(
        as_json(&config["Cmd"]),
        runtime_instruction("CMD").replace(", ", ",")
    );
    assert_eq!(config["WorkingDir"], runtime_instruction("WORKDIR"));

    // Its files: the binary, the libraries ldd lists and the user database, nothing
    // else (the CA bundle when the host has one).
    let root = PathBuf::from(podman.ok(&["image", "mount", &podman.image]));
    let mut expected = ldd_closure();
    expected.extend(
        [
            "/usr/local/bin/gatewarden",
            "/etc/passwd",
            "/etc/group",
            "/etc/ssl/certs/ca-certificates.crt",
        ]
        .map(str::to_string),
    );
    let found = files_under(&root);
    podman.ok(&["image", "unmount", &podman.image]);
    let unexpected: Vec<_> = found.difference(&expected).collect();
    assert!(
        unexpected.is_empty(),
        "files nobody asked for: {unexpected:?}"
    );
    for needed in ldd_closure()
        .iter()
        .chain(["/usr/local/bin/gatewarden".to_string()].iter())
    {
        assert!(found.contains(needed), "{needed} is missing from the image");
    }

    // Run it as an orchestrator would: read-only root, a mounted config, the two ports
    // published on loopback.
    let dir = tempfile::tempdir().unwrap();
    let config_file = dir.path().join("gatewarden.yaml");
    std::fs::write(
        &config_file,
        "listeners:\n  - address: 0.0.0.0:8080\nadmin:\n  address: 0.0.0.0:9091\n\
         upstreams:\n  app: { backends: ['127.0.0.1:9'] }\n\
         routes:\n  - { name: app, match: { path_prefix: / }, access: public, upstream: app }\n",
    )
    .unwrap();
    let (proxy_port, admin_port) = (free_port(), free_port());
    let out = podman.run_image(&[
        "--detach",
        "--name",
        &podman.container,
        "--publish",
        &format!("127.0.0.1:{proxy_port}:8080"),
        "--publish",
        &format!("127.0.0.1:{admin_port}:9091"),
        "--volume",
        &format!(
            "{}:/etc/gatewarden/gatewarden.yaml:ro",
            config_file.display()
        ),
        &podman.image,
    ]);
    assert!(out.status.success(), "podman run: {}", text(&out));

    for port in [proxy_port, admin_port] {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        poll_until(
            &format!("/healthz through the published port {port}"),
            Duration::from_secs(20),
            || {
                raw(
                    addr,
                    "GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
                )
                .is_ok_and(|r| r.status == 200 && r.json()["status"] == "ok")
            },
        );
    }

    // The gateway process (the container's first process) runs as 65532, real and
    // effective ids alike.
    let pid = podman.ok(&["inspect", "--format", "{{.State.Pid}}", &podman.container]);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    for field in ["Uid:", "Gid:"] {
        let ids: Vec<&str> = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .unwrap()
            .split_whitespace()
            .collect();
        assert_eq!(ids, ["65532"; 4], "{field} of the gateway process");
    }

    // Nothing can write to the root filesystem, not even root in the container: the
    // kernel answers EROFS, not a permission error.
    for (user, file) in [
        ("65532", "/probe.yaml"),
        ("0", "/probe.yaml"),
        ("0", "/etc/gatewarden/probe.yaml"),
    ] {
        let out = podman.run(&[
            "exec",
            "--user",
            user,
            &podman.container,
            "/usr/local/bin/gatewarden",
            "key",
            "new",
            "--file",
            file,
            "--name",
            "probe",
        ]);
        assert!(!out.status.success(), "{file} was written as {user}");
        assert!(
            text(&out).contains("Read-only file system"),
            "writing {file} as {user}: {}",
            text(&out)
        );
    }

    // SIGTERM from `podman stop` is a graceful stop: an idle gateway exits at once,
    // with status 0, long before podman would resort to SIGKILL.
    let started = Instant::now();
    podman.ok(&["stop", "--time", "30", &podman.container]);
    assert!(started.elapsed() < Duration::from_secs(15), "stop was slow");
    let code = podman.ok(&[
        "inspect",
        "--format",
        "{{.State.ExitCode}}",
        &podman.container,
    ]);
    assert_eq!(code, "0");

    // A volume at /var/lib/gatewarden is writable by the gateway: the image's empty
    // directory there is owned by 65532, and a new volume takes its owner from it.
    podman.ok(&["volume", "create", &podman.volume]);
    let state = format!("{}:/var/lib/gatewarden", podman.volume);
    let keys = |command: &[&str]| {
        let mut args = vec!["--rm", "--volume", &state, &podman.image, "key"];
        args.extend_from_slice(command);
        args.extend_from_slice(&["--file", "/var/lib/gatewarden/keys.yaml"]);
        let out = podman.run_image(&args);
        assert!(out.status.success(), "key {command:?}: {}", text(&out));
        text(&out)
    };
    keys(&["new", "--name", "probe"]);
    let listed = keys(&["list"]);
    assert!(
        listed.contains("probe"),
        "the key made a moment ago: {listed}"
    );
}
