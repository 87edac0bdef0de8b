//! PID-1 duties: the file systems every program expects, the hostname, and powering off. (Reaping
//! is [`crate::reaper`]'s.)

use std::ffi::CString;
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

fn mount(source: &str, target: &str, fstype: &str, options: &str) -> io::Result<()> {
    fs::create_dir_all(target)?;
    let cstr = |s: &str| CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let (source, target_c, fstype, options) =
        (cstr(source)?, cstr(target)?, cstr(fstype)?, cstr(options)?);
    let flags = libc::MS_NOSUID
        | if fstype.as_bytes() == b"devtmpfs" {
            0
        } else {
            libc::MS_NODEV
        };
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            fstype.as_ptr(),
            flags,
            options.as_ptr().cast(),
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        // Mounted already (by the kernel's devtmpfs.mount, or an initramfs).
        if err.raw_os_error() != Some(libc::EBUSY) {
            return Err(err);
        }
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
        PowerAction::PowerOff => libc::RB_POWER_OFF,
        PowerAction::Reboot => libc::RB_AUTOBOOT,
    };
    // SAFETY: reboot takes no pointers.
    unsafe { libc::reboot(command) };
    io::Error::last_os_error()
}
