//! The `fencelog` command line as a person runs it.

mod common;

use common::fencelog;
use fencelog::local_store::{LocalStore, StoreOptions};

#[test]
fn demo_fails_over_mid_load_and_finds_every_acknowledged_record_on_the_new_primary() {
    let (ok, stdout, stderr) = fencelog(&["demo", "--records", "6000"]);
    assert!(ok, "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("killed the primary demo-a"), "{stdout}");
    assert!(stdout.contains("demo-b promoted itself"), "{stdout}");
    assert!(stdout.contains("load summary"), "{stdout}");
    assert!(
        stdout.contains("acknowledged records are on the new primary"),
        "{stdout}"
    );
    // The worst ack latency includes the time the workers spent without a primary: from their
    // failed appends (sent before the kill) to their first ack from the new one.
    let number_after = |label: &str| -> f64 {
        let at = stdout
            .find(label)
            .unwrap_or_else(|| panic!("no {label:?}: {stdout}"));
        let rest = &stdout[at + label.len()..];
        let end = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap();
        rest[..end].parse().unwrap()
    };
    let outage_ms = number_after("promoted itself after ") * 1000.0;
    let max_ms = number_after(", max ");
    assert!(
        max_ms >= outage_ms - 300.0,
        "max latency {max_ms} ms, yet no primary for {outage_ms} ms:\n{stdout}"
    );
}

#[test]
fn bad_flags_exit_with_status_2_and_failed_commands_with_1() {
    let status = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_fencelog"))
            .args(args)
            .output()
            .unwrap();
        output.status.code()
    };
    assert_eq!(status(&["primary", "--bogus"]), Some(2));
    assert_eq!(status(&["append", "k"]), Some(2), "a missing VALUE");
    assert_eq!(
        status(&["read", "--server", "127.0.0.1:1", "--from", "0"]),
        Some(1)
    );
}

#[test]
fn demo_refuses_too_few_records() {
    let (ok, _, stderr) = fencelog(&["demo", "--records", "0"]);
    assert!(!ok);
    assert!(stderr.contains("at least 100"), "{stderr}");
}

