//! Numbers from JS, checked. napi's own conversion to `u32` wraps modulo 2^32 and truncates
//! (`2 ** 32 + 256` arrives as 256, `-1` as 4294967295, `1.5` as 1, `NaN` as 0), so every
//! size, count, port and timeout a caller gives arrives as an `f64` and is checked here: a
//! value that is not a whole number in range is an `INVALID_ARGUMENT` error, never another
//! value.

use std::time::Duration;

use crate::error::{Failure, Outcome};

/// The largest integer an `f64` holds exactly (`Number.MAX_SAFE_INTEGER`).
const MAX_SAFE: u64 = (1 << 53) - 1;

/// `value` as a whole number from 0 to `max`, for the argument `what`.
pub fn whole(value: f64, what: &str, max: u64) -> Outcome<u64> {
    let max = max.min(MAX_SAFE);
    // NaN fails every comparison; `max` is exact in an f64 (at most 2^53 - 1).
    if value >= 0.0 && value <= max as f64 && value.fract() == 0.0 {
        // In 0..=2^53 - 1 and whole: exact.
        Ok(value as u64)
    } else {
        Err(Failure::invalid(format!(
            "{what} must be a whole number from 0 to {max}, not {value}"
        )))
    }
}

/// `value` as a `u32`.
pub fn u32_arg(value: f64, what: &str) -> Outcome<u32> {
    // `whole` keeps it within u32.
    Ok(whole(value, what, u32::MAX.into())? as u32)
}

/// `value` as a `u16` (a port, a terminal size).
pub fn u16_arg(value: f64, what: &str) -> Outcome<u16> {
    // `whole` keeps it within u16.
    Ok(whole(value, what, u16::MAX.into())? as u16)
}

/// `value` as a size in bytes (a buffer's limit).
pub fn usize_arg(value: f64, what: &str) -> Outcome<usize> {
    Ok(usize::try_from(whole(value, what, MAX_SAFE)?).unwrap_or(usize::MAX))
}

/// `value` as a count of VMs (children, prepared forks): at most `u32::MAX`, the range these
/// calls always had.
pub fn count(value: f64, what: &str) -> Outcome<usize> {
    Ok(usize::try_from(u32_arg(value, what)?).unwrap_or(usize::MAX))
}

/// `value` milliseconds as a duration.
pub fn millis(value: f64, what: &str) -> Outcome<Duration> {
    Ok(Duration::from_millis(whole(value, what, MAX_SAFE)?))
}

/// `value` milliseconds, or `default` when it is absent.
pub fn millis_or(value: Option<f64>, what: &str, default: Duration) -> Outcome<Duration> {
    value.map_or(Ok(default), |ms| millis(ms, what))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_numbers_in_range_pass() {
        assert_eq!(whole(256.0, "x", 1000).unwrap(), 256);
        assert_eq!(whole(0.0, "x", 0).unwrap(), 0);
        for bad in [
            -1.0,
            1.5,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            1001.0,
            2f64.powi(32) + 256.0,
        ] {
            assert!(whole(bad, "x", 1000).is_err(), "{bad}");
        }
        assert!(u32_arg(2f64.powi(32) + 256.0, "memoryMib").is_err());
        assert_eq!(u32_arg(f64::from(u32::MAX), "x").unwrap(), u32::MAX);
        assert!(u16_arg(65536.0, "port").is_err());
        assert_eq!(
            millis(2f64.powi(53) - 1.0, "t").unwrap().as_millis(),
            (1 << 53) - 1
        );
        assert!(millis(2f64.powi(60), "t").is_err());
        assert!(count(2f64.powi(32) + 1.0, "n").is_err());
        assert_eq!(count(3.0, "n").unwrap(), 3);
        let e = u32_arg(-1.0, "vcpus").unwrap_err();
        assert_eq!(e.code, "INVALID_ARGUMENT");
        assert!(e.message.contains("vcpus"), "{}", e.message);
    }
}
