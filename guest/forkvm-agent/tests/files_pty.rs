//! The agent's file and PTY handlers as an ordinary host process (see `agent.rs` for the rest):
//! the agent runs in-process over Unix socket pairs with a fake privileged system; processes and
//! files are real (in a temp dir).
// Test helpers: a broken set-up panics.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs;

use common::*;
use forkvm_agent_protocol::*;

// ---- files --------------------------------------------------------------------------------

fn write_file(client: &mut Client, id: u32, request: WriteFileRequest, bytes: &[u8]) -> Outcome {
    client.request(id, &Request::WriteFile(request));
    client.data(id, bytes);
    client.eof(id);
    client.finish(id)
}

fn write_request(path: &str) -> WriteFileRequest {
    WriteFileRequest {
        path: path.into(),
        append: false,
        exclusive: false,
        mode: None,
    }
}

#[test]
fn files_write_append_and_read_large_with_checksums() {
    let (agent, _) = agent(false, false);
    let mut client = Client::connect(&agent, 0);
    let dir = temp_dir("files");
    let path = format!("{dir}/big");
    let big = pattern(5 * MAX_PAYLOAD + 777, 2);
    let written = write_file(&mut client, 1, write_request(&path), &big);
    assert_eq!(
        *written.last(),
        Reply::Written {
            bytes: big.len() as u64
        }
    );
    assert_eq!(checksum(&fs::read(&path).unwrap()), checksum(&big));

    client.request(
        2,
        &Request::ReadFile {
            path: path.clone(),
            offset: 0,
            len: None,
        },
    );
    let mut frames = 0;
    let mut read = Vec::new();
    loop {
        let frame = client.next_for(2);
        if frame.kind == Kind::Control {
            assert_eq!(
                frame.decode::<Reply>().unwrap(),
                Reply::ReadDone {
                    bytes: big.len() as u64
                }
            );
            break;
        }
        assert_eq!(frame.kind, Kind::Data);
        assert!(frame.payload.len() <= MAX_PAYLOAD);
        frames += 1;
        read.extend(frame.payload);
    }
    assert!(frames >= 6);
    assert_eq!(checksum(&read), checksum(&big));

    let part = client.call(
        3,
        &Request::ReadFile {
            path: path.clone(),
            offset: 1000,
            len: Some(5000),
        },
    );
    assert_eq!(part.stdout, big[1000..6000]);
    let past_end = client.call(
        4,
        &Request::ReadFile {
            path: path.clone(),
            offset: big.len() as u64 + 10,
            len: None,
        },
    );
    assert_eq!(*past_end.last(), Reply::ReadDone { bytes: 0 });

    // Truncate, append, exclusive, mode.
    let small = format!("{dir}/small");
    write_file(&mut client, 5, write_request(&small), b"abc");
    let appended = write_file(
        &mut client,
        6,
        WriteFileRequest {
            append: true,
            ..write_request(&small)
        },
        b"def",
    );
    assert_eq!(*appended.last(), Reply::Written { bytes: 3 });
    assert_eq!(fs::read(&small).unwrap(), b"abcdef");
    write_file(&mut client, 7, write_request(&small), b"x");
    assert_eq!(fs::read(&small).unwrap(), b"x");
    let exclusive = write_file(
        &mut client,
        8,
        WriteFileRequest {
            exclusive: true,
            ..write_request(&small)
        },
        b"y",
    );
    assert_eq!(exclusive.error().errno, Some(libc::EEXIST));
    let private = format!("{dir}/private");
    write_file(
        &mut client,
        9,
        WriteFileRequest {
            mode: Some(0o600),
            ..write_request(&private)
        },
        b"",
    );
    match client.call(10, &Request::Stat { path: private }).last() {
        Reply::Stat(stat) => {
            assert_eq!(
                (stat.file_type, stat.size, stat.mode),
                (FileType::File, 0, 0o600)
            );
        }
        other => panic!("{other:?}"),
    }
    // Errors.
    let missing = client.call(
        11,
        &Request::ReadFile {
            path: format!("{dir}/missing"),
            offset: 0,
            len: None,
        },
    );
    assert_eq!(missing.error().kind, ErrorKind::NotFound);
    let directory = client.call(
        12,
        &Request::ReadFile {
            path: dir.clone(),
            offset: 0,
            len: None,
        },
    );
    assert_eq!(directory.error().kind, ErrorKind::InvalidArgument);
    let no_dir = write_file(&mut client, 13, write_request(&format!("{dir}/a/b")), b"z");
    assert_eq!(no_dir.error().kind, ErrorKind::NotFound);
    // Data after a failed write is dropped; the connection goes on.
    client.data(13, b"late");
    client.eof(13);
    assert!(matches!(
        client.call(14, &Request::Ping).last(),
        Reply::Pong { .. }
    ));
}

