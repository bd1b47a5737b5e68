//! The first hour, as written. A reader pastes the README's tour, `tollgate dev`'s banner,
//! and the walkthroughs of docs/cluster.md, docs/control-plane.md, docs/metering.md,
//! docs/spec.md and docs/llm.md into a fresh shell, in order, after the README's two
//! commands; these tests do exactly that and check every command succeeds.
//!
//! Each test works in a fresh temporary directory that looks like the repository to the
//! commands (`docs/` is the repository's; `target/release/tollgate` is the binary under
//! test), with a clean environment (`PATH=/usr/bin:/bin`, a fresh `HOME`, nothing else).
//! The README's first command, `cargo run --release -- dev`, is the one thing replaced:
//! the test starts that binary's `dev` itself. The commands use the documented fixed ports,
//! so nextest runs these tests one at a time (`.config/nextest.toml`).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// The ```sh blocks of a markdown file, in order, after the heading `from` (all when None).
fn sh_blocks(file: &str, from: Option<&str>) -> Vec<String> {
    let text = std::fs::read_to_string(Path::new(REPO).join(file)).expect("read the doc");
    let text = match from {
        Some(h) => {
            let at = text
                .find(h)
                .unwrap_or_else(|| panic!("{file} has no {h:?}"));
            &text[at..]
        }
        None => &text[..],
    };
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let fence = line.trim_start();
        match &mut current {
            None if fence.starts_with("```sh") => current = Some(String::new()),
            Some(block) if fence.starts_with("```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            Some(block) => {
                block.push_str(line.trim_start());
                block.push('\n');
            }
            None => {}
        }
    }
    blocks
}

/// A block's commands: lines joined across a trailing `\`, blank and comment lines left out.
fn commands(block: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut pending = String::new();
    for line in block.lines() {
        if pending.is_empty() && (line.trim().is_empty() || line.trim_start().starts_with('#')) {
            continue;
        }
        pending.push_str(line);
        if line.ends_with('\\') {
            pending.push('\n');
        } else {
            out.push(std::mem::take(&mut pending));
        }
    }
    assert!(
        pending.is_empty(),
        "a block ends inside a command: {pending}"
    );
    out
}

fn all_commands(blocks: &[String]) -> Vec<String> {
    blocks.iter().flat_map(|b| commands(b)).collect()
}

/// What one command did.
#[derive(Debug)]
struct Outcome {
    command: String,
    rc: Option<i32>,
    output: String,
}

/// A reader's working directory and the `tollgate dev` they started. One at a time: the
/// commands use the documented fixed ports (nextest runs each test in a process of its
/// own, and a test group keeps them apart; `cargo test` runs them as threads of one
/// process, and this lock does).
struct Reader {
    dir: PathBuf,
    dev: Option<Child>,
    _turn: std::sync::MutexGuard<'static, ()>,
}