#[test]
fn inspect_reports_an_empty_store() {
    let dir = tempfile::tempdir().unwrap();
    drop(LocalStore::open(dir.path(), StoreOptions::default()).unwrap());
    let (ok, stdout, stderr) = fencelog(&["inspect", "--data-dir", dir.path().to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("received_seq  0 (epoch 0)"), "{stdout}");
    assert!(stdout.contains("state         0 keys"), "{stdout}");
}

#[test]
fn inspect_of_a_store_of_another_format_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    drop(LocalStore::open(dir.path(), StoreOptions::default()).unwrap());
    {
        let db = common::raw_sled(dir.path());
        db.open_tree("meta")
            .unwrap()
            .insert("format", &7u64.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let (ok, _, stderr) = fencelog(&["inspect", "--data-dir", dir.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains("has format 7") && stderr.contains("move it aside"),
        "{stderr}"
    );
}

#[test]
fn bench_measures_every_stage_and_writes_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("bench.md");
    let plot = dir.path().join("bench.png");
    let (report_arg, plot_arg) = (report.display().to_string(), plot.display().to_string());
    let (ok, stdout, stderr) = fencelog(&[
        "bench",
        "--seconds",
        "1",
        "--caps",
        "1024",
        "--replay-records",
        "5000",
        "--delays-ms",
        "1",
        "--commits-in-flight",
        "2",
        "--distant-caps",
        "1024",
        "--report",
        &report_arg,
        "--plot",
        &plot_arg,
    ]);
    assert!(ok, "bench failed:\n{stdout}\n{stderr}");
    let written = std::fs::read_to_string(&report).unwrap();
    assert!(
        stdout.contains(&written),
        "the report differs from what was printed"
    );
    for row in [
        "| ceiling: pre-encoded 1024-record fenced txns | ",
        "| plain loop: build 1024 records, encode, then commit them | ",
        "| etcd single-key puts",
        "| fencelog double, batch cap 1024 | ",
        "| fencelog single, batch cap 1024 | ",
        "| sled raw random-key inserts, one at a time | ",
        "| fencelog double, batch cap 1024, paced at 50% of its rate | ",
        "| standby receiving from a primary at 50% of its rate | ",
        "| standby receiving from a primary at 100% of its rate | ",
        "| fencelog primary daemon through the API, 32 clients x 256 records | ",
        "| seed style: 127 keys per txn + pointer put | ",
        "| standby: full replay of 5000 records onto an empty store | ",
        "| plain loop, etcd 1 ms away: build 1024 records, encode, then commit them | ",
        "| primary daemon through the API, etcd 1 ms away, batch cap 1024, 2 in flight | ",
        "| 1 ms | 1024 | 2 | ",
        "| 1 ms | 1024 | plain loop | ",
    ] {
        let line = written
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("no row {row:?} in:\n{written}"));
        let rate: f64 = line.split('|').nth(2).unwrap().trim().parse().unwrap();
        assert!(rate > 0.0, "{line}");
    }
    for note in [
        "Ack latency at 50% of the saturated rate",
        "Standby daemon at 50% of the primary's rate",
        "Standby daemon at 100% of the primary's rate",
        "Warm restart vs full replay",
        "At batch cap 1024: double / single",
        "## etcd a round trip away",
    ] {
        assert!(written.contains(note), "no {note:?} in:\n{written}");
    }
    let png = std::fs::read(&plot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "the plot is not a PNG");
}

#[test]
fn bench_refuses_a_zero_duration() {
    let (ok, _, stderr) = fencelog(&["bench", "--seconds", "0"]);
    assert!(!ok);
    assert!(stderr.contains("--seconds must be at least 1"), "{stderr}");
}

#[test]
fn an_unreachable_etcd_is_one_line_naming_it_and_why() {
    let etcd = format!("http://127.0.0.1:{}", common::free_port());
    let (ok, _, stderr) = fencelog(&[
        "append",
        "--etcd",
        &etcd,
        "--cluster",
        "c1",
        "--wait",
        "0",
        "k",
        "v",
    ]);
    assert!(!ok);
    assert_eq!(
        stderr,
        format!("error: cannot reach etcd at {etcd}: connection refused\n")
    );
}

#[test]
fn an_endpoint_that_is_not_etcd_is_named_as_such() {
    // An HTTP/1 server: it answers gRPC's HTTP/2 preface with a plain response.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let etcd = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut stream in listener.incoming().take(16).flatten() {
            // Each connection apart: one the client holds open must not keep the next waiting.
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(10)));
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request);
                let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
                // Open until the client hangs up, as a server does.
                while matches!(stream.read(&mut request), Ok(n) if n > 0) {}
            });
        }
    });
    let (ok, _, stderr) = fencelog(&["append", "--etcd", &etcd, "--cluster", "c1", "k", "v"]);
    assert!(!ok);
    // hyper races its protocol error against closing the connection: either is said.
    let not_etcd = format!("error: {etcd} is not an etcd endpoint");
    let closed = format!("error: etcd at {etcd} closed the connection without answering");
    assert!(
        stderr.starts_with(&not_etcd) || stderr.starts_with(&closed),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

/// One command of the README's by-hand block: its text, whether it runs in the background
/// (`&`), and what its `# ...` comment says it prints.
struct Pasted {
    command: String,
    background: bool,
    prints: Option<String>,
}

/// The README's `sh` block that starts etcd and the daemons by hand, command by command: lines
/// ending in `\` joined, each command's trailing comment apart.
fn readme_by_hand_block() -> Vec<Pasted> {
    let readme = include_str!("../README.md");
    let block = readme
        .split("```sh\n")
        .skip(1)
        .filter_map(|rest| rest.split_once("\n```").map(|(block, _)| block))
        .find(|block| block.contains("fencelog primary"))
        .expect("README.md has an sh block that starts a primary");
    let mut commands = Vec::new();
    let mut line = String::new();
    for part in block.lines() {
        match part.strip_suffix('\\') {
            Some(continued) => line.push_str(continued),
            None => {
                line.push_str(part);
                let (command, prints) = match line.split_once("  #") {
                    Some((command, comment)) => (command, Some(comment.trim().to_owned())),
                    None => (line.as_str(), None),
                };
                let command = command.trim();
                let (command, background) = match command.strip_suffix('&') {
                    Some(command) => (command.trim(), true),
                    None => (command, false),
                };
                commands.push(Pasted {
                    command: command.split_whitespace().collect::<Vec<_>>().join(" "),
                    background,
                    prints,
                });
                line.clear();
            }
        }
    }
    commands
}

/// Processes started in the background, killed (and reaped) when the test ends however it ends.
struct Background(Vec<std::process::Child>);

impl Drop for Background {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The README's block, pasted into a shell in a fresh directory: every port it names moved to
/// a free one and `/tmp/` to a fresh directory, so that it runs beside other tests; nothing else
/// changed. Each command must succeed and print what its comment says, with nothing waited for
/// between them but each command's own end.
#[test]
fn the_readmes_by_hand_block_runs_as_pasted() {
    let pasted = readme_by_hand_block();
    assert!(
        pasted.len() >= 8,
        "the block shrank to {} commands",
        pasted.len()
    );
    let dir = tempfile::tempdir().unwrap();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_fencelog"))
        .parent()
        .unwrap()
        .to_owned();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut ports = std::collections::BTreeMap::new();
    let relocate = |command: &str, ports: &mut std::collections::BTreeMap<String, String>| {
        let mut out = command.replace("/tmp/", &format!("{}/", dir.path().display()));
        let named: Vec<String> = out
            .split(|c: char| !c.is_ascii_digit() && c != '.' && c != ':')
            .filter_map(|word| word.strip_prefix("127.0.0.1:"))
            .map(str::to_owned)
            .collect();
        for port in named {
            let free = ports
                .entry(port.clone())
                .or_insert_with(|| common::free_port().to_string())
                .clone();
            out = out.replace(&format!("127.0.0.1:{port}"), &format!("127.0.0.1:{free}"));
        }
        out
    };
    let mut background = Background(Vec::new());
    for (i, step) in pasted.iter().enumerate() {
        let command = relocate(&step.command, &mut ports);
        let mut shell = std::process::Command::new("bash");
        shell
            .arg("-c")
            .arg(format!("exec {command}"))
            .current_dir(dir.path())
            .env("PATH", &path)
            .env_remove("RUST_LOG");
        if step.background {
            let log =
                std::fs::File::create(dir.path().join(format!("background-{i}.log"))).unwrap();
            shell
                .stdin(std::process::Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log);
            background.0.push(shell.spawn().unwrap());
            continue;
        }
        let child = shell
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let output = common::output_within(child, std::time::Duration::from_secs(120));
        let stdout = String::from_utf8_lossy(&output.stdout);
        let logs = || {
            (0..i)
                .filter_map(|n| {
                    std::fs::read_to_string(dir.path().join(format!("background-{n}.log"))).ok()
                })
                .collect::<Vec<_>>()
                .join("\n---\n")
        };
        assert!(
            output.status.success(),
            "{command}\nfailed: {stdout}{}\nbackground logs:\n{}",
            String::from_utf8_lossy(&output.stderr),
            logs()
        );
        if let Some(prints) = &step.prints {
            assert!(
                stdout.contains(prints.as_str()),
                "{command}\nprinted {stdout}, not {prints:?}"
            );
        }
    }
}

/// A file of docs/ops/, as the repository ships it.
fn ops_file(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("docs/ops")
        .join(name)
}

#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    for unit in ["fencelog-primary.service", "fencelog-standby.service"] {
        // The one change: the binary where this build put it, not where an install would.
        let text = std::fs::read_to_string(ops_file(unit))
            .unwrap()
            .replace("/usr/local/bin/fencelog", env!("CARGO_BIN_EXE_fencelog"));
        let path = dir.path().join(unit);
        std::fs::write(&path, text).unwrap();
        let output = std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .expect("systemd-analyze runs (tools/test.sh installs Debian's systemd)");
        let complaints = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{unit}: {complaints}");
        assert!(complaints.trim().is_empty(), "{unit}: {complaints}");
    }
}

