//! The book (`docs/src/`) and the README, read as a newcomer reads them.
//!
//! * Every complete config in the book or the README, a fenced ```` ```yaml ```` block
//!   with a top-level `routes:` key, passes `gatewarden check` without warnings, set up
//!   as the book tells the reader: each keys file it names made with
//!   `gatewarden key new`, each users file with a user whose hash comes from
//!   `gatewarden hash-pin`, and each `${env:VAR}` it reads set as the configuration
//!   reference's table of variables says. Deliberate fragments are fenced
//!   ```` ```yaml,partial ````; a plain `yaml` block without `routes:` fails the test, so
//!   a fragment cannot pass for a config unchecked.
//! * The ```` ```sh ```` blocks of the README (quick start and tour) and of the
//!   getting-started chapter run in order, as one shell session on a fresh copy of the
//!   repository's `conf/`, with a time bound per command. Blocks fenced
//!   ```` ```sh,norun ```` are not for a fresh clone and are left out.
//!
//! What the runner does differently from a reader, and why:
//!
//! * `gatewarden` is the binary under test (`crate::harness::bin()`, first on `PATH`),
//!   and `cargo run --release -- ARGS` runs it as `gatewarden ARGS`: a release build
//!   would take ten minutes, from the same source. `cargo build --release` is skipped
//!   for the same reason.
//! * `bash scripts/setup.sh` runs as written only under CI (where `scripts/test.sh` ran
//!   it moments before, so this proves it idempotent); elsewhere it is only parsed, so
//!   that a test run never installs packages. `bash scripts/test.sh` is never run (it
//!   runs this test); `.ci/run` must call it.
//! * Nothing leaves loopback or the temp dir: every `127.0.0.1:PORT` (in the commands
//!   and in the copy of `conf/`) moves to a free port, `demo` and `protect` get their
//!   default addresses moved the same way, `/var/lib/gatewarden`, `/var/log/gatewarden`
//!   and `/etc/gatewarden` move into the temp dir, and a leading `sudo` is dropped.
//!   A command that names another host fails the test.
//! * A line ending in `&` is a background job: it is started and its ports must answer
//!   HTTP before the next line runs; `kill %N` stops job N. A server started without
//!   `&` (`cargo run --release -- demo`) is started, probed, and stopped, as Ctrl-C
//!   would. Whatever a block leaves running is stopped when the block ends.
//! * A `curl` line whose comment starts with a status (`# 401: ...`) must get it; a
//!   line whose comment starts with `ok:` must print that text.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fenced code block of a Markdown file.
struct Block {
    /// `file:line` of the opening fence, for messages.
    at: String,
    /// The fence's info string (`yaml`, `yaml,partial`, `sh`...).
    info: String,
    text: String,
}

/// The fenced code blocks of `path`, in order.
fn blocks(path: &Path) -> Vec<Block> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let shown = path
        .strip_prefix(repo())
        .unwrap_or(path)
        .display()
        .to_string();
    let mut found = Vec::new();
    let mut open: Option<(String, Block)> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let fence: String = trimmed
            .chars()
            .take_while(|c| *c == '`' || *c == '~')
            .collect();
        let is_fence = fence.len() >= 3 && fence.chars().all(|c| c == fence.as_bytes()[0] as char);
        match &mut open {
            None if is_fence => {
                open = Some((
                    fence.clone(),
                    Block {
                        at: format!("{shown}:{}", i + 1),
                        info: trimmed[fence.len()..].trim().to_string(),
                        text: String::new(),
                    },
                ));
            }
            None => {}
            Some((opening, _))
                if is_fence
                    && trimmed.trim_end() == fence
                    && fence.as_bytes()[0] == opening.as_bytes()[0]
                    && fence.len() >= opening.len() =>
            {
                found.push(open.take().unwrap().1);
            }
            Some((_, block)) => {
                block.text.push_str(line);
                block.text.push('\n');
            }
        }
    }
    assert!(open.is_none(), "{shown}: a code block is never closed");
    found
}

/// Every chapter of the book, `docs/src/**/*.md`.
fn book_pages() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "md") {
                out.push(path);
            }
        }
    }
    let mut pages = Vec::new();
    walk(&repo().join("docs/src"), &mut pages);
    pages.sort();
    assert!(pages.len() > 10, "the book has chapters: {pages:?}");
    pages
}

