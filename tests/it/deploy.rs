//! The deployment kit in `deploy/` and the secret scan of CI.
//!
//! * `deploy/compose.yaml` meets the Compose Specification (`check-jsonschema`'s copy of
//!   its schema, offline) and publishes the gateway's proxy port only; the gateway
//!   config it mounts passes `gatewarden check` with the secrets compose provides.
//! * `deploy/kubernetes/`: the kustomization lists every manifest, each one meets the
//!   Kubernetes API's schemas (`kubernetes-validate`, which carries them), the embedded
//!   config passes `gatewarden check`, and the pods run as the image expects. With
//!   `kubectl` installed, the kustomization is also rendered and the result validated.
//! * `scripts/secret-scan.sh` passes on a copy of the tree and fails once a key is
//!   planted in it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::container::{bounded, text};
use crate::harness::*;

/// The Kubernetes release the manifests are validated against.
const KUBERNETES: &str = "1.33.0";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

/// Every document of a multi-document YAML file.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{path:?}: {e}")))
        .collect()
}

/// The port of an `IP:PORT` address.
fn port_of(address: &Value) -> u64 {
    address
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The names of the `${file:DIR/NAME}` references of a config.
fn secret_files(config: &str, dir: &str) -> BTreeSet<String> {
    let marker = format!("${{file:{dir}/");
    config
        .split(&marker)
        .skip(1)
        .map(|rest| rest.split('}').next().unwrap().to_string())
        .collect()
}

/// Runs `gatewarden check` on `config` with its `${file:DIR/...}` secrets made up in a
/// temp dir (in the form each must have) and `env` set; asserts it passes cleanly.
fn check_with_secrets(config: &Path, dir: &str, env: &[(&str, &str)]) {
    let source = std::fs::read_to_string(config).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let names = secret_files(&source, dir);
    assert!(!names.is_empty(), "{config:?} reads no secret from {dir}");
    for name in &names {
        let value = if name.contains("pin_hash") {
            crate::identity::pin_hash().to_string()
        } else {
            // Random-looking, long enough for a session secret and an admin key.
            format!("{name}-made-up-for-the-test-0123456789abcdef\n")
        };
        std::fs::write(tmp.path().join(name), value).unwrap();
    }
    let copy = tmp.path().join("gatewarden.yaml");
    std::fs::write(
        &copy,
        source.replace(&format!("{dir}/"), &format!("{}/", tmp.path().display())),
    )
    .unwrap();
    let out = bounded(
        Command::new(bin())
            .args(["check", "-c"])
            .arg(&copy)
            .envs(env.iter().copied()),
        Duration::from_secs(30),
    );
    let said = text(&out);
    assert!(out.status.success(), "check {config:?}: {said}");
    assert!(
        said.trim().starts_with("ok:") && said.trim().lines().count() == 1,
        "check {config:?} passes with warnings: {said}"
    );
    if let Some(valid) = crate::schema::schema_accepts(&copy) {
        assert!(valid, "{config:?} does not meet the JSON Schema");
    }
}

#[test]
fn the_compose_file_publishes_the_proxy_only_and_its_gateway_config_checks() {
    let dir = repo().join("deploy");
    let compose_file = dir.join("compose.yaml");
    let compose = yaml(&compose_file);
    let config_file = dir.join("gatewarden.compose.yaml");
    let config = yaml(&config_file);

    if let Some(validator) = tool(&["check-jsonschema"]) {
        let out = bounded(
            Command::new(validator)
                .args(["--builtin-schema", "vendor.compose-spec"])
                .arg(&compose_file),
            Duration::from_secs(60),
        );
        assert!(
            out.status.success(),
            "compose.yaml breaks the Compose Specification: {}",
            text(&out)
        );
    }

    let services = compose["services"].as_object().unwrap();
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        BTreeSet::from(["gatewarden", "redis", "litellm", "open-webui"])
    );
    for (name, service) in services {
        if name != "gatewarden" {
            assert!(
                service.get("ports").is_none(),
                "{name} publishes a port: only the gateway may"
            );
        }
    }
    let gateway = &services["gatewarden"];
    let listener = port_of(&config["listeners"][0]["address"]);
    let admin = port_of(&config["admin"]["address"]);
    let published: Vec<&str> = gateway["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(
        published,
        [format!("{listener}:{listener}")],
        "the proxy port, and nothing else"
    );
    assert!(
        !published.iter().any(|p| p.ends_with(&format!(":{admin}"))),
        "the admin port is published"
    );
    assert_eq!(gateway["read_only"], true);
    assert_eq!(gateway["cap_drop"], serde_json::json!(["ALL"]));
    assert_eq!(
        gateway["volumes"][0],
        "./gatewarden.compose.yaml:/etc/gatewarden/gatewarden.yaml:ro"
    );
    // The gateway resolves its backends when it starts: they must be up by then.
    for needed in ["redis", "open-webui", "litellm"] {
        assert!(
            gateway["depends_on"].get(needed).is_some(),
            "gatewarden does not wait for {needed}"
        );
    }

    // Each secret the config reads is a compose secret of the gateway, from a file
    // under secrets/, which git ignores.
    let config_text = std::fs::read_to_string(&config_file).unwrap();
    let wanted = secret_files(&config_text, "/run/secrets");
    let given: BTreeSet<String> = gateway["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    assert_eq!(wanted, given, "the secrets the config reads are mounted");
    for name in &given {
        let file = compose["secrets"][name]["file"].as_str().unwrap();
        assert!(file.starts_with("./secrets/"), "{name} comes from {file}");
    }
    let ignored = std::fs::read_to_string(repo().join(".gitignore")).unwrap();
    for path in ["/deploy/secrets/", "/deploy/.env"] {
        assert!(
            ignored.lines().any(|l| l == path),
            ".gitignore lacks {path}"
        );
    }
    // What the config reads from the environment, compose sets.
    assert!(config_text.contains("${env:LITELLM_MASTER_KEY}"));
    assert!(gateway["environment"].get("LITELLM_MASTER_KEY").is_some());
    // Streams get the config's grace period before compose resorts to SIGKILL.
    let grace = config["server"]["grace_period_seconds"].as_u64().unwrap()
        + config["server"]["graceful_shutdown_timeout_seconds"]
            .as_u64()
            .unwrap();
    let stop: u64 = gateway["stop_grace_period"]
        .as_str()
        .unwrap()
        .trim_end_matches('s')
        .parse()
        .unwrap();
    assert!(stop > grace, "stop_grace_period {stop}s is within {grace}s");

    check_with_secrets(
        &config_file,
        "/run/secrets",
        &[("LITELLM_MASTER_KEY", "sk-made-up-for-the-test")],
    );
}

/// The manifests of the kustomization, by kind and name.
fn manifests(dir: &Path, files: &[String]) -> Vec<Value> {
    files.iter().flat_map(|f| documents(&dir.join(f))).collect()
}

fn find<'a>(all: &'a [Value], kind: &str, name: &str) -> &'a Value {
    all.iter()
        .find(|m| m["kind"] == kind && m["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn the_kubernetes_kit_lists_every_manifest_and_each_one_validates() {
    let dir = repo().join("deploy/kubernetes");
    let kustomization = yaml(&dir.join("kustomization.yaml"));
    let resources: Vec<String> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    let config_files: Vec<String> = kustomization["configMapGenerator"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["files"].as_array().unwrap().iter())
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    assert_eq!(config_files, ["gatewarden.yaml"]);

    // Every YAML file of the directory is the kustomization, the config or a listed
    // manifest: none is forgotten, none listed is missing.
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".yaml"))
        .filter(|n| n != "kustomization.yaml" && !config_files.contains(n))
        .collect();
    let listed: BTreeSet<String> = resources.iter().cloned().collect();
    assert_eq!(on_disk, listed, "kustomization.yaml's resources");
    assert_eq!(listed.len(), resources.len(), "a resource is listed twice");

    if let Some(validator) = tool(&["kubernetes-validate"]) {
        let out = bounded(
            Command::new(validator)
                .args(["--strict", "--kubernetes-version", KUBERNETES])
                .args(&resources)
                .current_dir(&dir),
            Duration::from_secs(120),
        );
        assert!(out.status.success(), "kubernetes-validate: {}", text(&out));
    }

    // The config passes check with the secrets the Secret provides, and those are
    // exactly the files secretGenerator reads, from a directory git ignores.
    let config_file = dir.join("gatewarden.yaml");
    let config_text = std::fs::read_to_string(&config_file).unwrap();
    let config = yaml(&config_file);
    let wanted = secret_files(&config_text, "/run/secrets/gatewarden");
    let generated: BTreeSet<String> = kustomization["secretGenerator"][0]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            f.as_str()
                .unwrap()
                .strip_prefix("secrets/")
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(wanted, generated, "the secrets the config reads");
    let ignored = std::fs::read_to_string(repo().join(".gitignore")).unwrap();
    assert!(ignored.lines().any(|l| l == "/deploy/kubernetes/secrets/"));
    check_with_secrets(&config_file, "/run/secrets/gatewarden", &[]);

    // The pods: as the image expects, probed on the admin port, nothing writable but
    // an emptyDir.
    let all = manifests(&dir, &resources);
    let deployment = find(&all, "Deployment", "gatewarden");
    assert!(deployment["spec"]["replicas"].as_u64().unwrap() >= 2);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let container = &pod["containers"][0];
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["runAsUser"], 65532);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(
        security["capabilities"].get("add").is_none(),
        "no capability is needed above port 1024"
    );
    assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
    assert!(container["resources"]["requests"].is_object());
    assert!(container["resources"]["limits"]["memory"].is_string());
    let port = |name: &str| {
        container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no container port {name}"))["containerPort"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(port("proxy"), port_of(&config["listeners"][0]["address"]));
    assert_eq!(port("admin"), port_of(&config["admin"]["address"]));
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(container[probe]["httpGet"]["path"], "/healthz", "{probe}");
        assert_eq!(container[probe]["httpGet"]["port"], "admin", "{probe}");
    }
    assert_eq!(
        container["args"],
        serde_json::json!(["run", "-c", "/etc/gatewarden/gatewarden.yaml"])
    );
    let mounts = container["volumeMounts"].as_array().unwrap();
    let volumes = pod["volumes"].as_array().unwrap();
    for mount in mounts {
        let volume = volumes.iter().find(|v| v["name"] == mount["name"]).unwrap();
        let writable = mount["readOnly"] != true;
        assert!(
            !writable || volume.get("emptyDir").is_some(),
            "{} is writable and not an emptyDir",
            mount["mountPath"]
        );
    }
    let grace = config["server"]["grace_period_seconds"].as_u64().unwrap()
        + config["server"]["graceful_shutdown_timeout_seconds"]
            .as_u64()
            .unwrap()
        + container["lifecycle"]["preStop"]["sleep"]["seconds"]
            .as_u64()
            .unwrap_or(0);
    assert!(pod["terminationGracePeriodSeconds"].as_u64().unwrap() > grace);

    // The Service carries the proxy port only; the NetworkPolicy opens the proxy port
    // to anyone and the admin port only to listed peers.
    let service = find(&all, "Service", "gatewarden");
    let service_ports: Vec<&Value> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["targetPort"])
        .collect();
    assert_eq!(service_ports, [&Value::from("proxy")]);
    let policy = find(&all, "NetworkPolicy", "gatewarden");
    assert_eq!(
        policy["spec"]["policyTypes"],
        serde_json::json!(["Ingress"])
    );
    let rules = policy["spec"]["ingress"].as_array().unwrap();
    let rule_for = |name: &str| {
        rules
            .iter()
            .find(|r| {
                r["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["port"] == name)
            })
            .unwrap_or_else(|| panic!("no ingress rule for {name}"))
    };
    assert!(rule_for("proxy").get("from").is_none());
    let admin_peers = rule_for("admin")["from"].as_array().unwrap();
    assert!(!admin_peers.is_empty());
    for peer in admin_peers {
        assert!(
            peer.get("ipBlock").is_none() && peer.get("podSelector").is_some(),
            "the admin port is open to {peer}"
        );
    }
    let budget = find(&all, "PodDisruptionBudget", "gatewarden");
    assert_eq!(budget["spec"]["minAvailable"], 1);
    assert_eq!(
        config["redis"]["url"],
        format!(
            "redis://{}:6379/0",
            find(&all, "Service", "redis")["metadata"]["name"]
                .as_str()
                .unwrap()
        )
    );

    render_with_kustomize(&dir, &generated);
}