#[test]
fn files_stat_list_mkdir_remove_rename() {
    let (agent, _) = agent(false, false);
    let mut client = Client::connect(&agent, 0);
    let dir = temp_dir("tree");
    let ok = |outcome: Outcome| assert_eq!(*outcome.last(), Reply::Ok, "{outcome:?}");
    ok(client.call(
        1,
        &Request::Mkdir {
            path: format!("{dir}/a/b/c"),
            parents: true,
            mode: None,
        },
    ));
    let exists = client.call(
        2,
        &Request::Mkdir {
            path: format!("{dir}/a"),
            parents: false,
            mode: None,
        },
    );
    assert_eq!(exists.error().errno, Some(libc::EEXIST));
    ok(client.call(
        3,
        &Request::Mkdir {
            path: format!("{dir}/a"),
            parents: true,
            mode: Some(0o700),
        },
    ));
    write_file(
        &mut client,
        4,
        write_request(&format!("{dir}/a/file")),
        b"12345",
    );
    std::os::unix::fs::symlink("file", format!("{dir}/a/link")).unwrap();

    match client
        .call(
            5,
            &Request::List {
                path: format!("{dir}/a"),
            },
        )
        .last()
    {
        Reply::Entries { entries } => assert_eq!(
            *entries,
            [
                DirEntry {
                    name: "b".into(),
                    file_type: FileType::Dir,
                    size: entries[0].size
                },
                DirEntry {
                    name: "file".into(),
                    file_type: FileType::File,
                    size: 5
                },
                DirEntry {
                    name: "link".into(),
                    file_type: FileType::Symlink,
                    size: 4
                },
            ]
        ),
        other => panic!("{other:?}"),
    }
    // Stat follows the link.
    match client
        .call(
            6,
            &Request::Stat {
                path: format!("{dir}/a/link"),
            },
        )
        .last()
    {
        Reply::Stat(stat) => assert_eq!((stat.file_type, stat.size), (FileType::File, 5)),
        other => panic!("{other:?}"),
    }
    match client
        .call(
            7,
            &Request::Stat {
                path: format!("{dir}/a/b"),
            },
        )
        .last()
    {
        Reply::Stat(stat) => {
            assert_eq!((stat.file_type, stat.mode), (FileType::Dir, 0o755));
            assert!(stat.mtime_ns > 1_600_000_000 * 1_000_000_000);
        }
        other => panic!("{other:?}"),
    }
    ok(client.call(
        8,
        &Request::Rename {
            from: format!("{dir}/a/file"),
            to: format!("{dir}/a/b/moved"),
        },
    ));
    assert_eq!(fs::read(format!("{dir}/a/b/moved")).unwrap(), b"12345");
    let gone = client.call(
        9,
        &Request::Stat {
            path: format!("{dir}/a/file"),
        },
    );
    assert_eq!(gone.error().kind, ErrorKind::NotFound);
    // Removing the dangling link removes the link, not its target.
    ok(client.call(
        10,
        &Request::Remove {
            path: format!("{dir}/a/link"),
            recursive: false,
        },
    ));
    let not_empty = client.call(
        11,
        &Request::Remove {
            path: format!("{dir}/a"),
            recursive: false,
        },
    );
    assert_eq!(not_empty.error().errno, Some(libc::ENOTEMPTY));
    ok(client.call(
        12,
        &Request::Remove {
            path: format!("{dir}/a"),
            recursive: true,
        },
    ));
    assert!(!fs::exists(format!("{dir}/a")).unwrap());
    let missing = client.call(
        13,
        &Request::List {
            path: format!("{dir}/a"),
        },
    );
    assert_eq!(missing.error().kind, ErrorKind::NotFound);
}

// ---- PTY sessions ---------------------------------------------------------------------------

/// Reads PTY output for `id` until it contains `needle`; returns everything read.
fn read_until(client: &mut Client, id: u32, needle: &str) -> String {
    let mut text = String::new();
    while !text.contains(needle) {
        let frame = client.next_for(id);
        match frame.kind {
            Kind::Data => text.push_str(&String::from_utf8_lossy(&frame.payload)),
            _ => panic!(
                "{:?} while waiting for {needle:?} in {text:?}",
                frame.decode::<Reply>()
            ),
        }
    }
    text
}

