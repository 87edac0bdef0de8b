//! Tests of the entropy device over the register-level test driver (the transport's own tests
//! use it too: `virtio::mmio`).

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::test_driver::{BUF, Driver};
use crate::virtio::{DeviceState, VirtioDevice};

#[test]
fn a_request_is_filled_up_to_the_limit_and_no_further() {
    let mut d = Driver::new(Box::new(Rng::new()));
    d.start();
    let len = 2 * MAX_BYTES_PER_REQUEST as u32;
    d.chain(0, &[(BUF, len, true)]);
    d.notify();
    assert_eq!(d.used(0), (1, MAX_BYTES_PER_REQUEST as u32));
    let mut bytes = vec![0u8; len as usize];
    d.memory.read_slice(&mut bytes, GuestAddress(BUF)).unwrap();
    let (served, rest) = bytes.split_at(MAX_BYTES_PER_REQUEST);
    assert!(served.iter().any(|b| *b != 0));
    assert!(rest.iter().all(|b| *b == 0), "nothing past the limit");
}

#[test]
fn a_request_without_writable_buffers_is_returned_empty() {
    let mut d = Driver::new(Box::new(Rng::new()));
    d.start();
    d.chain(0, &[(BUF, 64, false)]);
    d.notify();
    assert_eq!(d.used(0), (1, 0));
    let mut bytes = [0u8; 64];
    d.memory.read_slice(&mut bytes, GuestAddress(BUF)).unwrap();
    assert_eq!(
        bytes, [0; 64],
        "a buffer the guest only lets the device read is not written"
    );
}

#[test]
fn a_fork_carries_no_state_and_the_child_serves() {
    let mut parent = Rng::new();
    assert!(matches!(parent.freeze().unwrap(), DeviceState::Rng));
    let mut d = Driver::new(Box::new(Rng::from_state()));
    d.start();
    d.chain(0, &[(BUF, 16, true)]);
    d.notify();
    assert_eq!(d.used(0), (1, 16));
}

#[test]
fn fill_random_fills_buffers_of_any_size() {
    let mut empty = [];
    fill_random(&mut empty).unwrap();
    let mut big = vec![0u8; 1 << 20];
    fill_random(&mut big).unwrap();
    // 1 MiB of zeros from a CSPRNG would be astronomically unlikely; so would one byte value
    // missing from it.
    let mut seen = [false; 256];
    big.iter().for_each(|b| seen[usize::from(*b)] = true);
    assert!(seen.iter().all(|s| *s));
}