static FIXED_PORTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Reader {
    fn new(name: &str) -> Reader {
        // A test that failed while holding the turn has said so; the next one may go.
        let turn = FIXED_PORTS.lock().unwrap_or_else(|e| e.into_inner());
        let dir = std::env::temp_dir().join(format!("tollgate-tour-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("target/release")).expect("create the reader's dir");
        std::os::unix::fs::symlink(Path::new(REPO).join("docs"), dir.join("docs"))
            .expect("link docs");
        std::os::unix::fs::symlink(BIN, dir.join("target/release/tollgate"))
            .expect("link the binary");
        std::fs::create_dir_all(dir.join("home")).expect("create HOME");
        Reader {
            dir,
            dev: None,
            _turn: turn,
        }
    }

    /// A command with the reader's clean environment, in the reader's directory.
    fn clean(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.current_dir(&self.dir)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", self.dir.join("home"))
            .env("LANG", "C.UTF-8");
        c
    }

    /// `cargo run --release -- dev`, in the background: returns once the banner is out.
    fn start_dev(&mut self) -> String {
        assert!(self.dev.is_none(), "dev already runs");
        let out = std::fs::File::create(self.dir.join("dev.out")).unwrap();
        let err = std::fs::File::create(self.dir.join("dev.err")).unwrap();
        let child = self
            .clean(BIN)
            .arg("dev")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start tollgate dev");
        self.dev = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let err = self.dev_stderr();
            if err.contains("Ctrl-C stops") {
                return err;
            }
            if let Some(status) = self.dev.as_mut().unwrap().try_wait().unwrap() {
                panic!("tollgate dev exited ({status}):\n{err}");
            }
            assert!(Instant::now() < deadline, "no banner within 60 s:\n{err}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn dev_stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("dev.err")).unwrap_or_default()
    }

    /// Ctrl-C, as the reader stops it; returns everything it wrote to stderr.
    fn stop_dev(&mut self) -> String {
        let mut child = self.dev.take().expect("dev runs");
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "dev exited with {status}:\n{}",
                    self.dev_stderr()
                );
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("dev did not stop within 30 s of Ctrl-C");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.dev_stderr()
    }

    /// Runs `commands` in one fresh bash, one after the other as pasted (no `set -e`: each
    /// command's exit status is recorded); everything the shell started is stopped after.
    fn run(&self, commands: &[String], timeout: Duration) -> Vec<Outcome> {
        let mut script = String::from("exec 2>&1 </dev/null\n");
        for (i, c) in commands.iter().enumerate() {
            script.push_str(&format!(
                "printf '\\n@@BEGIN {i}@@\\n'\n{c}\nprintf '\\n@@END {i} %s@@\\n' \"$?\"\n"
            ));
        }
        let path = self.dir.join(format!("script-{}.sh", commands.len()));
        std::fs::write(&path, script).unwrap();
        let mut child = self
            .clean("/bin/bash")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start bash");
        let group = child.id();
        let mut stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = stdout.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        });
        let deadline = Instant::now() + timeout;
        let finished = loop {
            if child.try_wait().unwrap().is_some() {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // Whatever the commands left running (background nodes) goes with the group.
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{group}")])
            .status();
        let _ = child.kill();
        let _ = child.wait();
        let output = reader.join().unwrap();
        std::fs::write(self.dir.join("tour.log"), &output).unwrap();
        assert!(
            finished,
            "the commands did not finish within {timeout:?}:\n{output}"
        );
        parse(commands, &output)
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        if let Some(mut child) = self.dev.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if !std::thread::panicking() && std::env::var_os("TOUR_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn parse(commands: &[String], output: &str) -> Vec<Outcome> {
    commands
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let begin = format!("@@BEGIN {i}@@\n");
            let body = output
                .split_once(&begin)
                .map(|(_, rest)| rest)
                .unwrap_or_default();
            let end = format!("\n@@END {i} ");
            let (text, rc) = match body.split_once(&end) {
                Some((text, rest)) => (
                    text.to_string(),
                    rest.split("@@").next().and_then(|n| n.trim().parse().ok()),
                ),
                None => (body.to_string(), None),
            };
            Outcome {
                command: c.clone(),
                rc,
                output: text,
            }
        })
        .collect()
}

/// Every command exited 0; the failures are listed with their output.
fn assert_all_succeeded(outcomes: &[Outcome]) {
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|o| o.rc != Some(0))
        .map(|o| format!("$ {}\n(exit {:?})\n{}", o.command, o.rc, o.output))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} commands failed:\n\n{}",
        failed.len(),
        outcomes.len(),
        failed.join("\n\n")
    );
}

/// The output of the first command containing `needle`.
fn output_of<'a>(outcomes: &'a [Outcome], needle: &str) -> &'a str {
    &outcomes
        .iter()
        .find(|o| o.command.contains(needle))
        .unwrap_or_else(|| panic!("no command contains {needle:?}"))
        .output
}

