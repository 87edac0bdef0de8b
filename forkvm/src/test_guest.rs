//! The freestanding test guest (`tests/guest/`) for this crate's unit tests that run a VM.

/// The test guest's ELF, built by its script (which caches it).
pub(crate) fn path() -> std::path::PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/guest/build.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().into()
}
