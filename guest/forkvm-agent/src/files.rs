//! File requests: write (streamed in), read (streamed out), stat, list, mkdir, remove, rename.

use std::fs::{self, DirBuilder, File, Metadata, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::sync::mpsc::Receiver;

use forkvm_agent_protocol::{
    DirEntry, ErrorKind, ErrorReply, FileStat, FileType, Kind, MAX_PAYLOAD, Reply,
    WriteFileRequest, write_parts,
};

use crate::request::{Chunk, RequestContext};
use crate::{error, io_error};

/// Size of the reads of a file being sent (and so of its data frames).
const READ_CHUNK: usize = MAX_PAYLOAD;

/// Writes a file from `input` up to its eof; the connection closing first is an error (the bytes
/// written so far stay).
pub fn write(
    request: &WriteFileRequest,
    input: Option<&Receiver<Chunk>>,
) -> Result<Reply, ErrorReply> {
    let path = &request.path;
    let mut options = OpenOptions::new();
    options.write(true).mode(request.mode.unwrap_or(0o644));
    if request.exclusive {
        options.create_new(true);
    } else {
        options.create(true);
    }
    if request.append {
        options.append(true);
    } else {
        options.truncate(true);
    }
    let mut file = options
        .open(path)
        .map_err(|e| io_error(&format!("opening {path}"), &e))?;
    let mut bytes = 0u64;
    if let Some(input) = input {
        for chunk in input {
            match chunk {
                Chunk::Data(data) => {
                    file.write_all(&data)
                        .map_err(|e| io_error(&format!("writing {path}"), &e))?;
                    bytes += data.len() as u64;
                }
                Chunk::Eof => return Ok(Reply::Written { bytes }),
            }
        }
    }
    Err(error(
        ErrorKind::Io,
        format!("{path}: the connection ended before the file's eof"),
    ))
}

/// Sends `len` bytes (default: all) of a file from `offset` as data frames.
pub fn read(
    ctx: &RequestContext,
    path: &str,
    offset: u64,
    len: Option<u64>,
) -> Result<Reply, ErrorReply> {
    let context = || format!("reading {path}");
    let mut file = File::open(path).map_err(|e| io_error(&context(), &e))?;
    if file
        .metadata()
        .map_err(|e| io_error(&context(), &e))?
        .is_dir()
    {
        return Err(error(
            ErrorKind::InvalidArgument,
            format!("{path} is a directory"),
        ));
    }
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| io_error(&context(), &e))?;
    let mut left = len.unwrap_or(u64::MAX);
    let mut sent = 0u64;
    let mut buf = vec![0u8; READ_CHUNK];
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = match file.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(&context(), &e)),
        };
        write_parts(&mut *ctx.out.lock(), Kind::Data, ctx.id, &buf[..n])
            .map_err(|e| error(ErrorKind::Io, format!("sending {path}: {e}")))?;
        sent += n as u64;
        left -= n as u64;
    }
    Ok(Reply::ReadDone { bytes: sent })
}

fn file_type(file_type: fs::FileType) -> FileType {
    if file_type.is_symlink() {
        FileType::Symlink
    } else if file_type.is_dir() {
        FileType::Dir
    } else if file_type.is_file() {
        FileType::File
    } else {
        FileType::Other
    }
}

fn file_stat(meta: &Metadata) -> FileStat {
    FileStat {
        file_type: file_type(meta.file_type()),
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime_ns: meta
            .mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(meta.mtime_nsec()),
    }
}

/// Metadata of `path`, following symlinks.
pub fn stat(path: &str) -> Result<Reply, ErrorReply> {
    let meta = fs::metadata(path).map_err(|e| io_error(&format!("stat {path}"), &e))?;
    Ok(Reply::Stat(file_stat(&meta)))
}

/// The entries of directory `path`, sorted by name.
pub fn list(path: &str) -> Result<Reply, ErrorReply> {
    let context = || format!("listing {path}");
    let mut entries = Vec::new();
    for entry in fs::read_dir(path).map_err(|e| io_error(&context(), &e))? {
        let entry = entry.map_err(|e| io_error(&context(), &e))?;
        // The entry may be gone already: skip it then.
        let Ok(meta) = entry.metadata() else { continue };
        entries.push(DirEntry {
            name: entry.file_name().to_string_lossy().into_owned(),
            file_type: file_type(meta.file_type()),
            size: meta.len(),
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Reply::Entries { entries })
}

/// Creates directory `path` (with its parents, and no error if it exists, when `parents`).
pub fn mkdir(path: &str, parents: bool, mode: Option<u32>) -> Result<Reply, ErrorReply> {
    DirBuilder::new()
        .recursive(parents)
        .mode(mode.unwrap_or(0o755))
        .create(path)
        .map_err(|e| io_error(&format!("mkdir {path}"), &e))?;
    Ok(Reply::Ok)
}

/// Removes a file, symlink or directory (empty unless `recursive`); symlinks are not followed.
pub fn remove(path: &str, recursive: bool) -> Result<Reply, ErrorReply> {
    let context = format!("removing {path}");
    let meta = fs::symlink_metadata(path).map_err(|e| io_error(&context, &e))?;
    let result = match (meta.is_dir(), recursive) {
        (true, true) => fs::remove_dir_all(path),
        (true, false) => fs::remove_dir(path),
        (false, _) => fs::remove_file(path),
    };
    result.map_err(|e| io_error(&context, &e))?;
    Ok(Reply::Ok)
}

/// Renames `from` to `to` (replacing a file at `to`).
pub fn rename(from: &str, to: &str) -> Result<Reply, ErrorReply> {
    fs::rename(from, to).map_err(|e| io_error(&format!("renaming {from} to {to}"), &e))?;
    Ok(Reply::Ok)
}
