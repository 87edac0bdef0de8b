//! The host API of the guest agent (`forkvm_agent_client`), against the real agent's server run in
//! this process over Unix socket pairs, with its privileged calls recorded instead of made (so
//! this host's RNG and clock are left alone). End to end in a Linux guest: tests/linux.rs.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use forkvm_agent_client::{Agent, AgentError, Command, Connector, PtyEvent, Stream, WriteOptions};
use forkvm_agent_protocol::{ErrorKind, PowerAction};

use forkvm_agent::server::{Agent as AgentServer, Config, serve_connection};
use forkvm_tests::agent_server::{Recorder, TIMEOUT, agent, agent_server};

#[test]
fn the_hello_reseeds_once_per_generation_and_requests_follow() {
    let (connector, calls) = agent_server();
    let agent = Agent::connect(connector.clone(), 7, TIMEOUT).unwrap();
    assert!(agent.ping().is_ok());
    // A second connection of the same generation does not reseed again.
    let again = Agent::connect(connector.clone(), 7, TIMEOUT).unwrap();
    assert!(again.ping().is_ok());
    {
        let calls = calls.lock().unwrap();
        assert_eq!(calls.entropy, [32], "fresh host entropy, once");
        assert_eq!(calls.clock.len(), 1, "the clock stepped once");
    }
    // A fork child (the next generation) reseeds before it is served.
    let child = Agent::connect(connector, 8, TIMEOUT).unwrap();
    assert!(child.ping().is_ok());
    assert_eq!(calls.lock().unwrap().entropy.len(), 2);
}

#[test]
fn commands_report_output_status_and_failures() {
    let agent = agent();
    let out = agent.exec(["echo", "hello"]).unwrap();
    assert!(out.success());
    assert_eq!(out.stdout_text(), "hello\n");

    let out = agent
        .run(&Command::new([
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ]))
        .unwrap();
    assert_eq!(
        (out.stdout_text(), out.stderr_text(), out.status.code),
        ("out\n".into(), "err\n".into(), Some(3))
    );

    match agent.exec(["/no/such/program"]) {
        Err(AgentError::CommandNotFound(what)) => assert!(what.contains("/no/such/program")),
        other => panic!("{other:?}"),
    }
    // Also with a working directory that exists, and with a program looked up on PATH.
    for argv in ["/no/such/program", "no-such-program-forkvm"] {
        match agent.run(&Command::new([argv]).cwd("/")) {
            Err(AgentError::CommandNotFound(what)) => assert!(what.contains(argv), "{what}"),
            other => panic!("{other:?}"),
        }
    }
    // A missing working directory is not a missing command.
    for argv in ["true", "no-such-program-forkvm"] {
        match agent.run(&Command::new([argv]).cwd("/no/such/dir")) {
            Err(AgentError::Agent(e)) => assert_eq!(e.kind, ErrorKind::NotFound, "{e:?}"),
            other => panic!("{other:?}"),
        }
    }
    match agent.pty(["no-such-program-forkvm"], 24, 80) {
        Err(AgentError::CommandNotFound(what)) => assert!(what.contains("no-such-program")),
        other => panic!("{other:?}"),
    }

    let out = agent
        .run(&Command::new(["sleep", "30"]).timeout(Duration::from_millis(200)))
        .unwrap();
    assert!(
        out.status.timed_out && out.status.signal.is_some(),
        "{out:?}"
    );

    let out = agent
        .run(
            &Command::new(["sh", "-c", "cat; echo \"$GREETING\"; pwd"])
                .stdin("typed\n")
                .env("GREETING", "hi")
                .cwd("/tmp"),
        )
        .unwrap();
    assert_eq!(out.stdout_text(), "typed\nhi\n/tmp\n");
}

#[test]
fn streamed_output_arrives_as_it_is_produced() {
    let agent = agent();
    let mut chunks = Vec::new();
    let status = agent
        .run_streaming(
            &Command::new(["sh", "-c", "echo one; sleep 0.3; echo two >&2"]),
            |stream, bytes| chunks.push((stream, String::from_utf8_lossy(bytes).into_owned())),
        )
        .unwrap();
    assert_eq!(status.code, Some(0));
    assert_eq!(
        chunks,
        [
            (Stream::Stdout, "one\n".to_owned()),
            (Stream::Stderr, "two\n".to_owned())
        ]
    );
}