#[test]
fn the_tools_run_the_release_binary_where_cargo_target_dir_puts_it() {
    let root = env!("CARGO_MANIFEST_DIR");
    let bin = |target_dir: Option<&str>| {
        let mut shell = std::process::Command::new("bash");
        shell
            .args([
                "-c",
                "source tools/deps.sh >/dev/null && echo \"$release_bin\"",
            ])
            .current_dir(root);
        match target_dir {
            Some(dir) => shell.env("CARGO_TARGET_DIR", dir),
            None => shell.env_remove("CARGO_TARGET_DIR"),
        };
        let output = shell.output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    };
    assert_eq!(bin(Some("/elsewhere")), "/elsewhere/release/fencelog");
    assert_eq!(bin(None), "target/release/fencelog");
    for tool in ["demo.sh", "bench.sh", "bench_snapshot.sh"] {
        let script = std::fs::read_to_string(format!("{root}/tools/{tool}")).unwrap();
        assert!(
            script.contains("$release_bin") && !script.contains("target/release"),
            "tools/{tool} does not run $release_bin"
        );
    }
}

/// `fencelog [COMMAND] --help`.
fn help(command: &[&str]) -> String {
    let args: Vec<&str> = command.iter().copied().chain(["--help"]).collect();
    let (ok, out, err) = fencelog(&args);
    assert!(ok, "{command:?} --help: {err}");
    out
}