/// With `kubectl` at hand (it is not a Debian package, so CI may lack it), renders the
/// kustomization, with made-up secret files, and validates what comes out.
fn render_with_kustomize(dir: &Path, secrets: &BTreeSet<String>) {
    let kubectl = Command::new("kubectl")
        .args(["version", "--client"])
        .output();
    if !kubectl.is_ok_and(|o| o.status.success()) {
        eprintln!("skipping `kubectl kustomize`: kubectl is not installed");
        return;
    }
    let Some(validator) = tool(&["kubernetes-validate"]) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("kubernetes");
    std::fs::create_dir_all(copy.join("secrets")).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, copy.join(path.file_name().unwrap())).unwrap();
        }
    }
    for name in secrets {
        std::fs::write(copy.join("secrets").join(name), "made-up\n").unwrap();
    }
    let out = bounded(
        Command::new("kubectl").arg("kustomize").arg(&copy),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "kubectl kustomize: {}", text(&out));
    let rendered = tmp.path().join("rendered.yaml");
    std::fs::write(&rendered, &out.stdout).unwrap();
    let kinds: BTreeSet<String> = documents(&rendered)
        .iter()
        .map(|m| m["kind"].as_str().unwrap().to_string())
        .collect();
    for kind in ["ConfigMap", "Secret", "Deployment", "NetworkPolicy"] {
        assert!(kinds.contains(kind), "kustomize made no {kind}: {kinds:?}");
    }
    let out = bounded(
        Command::new(validator)
            .args(["--strict", "--kubernetes-version", KUBERNETES])
            .arg(&rendered),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "the rendered kit: {}", text(&out));
}

