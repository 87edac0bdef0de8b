//! `cfg(no_kvm)` where this host's `/dev/kvm` cannot be opened read-write: the tests that need
//! KVM carry `#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]` and show there as ignored instead
//! of failing (`scripts/test.sh` says what it skipped). `tests` and `forkvm-cli` build with this same script.

const KVM: &str = "/dev/kvm";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(no_kvm)");
    // Checked again when the device node changes. Where there is none, only when this file does:
    // cargo runs a script that names a missing path on every build, and so rebuilds the crate
    // (and all that depends on it). After loading KVM or joining the kvm group, touch this file.
    if std::path::Path::new(KVM).exists() {
        println!("cargo::rerun-if-changed={KVM}");
    } else {
        println!("cargo::rerun-if-changed=build.rs");
    }
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(KVM)
        .is_ok();
    if !usable {
        println!("cargo::rustc-cfg=no_kvm");
    }
}
