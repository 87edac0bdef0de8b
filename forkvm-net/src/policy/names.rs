//! Domain names as the policy and the DNS forwarder compare them.

use std::net::{IpAddr, Ipv4Addr};

/// The longest name in presentation form, without the trailing dot.
const MAX_NAME_LEN: usize = 253;
/// The longest label.
const MAX_LABEL_LEN: usize = 63;

/// `name` lowercased (ASCII) and without one trailing dot.
pub(crate) fn normalize_name(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// Whether a normalized name is a host name we resolve: 1 to 253 characters, labels of 1 to 63
/// letters, digits, `-` or `_` (no empty labels, no spaces, escapes, `*`, `:` or `%`).
pub(crate) fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= MAX_LABEL_LEN
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Whether a normalized name is, or could be taken by a C library for, an IP address: any
/// `inet_aton` form, an IPv6 or dotted-quad literal, or a name whose last label is all digits
/// (no top-level domain is numeric, RFC 3696 §2).
pub(crate) fn is_ip_literal(name: &str) -> bool {
    parse_inet_aton(name).is_some()
        || name.parse::<IpAddr>().is_ok()
        || name
            .rsplit('.')
            .next()
            .is_some_and(|last| !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()))
}

/// `s` read as `inet_aton` reads it: 1 to 4 parts separated by dots, each decimal, octal
/// (leading `0`) or hexadecimal (leading `0x`); the last part fills the bytes that remain.
pub(crate) fn parse_inet_aton(s: &str) -> Option<Ipv4Addr> {
    let mut parts = [0u64; 4];
    let mut count = 0;
    for part in s.split('.') {
        let slot = parts.get_mut(count)?;
        *slot = parse_aton_number(part)?;
        count += 1;
    }
    let [a, b, c, d] = parts;
    let value = match count {
        1 => a,
        2 if a <= 0xff && b <= 0xff_ffff => (a << 24) | b,
        3 if a <= 0xff && b <= 0xff && c <= 0xffff => (a << 24) | (b << 16) | c,
        4 if a <= 0xff && b <= 0xff && c <= 0xff && d <= 0xff => {
            (a << 24) | (b << 16) | (c << 8) | d
        }
        _ => return None,
    };
    u32::try_from(value).ok().map(Ipv4Addr::from)
}

/// One `inet_aton` number; `None` when it is not one or exceeds 32 bits.
fn parse_aton_number(part: &str) -> Option<u64> {
    let (digits, radix) =
        if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
            (hex, 16)
        } else if part.len() > 1 && part.starts_with('0') {
            (&part[1..], 8)
        } else {
            (part, 10)
        };
    if part.is_empty() {
        return None;
    }
    let mut value: u64 = 0;
    for c in digits.chars() {
        let digit = u64::from(c.to_digit(radix)?);
        value = value.checked_mul(u64::from(radix))?.checked_add(digit)?;
        if value > u64::from(u32::MAX) {
            return None;
        }
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inet_aton_forms() {
        let loopback = Some(Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(parse_inet_aton("127.0.0.1"), loopback);
        assert_eq!(parse_inet_aton("2130706433"), loopback);
        assert_eq!(parse_inet_aton("0177.0.0.1"), loopback);
        assert_eq!(parse_inet_aton("0x7f.1"), loopback);
        assert_eq!(parse_inet_aton("0X7F.0.0.1"), loopback);
        assert_eq!(parse_inet_aton("127.1"), loopback);
        assert_eq!(parse_inet_aton("127.0.1"), loopback);
        assert_eq!(parse_inet_aton("0x7f000001"), loopback);
        assert_eq!(parse_inet_aton("017700000001"), loopback);
        assert_eq!(
            parse_inet_aton("169.254.43518"),
            Some(Ipv4Addr::new(169, 254, 169, 254))
        );
        assert_eq!(parse_inet_aton("0"), Some(Ipv4Addr::UNSPECIFIED));
        // glibc reads a bare "0x" as zero; so do we (taking more as literals is the safe side).
        assert_eq!(parse_inet_aton("0x.0"), Some(Ipv4Addr::UNSPECIFIED));
        for not in [
            "",
            "1.",
            ".1",
            "1..2",
            "1.2.3.4.5",
            "256.0.0.1",
            "1.2.3.256",
            "4294967296",
            "08",
            "0xg",
            "example",
            "1.2.3.a",
            "127.16777216",
            "99999999999999999999999",
        ] {
            assert_eq!(parse_inet_aton(not), None, "{not:?}");
        }
    }

    #[test]
    fn ip_literals_include_numeric_top_level_labels() {
        for literal in [
            "2130706433",
            "0177.0.0.1",
            "0x7f.1",
            "127.1",
            "10.0.0.1",
            "1.2.3.999",
        ] {
            assert!(is_ip_literal(literal), "{literal:?}");
        }
        for name in ["example.com", "1.example.com", "0x7f.example", "localhost"] {
            assert!(!is_ip_literal(name), "{name:?}");
        }
    }

    #[test]
    fn valid_names_and_normalization() {
        assert_eq!(normalize_name("WWW.Example.COM."), "www.example.com");
        assert!(is_valid_name("www.example.com"));
        assert!(is_valid_name("_dmarc.example-1.com"));
        for bad in [
            "",
            "a..b",
            ".a",
            "a b",
            "*.example.com",
            "::1",
            "a%b",
            "a\\.b",
            "é.com",
        ] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
        assert!(!is_valid_name(&"a".repeat(64)));
        assert!(is_valid_name(&"a".repeat(63)));
        assert!(!is_valid_name(&["a"; 128].join(".")));
    }
}
