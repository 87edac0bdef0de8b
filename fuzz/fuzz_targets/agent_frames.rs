//! The host's decoder of the guest agent's frames (`forkvm_agent_protocol::read_frame`, then a
//! control frame's JSON as a `Reply`), as the agent client's reader runs it on what comes out
//! of the guest: arbitrary bytes as a stream of frames until the first that does not read.
//! Nothing may panic, and no frame may carry more than `MAX_PAYLOAD` (the header is checked
//! before the payload is allocated).

#![no_main]

use forkvm_agent_protocol::{Kind, MAX_PAYLOAD, Reply, read_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut stream = data;
    while let Ok(frame) = read_frame(&mut stream) {
        assert!(frame.payload.len() <= MAX_PAYLOAD);
        match frame.kind {
            Kind::Control => {
                let _ = frame.decode::<Reply>();
            }
            // Not control: decoding must refuse, not misread.
            _ => assert!(frame.decode::<Reply>().is_err()),
        }
    }
});