/// The files git tracks (and the untracked ones it does not ignore), as the scan sees
/// the repository.
fn tracked_files() -> Vec<String> {
    let out = bounded(
        Command::new("git")
            .args(["ls-files", "--cached", "--others", "--exclude-standard"])
            .current_dir(repo()),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "git ls-files: {}", text(&out));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn secret_scan(dir: &Path) -> std::process::Output {
    bounded(
        Command::new("bash")
            .arg(repo().join("scripts/secret-scan.sh"))
            .arg(dir),
        Duration::from_secs(300),
    )
}

#[test]
fn the_secret_scan_passes_on_the_tree_and_fails_on_a_planted_key() {
    if tool(&["detect-secrets"]).is_none() || tool(&["git"]).is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for file in tracked_files() {
        let from = repo().join(&file);
        if !from.is_file() {
            continue; // deleted in the work tree, still tracked
        }
        let to = tmp.path().join(&file);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&from, &to).unwrap();
    }
    let out = secret_scan(tmp.path());
    assert!(
        out.status.success(),
        "the scan fails on the tree as it is: {}",
        text(&out)
    );

    // A private key in a new file, and a cloud key added to a file whose test secrets
    // the baseline knows: both are caught, by file.
    // Both are put together at run time, so that this file holds neither.
    let key_block = format!(
        "-----BEGIN {0} PRIVATE KEY-----\n...\n-----END {0} PRIVATE KEY-----\n",
        "RSA"
    );
    std::fs::write(tmp.path().join("deploy/leaked.pem"), key_block).unwrap();
    let fixture = tmp.path().join("tests/it/cli.rs");
    let mut source = std::fs::read_to_string(&fixture).unwrap();
    source.push_str(&format!("// {}{}\n", "AKIA", "IOSFODNN7Q2XW4ZP"));
    std::fs::write(&fixture, source).unwrap();
    let out = secret_scan(tmp.path());
    let said = text(&out);
    assert!(!out.status.success(), "the planted keys passed: {said}");
    assert!(said.contains("deploy/leaked.pem"), "{said}");
    assert!(said.contains("tests/it/cli.rs"), "{said}");
    assert!(
        said.contains("Private Key") && said.contains("AWS Access Key"),
        "{said}"
    );
}