/// The commands `fencelog --help` lists (but `help` itself).
fn subcommands() -> Vec<String> {
    let top = help(&[]);
    let listed = top
        .lines()
        .skip_while(|line| !line.starts_with("Commands:"))
        .skip(1)
        .take_while(|line| !line.is_empty());
    let names: Vec<String> = listed
        .filter_map(|line| line.strip_prefix("  ")?.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect();
    assert!(names.len() >= 10, "{top}");
    names
}

#[test]
fn every_commands_help_describes_each_of_its_arguments_below_it() {
    for command in subcommands() {
        let text = help(&[&command]);
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let is_argument = ["  -", "      --", "  <", "  ["]
                .iter()
                .any(|start| line.starts_with(start));
            if !is_argument {
                continue;
            }
            let described = lines
                .get(i + 1)
                .is_some_and(|next| next.starts_with("          ") && !next.trim().is_empty());
            assert!(
                described,
                "fencelog {command} --help: {line:?} has no description:\n{text}"
            );
        }
    }
}

#[test]
fn a_primarys_help_offers_only_its_own_flags_and_each_role_marks_the_required_ones() {
    let (primary, standby) = (help(&["primary"]), help(&["standby"]));
    assert!(!primary.contains("--failover"), "{primary}");
    assert!(standby.contains("--failover"), "{standby}");
    for text in [primary, standby] {
        let required: Vec<&str> = text
            .lines()
            .skip_while(|line| !line.starts_with("Required"))
            .skip(1)
            .take_while(|line| !line.is_empty())
            .filter_map(|line| line.trim().strip_prefix("--"))
            .filter_map(|flag| flag.split_whitespace().next())
            .collect();
        assert_eq!(required, ["cluster", "node", "data-dir", "etcd"], "{text}");
    }
}