/// No log line at WARN or ERROR (a normal start, join, restart or shutdown has none).
fn assert_quiet(what: &str, log: &str) {
    let loud: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(
        loud.is_empty(),
        "{what} logged warnings or errors:\n{}",
        loud.join("\n")
    );
    assert!(
        !log.contains('\u{1b}'),
        "{what} wrote ANSI colour codes to a file"
    );
}

/// The commands of the banner's "Try" section.
fn banner_commands(banner: &str) -> Vec<String> {
    let start = banner
        .find("Try, in another shell:")
        .expect("the banner has a Try section");
    banner[start..]
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with("Logs:"))
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
        .collect()
}

#[test]
fn tour_readme_works_as_written() {
    let mut reader = Reader::new("readme");
    let banner = reader.start_dev();
    assert!(
        banner.trim_start().starts_with("Tollgate dev is running"),
        "the banner comes first:\n{banner}"
    );
    let commands = all_commands(&sh_blocks("README.md", Some("## A five-minute tour")));
    assert!(
        commands.len() > 25,
        "the tour has its commands: {commands:?}"
    );
    let outcomes = reader.run(&commands, Duration::from_secs(180));
    assert_all_succeeded(&outcomes);
    // What the tour says each step shows.
    assert!(output_of(&outcomes, "/echo/hello").contains("\"path\": \"/echo/hello\""));
    assert!(output_of(&outcomes, "/nowhere").contains("route_not_found"));
    let hello = output_of(&outcomes, "/orders/v1/hello -H");
    assert!(hello.contains("\"path\": \"/hello\""), "{hello}");
    assert!(output_of(&outcomes, "/orders/v1/hello      #").contains("unauthorized"));
    let limited = output_of(&outcomes, "for i in");
    assert!(
        limited.trim().ends_with("429"),
        "the sixth request is refused: {limited}"
    );
    assert!(output_of(&outcomes, "/api/users/1").contains("circuit_open"));
    assert!(output_of(&outcomes, "cluster status").contains("leader"));
    // The LLM step: each dialect against a provider of another format.
    assert!(output_of(&outcomes, "demo-claude").contains("You said: hello"));
    assert!(output_of(&outcomes, "demo-gemini").contains("data: [DONE]"));
    assert!(output_of(&outcomes, "demo-gpt").contains("\"type\":\"message\""));
    assert!(output_of(&outcomes, "models list").contains("demo-chat"));
    let log = reader.stop_dev();
    assert_quiet("tollgate dev", &log);
}

#[test]
fn tour_dev_banner_commands_work_also_after_a_restart() {
    let mut reader = Reader::new("banner");
    let banner = reader.start_dev();
    let commands = banner_commands(&banner);
    assert!(
        commands.iter().any(|c| c.contains("tenant create demo")),
        "{banner}"
    );
    let outcomes = reader.run(&commands, Duration::from_secs(300));
    assert_all_succeeded(&outcomes);
    assert!(output_of(&outcomes, "/demo/v1/hello").contains("\"path\": \"/hello\""));
    // The LLM lines: curl, and the official SDKs from PyPI with the two exported variables.
    assert!(output_of(&outcomes, "/chat/completions -H").contains("You said: hello"));
    assert!(output_of(&outcomes, "from openai import").contains("You said: hello"));
    assert!(output_of(&outcomes, "import anthropic").contains("You said: hello"));
    // The README's tour, after the banner's hints on the same `dev`: they make different
    // tenants and APIs, so either order works.
    let readme = all_commands(&sh_blocks("README.md", Some("## A five-minute tour")));
    assert_all_succeeded(&reader.run(&readme, Duration::from_secs(180)));
    let first = reader.stop_dev();
    assert_quiet("tollgate dev", &first);

    // Started again on the same directory: the token is not shown again, and the hints
    // leave out what the first round made.
    let restarted = reader.start_dev();
    assert!(!restarted.contains("made now"), "{restarted}");
    let commands = banner_commands(&restarted);
    assert!(
        !commands.iter().any(|c| c.contains("tenant create")),
        "{restarted}"
    );
    let outcomes = reader.run(&commands, Duration::from_secs(300));
    assert_all_succeeded(&outcomes);
    let log = reader.stop_dev();
    assert_quiet("tollgate dev, restarted", &log);
}

