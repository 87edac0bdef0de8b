//! The agent's server and handlers as an ordinary host process: hello and reseed, exec, files,
//! PTY sessions, bad frames. The agent runs in-process over Unix socket pairs with a fake
//! privileged system; processes and files are real (in a temp dir).
// Test helpers: a broken set-up panics.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use forkvm_agent_protocol::*;

// ---- hello and reseed -------------------------------------------------------------------

#[test]
fn hello_reseeds_then_steps_the_clock_once_per_generation() {
    let (agent, fake) = agent(false, false);
    let mut first = Client::raw(&agent);
    let time = now_ns();
    first.request(
        0,
        &Request::Hello(Hello {
            version: PROTOCOL_VERSION,
            generation: 0,
            entropy: entropy(),
            time_ns: time,
        }),
    );
    match first.next_reply(0) {
        Reply::Hello {
            version,
            generation,
            reseeded,
            ..
        } => assert_eq!((version, generation, reseeded), (PROTOCOL_VERSION, 0, true)),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        *fake.calls.lock().unwrap(),
        [Call::Entropy(entropy()), Call::Reseed, Call::Clock(time)]
    );
    // Same generation: nothing to do.
    let mut second = Client::raw(&agent);
    assert!(matches!(
        second.hello(0),
        Reply::Hello {
            reseeded: false,
            ..
        }
    ));
    assert_eq!(fake.calls.lock().unwrap().len(), 3);
    // A fork: a new generation reseeds again, before the answer.
    let mut third = Client::raw(&agent);
    assert!(matches!(
        third.hello(1),
        Reply::Hello {
            reseeded: true,
            generation: 1,
            ..
        }
    ));
    assert_eq!(fake.calls.lock().unwrap().len(), 6);
    assert!(matches!(
        third.call(1, &Request::Ping).last(),
        Reply::Pong { .. }
    ));
}

#[test]
fn a_failed_reseed_closes_the_connection_and_is_retried() {
    let (agent, fake) = agent(false, false);
    *fake.fail_entropy.lock().unwrap() = true;
    let mut client = Client::raw(&agent);
    match client.hello(7) {
        Reply::Error(e) => {
            assert_eq!(e.kind, ErrorKind::Reseed);
            assert_eq!(e.errno, Some(libc::EPERM));
        }
        other => panic!("{other:?}"),
    }
    client.expect_closed();
    assert!(fake.calls.lock().unwrap().is_empty());
    // The generation was not taken as seen: the next hello reseeds.
    *fake.fail_entropy.lock().unwrap() = false;
    let mut client = Client::raw(&agent);
    assert!(matches!(
        client.hello(7),
        Reply::Hello { reseeded: true, .. }
    ));
}

#[test]
fn bad_hellos_are_refused() {
    let (agent, fake) = agent(false, false);
    let cases: Vec<(Request, ErrorKind)> = vec![
        (
            Request::Hello(Hello {
                version: PROTOCOL_VERSION + 1,
                generation: 0,
                entropy: entropy(),
                time_ns: 0,
            }),
            ErrorKind::Version,
        ),
        (
            Request::Hello(Hello {
                version: PROTOCOL_VERSION,
                generation: 0,
                entropy: vec![1; MIN_ENTROPY - 1],
                time_ns: 0,
            }),
            ErrorKind::InvalidArgument,
        ),
        (
            Request::Hello(Hello {
                version: PROTOCOL_VERSION,
                generation: 0,
                entropy: vec![1; MAX_ENTROPY + 1],
                time_ns: 0,
            }),
            ErrorKind::InvalidArgument,
        ),
        (Request::Ping, ErrorKind::NotHello),
    ];
    for (request, kind) in cases {
        let mut client = Client::raw(&agent);
        match client.call(0, &request).last() {
            Reply::Error(e) => assert_eq!(e.kind, kind),
            other => panic!("{other:?}"),
        }
        client.expect_closed();
    }
    assert!(fake.calls.lock().unwrap().is_empty());
    // A second hello on a connection is refused too.
    let mut client = Client::connect(&agent, 0);
    assert_eq!(client.hello(0), reply_error(ErrorKind::NotHello));
    client.expect_closed();
}

fn reply_error(kind: ErrorKind) -> Reply {
    Reply::Error(ErrorReply {
        kind,
        message: "hello is only the first request".into(),
        errno: None,
    })
}