/// The YAML a config file holds once comments are left out.
fn active_yaml(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| l.split(" #").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The values of `key:` in the active part of a config (`keys_file`, `users_file`).
fn values_of(yaml: &str, key: &str) -> Vec<String> {
    active_yaml(yaml)
        .lines()
        .filter_map(|l| l.split_once(&format!("{key}:")))
        .map(|(_, v)| {
            v.trim()
                .trim_matches(['"', '\'', ' ', '}', ','])
                .to_string()
        })
        .filter(|v| !v.is_empty())
        .collect()
}

/// The `${env:VAR}` names the active part of a config reads.
fn env_vars(yaml: &str) -> BTreeSet<String> {
    active_yaml(yaml)
        .split("${env:")
        .skip(1)
        .map(|rest| rest.split('}').next().unwrap().to_string())
        .collect()
}

/// The variables the configuration reference's table documents, with a value made as
/// its "how to make it" column says (fixed values here, so failures repeat).
fn documented_variables() -> BTreeMap<String, String> {
    let reference = std::fs::read_to_string(repo().join("docs/src/configuration.md")).unwrap();
    let table = reference
        .split("## Secrets and environment variables")
        .nth(1)
        .expect("configuration.md has a section on environment variables");
    let table = table.split("\n## ").next().unwrap();
    let listed: BTreeSet<String> = table
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_string)
        .collect();
    let made = |name: &str| -> String {
        match name {
            // `gatewarden hash-pin`
            "GATEWARDEN_PIN_HASH" => crate::identity::pin_hash().to_string(),
            // `head -c 32 /dev/urandom | base64`
            "GATEWARDEN_SESSION_SECRET" => "q2d8VXW0c3JmT5y1nQ8hZcJ0m4kR7bE2tYp6uL9sA3w=".into(),
            "GATEWARDEN_OIDC_CLIENT_SECRET" => "the-client-secret-the-provider-shows".into(),
            // `head -c 24 /dev/urandom | base64`
            "GATEWARDEN_ADMIN_KEY" => "mF3kQ9zV1xR7pL2cW8nB5tY0hJ4sD6gA".into(),
            "LITELLM_MASTER_KEY" => "sk-the-litellm-master-key".into(),
            "LLM_API_KEY" => "sk-the-llm-servers-key".into(),
            // `head -c 20 /dev/urandom | base32`
            "GATEWARDEN_TOTP_SECRET" => "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP".into(),
            "GATEWARDEN_OTLP_TOKEN" => "the-collectors-token".into(),
            other => panic!(
                "configuration.md documents ${other}, which this test does not know how to \
                 make: add it here as the table says"
            ),
        }
    };
    let variables: BTreeMap<String, String> = listed
        .iter()
        .map(|name| (name.clone(), made(name)))
        .collect();
    assert!(
        variables.contains_key("GATEWARDEN_PIN_HASH") && variables.len() >= 6,
        "the table of variables was not found in configuration.md: {variables:?}"
    );
    variables
}

/// Where a reader's machine keeps gatewarden's files, and where the tests keep them: the
/// systemd unit's configuration, state and logs directories, under a temp dir.
const SYSTEM_DIRS: [&str; 3] = [
    "/var/lib/gatewarden",
    "/var/log/gatewarden",
    "/etc/gatewarden",
];

fn moved_system_dirs(text: &str, root: &Path) -> String {
    let mut text = text.to_string();
    for dir in SYSTEM_DIRS {
        text = text.replace(dir, &format!("{}/fs{dir}", root.display()));
    }
    text
}

/// Runs `gatewarden ARGS` in `dir` with `env` on top of an environment without any
/// documented variable; bounded in time.
fn gatewarden_in(
    dir: &Path,
    args: &[&str],
    env: &BTreeMap<String, String>,
    cleared: &BTreeMap<String, String>,
) -> (bool, String) {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    for var in cleared.keys() {
        cmd.env_remove(var);
    }
    cmd.envs(env);
    let (ok, out, err) = run_bounded(&mut cmd, Duration::from_secs(30));
    (ok, out + &err)
}

/// Runs a command to its end within `limit`: its success, stdout and stderr.
fn run_bounded(cmd: &mut Command, limit: Duration) -> (bool, String, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    match status {
        Some(status) => (status.success(), out, err),
        None => (
            false,
            out,
            format!("{err}\n(still running after {limit:?}: killed)"),
        ),
    }
}

