//! The connection against a fake agent on a socket pair: bounded buffers and backpressure, and
//! waiting requests ended by their VM's end.

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use forkvm::{ErrorKind, GuestExit};
use forkvm_agent_protocol::{Kind, Reply, Request, read_frame, write_control, write_parts};

use super::{CALL_BUFFER, Connection, FRAME_COST, OVERCOMMIT};
use crate::AgentError;
use crate::life::VmLife;

/// A frame of the size the guest agent sends output in.
const CHUNK: usize = 64 << 10;

/// The fake agent's side: what it wrote, and whether it should keep writing.
#[derive(Default)]
struct Fake {
    written: AtomicU64,
    stop: AtomicBool,
}

/// A fake agent on `theirs`: answers Hello; floods the first request after it with data frames
/// (until `stop` or a failed write); answers a `Signal` with `Ok` and then stops the flood.
fn fake_agent(theirs: UnixStream, fake: Arc<Fake>) {
    let writer = Arc::new(Mutex::new(theirs.try_clone().unwrap()));
    let mut reader = theirs;
    let mut flooding = None;
    while let Ok(frame) = read_frame(&mut reader) {
        if frame.kind != Kind::Control {
            continue;
        }
        match frame.decode::<Request>() {
            Ok(Request::Hello(_)) => {
                let hello = Reply::Hello {
                    version: forkvm_agent_protocol::PROTOCOL_VERSION,
                    agent: "fake".into(),
                    generation: 1,
                    reseeded: false,
                };
                write_control(&mut *writer.lock().unwrap(), 0, &hello).unwrap();
            }
            Ok(Request::Signal { .. }) => {
                fake.stop.store(true, Ordering::SeqCst);
                let _ = write_control(&mut *writer.lock().unwrap(), frame.id, &Reply::Ok);
            }
            Ok(Request::Ping) => {}
            _ if flooding.is_none() => {
                let (writer, fake, id) = (writer.clone(), fake.clone(), frame.id);
                flooding = Some(thread::spawn(move || {
                    let chunk = vec![0u8; CHUNK];
                    while !fake.stop.load(Ordering::SeqCst) {
                        if write_parts(&mut *writer.lock().unwrap(), Kind::Data, id, &chunk)
                            .is_err()
                        {
                            return;
                        }
                        fake.written.fetch_add(CHUNK as u64, Ordering::SeqCst);
                    }
                }));
            }
            _ => {}
        }
    }
    fake.stop.store(true, Ordering::SeqCst);
    if let Some(flooding) = flooding {
        let _ = flooding.join();
    }
}

fn connect(life: Option<&VmLife>) -> (Arc<Connection>, Arc<Fake>) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let fake = Arc::new(Fake::default());
    let agent = fake.clone();
    thread::spawn(move || fake_agent(theirs, agent));
    let connection = Connection::open(ours, 1, Duration::from_secs(10), life).unwrap();
    (Arc::new(connection), fake)
}

/// Waits until `fake` has written nothing more for 300 ms (its writes are blocked), at most 20 s.
fn until_blocked(fake: &Fake) -> u64 {
    let mut last = fake.written.load(Ordering::SeqCst);
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        thread::sleep(Duration::from_millis(300));
        let now = fake.written.load(Ordering::SeqCst);
        if now == last && now > 0 || Instant::now() > give_up {
            return now;
        }
        last = now;
    }
}

#[test]
fn output_nobody_reads_stays_within_the_bound_and_stops_the_writer() {
    let (connection, fake) = connect(None);
    let call = connection.start(&Request::Ping).unwrap();
    // A second request, so that the flood is for the first one, made above.
    let flood = connection
        .start(&Request::Stat { path: "/".into() })
        .unwrap();
    let written = until_blocked(&fake);
    assert!(written > 0, "the fake agent wrote nothing");
    let bound = CALL_BUFFER + CHUNK + FRAME_COST;
    assert!(
        flood.buffered() <= bound,
        "{} bytes buffered, bound {bound}",
        flood.buffered()
    );
    // What the fake wrote beyond the buffer sits in the socket's buffers: its writes block.
    assert!(
        written < (CALL_BUFFER as u64) + (16 << 20),
        "{written} bytes written: the writer was not stopped"
    );
    assert_eq!(
        fake.written.load(Ordering::SeqCst),
        written,
        "still writing"
    );
    // Reading makes room, and the writer goes on.
    for _ in 0..64 {
        let frame = flood
            .next(Some(Instant::now() + Duration::from_secs(10)))
            .unwrap();
        assert_eq!(frame.payload.len(), CHUNK);
    }
    assert!(
        until_blocked(&fake) > written,
        "reading did not let the writer go on"
    );
    assert!(flood.buffered() <= bound);
    drop(call);
}

