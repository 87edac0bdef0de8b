//! PID-1 duties: a writable overlay over a read-only root, the file systems every program expects,
//! the hostname, and powering off. (Reaping is [`crate::reaper`]'s.)
//!
//! # The root overlay
//!
//! forkvm's root image (`guest/rootfs/build.sh`) is attached read-only and mounted by the kernel
//! with `root=/dev/vda ro`. Before anything else, [`overlay_root`] mounts a tmpfs on `/run` of
//! that root, an overlay with the root as its lower layer and directories of that tmpfs as its
//! upper and work layers, and `pivot_root`s into the overlay; the old root (with that `/run` and
//! anything the kernel mounted on it, such as `/dev`) is then detached. Every write therefore
//! lands in guest memory: forking the VM's memory forks its file system too, and the disk image
//! can be shared by any number of VMs. It does nothing when the root is writable already or the
//! kernel command line says `forkvm.overlay=0` (or `off`, `no`, `false`).

use std::error::Error;
use std::ffi::CString;
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::thread;
use std::time::Duration;

use forkvm_agent_protocol::PowerAction;

/// What [`setup`] mounts: source, target, type, options.
const MOUNTS: &[(&str, &str, &str, &str)] = &[
    ("proc", "/proc", "proc", ""),
    ("sysfs", "/sys", "sysfs", ""),
    ("devtmpfs", "/dev", "devtmpfs", "mode=0755"),
    (
        "devpts",
        "/dev/pts",
        "devpts",
        "gid=5,mode=0620,ptmxmode=0666",
    ),
    ("tmpfs", "/dev/shm", "tmpfs", "mode=1777"),
    ("tmpfs", "/tmp", "tmpfs", "mode=1777"),
    ("tmpfs", "/run", "tmpfs", "mode=0755"),
];

/// The `PATH` processes get when the kernel gave the agent none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Mounts proc, sysfs, devtmpfs, devpts, and tmpfs on /dev/shm, /tmp and /run (one already
/// mounted is fine) and sets the hostname. Returns what failed, for the console; the agent serves
/// anyway.
pub fn setup(hostname: &str) -> Vec<String> {
    let mut problems = Vec::new();
    for &(source, target, fstype, options) in MOUNTS {
        if let Err(e) = mount(source, target, fstype, options) {
            problems.push(format!("mount {target}: {e}"));
        }
    }
    if let Err(e) = set_hostname(hostname) {
        problems.push(format!("sethostname: {e}"));
    }
    problems
}