#[test]
fn ping_and_shutdown() {
    let (agent, fake) = agent(false, false);
    let mut client = Client::connect(&agent, 0);
    assert!(matches!(
        client.call(1, &Request::Ping).last(),
        Reply::Pong { sessions: 0, .. }
    ));
    let not_init = client.call(
        2,
        &Request::Shutdown {
            action: PowerAction::PowerOff,
        },
    );
    assert_eq!(not_init.error().kind, ErrorKind::NotInit);
    assert!(
        !fake
            .calls
            .lock()
            .unwrap()
            .contains(&Call::Power(PowerAction::PowerOff))
    );

    let (agent, fake) = common::agent(false, true);
    let mut client = Client::connect(&agent, 0);
    let done = client.call(
        1,
        &Request::Shutdown {
            action: PowerAction::Reboot,
        },
    );
    assert_eq!(*done.last(), Reply::Ok);
    // The reply goes out first, then the agent powers off.
    let deadline = Instant::now() + Duration::from_secs(5);
    while fake.calls.lock().unwrap().last() != Some(&Call::Power(PowerAction::Reboot)) {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            fake.calls.lock().unwrap()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

// ---- bad frames ---------------------------------------------------------------------------

#[test]
fn bad_frames_close_only_their_connection() {
    let (agent, _) = agent(false, false);
    let mut bystander = Client::connect(&agent, 0);
    let header = |len: u32, kind: u8, id: u32| {
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.push(kind);
        bytes.extend(id.to_le_bytes());
        bytes
    };
    let bad: Vec<(Vec<u8>, ErrorKind, u32)> = vec![
        (header(0, 9, 1), ErrorKind::BadFrame, 0),
        (header(0, 0, 1), ErrorKind::BadFrame, 0),
        (
            header(MAX_PAYLOAD as u32 + 1, 2, 1),
            ErrorKind::Oversized,
            0,
        ),
        (header(u32::MAX, 1, 1), ErrorKind::Oversized, 0),
        (
            [header(8, 1, 5), b"{garbage".to_vec()].concat(),
            ErrorKind::BadMessage,
            5,
        ),
        (
            [header(17, 1, 6), br#"{"op":"launch"}  "#.to_vec()].concat(),
            ErrorKind::BadMessage,
            6,
        ),
        (
            [header(1, 3, 2), b"x".to_vec()].concat(),
            ErrorKind::BadFrame,
            2,
        ),
    ];
    for (bytes, kind, id) in bad {
        let mut client = Client::connect(&agent, 0);
        client.send_raw(&bytes);
        let frame = client.read().unwrap();
        assert_eq!(frame.id, id);
        match frame.decode::<Reply>().unwrap() {
            Reply::Error(e) => assert_eq!(e.kind, kind, "{bytes:?}"),
            other => panic!("{other:?}"),
        }
        client.expect_closed();
        // The agent still serves everyone else.
        assert!(matches!(
            bystander.call(1, &Request::Ping).last(),
            Reply::Pong { .. }
        ));
    }
    // A frame cut short by the host closing its side.
    let mut client = Client::connect(&agent, 0);
    client.send_raw(&header(10, 2, 1));
    client.send_raw(b"abc");
    client.stream.shutdown(std::net::Shutdown::Write).unwrap();
    match client.read().unwrap().decode::<Reply>().unwrap() {
        Reply::Error(e) => assert_eq!(e.kind, ErrorKind::BadFrame),
        other => panic!("{other:?}"),
    }
    client.expect_closed();
    // Garbage before the hello.
    let mut client = Client::raw(&agent);
    client.send_raw(b"GET / HTTP/1.1\r\n\r\n");
    assert!(matches!(
        client.read().unwrap().decode::<Reply>().unwrap(),
        Reply::Error(_)
    ));
    client.expect_closed();
    assert!(matches!(
        bystander.call(2, &Request::Ping).last(),
        Reply::Pong { .. }
    ));
}

// ---- exec ---------------------------------------------------------------------------------

#[test]
fn exec_echo_streams_stdout_after_started() {
    let (agent, _) = agent(false, false);
    let mut client = Client::connect(&agent, 0);
    let outcome = client.exec(1, &["echo", "hello", "world"]);
    assert!(matches!(outcome.replies[0], Reply::Started { pid } if pid > 0));
    assert_eq!(outcome.stdout(), "hello world\n");
    assert_eq!(
        outcome.exited(),
        ExitStatus {
            code: Some(0),
            signal: None,
            timed_out: false
        }
    );
}

#[test]
fn exec_failure_stderr_and_exit_code() {
    let (agent, _) = agent(false, false);
    let mut client = Client::connect(&agent, 0);
    let outcome = client.exec(1, &["sh", "-c", "echo oops >&2; exit 3"]);
    assert_eq!(outcome.stderr, b"oops\n");
    assert!(outcome.stdout.is_empty());
    assert_eq!(outcome.exited().code, Some(3));
    let outcome = client.exec(2, &["sh", "-c", "kill -TERM $$"]);
    assert_eq!(outcome.exited().signal, Some(libc::SIGTERM));
    assert_eq!(outcome.exited().code, None);
}

#[test]
fn exec_errors() {
    let (agent, _) = agent(false, false);
    let mut client = Client::connect(&agent, 0);
    for argv in [&["no-such-command-forkvm"][..], &["/nonexistent/program"]] {
        let outcome = client.exec(1, argv);
        assert_eq!(outcome.replies.len(), 1);
        let error = outcome.error();
        assert_eq!(error.kind, ErrorKind::ProgramNotFound, "{error:?}");
        assert_eq!(error.errno, Some(libc::ENOENT));
    }
    // A path through a file: ENOTDIR, still the program.
    let error = client.exec(1, &["/etc/passwd/program"]).error();
    assert_eq!(error.kind, ErrorKind::ProgramNotFound, "{error:?}");
    assert_eq!(error.errno, Some(libc::ENOTDIR));
    assert_eq!(client.exec(2, &[]).error().kind, ErrorKind::InvalidArgument);
    let bad_env = Request::Exec(ExecRequest {
        argv: vec!["true".into()],
        env: vec![("A=B".into(), "1".into())],
        ..ExecRequest::default()
    });
    assert_eq!(
        client.call(3, &bad_env).error().kind,
        ErrorKind::InvalidArgument
    );
    let bad_cwd = Request::Exec(ExecRequest {
        argv: vec!["true".into()],
        cwd: Some("/nonexistent/dir".into()),
        ..ExecRequest::default()
    });
    let error = client.call(4, &bad_cwd).error();
    assert_eq!(error.kind, ErrorKind::NotFound, "{error:?}");
    assert!(error.message.contains("/nonexistent/dir"), "{error:?}");
    let bad_user = Request::Exec(ExecRequest {
        argv: vec!["true".into()],
        user: Some("no-such-user-forkvm".into()),
        ..ExecRequest::default()
    });
    assert_eq!(
        client.call(5, &bad_user).error().kind,
        ErrorKind::InvalidArgument
    );
    // The connection is fine after all that.
    assert_eq!(client.exec(6, &["true"]).exited().code, Some(0));
}

#[test]
fn missing_program_and_missing_cwd_are_told_apart() {
    let (agent, _) = agent(false, false);
    let mut client = Client::connect(&agent, 0);
    let dir = temp_dir("missing");
    // A script whose interpreter is missing: execve fails with ENOENT, but the program exists.
    let script = format!("{dir}/script");
    fs::write(&script, "#!/nonexistent/interpreter\n").unwrap();
    fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let exec = |argv: &[&str], cwd: Option<&str>, env: &[(&str, &str)], clear_env: bool| {
        Request::Exec(ExecRequest {
            argv: argv.iter().map(|a| (*a).into()).collect(),
            cwd: cwd.map(Into::into),
            env: env
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            clear_env,
            ..ExecRequest::default()
        })
    };
    let cases = [
        // A missing program with a working directory that exists.
        (
            exec(&["no-such-command-forkvm"], Some(&dir), &[], false),
            ErrorKind::ProgramNotFound,
        ),
        (
            exec(&["/nonexistent/program"], Some(&dir), &[], false),
            ErrorKind::ProgramNotFound,
        ),
        // Relative paths are looked up from the working directory.
        (
            exec(&["./no-such-program"], Some(&dir), &[], false),
            ErrorKind::ProgramNotFound,
        ),
        (
            exec(&["./script"], Some(&dir), &[], false),
            ErrorKind::NotFound,
        ),
        (exec(&[&script], None, &[], false), ErrorKind::NotFound),
        // A missing working directory, whether the program exists or not.
        (
            exec(&["true"], Some("/nonexistent/dir"), &[], false),
            ErrorKind::NotFound,
        ),
        (
            exec(
                &["no-such-command-forkvm"],
                Some("/nonexistent/dir"),
                &[],
                false,
            ),
            ErrorKind::NotFound,
        ),
        // The child's PATH is the one searched.
        (
            exec(&["true"], None, &[("PATH", "/nonexistent")], false),
            ErrorKind::ProgramNotFound,
        ),
        (
            exec(&["script"], None, &[("PATH", &dir)], false),
            ErrorKind::NotFound,
        ),
        (
            exec(&["script"], None, &[("PATH", &dir)], true),
            ErrorKind::NotFound,
        ),
    ];
    for (id, (request, kind)) in cases.into_iter().enumerate() {
        let error = client.call(id as u32 + 1, &request).error();
        assert_eq!(error.kind, kind, "{request:?}: {error:?}");
        assert_eq!(error.errno, Some(libc::ENOENT), "{request:?}: {error:?}");
    }
    // Still runs what exists, from the default PATH when the environment has none.
    let found = exec(&["sh", "-c", "exit 4"], Some(&dir), &[], true);
    assert_eq!(client.call(20, &found).exited().code, Some(4));
}

#[test]
fn exec_timeout_kills_the_process_group() {
    let (agent, _) = agent(false, false);
    let mut client = Client::connect(&agent, 0);
    let start = Instant::now();
    // The background sleep holds the output pipes: it must die with the group.
    let outcome = client.call(
        1,
        &Request::Exec(ExecRequest {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "sleep 30 & echo started; sleep 30".into(),
            ],
            timeout_ms: Some(300),
            ..ExecRequest::default()
        }),
    );
    let elapsed = start.elapsed();
    assert_eq!(outcome.stdout(), "started\n");
    assert_eq!(
        outcome.exited(),
        ExitStatus {
            code: None,
            signal: Some(libc::SIGKILL),
            timed_out: true
        }
    );
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
}

#[test]
fn exec_signal_and_duplicate_ids() {
    let (agent, _) = agent(false, false);
    let mut client = Client::connect(&agent, 0);
    client.request(7, &exec_request(&["sleep", "30"]));
    assert!(matches!(client.next_reply(7), Reply::Started { .. }));
    // Id 7 is taken while the exec runs.
    let duplicate = client.exec(7, &["true"]);
    assert_eq!(duplicate.error().kind, ErrorKind::DuplicateId);
    let unknown = client.call(
        8,
        &Request::Signal {
            target: 99,
            signal: libc::SIGTERM,
        },
    );
    assert_eq!(unknown.error().kind, ErrorKind::NotFound);
    let signalled = client.call(
        8,
        &Request::Signal {
            target: 7,
            signal: libc::SIGTERM,
        },
    );
    assert_eq!(*signalled.last(), Reply::Ok);
    let outcome = client.finish(7);
    assert_eq!(outcome.exited().signal, Some(libc::SIGTERM));
    // Free again once finished.
    assert_eq!(client.exec(7, &["true"]).exited().code, Some(0));
}

#[test]
fn exec_stdin_env_cwd() {
    let (agent, _) = agent(false, false);
    let mut client = Client::connect(&agent, 0);
    // stdin, in pieces, then a large amount.
    client.request(
        1,
        &Request::Exec(ExecRequest {
            argv: vec!["cat".into()],
            stdin: true,
            ..ExecRequest::default()
        }),
    );
    client.data(1, b"abc");
    client.data(1, b"def\n");
    client.eof(1);
    let outcome = client.finish(1);
    assert_eq!(outcome.stdout(), "abcdef\n");
    assert_eq!(outcome.exited().code, Some(0));

    let big = pattern(3 << 20 | 12345, 1);
    client.request(
        2,
        &Request::Exec(ExecRequest {
            argv: vec!["cat".into()],
            stdin: true,
            ..ExecRequest::default()
        }),
    );
    client.data(2, &big[..]);
    client.eof(2);
    let outcome = client.finish(2);
    assert_eq!(outcome.stdout.len(), big.len());
    assert_eq!(checksum(&outcome.stdout), checksum(&big));

    // Without stdin: /dev/null.
    assert_eq!(client.exec(3, &["wc", "-c"]).stdout().trim(), "0");

    let dir = temp_dir("cwd");
    let outcome = client.call(
        4,
        &Request::Exec(ExecRequest {
            argv: vec!["sh".into(), "-c".into(), "echo \"$FOO|$BAR\"; pwd".into()],
            env: vec![
                ("FOO".into(), "foo value".into()),
                ("BAR".into(), String::new()),
            ],
            cwd: Some(dir.clone()),
            ..ExecRequest::default()
        }),
    );
    assert_eq!(outcome.stdout(), format!("foo value|\n{dir}\n"));
    let outcome = client.call(
        5,
        &Request::Exec(ExecRequest {
            argv: vec!["env".into()],
            env: vec![("ONLY".into(), "1".into())],
            clear_env: true,
            ..ExecRequest::default()
        }),
    );
    assert_eq!(outcome.stdout(), "ONLY=1\n");
}

#[test]
fn exec_output_streams_in_order_as_produced() {
    let (agent, _) = agent(false, false);
    let mut client = Client::connect(&agent, 0);
    client.request(
        1,
        &exec_request(&[
            "sh",
            "-c",
            "echo one; sleep 0.3; echo two >&2; sleep 0.3; echo three",
        ]),
    );
    assert!(matches!(client.next_reply(1), Reply::Started { .. }));
    let mut seen = Vec::new();
    let start = Instant::now();
    loop {
        let frame = client.next_for(1);
        if frame.kind == Kind::Control {
            assert!(matches!(frame.decode::<Reply>().unwrap(), Reply::Exited(_)));
            break;
        }
        seen.push((frame.kind, frame.payload, start.elapsed()));
    }
    let kinds_and_text: Vec<(Kind, &[u8])> = seen.iter().map(|(k, p, _)| (*k, &p[..])).collect();
    assert_eq!(
        kinds_and_text,
        [
            (Kind::Data, &b"one\n"[..]),
            (Kind::Stderr, b"two\n"),
            (Kind::Data, b"three\n")
        ]
    );
    // "one" came while the process was still running, well before "three".
    assert!(
        seen[2].2 - seen[0].2 >= Duration::from_millis(400),
        "{seen:?}"
    );
}

#[test]
fn exec_requests_run_concurrently_on_one_connection() {
    let (agent, _) = agent(false, false);
    let mut client = Client::connect(&agent, 0);
    let start = Instant::now();
    for id in 1..=4 {
        client.request(
            id,
            &exec_request(&["sh", "-c", &format!("sleep 0.5; echo {id}")]),
        );
    }
    for id in (1..=4).rev() {
        let outcome = client.finish(id);
        assert_eq!(outcome.stdout(), format!("{id}\n"));
    }
    assert!(
        start.elapsed() < Duration::from_millis(1900),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn exec_does_not_wait_for_background_processes() {
    let (agent, _) = agent(false, false);
    let mut client = Client::connect(&agent, 0);
    let start = Instant::now();
    let outcome = client.exec(1, &["sh", "-c", "sleep 3 & echo done"]);
    assert_eq!(outcome.stdout(), "done\n");
    assert_eq!(outcome.exited().code, Some(0));
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn exec_as_another_user() {
    let (agent, _) = agent(false, false);
    let mut client = Client::connect(&agent, 0);
    let request = Request::Exec(ExecRequest {
        argv: vec![
            "sh".into(),
            "-c".into(),
            "id -u; id -g; echo $HOME $USER".into(),
        ],
        user: Some("65534:65534".into()),
        ..ExecRequest::default()
    });
    let outcome = client.call(1, &request);
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } == 0 {
        let (_, home, name) = fs::read_to_string("/etc/passwd")
            .unwrap()
            .lines()
            .find_map(|line| {
                let f: Vec<&str> = line.split(':').collect();
                (f.get(2) == Some(&"65534")).then(|| (0, f[5].to_owned(), f[0].to_owned()))
            })
            .unwrap_or((0, "/".into(), "65534".into()));
        assert_eq!(outcome.stdout(), format!("65534\n65534\n{home} {name}\n"));
    } else {
        // Not root: switching users must be refused, not ignored.
        assert_eq!(outcome.error().kind, ErrorKind::PermissionDenied);
    }
}

#[test]
fn closing_the_connection_kills_its_execs() {
    let (agent, _) = agent(false, false);
    let mut client = Client::connect(&agent, 0);
    client.request(1, &exec_request(&["sleep", "30"]));
    let Reply::Started { pid } = client.next_reply(1) else {
        panic!()
    };
    drop(client);
    let gone = Instant::now() + Duration::from_secs(5);
    // Reaped by the agent's waiter: /proc/<pid> disappears.
    while fs::metadata(format!("/proc/{pid}")).is_ok() {
        assert!(Instant::now() < gone, "exec {pid} survived its connection");
        thread::sleep(Duration::from_millis(20));
    }
}
