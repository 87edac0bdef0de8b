//! Host memory per idle VM beyond the guest pages it touched.
//!
//! Starts `VMS` test guests (256 MiB, 1 vCPU) that halt after their banner, then reads this
//! process's `/proc/self/status`: `RssShmem` grows by the guest pages the guests touched (their
//! memfds), `RssAnon` + `RssFile` by what the VMM itself keeps per VM (device state, buffers,
//! thread stacks actually touched). Kernel-side KVM memory is not in RSS and is not counted.

use forkvm::{ConsoleBuffer, ConsoleOutput, Vm, VmBuilder};
use forkvm_tests::{proc_status, test_guest, wait_for_output};

const VMS: u64 = 16;

fn main() {
    // Criterion-style arguments (`--bench`) are accepted and ignored.
    let start = |console: &ConsoleBuffer| -> Vm {
        let vm = VmBuilder::new()
            .kernel(test_guest())
            .memory_mib(256)
            .cmdline("mode=halt")
            .console(ConsoleOutput::Buffer(console.clone()))
            .build()
            .unwrap();
        vm.start().unwrap();
        wait_for_output(console, "halting");
        vm
    };
    // One VM first, so one-time process costs (probe, signal handler, allocator arenas) are not
    // charged to the measured ones.
    let warm = start(&ConsoleBuffer::new());
    let read = || {
        (
            proc_status("RssAnon") + proc_status("RssFile"),
            proc_status("RssShmem"),
            proc_status("Threads"),
        )
    };
    let (vmm_before, guest_before, threads_before) = read();
    let vms: Vec<Vm> = (0..VMS).map(|_| start(&ConsoleBuffer::new())).collect();
    let (vmm_after, guest_after, threads_after) = read();
    let vmm_kib = (vmm_after.saturating_sub(vmm_before)) as f64 / VMS as f64;
    let guest_kib = (guest_after.saturating_sub(guest_before)) as f64 / VMS as f64;
    println!("idle_memory: {VMS} idle 256 MiB VMs");
    println!("idle_memory: VMM memory per VM (RssAnon+RssFile): {vmm_kib:.0} KiB");
    println!("idle_memory: guest pages touched per VM (RssShmem): {guest_kib:.0} KiB");
    println!(
        "idle_memory: threads per VM: {}",
        (threads_after - threads_before) / VMS
    );
    drop(vms);
    drop(warm);
}
