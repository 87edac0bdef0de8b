//! The `forkvm` CLI: `run` boots the test guest with the console on stdout and exits with the
//! guest's end state; `exec` refuses what it cannot run.

// Test helpers: a broken set-up panics.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn test_guest() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/guest/build.sh");
    let out = Command::new("bash")
        .arg(script)
        .output()
        .expect("run tests/guest/build.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn forkvm(args: &[&str], kernel: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_forkvm"))
        .arg("run")
        .arg("--kernel")
        .arg(kernel)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run forkvm")
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn run_prints_the_banner_and_exits_zero() {
    let out = forkvm(&[], &test_guest());
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("forkvm test guest\n"));
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn exit_status_follows_the_guest() {
    let guest = test_guest();
    let status = forkvm(
        &[
            "--debug-exit",
            "--cmdline",
            "mode=exit memcheck=1 exit_code=9",
        ],
        &guest,
    );
    assert_eq!(status.status.code(), Some(9));
    let fault = forkvm(&["--cmdline", "mode=triple-fault"], &guest);
    assert_eq!(fault.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&fault.stderr).contains("triple-faulted"));
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn bad_arguments_print_usage() {
    let out = Command::new(env!("CARGO_BIN_EXE_forkvm"))
        .args(["run", "--vcpus", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage: forkvm run"));
    let missing = forkvm(&[], Path::new("/nonexistent/vmlinux"));
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/vmlinux"));
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn exec_needs_an_image_and_a_program() {
    let forkvm = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_forkvm"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run forkvm")
    };
    let usage = forkvm(&["exec", "--image", "/nonexistent"]);
    assert_eq!(usage.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&usage.stderr).contains("needs a program"));
    let missing = forkvm(&["exec", "--image", "/nonexistent", "--", "true"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/rootfs.ext4"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn net_and_publish_give_the_guest_a_network_and_bad_ports_are_refused() {
    let guest = test_guest();
    let args = ["--debug-exit", "--cmdline", "mode=exit exit_code=0"];
    // A guest with a network device (the test guest ignores it) and a published port.
    let ok = forkvm(
        &[&args[..], &["--net", "--publish", "0:80"]].concat(),
        &guest,
    );
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    for bad in ["80", "x:80", "0:y", "1.2.3:0:80"] {
        let out = forkvm(&[&args[..], &["--publish", bad]].concat(), &guest);
        assert_eq!(out.status.code(), Some(2), "--publish {bad}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("--publish"));
    }
    // A host port that is taken fails the build.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let spec = format!("127.0.0.1:{port}:80");
    let out = forkvm(&[&args[..], &["--publish", &spec]].concat(), &guest);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot publish"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