/// `s` as a C string (an interior NUL is an invalid-input error).
fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// `mount(2)` of `source` on `target` (which must exist) with `flags` and `options`.
fn mount_raw(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    options: &str,
) -> io::Result<()> {
    let (source, target, fstype, options) =
        (cstr(source)?, cstr(target)?, cstr(fstype)?, cstr(options)?);
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            options.as_ptr().cast(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn mount(source: &str, target: &str, fstype: &str, options: &str) -> io::Result<()> {
    fs::create_dir_all(target)?;
    match mount_raw(source, target, fstype, mount_flags(fstype), options) {
        // Mounted already (by the kernel's devtmpfs.mount, or an initramfs).
        Err(err) if err.raw_os_error() != Some(libc::EBUSY) => return Err(err),
        _ => {}
    }
    if target == "/tmp" {
        fs::set_permissions(target, fs::Permissions::from_mode(0o1777))?;
    }
    Ok(())
}

fn set_hostname(hostname: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `hostname`'s bytes.
    let rc = unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Stops every other process (SIGTERM, a second to go, SIGKILL), syncs, and powers off or
/// reboots. Returns the error when `reboot` fails (it does not return otherwise).
///
/// A forkvm VM has no ACPI, so a Linux power-off there only halts the CPUs and the VM would
/// stay; its kernel resets through the i8042 instead (`reboot=k`, which forkvm always passes),
/// and forkvm ends a VM whose guest resets. So a power-off is a reset here too: either way the
/// VM ends, and the host sees `GuestExit::Reset`.
pub fn power(action: PowerAction) -> io::Error {
    // SAFETY: kill and sync have no memory effects; kill(-1) spares the caller.
    unsafe {
        libc::kill(-1, libc::SIGTERM);
    }
    thread::sleep(Duration::from_secs(1));
    // SAFETY: as above.
    unsafe {
        libc::kill(-1, libc::SIGKILL);
        libc::sync();
    }
    let command = match action {
        PowerAction::PowerOff | PowerAction::Reboot => libc::RB_AUTOBOOT,
    };
    // SAFETY: reboot takes no pointers.
    unsafe { libc::reboot(command) };
    io::Error::last_os_error()
}

/// The flags [`setup`] mounts a file system of type `fstype` with: `nosuid`, and `nodev` except
/// where device nodes live (devtmpfs, and devpts, whose `/dev/pts/N` a PTY session opens).
fn mount_flags(fstype: &str) -> libc::c_ulong {
    match fstype {
        "devtmpfs" | "devpts" => libc::MS_NOSUID,
        _ => libc::MS_NOSUID | libc::MS_NODEV,
    }
}

/// Where [`overlay_root`] mounts the tmpfs holding the overlay's upper and work layers, on the
/// read-only root (the directory must exist there; `guest/rootfs/build.sh` makes sure it does).
pub const OVERLAY_TMPFS: &str = "/run";
/// The overlay's directory inside [`OVERLAY_TMPFS`]: `upper/`, `work/` and the mount point
/// `root/`.
pub const OVERLAY_DIR: &str = "/run/forkvm-overlay";
/// The kernel command-line parameter that turns the overlay off (`forkvm.overlay=0`).
pub const OVERLAY_PARAM: &str = "forkvm.overlay";

/// What [`overlay_root`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overlay {
    /// `/` is now an overlay of the old root under a tmpfs.
    Mounted,
    /// The root was writable already; nothing was done.
    RootWritable,
    /// `forkvm.overlay=0` (or `off`, `no`, `false`) was on the kernel command line.
    Disabled,
}

/// Why [`overlay_root`] failed: the step and the system's error. The root is left as it was
/// unless the step is `pivot_root` or later.
#[derive(Debug)]
pub struct OverlayError {
    /// What was being done (e.g. "mount overlay on /run/forkvm-overlay/root").
    pub step: String,
    /// The error the system returned.
    pub source: io::Error,
}

impl fmt::Display for OverlayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "root overlay: {}: {}", self.step, self.source)
    }
}

impl Error for OverlayError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&self.source)
    }
}

/// Whether the kernel command line `cmdline` (the text of `/proc/cmdline`) allows the root
/// overlay: anything but `forkvm.overlay=0`, `off`, `no` or `false` does (the last occurrence
/// wins, as with the kernel's own parameters).
pub fn overlay_enabled(cmdline: &str) -> bool {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|word| word.strip_prefix(OVERLAY_PARAM)?.strip_prefix('='))
        .next_back()
        .is_none_or(|value| !matches!(value, "0" | "off" | "no" | "false"))
}

/// The overlay mount options for `lower`, `upper` and `work`.
pub fn overlay_options(lower: &str, upper: &str, work: &str) -> String {
    format!("lowerdir={lower},upperdir={upper},workdir={work}")
}