#[test]
fn every_complete_config_in_the_book_passes_check() {
    let variables = documented_variables();
    let mut pages = book_pages();
    pages.push(repo().join("README.md"));
    let mut checked = 0;
    let mut failures = Vec::new();
    for page in &pages {
        for block in blocks(page) {
            if block.info != "yaml" {
                continue;
            }
            assert!(
                block.text.lines().any(|l| l.starts_with("routes:")),
                "{}: a ```yaml block without `routes:` is not a whole config; fence a \
                 fragment as ```yaml,partial",
                block.at
            );
            checked += 1;
            if let Err(why) = check_as_the_book_says(&block, &variables) {
                failures.push(why);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} configs in the book fail:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    assert!(
        checked >= 8,
        "only {checked} complete configs found in the book"
    );
}

/// Writes `block` to a temp dir set up as the book says, and runs `gatewarden check`.
fn check_as_the_book_says(
    block: &Block,
    variables: &BTreeMap<String, String>,
) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for sub in SYSTEM_DIRS {
        std::fs::create_dir_all(root.join("fs").join(&sub[1..])).unwrap();
    }
    // Relative paths (`conf/theme.css`) resolve against the working directory: the
    // repository's root, as in the book's commands.
    copy_conf(&repo().join("conf"), &root.join("conf"), &|t| t.to_string());
    let yaml = moved_system_dirs(&block.text, root);
    for keys in values_of(&yaml, "keys_file") {
        let out = run_cli(
            &[
                "key", "new", "--file", &keys, "--name", "ops", "--role", "admin",
            ],
            root,
        );
        if !out.status.success() {
            return Err(format!(
                "{}: `gatewarden key new --file {keys}`: {out:?}",
                block.at
            ));
        }
    }
    for users in values_of(&yaml, "users_file") {
        std::fs::write(
            root.join(&users),
            format!("alice:{}\n", crate::identity::pin_hash()),
        )
        .unwrap();
    }
    assert!(
        values_of(&yaml, "public_key_file").is_empty() && values_of(&yaml, "cert_file").is_empty(),
        "{}: this test does not make key or certificate files; keep such configs partial",
        block.at
    );
    let mut env = BTreeMap::new();
    for var in env_vars(&yaml) {
        let Some(value) = variables.get(&var) else {
            return Err(format!(
                "{}: reads ${{env:{var}}}, which the table of variables in \
                 configuration.md does not document",
                block.at
            ));
        };
        env.insert(var, value.clone());
    }
    std::fs::write(root.join("book.yaml"), &yaml).unwrap();
    if crate::schema::schema_accepts(&root.join("book.yaml")) == Some(false) {
        return Err(format!(
            "{}: does not meet schema/gatewarden.schema.json",
            block.at
        ));
    }
    let (ok, output) = gatewarden_in(root, &["check", "-c", "book.yaml"], &env, variables);
    if !ok || !output.contains("ok: ") {
        return Err(format!("{}: gatewarden check fails:\n{output}", block.at));
    }
    if output.contains("warning:") {
        return Err(format!("{}: gatewarden check warns:\n{output}", block.at));
    }
    Ok(())
}

/// Copies the files of `from` into `to`, YAML files passed through `edit`.
fn copy_conf(from: &Path, to: &Path, edit: &dyn Fn(&str) -> String) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let text = std::fs::read_to_string(&path).unwrap();
            std::fs::write(to.join(name), edit(&text)).unwrap();
        } else if path.is_file() {
            std::fs::copy(&path, to.join(name)).unwrap();
        }
    }
}

#[test]
fn the_readme_quick_start_and_tour_run_on_a_fresh_clone() {
    let readme = repo().join("README.md");
    let all: String = blocks(&readme)
        .iter()
        .filter(|b| b.info == "sh")
        .map(|b| b.text.as_str())
        .collect();
    for shown in [
        "bash scripts/setup.sh",
        "bash scripts/test.sh",
        "gatewarden demo",
        "gatewarden protect",
        "gatewarden run -c conf/",
    ] {
        assert!(all.contains(shown), "the README's commands lack `{shown}`");
    }
    run_page(&readme);
}

#[test]
fn the_getting_started_commands_run_on_a_fresh_clone() {
    run_page(&repo().join("docs/src/getting-started.md"));
}