#[test]
fn an_answer_gets_past_output_nobody_reads() {
    let (connection, fake) = connect(None);
    let flood = connection
        .start(&Request::Stat { path: "/".into() })
        .unwrap();
    until_blocked(&fake);
    // A signal on the same connection (as `Process::signal` sends) is answered although the
    // flood's buffer is full: the flood may then overcommit, within its own bound.
    let signal = connection
        .start(&Request::Signal {
            target: 1,
            signal: 9,
        })
        .unwrap();
    let started = Instant::now();
    let reply = signal.reply(Some(started + Duration::from_secs(20)));
    assert!(matches!(reply, Ok(Reply::Ok)), "{reply:?}");
    assert!(
        flood.buffered() <= CALL_BUFFER * OVERCOMMIT + CHUNK + FRAME_COST,
        "{}",
        flood.buffered()
    );
}

#[test]
fn a_waiting_request_fails_at_once_when_the_vm_ends() {
    let life = VmLife::default();
    let (connection, _fake) = connect(Some(&life));
    let call = connection.start(&Request::Ping).unwrap();
    let waiting = thread::spawn(move || {
        let result = call.next(None);
        (result, Instant::now())
    });
    thread::sleep(Duration::from_millis(200));
    let ended = Instant::now();
    life.end(Some(GuestExit::Stopped));
    let (result, returned) = waiting.join().unwrap();
    let error = result.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::NotRunning, "{error:?}");
    assert!(
        returned.duration_since(ended) < Duration::from_secs(1),
        "took {:?}",
        returned.duration_since(ended)
    );
    // New requests and connections fail at once too.
    let error = connection.start(&Request::Ping).err().unwrap();
    assert_eq!(error.kind(), ErrorKind::NotRunning, "{error:?}");
    assert!(!connection.is_open());
    let (ours, _theirs) = UnixStream::pair().unwrap();
    let started = Instant::now();
    let error = Connection::open(ours, 1, Duration::from_secs(30), Some(&life))
        .err()
        .unwrap();
    assert_eq!(error.kind(), ErrorKind::NotRunning, "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[test]
fn a_vm_that_ends_during_the_hello_fails_the_connection_at_once() {
    let life = Arc::new(VmLife::default());
    // Nobody answers on the other end.
    let (ours, _theirs) = UnixStream::pair().unwrap();
    let ending = life.clone();
    let ender = thread::spawn(move || {
        thread::sleep(Duration::from_millis(200));
        ending.end(None);
    });
    let started = Instant::now();
    let error = Connection::open(ours, 1, Duration::from_secs(30), Some(&life))
        .err()
        .unwrap();
    ender.join().unwrap();
    assert_eq!(error.kind(), ErrorKind::NotRunning, "{error:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_hello_that_never_comes_times_out_on_time() {
    let (ours, _theirs) = UnixStream::pair().unwrap();
    let started = Instant::now();
    let error = Connection::open(ours, 1, Duration::from_millis(300), None)
        .err()
        .unwrap();
    assert!(matches!(error, AgentError::NotReady(_)), "{error:?}");
    assert!(
        started.elapsed() < Duration::from_millis(1300),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn frames_for_a_dropped_request_are_dropped_not_buffered() {
    let (connection, fake) = connect(None);
    let flood = connection
        .start(&Request::Stat { path: "/".into() })
        .unwrap();
    until_blocked(&fake);
    let before = fake.written.load(Ordering::SeqCst);
    drop(flood);
    // The reader goes on and discards: the writer is no longer held up.
    let give_up = Instant::now() + Duration::from_secs(20);
    while fake.written.load(Ordering::SeqCst) < before + (64 << 20) && Instant::now() < give_up {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(fake.written.load(Ordering::SeqCst) >= before + (64 << 20));
    fake.stop.store(true, Ordering::SeqCst);
}

#[test]
fn a_smaller_limit_holds_less() {
    let (connection, fake) = connect(None);
    connection.set_buffer_limit(256 << 10);
    let flood = connection
        .start(&Request::Stat { path: "/".into() })
        .unwrap();
    until_blocked(&fake);
    let bound = (256 << 10) + CHUNK + FRAME_COST;
    assert!(flood.buffered() <= bound, "{} > {bound}", flood.buffered());
    assert!(flood.buffered() > 0);
}