#[test]
fn files_round_trip_and_the_tree_can_be_changed() {
    let agent = agent();
    let dir = std::env::temp_dir().join(format!("forkvm-agent-api-{}", std::process::id()));
    let dir = dir.to_str().unwrap().to_owned();
    let _ = std::fs::remove_dir_all(&dir);
    agent.mkdir(&format!("{dir}/sub"), true).unwrap();
    let data: Vec<u8> = (0..5_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let path = format!("{dir}/sub/data.bin");
    let written = agent
        .write_file(&path, &data[..], WriteOptions::default())
        .unwrap();
    assert_eq!(written, data.len() as u64);
    assert!(
        agent.read_file(&path).unwrap() == data,
        "5 MB came back intact"
    );
    agent
        .write_file(
            &path,
            &b"tail"[..],
            WriteOptions {
                append: true,
                ..WriteOptions::default()
            },
        )
        .unwrap();
    assert_eq!(agent.stat(&path).unwrap().size, data.len() as u64 + 4);
    let renamed = format!("{dir}/sub/renamed.bin");
    agent.rename(&path, &renamed).unwrap();
    let names: Vec<_> = agent
        .list(&format!("{dir}/sub"))
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["renamed.bin"]);
    match agent.read_file(&path) {
        Err(AgentError::Agent(e)) => assert_eq!(e.kind, ErrorKind::NotFound),
        other => panic!("{other:?}"),
    }
    agent.remove(&dir, true).unwrap();
    assert!(!std::path::Path::new(&dir).exists());
}

#[test]
fn a_pty_session_resizes_and_survives_its_handle() {
    let agent = agent();
    let pty = agent.pty(["sh"], 24, 80).unwrap();
    pty.write(b"stty size\n").unwrap();
    assert!(pty.read_until("24 80", TIMEOUT).unwrap().contains("24 80"));
    pty.resize(40, 100).unwrap();
    pty.write(b"stty size\n").unwrap();
    assert!(
        pty.read_until("40 100", TIMEOUT)
            .unwrap()
            .contains("40 100")
    );
    let session = pty.session();
    // Output made while nobody is attached waits for the next handle, even output made the
    // moment the detach has returned.
    // (This agent runs on the host: the file that releases the output is a fresh host path.)
    let go = std::env::temp_dir().join(format!("forkvm-pty-go-{}-{}", std::process::id(), session));
    let _ = std::fs::remove_file(&go);
    let wait = format!(
        "while [ ! -e {} ]; do sleep 0.05; done; echo detached-$((40+2))\n",
        go.display()
    );
    pty.write(wait.as_bytes()).unwrap();
    pty.read_until("done; echo", TIMEOUT).unwrap();
    pty.detach().unwrap();
    agent
        .exec(["touch".to_owned(), go.display().to_string()])
        .unwrap();
    let again = agent.pty_attach(session).unwrap();
    assert!(
        again
            .read_until("detached-42", TIMEOUT)
            .unwrap()
            .contains("detached-42")
    );
    let _ = std::fs::remove_file(&go);
    again.write(b"exit 5\n").unwrap();
    let status = loop {
        match again.read(TIMEOUT).unwrap() {
            Some(PtyEvent::Exited(status)) => break status,
            Some(PtyEvent::Output(_)) => {}
            None => panic!("the shell did not exit"),
        }
    };
    assert_eq!(status.code, Some(5));
    again.close().unwrap();
}