/// Runs the ```sh blocks of `page` in order, as one shell session.
fn run_page(page: &Path) {
    if tool(&["curl"]).is_none() || tool(&["python3"]).is_none() {
        return;
    }
    let sh: Vec<Block> = blocks(page)
        .into_iter()
        .filter(|b| b.info == "sh")
        .collect();
    assert!(!sh.is_empty(), "{page:?} has no ```sh block to run");
    let mut session = Session::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    for block in &sh {
        for (at, line) in logical_lines(block) {
            assert!(
                Instant::now() < deadline,
                "the commands of {page:?} take over ten minutes"
            );
            session.run_line(&at, &line);
        }
        // The reader closes the terminal: what the block started stops.
        session.jobs.clear();
    }
}

/// The commands of a block, continuation lines joined, with where each starts.
fn logical_lines(block: &Block) -> Vec<(String, String)> {
    let (file, first) = block.at.rsplit_once(':').unwrap();
    let first: usize = first.parse().unwrap();
    let mut lines = Vec::new();
    let mut current = String::new();
    let mut start = 0;
    for (i, line) in block.text.lines().enumerate() {
        if current.is_empty() {
            start = first + 1 + i;
        }
        match line.strip_suffix('\\') {
            Some(head) => current.push_str(head),
            None => {
                current.push_str(line);
                lines.push((format!("{file}:{start}"), std::mem::take(&mut current)));
            }
        }
    }
    lines
}

/// A command and its comment, split where a `#` after a space (or at the start) begins
/// one outside quotes.
fn split_comment(line: &str) -> (&str, &str) {
    let (mut single, mut double) = (false, false);
    let mut previous = ' ';
    for (i, c) in line.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && previous.is_whitespace() => {
                return (line[..i].trim(), line[i + 1..].trim());
            }
            _ => {}
        }
        previous = c;
    }
    (line.trim(), "")
}

/// One reader's shell: its environment, its background jobs, and the temp dir that
/// stands for the fresh clone and the machine's system directories.
struct Session {
    dir: tempfile::TempDir,
    env: BTreeMap<String, String>,
    /// Port in the docs -> port this test uses.
    ports: BTreeMap<u16, u16>,
    /// Background jobs by job number.
    jobs: BTreeMap<usize, Process>,
}

impl Session {
    fn new() -> Session {
        let dir = tempfile::tempdir().unwrap();
        let shim = dir.path().join("bin");
        std::fs::create_dir_all(&shim).unwrap();
        std::os::unix::fs::symlink(bin(), shim.join("gatewarden")).unwrap();
        let mut env: BTreeMap<String, String> = std::env::vars().collect();
        for var in documented_variables().keys() {
            env.remove(var);
        }
        env.remove("RUST_LOG");
        let path = env.get("PATH").cloned().unwrap_or_default();
        env.insert("PATH".into(), format!("{}:{path}", shim.display()));
        let mut session = Session {
            dir,
            env,
            ports: BTreeMap::new(),
            jobs: BTreeMap::new(),
        };
        // The fresh clone's conf/, on this test's ports and directories.
        let root = session.root();
        let ports = std::cell::RefCell::new(BTreeMap::new());
        copy_conf(&repo().join("conf"), &root.join("conf"), &|text| {
            moved_system_dirs(&remap_ports(text, &mut ports.borrow_mut()), &root)
        });
        session.ports = ports.into_inner();
        session
    }

    fn root(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// The port this test uses for `port` of the docs.
    fn port(&mut self, port: u16) -> u16 {
        *self.ports.entry(port).or_insert_with(free_port)
    }

    fn run_line(&mut self, at: &str, line: &str) {
        let (command, comment) = split_comment(line);
        if command.is_empty() {
            return;
        }
        for part in command.split(" && ") {
            self.run_command(at, part.trim(), comment);
        }
    }

    fn run_command(&mut self, at: &str, command: &str, comment: &str) {
        let (command, background) = match command.strip_suffix('&') {
            Some(c) if !c.ends_with('&') => (c.trim(), true),
            _ => (command, false),
        };
        let command = command.strip_prefix("sudo ").unwrap_or(command);
        let command = match command.strip_prefix("cargo run --release -- ") {
            Some(args) => format!("gatewarden {args}"),
            None => command.to_string(),
        };
        match command.as_str() {
            "cargo build --release" => return,
            "bash scripts/test.sh" => {
                let ci = std::fs::read_to_string(repo().join(".ci/run")).unwrap();
                assert!(
                    ci.lines().any(|l| l.trim() == "bash scripts/test.sh"),
                    "{at}: the test command is not what .ci/run calls"
                );
                return;
            }
            "bash scripts/setup.sh" => return self.setup(at),
            _ => {}
        }
        if let Some(jobs) = command.strip_prefix("kill ") {
            for job in jobs.split_whitespace() {
                let n: usize = job
                    .strip_prefix('%')
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("{at}: `kill {jobs}`: only %N jobs are run"));
                assert!(self.jobs.remove(&n).is_some(), "{at}: no job %{n}");
            }
            return;
        }
        let command = self.on_this_machine(at, &command);
        // The transcript, shown with a failure (or with --nocapture).
        eprintln!("{at}: $ {command}{}", if background { " &" } else { "" });
        let server = ["gatewarden demo", "gatewarden protect", "gatewarden run"]
            .iter()
            .any(|s| command.starts_with(s))
            || command.starts_with("python3 -m http.server");
        if background || server {
            let process = self.start(at, &command);
            if background {
                let n = self.jobs.keys().max().map_or(1, |n| n + 1);
                self.jobs.insert(n, process);
            }
            // A server started in the foreground runs until Ctrl-C: it has answered.
            return;
        }
        self.run_to_end(at, &command, comment);
    }

