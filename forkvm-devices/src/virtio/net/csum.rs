//! Checksum offload (`VIRTIO_NET_F_CSUM`, `VIRTIO_NET_F_GUEST_CSUM`): what the device does with
//! the virtio-net header's checksum fields.
//!
//! With a backend that can take them ([`super::NetBackend::checksum_offload`]: the user-mode
//! network, a memory link that terminates every flow, so nothing can corrupt a frame on it),
//! frames with a partial checksum pass through untouched and the backend ignores the guest's
//! TCP/UDP checksums: the guest's header fields (`csum_start`, `csum_offset`) are never used,
//! so whatever it writes there cannot matter. Only a device whose driver negotiated `CSUM` and
//! whose backend cannot take partial checksums (a device that continues from its state with a
//! backend of another kind) completes them here, from checked fields.

/// Where the header's fields lie (virtio 1.x, little-endian).
const FLAGS: usize = 0;
const CSUM_START: usize = 6;
const CSUM_OFFSET: usize = 8;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum from `csum_start` on is partial.
pub(super) const NEEDS_CSUM: u8 = virtio_bindings::virtio_net::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
/// `VIRTIO_NET_HDR_F_DATA_VALID`: the device vouches for the frame's checksums.
pub(super) const DATA_VALID: u8 = virtio_bindings::virtio_net::VIRTIO_NET_HDR_F_DATA_VALID as u8;

/// Why a partial checksum could not be completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct BadChecksumFields {
    /// The header's `csum_start`.
    pub(super) start: u16,
    /// The header's `csum_offset`.
    pub(super) offset: u16,
    /// The frame's length.
    pub(super) len: usize,
}

/// Completes the checksum of the frame behind `header` if the header asks for it
/// (`NEEDS_CSUM`): the one's complement sum of `frame[csum_start..]` (whose checksum field holds
/// the pseudo-header's sum) is stored, complemented, at `csum_start + csum_offset`. Refuses
/// fields that do not leave the two checksum bytes inside the frame.
pub(super) fn complete(header: &[u8], frame: &mut [u8]) -> Result<(), BadChecksumFields> {
    let field = |at: usize| u16::from_le_bytes([header[at], header[at + 1]]);
    if header[FLAGS] & NEEDS_CSUM == 0 {
        return Ok(());
    }
    let (start, offset) = (field(CSUM_START), field(CSUM_OFFSET));
    let bad = BadChecksumFields {
        start,
        offset,
        len: frame.len(),
    };
    let at = usize::from(start) + usize::from(offset);
    if at + 2 > frame.len() {
        return Err(bad);
    }
    // In bounds: start <= at < at + 2 <= len.
    let sum = !fold(sum(&frame[usize::from(start)..]));
    frame[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

/// The one's complement sum of `data` as big-endian 16-bit words (an odd last byte padded
/// with zero), not yet folded.
fn sum(data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(4);
    let mut total = 0u64;
    for chunk in &mut chunks {
        // Two words at a time; a u64 holds 2^32 of them without overflow.
        total += u64::from(u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]));
    }
    let rest = chunks.remainder();
    let mut pairs = rest.chunks(2);
    for pair in &mut pairs {
        let hi = pair[0];
        let lo = pair.get(1).copied().unwrap_or(0);
        total += u64::from(u16::from_be_bytes([hi, lo]));
    }
    total
}

/// Folds a sum to 16 bits with end-around carry.
fn fold(mut total: u64) -> u16 {
    while total > 0xffff {
        total = (total & 0xffff) + (total >> 16);
    }
    total as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(flags: u8, start: u16, offset: u16) -> [u8; 12] {
        let mut h = [0u8; 12];
        h[FLAGS] = flags;
        h[CSUM_START..CSUM_START + 2].copy_from_slice(&start.to_le_bytes());
        h[CSUM_OFFSET..CSUM_OFFSET + 2].copy_from_slice(&offset.to_le_bytes());
        h
    }

    /// The plain RFC 1071 sum, one word at a time.
    fn reference(data: &[u8]) -> u16 {
        let mut total = 0u32;
        for pair in data.chunks(2) {
            total += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
        while total > 0xffff {
            total = (total & 0xffff) + (total >> 16);
        }
        total as u16
    }

    #[test]
    fn the_sum_matches_the_plain_one_for_every_length_and_the_result_verifies() {
        for len in 0..80usize {
            let data: Vec<u8> = (0..len)
                .map(|i| (i as u8).wrapping_mul(151) ^ 0xc3)
                .collect();
            assert_eq!(fold(sum(&data)), reference(&data), "length {len}");
            if len >= 20 {
                let mut frame = data.clone();
                frame[14..16].copy_from_slice(&[0x12, 0x34]);
                complete(&header(NEEDS_CSUM, 10, 4), &mut frame).unwrap();
                // The field held the pseudo-header's sum (0x1234): with it, the completed
                // checksum sums to all ones, as a receiver verifies it.
                let verified = u64::from(reference(&frame[10..])) + 0x1234;
                assert_eq!(fold(verified), 0xffff, "length {len}");
                assert_eq!(frame[..14], data[..14]);
                assert_eq!(frame[16..], data[16..]);
            }
        }
    }

    #[test]
    fn fields_outside_the_frame_are_refused_and_nothing_is_written() {
        let frame = vec![7u8; 60];
        for (start, offset) in [
            (59, 0),
            (58, 1),
            (60, 0),
            (0, 59),
            (u16::MAX, u16::MAX),
            (u16::MAX, 0),
            (0, u16::MAX),
        ] {
            let mut copy = frame.clone();
            assert_eq!(
                complete(&header(NEEDS_CSUM, start, offset), &mut copy),
                Err(BadChecksumFields {
                    start,
                    offset,
                    len: 60
                })
            );
            assert_eq!(copy, frame);
        }
        // The last two bytes are the last place the checksum may go.
        let mut copy = frame.clone();
        assert!(complete(&header(NEEDS_CSUM, 50, 8), &mut copy).is_ok());
    }

    #[test]
    fn a_frame_without_needs_csum_is_left_alone_whatever_its_fields() {
        let mut frame = vec![7u8; 20];
        assert!(complete(&header(DATA_VALID, u16::MAX, u16::MAX), &mut frame).is_ok());
        assert_eq!(frame, vec![7u8; 20]);
    }
}