#[test]
fn requests_fail_cleanly_once_the_connection_is_gone() {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let server_end = theirs.try_clone().unwrap();
    let slot = Arc::new(Mutex::new(Some(ours)));
    let connector: Connector = Arc::new(move |_| {
        slot.lock()
            .unwrap()
            .take()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
    });
    let server = AgentServer::new(Config {
        system: Box::new(Recorder(Arc::default())),
        reap_all: false,
        allow_shutdown: false,
    });
    std::thread::spawn(move || serve_connection(server, theirs));
    let agent = Agent::connect(connector, 0, TIMEOUT).unwrap();
    assert!(agent.ping().is_ok());
    // The agent refuses what it may not do, and the connection carries on.
    assert!(matches!(
        agent.shutdown(PowerAction::PowerOff),
        Err(AgentError::Agent(_))
    ));
    assert!(agent.is_connected());
    // The guest side goes away (the VM stopped, say): requests fail, none hangs, and a
    // command with input cannot get a connection of its own either.
    server_end.shutdown(std::net::Shutdown::Both).unwrap();
    let t0 = std::time::Instant::now();
    while agent.is_connected() {
        assert!(t0.elapsed() < TIMEOUT);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(matches!(agent.ping(), Err(AgentError::ConnectionLost)));
    assert!(matches!(
        agent.exec(["true"]),
        Err(AgentError::ConnectionLost)
    ));
    assert!(matches!(
        agent.run(&Command::new(["cat"]).stdin("x")),
        Err(AgentError::Io(_))
    ));
}

#[test]
fn a_spawned_process_takes_input_as_it_goes_and_can_be_signalled() {
    use forkvm_agent_client::ProcessEvent;

    let agent = agent();
    let cat = agent.spawn(&Command::new(["cat"])).unwrap();
    assert!(cat.pid() > 0);
    cat.write_stdin(b"first\n").unwrap();
    assert_eq!(
        cat.next(Some(TIMEOUT)).unwrap(),
        Some(ProcessEvent::Output(Stream::Stdout, b"first\n".to_vec()))
    );
    cat.write_stdin(b"second\n").unwrap();
    cat.close_stdin().unwrap();
    let mut rest = Vec::new();
    let status = cat.wait(|_, bytes| rest.extend_from_slice(bytes)).unwrap();
    assert_eq!((status.code, rest), (Some(0), b"second\n".to_vec()));

    let sleeper = agent
        .spawn(&Command::new(["sh", "-c", "echo up; sleep 30"]))
        .unwrap();
    assert_eq!(
        sleeper.next(Some(TIMEOUT)).unwrap(),
        Some(ProcessEvent::Output(Stream::Stdout, b"up\n".to_vec()))
    );
    assert_eq!(
        sleeper.next(Some(Duration::from_millis(100))).unwrap(),
        None
    );
    sleeper.kill().unwrap();
    let status = sleeper.wait(|_, _| {}).unwrap();
    assert_eq!(status.signal, Some(libc::SIGKILL));
}

#[test]
fn a_spawned_process_is_signalled_and_fed_while_another_thread_waits_for_it() {
    let agent = agent();
    let process = agent
        .spawn(&Command::new([
            "sh",
            "-c",
            "read line; echo got $line; sleep 30",
        ]))
        .unwrap();
    // `Process` is `Sync`: one thread waits for its output while this one feeds and signals it
    // (a lock held across the wait would hold up both for good).
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let mut out = Vec::new();
            let status = process.wait(|_, bytes| out.extend_from_slice(bytes));
            (status, out)
        });
        std::thread::sleep(Duration::from_millis(100));
        process.write_stdin(b"it\n").unwrap();
        std::thread::sleep(Duration::from_millis(500)); // for `sh` to echo the line
        process.signal(libc::SIGTERM).unwrap();
        let (status, out) = waiter.join().unwrap();
        assert_eq!(status.unwrap().signal, Some(libc::SIGTERM));
        assert_eq!(out, b"got it\n");
    });
}

/// A process whose output nobody reads can still be signalled: the answer gets past the
/// output held back on its connection.
#[test]
fn a_process_whose_output_nobody_reads_can_be_killed() {
    let agent = agent();
    let process = agent.spawn(&Command::new(["cat", "/dev/zero"])).unwrap();
    let t0 = std::time::Instant::now();
    while process.buffered_bytes() < forkvm_agent_client::CALL_BUFFER / 2 {
        assert!(t0.elapsed() < TIMEOUT, "no output came");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    process.kill().unwrap();
    let status = process.wait(|_, _| {}).unwrap();
    assert_eq!(status.signal, Some(libc::SIGKILL));
}
