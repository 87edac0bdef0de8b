//! Resolving `user` for exec and PTY requests from `/etc/passwd`, without NSS (the agent is
//! statically linked, and glibc's `getpwnam` needs shared NSS modules).

use std::fs;

use forkvm_agent_protocol::{ErrorKind, ErrorReply};

/// Where users are looked up.
pub const PASSWD: &str = "/etc/passwd";

/// A resolved user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// Login name (the uid in decimal when it has no passwd entry).
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory (`/` when unknown).
    pub home: String,
}

/// Resolves `spec` (a login name, `uid` or `uid:gid`) against [`PASSWD`].
pub fn resolve(spec: &str) -> Result<User, ErrorReply> {
    // A missing passwd file leaves only numeric users.
    let passwd = fs::read_to_string(PASSWD).unwrap_or_default();
    resolve_in(spec, &passwd)
}

/// Resolves `spec` against the contents of a passwd file.
pub fn resolve_in(spec: &str, passwd: &str) -> Result<User, ErrorReply> {
    let entries: Vec<User> = passwd.lines().filter_map(parse_line).collect();
    let unknown = || crate::error(ErrorKind::InvalidArgument, format!("unknown user {spec:?}"));
    if let Some((uid, gid)) = spec.split_once(':') {
        let (uid, gid) = (
            uid.parse::<u32>().map_err(|_| unknown())?,
            gid.parse::<u32>().map_err(|_| unknown())?,
        );
        let known = entries.iter().find(|u| u.uid == uid);
        return Ok(User {
            name: known.map_or_else(|| uid.to_string(), |u| u.name.clone()),
            uid,
            gid,
            home: known.map_or_else(|| "/".to_owned(), |u| u.home.clone()),
        });
    }
    if let Ok(uid) = spec.parse::<u32>() {
        return Ok(entries
            .into_iter()
            .find(|u| u.uid == uid)
            .unwrap_or_else(|| User {
                name: uid.to_string(),
                uid,
                gid: uid,
                home: "/".to_owned(),
            }));
    }
    entries
        .into_iter()
        .find(|u| u.name == spec)
        .ok_or_else(unknown)
}

/// `name:password:uid:gid:gecos:home:shell`
fn parse_line(line: &str) -> Option<User> {
    let mut fields = line.split(':');
    let name = fields.next()?;
    let _password = fields.next()?;
    let uid = fields.next()?.parse().ok()?;
    let gid = fields.next()?.parse().ok()?;
    let _gecos = fields.next()?;
    let home = fields.next()?;
    if name.is_empty() || name.starts_with('#') {
        return None;
    }
    Some(User {
        name: name.to_owned(),
        uid,
        gid,
        home: if home.is_empty() { "/" } else { home }.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD_TEXT: &str = "root:x:0:0:root:/root:/bin/bash\n\
        # comment\n\
        broken line\n\
        alice:x:1000:1001:Alice:/home/alice:/bin/sh\n\
        nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";

    #[test]
    fn by_name_number_and_pair() {
        let alice = resolve_in("alice", PASSWD_TEXT).unwrap();
        assert_eq!(
            (alice.uid, alice.gid, alice.home.as_str()),
            (1000, 1001, "/home/alice")
        );
        assert_eq!(resolve_in("1000", PASSWD_TEXT).unwrap(), alice);
        let pair = resolve_in("1000:5", PASSWD_TEXT).unwrap();
        assert_eq!((pair.name.as_str(), pair.uid, pair.gid), ("alice", 1000, 5));
        let anon = resolve_in("4242", PASSWD_TEXT).unwrap();
        assert_eq!(
            (anon.name.as_str(), anon.gid, anon.home.as_str()),
            ("4242", 4242, "/")
        );
    }

    #[test]
    fn unknown_users_are_errors() {
        for spec in ["mallory", "1:x", "x:1", "", "# comment"] {
            let err = resolve_in(spec, PASSWD_TEXT).unwrap_err();
            assert_eq!(err.kind, ErrorKind::InvalidArgument, "{spec}");
        }
    }
}