    /// `bash scripts/setup.sh`: run for real under CI only (see the module doc).
    fn setup(&mut self, at: &str) {
        let script = repo().join("scripts/setup.sh");
        if std::env::var_os("CI").is_none() {
            let (ok, _, err) = run_bounded(
                Command::new("bash").arg("-n").arg(&script),
                Duration::from_secs(10),
            );
            assert!(ok, "{at}: scripts/setup.sh does not parse:\n{err}");
            eprintln!("{at}: bash scripts/setup.sh: only parsed outside CI");
            return;
        }
        eprintln!("{at}: $ bash scripts/setup.sh");
        let (ok, out, err) = run_bounded(
            Command::new("bash")
                .arg(&script)
                .current_dir(repo())
                .stdin(Stdio::null()),
            Duration::from_secs(600),
        );
        assert!(ok, "{at}: bash scripts/setup.sh failed:\n{out}{err}");
    }

    /// The command on this test's ports and directories; fails on any other host.
    fn on_this_machine(&mut self, at: &str, command: &str) -> String {
        let mut command = remap_ports(command, &mut self.ports);
        if let Some(rest) = command.strip_prefix("python3 -m http.server ") {
            let (port, rest) = rest.split_once(' ').unwrap_or((rest, ""));
            let port: u16 = port
                .parse()
                .unwrap_or_else(|_| panic!("{at}: http.server without a port"));
            command = format!("python3 -m http.server {} {rest}", self.port(port));
        }
        if command.starts_with("gatewarden demo") || command.starts_with("gatewarden protect") {
            if !command.contains("--listen") {
                command = format!("{command} --listen 127.0.0.1:{}", self.port(8080));
            }
            if command.starts_with("gatewarden demo") && !command.contains("--admin") {
                command = format!("{command} --admin 127.0.0.1:{}", self.port(9091));
            }
        }
        for (i, _) in command.match_indices("://") {
            let host: String = command[i + 3..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
                .collect();
            assert!(
                host == "127.0.0.1" || host == "localhost",
                "{at}: `{command}` reaches {host}; the docs' runnable commands stay on loopback"
            );
        }
        assert!(
            !command.contains("0.0.0.0"),
            "{at}: `{command}` listens beyond loopback"
        );
        moved_system_dirs(&command, &self.root())
    }

    /// Starts a server and waits until every loopback port it names (or its config
    /// names) answers HTTP.
    fn start(&mut self, at: &str, command: &str) -> Process {
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(format!("exec {command}"))
            .current_dir(self.root())
            .env_clear()
            .envs(&self.env)
            .stdin(Stdio::null());
        let mut process = Process::spawn_command(&mut cmd);
        let mut ports = loopback_ports(command);
        if let Some(file) = command.split_whitespace().skip_while(|w| *w != "-c").nth(1) {
            let text = std::fs::read_to_string(self.root().join(file))
                .unwrap_or_else(|e| panic!("{at}: {file}: {e}"));
            ports.extend(loopback_ports(&active_yaml(&text)));
        }
        if let Some(port) = command
            .strip_prefix("python3 -m http.server ")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|p| p.parse().ok())
        {
            ports.insert(port);
        }
        assert!(!ports.is_empty(), "{at}: `{command}`: on which port?");
        for port in ports {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            poll_until(
                &format!("{at}: `{command}` to answer on {addr}"),
                Duration::from_secs(30),
                || {
                    assert!(
                        !process.exited(),
                        "{at}: `{command}` exited:\n{}",
                        process.output()
                    );
                    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                },
            );
            let answer = raw(
                addr,
                "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            );
            assert!(
                answer.is_ok(),
                "{at}: `{command}` does not answer HTTP on {addr}: {answer:?}\n{}",
                process.output()
            );
        }
        process
    }

    /// Runs a command to its end in the session's shell, keeping what it exports.
    fn run_to_end(&mut self, at: &str, command: &str, comment: &str) {
        let expected_status: Option<u16> = comment
            .get(..3)
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse().ok())
            .filter(|_| command.starts_with("curl ") && !command.contains('|'));
        let run = match expected_status {
            Some(_) => format!("{command} --write-out '\\n%{{http_code}}'"),
            None => command.to_string(),
        };
        let env_file = self.dir.path().join("env");
        let script = format!(
            "set -a\n{run}\nstatus=$?\nenv -0 > '{}'\nexit $status\n",
            env_file.display()
        );
        let (ok, stdout, stderr) = run_bounded(
            Command::new("bash")
                .arg("-c")
                .arg(script)
                .current_dir(self.root())
                .env_clear()
                .envs(&self.env)
                .stdin(Stdio::null()),
            Duration::from_secs(120),
        );
        let output = format!("{stdout}{stderr}");
        assert!(ok, "{at}: `{command}` failed:\n{output}");
        let env = std::fs::read(&env_file).unwrap();
        self.env = env
            .split(|b| *b == 0)
            .filter_map(|kv| std::str::from_utf8(kv).ok()?.split_once('='))
            .filter(|(k, _)| !["_", "PWD", "OLDPWD", "SHLVL", "status"].contains(k))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let Some(status) = expected_status {
            // `--write-out` puts the status on the last line of stdout.
            let got = stdout
                .lines()
                .last()
                .and_then(|l| l.trim().parse::<u16>().ok());
            assert_eq!(
                got,
                Some(status),
                "{at}: `{command}` should answer {status}:\n{output}"
            );
        }
        if let Some(text) = comment.strip_prefix("ok:").map(|t| format!("ok:{t}")) {
            assert!(
                output.contains(&text),
                "{at}: `{command}` should print `{text}`:\n{output}"
            );
        }
    }
}