fn open_shell(client: &mut Client, id: u32) -> u64 {
    client.request(
        id,
        &Request::PtyOpen(PtyOpenRequest {
            argv: vec!["sh".into()],
            env: vec![("PS1".into(), "$ ".into())],
            cwd: None,
            user: None,
            rows: 24,
            cols: 80,
        }),
    );
    match client.next_reply(id) {
        Reply::PtyOpened { session, pid } => {
            assert!(pid > 0);
            session
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn pty_echo_resize_detach_reattach_close() {
    let (agent, _) = agent(false, false);
    let mut client = Client::connect(&agent, 0);
    let session = open_shell(&mut client, 1);
    client.data(1, b"stty size; echo h''i\n");
    // "hi" only appears in the output, not in the echoed command.
    let text = read_until(&mut client, 1, "hi\r\n");
    assert!(text.contains("24 80"), "{text:?}");

    let resized = client.call(
        2,
        &Request::PtyResize {
            session,
            rows: 50,
            cols: 132,
        },
    );
    assert_eq!(*resized.last(), Reply::Ok);
    client.data(1, b"stty size\n");
    read_until(&mut client, 1, "50 132");
    assert!(matches!(
        client.call(3, &Request::Ping).last(),
        Reply::Pong { sessions: 1, .. }
    ));

    // Output produced while detached is kept for the next attach. (Detached explicitly: output
    // the agent writes before it sees a closed connection end would be lost, and on a loaded
    // machine that took more than a second.)
    client.data(1, b"sleep 1; echo la''ter\n");
    let detached = client.call(4, &Request::PtyDetach { session });
    assert_eq!(*detached.last(), Reply::Ok);
    drop(client);
    let mut client = Client::connect(&agent, 0);
    client.request(5, &Request::PtyAttach { session });
    assert_eq!(client.next_reply(5), Reply::PtyAttached { session });
    read_until(&mut client, 5, "later\r\n");
    // Input now goes in through the new attachment.
    client.data(5, b"echo ag''ain\n");
    read_until(&mut client, 5, "again\r\n");
    // Another connection can take the session over.
    let mut other = Client::connect(&agent, 0);
    other.request(1, &Request::PtyAttach { session });
    assert_eq!(other.next_reply(1), Reply::PtyAttached { session });
    other.data(1, b"echo th''ere\n");
    read_until(&mut other, 1, "there\r\n");

    let closed = client.call(6, &Request::PtyClose { session });
    assert_eq!(*closed.last(), Reply::Ok);
    let gone = client.call(7, &Request::PtyAttach { session });
    assert_eq!(gone.error().kind, ErrorKind::NotFound);
    let gone = client.call(8, &Request::PtyClose { session });
    assert_eq!(gone.error().kind, ErrorKind::NotFound);
}

/// After `PtyDetach` is answered, every byte of output goes to the backlog, even when the program
/// writes it at once and the detaching connection stays open (it used to be lost when written
/// before the agent saw the connection close).
#[test]
fn output_right_after_a_detach_is_kept_for_the_next_attach() {
    let (agent, _) = agent(false, false);
    let dir = temp_dir("pty-detach");
    let go = format!("{dir}/go");
    let mut client = Client::connect(&agent, 0);
    let session = open_shell(&mut client, 1);
    client.data(
        1,
        format!("while [ ! -e {go} ]; do sleep 0.01; done; echo de''tached\n").as_bytes(),
    );
    read_until(&mut client, 1, "done; echo");
    let detached = client.call(2, &Request::PtyDetach { session });
    assert_eq!(*detached.last(), Reply::Ok);
    std::fs::write(&go, b"").unwrap();
    // The old connection stays open and gets nothing more for the session.
    let mut other = Client::connect(&agent, 0);
    other.request(1, &Request::PtyAttach { session });
    assert_eq!(other.next_reply(1), Reply::PtyAttached { session });
    read_until(&mut other, 1, "detached\r\n");
    // A detach from a connection the session is not attached to changes nothing.
    let stray = client.call(3, &Request::PtyDetach { session });
    assert_eq!(*stray.last(), Reply::Ok);
    other.data(1, b"echo st''ill\n");
    read_until(&mut other, 1, "still\r\n");
    // An unknown session is reported.
    let unknown = client.call(
        4,
        &Request::PtyDetach {
            session: session + 100,
        },
    );
    assert_eq!(unknown.error().kind, ErrorKind::NotFound);
}

#[test]
fn pty_exit_is_reported_and_kept_for_attach() {
    let (agent, _) = agent(false, false);
    let mut client = Client::connect(&agent, 0);
    let session = open_shell(&mut client, 1);
    client.data(1, b"exit 7\n");
    let outcome = client.finish(1);
    match outcome.last() {
        Reply::PtyExited { session: s, status } => {
            assert_eq!((*s, status.code), (session, Some(7)));
        }
        other => panic!("{other:?}"),
    }
    // The session stays, with its status, until closed.
    let mut later = Client::connect(&agent, 0);
    let attached = later.call(1, &Request::PtyAttach { session });
    assert_eq!(attached.replies[0], Reply::PtyAttached { session });
    assert!(
        matches!(attached.last(), Reply::PtyExited { status, .. } if status.code == Some(7)),
        "{attached:?}"
    );
    assert_eq!(
        *later.call(2, &Request::PtyClose { session }).last(),
        Reply::Ok
    );

    let bad = client.call(
        9,
        &Request::PtyOpen(PtyOpenRequest {
            argv: vec!["no-such-command-forkvm".into()],
            env: vec![],
            cwd: None,
            user: None,
            rows: 24,
            cols: 80,
        }),
    );
    assert_eq!(bad.error().kind, ErrorKind::ProgramNotFound);
    let bad_cwd = client.call(
        9,
        &Request::PtyOpen(PtyOpenRequest {
            argv: vec!["sh".into()],
            env: vec![],
            cwd: Some("/nonexistent/dir".into()),
            user: None,
            rows: 24,
            cols: 80,
        }),
    );
    assert_eq!(bad_cwd.error().kind, ErrorKind::NotFound);
    assert_eq!(
        client
            .call(
                10,
                &Request::PtyResize {
                    session: 999,
                    rows: 1,
                    cols: 1
                }
            )
            .error()
            .kind,
        ErrorKind::NotFound
    );
}