/// When the root file system is mounted read-only and the kernel command line does not say
/// `forkvm.overlay=0`, makes `/` an overlay of that root with a tmpfs upper layer (see the
/// module's documentation) and returns [`Overlay::Mounted`]. For PID 1 only, before any other
/// mount: it mounts proc on `/proc` to read the command line, and detaches everything mounted on
/// the old root, so [`setup`] must run afterwards.
pub fn overlay_root() -> Result<Overlay, OverlayError> {
    let fail = |step: &str| {
        let step = step.to_string();
        move |source| OverlayError { step, source }
    };
    if !root_read_only().map_err(fail("statvfs /"))? {
        return Ok(Overlay::RootWritable);
    }
    // The parameter has a dot, so the kernel keeps it from init's arguments: read it from proc.
    match mount_raw(
        "proc",
        "/proc",
        "proc",
        libc::MS_NOSUID | libc::MS_NODEV,
        "",
    ) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
        Err(e) => return Err(fail("mount proc on /proc")(e)),
    }
    let cmdline = fs::read_to_string("/proc/cmdline").map_err(fail("read /proc/cmdline"))?;
    if !overlay_enabled(&cmdline) {
        return Ok(Overlay::Disabled);
    }
    // pivot_root refuses shared mounts; nothing has shared anything yet, but make sure.
    mount_raw("none", "/", "none", libc::MS_REC | libc::MS_PRIVATE, "")
        .map_err(fail("make / private"))?;
    mount_raw(
        "tmpfs",
        OVERLAY_TMPFS,
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0755",
    )
    .map_err(fail(&format!("mount tmpfs on {OVERLAY_TMPFS}")))?;
    let (upper, work, new_root) = (
        format!("{OVERLAY_DIR}/upper"),
        format!("{OVERLAY_DIR}/work"),
        format!("{OVERLAY_DIR}/root"),
    );
    for dir in [&upper, &work, &new_root] {
        fs::create_dir_all(dir).map_err(fail(&format!("mkdir {dir}")))?;
    }
    // The upper layer's root becomes the new `/`: the usual mode, not tmpfs's directory default.
    fs::set_permissions(&upper, fs::Permissions::from_mode(0o755))
        .map_err(fail(&format!("chmod {upper}")))?;
    mount_raw(
        "overlay",
        &new_root,
        "overlay",
        0,
        &overlay_options("/", &upper, &work),
    )
    .map_err(fail(&format!("mount overlay on {new_root}")))?;
    std::env::set_current_dir(&new_root).map_err(fail(&format!("chdir {new_root}")))?;
    // pivot_root(".", "."): the old root ends up mounted on top of the new one, and detaching "."
    // removes it (with /run, /proc and the kernel's /dev below it) without needing a directory
    // for it in the new root.
    let dot = cstr(".").map_err(fail("pivot_root"))?;
    // SAFETY: both pointers are the same NUL-terminated string, alive across the call.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } < 0 {
        let error = io::Error::last_os_error();
        // Still on the old root: leave the working directory (which processes started without
        // a `cwd` inherit) where it was.
        let _ = std::env::set_current_dir("/");
        return Err(fail("pivot_root")(error));
    }
    // SAFETY: the pointer is a NUL-terminated string alive across the call.
    if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } < 0 {
        return Err(fail("detach the old root")(io::Error::last_os_error()));
    }
    std::env::set_current_dir("/").map_err(fail("chdir /"))?;
    Ok(Overlay::Mounted)
}

/// Whether `/` is mounted read-only.
fn root_read_only() -> io::Result<bool> {
    let root = cstr("/")?;
    // SAFETY: statvfs is plain data; all-zero is a valid value that the call overwrites.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `root` is a NUL-terminated string and `stat` a valid, writable statvfs.
    if unsafe { libc::statvfs(root.as_ptr(), &mut stat) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.f_flag & libc::ST_RDONLY != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_is_on_unless_the_command_line_turns_it_off() {
        assert!(overlay_enabled(""));
        assert!(overlay_enabled("console=ttyS0 root=/dev/vda ro"));
        assert!(overlay_enabled("forkvm.overlay=1"));
        assert!(overlay_enabled("forkvm.overlayfs=0 xforkvm.overlay=0"));
        for off in ["0", "off", "no", "false"] {
            assert!(!overlay_enabled(&format!(
                "ro forkvm.overlay={off} quiet\n"
            )));
        }
        // The last occurrence wins.
        assert!(overlay_enabled("forkvm.overlay=0 forkvm.overlay=1"));
        assert!(!overlay_enabled("forkvm.overlay=1 forkvm.overlay=0"));
    }

    #[test]
    fn device_nodes_stay_usable_where_they_live() {
        // A `nodev` devpts makes opening /dev/pts/N fail with EACCES (seen in a guest).
        for fstype in ["devtmpfs", "devpts"] {
            assert_eq!(mount_flags(fstype) & libc::MS_NODEV, 0, "{fstype}");
        }
        for (_, target, fstype, _) in MOUNTS {
            assert_ne!(mount_flags(fstype) & libc::MS_NOSUID, 0, "{target}");
        }
        assert_ne!(mount_flags("tmpfs") & libc::MS_NODEV, 0);
    }

    #[test]
    fn overlay_options_name_the_three_layers() {
        assert_eq!(
            overlay_options("/", "/run/o/upper", "/run/o/work"),
            "lowerdir=/,upperdir=/run/o/upper,workdir=/run/o/work"
        );
    }
}