/// Every `127.0.0.1:PORT` and `localhost:PORT` of `text` moved to this test's ports.
fn remap_ports(text: &str, ports: &mut BTreeMap<u16, u16>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let next = ["127.0.0.1:", "localhost:"]
            .iter()
            .filter_map(|p| rest.find(p).map(|i| (i, p.len())))
            .min();
        let Some((i, len)) = next else {
            out.push_str(rest);
            return out;
        };
        out.push_str(&rest[..i + len]);
        rest = &rest[i + len..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if let Ok(port) = digits.parse::<u16>() {
            let mapped = *ports.entry(port).or_insert_with(free_port);
            out.push_str(&mapped.to_string());
            rest = &rest[digits.len()..];
        }
    }
}

/// The ports of every `127.0.0.1:PORT` in `text`.
fn loopback_ports(text: &str) -> BTreeSet<u16> {
    text.match_indices("127.0.0.1:")
        .filter_map(|(i, p)| {
            text[i + p.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .ok()
        })
        .collect()
}

#[test]
fn the_runner_reads_commands_as_a_shell_would() {
    assert_eq!(
        split_comment("curl -i http://127.0.0.1:8080/   # 401: no key"),
        ("curl -i http://127.0.0.1:8080/", "401: no key")
    );
    assert_eq!(
        split_comment(r#"export X="$(echo '#1' | wc -c)"  # count"#),
        (r#"export X="$(echo '#1' | wc -c)""#, "count")
    );
    assert_eq!(
        split_comment("curl http://h/#frag"),
        ("curl http://h/#frag", "")
    );
    let mut ports = BTreeMap::new();
    let moved = remap_ports("a 127.0.0.1:8080 b localhost:8080/x 127.0.0.1:", &mut ports);
    let p = ports[&8080];
    assert_eq!(
        moved,
        format!("a 127.0.0.1:{p} b localhost:{p}/x 127.0.0.1:")
    );
    assert_eq!(loopback_ports(&moved), BTreeSet::from([p]), "{moved}");
}