#[test]
fn tour_cluster_doc_runs_three_nodes_on_loopback() {
    let reader = Reader::new("cluster");
    let mut blocks = sh_blocks("docs/cluster.md", None);
    let last = blocks
        .pop()
        .expect("the doc ends with taking the cluster down");
    let mut commands = all_commands(&blocks);
    // A restart of node 1, the bootstrap node, with the same command line (the doc says a
    // restarted node rejoins by itself; it must not claim to fail at making the operator
    // token, which exists).
    let node1 = "tollgate node --id 1 --bootstrap --spec docs/examples/cluster-spec.yaml \
                 --data-dir tollgate-loopback/n1 --grpc-addr 127.0.0.1:17071 \
                 --proxy-addr 127.0.0.1:18081 --admin-addr 127.0.0.1:19081 \
                 >> tollgate-loopback/n1.access.log 2>> tollgate-loopback/n1.log &";
    commands.extend([
        "pkill -INT -f 'data-dir tollgate-loopback/n1 '; \
         while pgrep -f 'data-dir tollgate-loopback/n1 ' > /dev/null; do sleep 0.1; done"
            .to_string(),
        "tollgate cluster status --node 127.0.0.1:17072 --output json".to_string(),
        node1.to_string(),
        "curl -sf --retry 30 --retry-connrefused --retry-delay 1 http://127.0.0.1:19081/readyz"
            .to_string(),
        "curl -s http://127.0.0.1:18081/after-restart".to_string(),
    ]);
    commands.extend(self::commands(&last));
    let outcomes = reader.run(&commands, Duration::from_secs(180));
    assert_all_succeeded(&outcomes);
    let status = output_of(&outcomes, "cluster status --node 127.0.0.1:17071");
    assert_eq!(status.matches(" voter ").count(), 3, "{status}");
    assert!(output_of(&outcomes, "18083/hello").contains("\"path\": \"/hello\""));
    assert!(output_of(&outcomes, "/after-restart").contains("\"path\": \"/after-restart\""));
    let logs: Vec<(String, String)> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| {
            let path = reader.dir.join(format!("tollgate-loopback/{n}.log"));
            (
                n.to_string(),
                std::fs::read_to_string(path).unwrap_or_default(),
            )
        })
        .collect();
    let all: String = logs.iter().map(|(n, l)| format!("== {n}\n{l}")).collect();
    for (n, log) in &logs {
        assert!(
            log.contains("tollgate node stopped"),
            "{n} stopped cleanly:\n{all}"
        );
    }
    assert_quiet("the loopback cluster", &all);
}

#[test]
fn tour_control_plane_metering_and_spec_docs_run_against_dev() {
    let mut reader = Reader::new("docs");
    reader.start_dev();
    // Each doc in a fresh shell of its own, in this order (metering's examples use the
    // tenant and API the control-plane walkthrough made).
    for doc in [
        "docs/control-plane.md",
        "docs/metering.md",
        "docs/spec.md",
        "docs/llm.md",
        "docs/calls.md",
        "docs/hypercare.md",
    ] {
        let outcomes = reader.run(
            &all_commands(&sh_blocks(doc, None)),
            Duration::from_secs(180),
        );
        assert_all_succeeded(&outcomes);
        if doc == "docs/control-plane.md" {
            let items = output_of(&outcomes, "/orders/v2/items/7");
            assert!(items.contains("\"path\": \"/items/7\""), "{items}");
        }
    }
    let log = reader.stop_dev();
    assert_quiet("tollgate dev", &log);
}

#[test]
fn commands_are_split_as_a_shell_reads_them() {
    let block = "# a comment\nfoo \\\n  --bar\n\nbaz # trailing\n";
    assert_eq!(commands(block), vec!["foo \\\n  --bar", "baz # trailing"]);
}
