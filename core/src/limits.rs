//! Bounds on what a peer may send: identifiers, addresses, and sizes derived from a request,
//! computed with checked arithmetic so that no product can wrap before it is compared with a
//! limit. Pure functions: the coordinator, the workers and the dispatcher share them.

/// Longest worker id, node name or reporter name, in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Longest `HOST:PORT` address, in bytes.
pub const MAX_ADDRESS_BYTES: usize = 256;
/// Longest error text a worker may attach to a ready report; longer texts are cut.
pub const MAX_ERROR_BYTES: usize = 4096;
/// Most devices one worker may register.
pub const MAX_DEVICES: usize = 64;
/// Longest device kind (`cpu`, `cuda`, `npu`...).
pub const MAX_DEVICE_KIND_BYTES: usize = 32;

/// Check an identifier (worker id, node name, reporter): 1 to [`MAX_ID_BYTES`] bytes of ASCII
/// letters, digits, `-`, `_` and `.`. It becomes part of store keys, so `/` is never allowed.
pub fn check_id(what: &str, id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err(format!("{what} is empty; expected 1 to {MAX_ID_BYTES} letters, digits, `-`, `_` or `.`"));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(format!("{what} is {} bytes long; the limit is {MAX_ID_BYTES}", id.len()));
    }
    if let Some(c) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        return Err(format!("{what} `{}` contains {c:?}; use letters, digits, `-`, `_` or `.`", id.escape_debug()));
    }
    Ok(())
}

/// Check a `HOST:PORT` address: host an IPv4 address, a bracketed IPv6 address or a DNS name;
/// port 1 to 65535; at most [`MAX_ADDRESS_BYTES`] bytes.
pub fn check_address(what: &str, addr: &str) -> Result<(), String> {
    let expected = "expected HOST:PORT (an IPv4 address, [IPv6] or a DNS name, and a port 1-65535)";
    if addr.len() > MAX_ADDRESS_BYTES {
        return Err(format!("{what} is {} bytes long; the limit is {MAX_ADDRESS_BYTES}", addr.len()));
    }
    let bad = |why: &str| Err(format!("{what} `{}` {why}; {expected}", addr.escape_debug()));
    let Some((host, port)) = addr.rsplit_once(':') else { return bad("has no port") };
    match port.parse::<u16>() {
        Ok(p) if p > 0 && !port.starts_with('+') => {}
        _ => return bad("has no valid port"),
    }
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return match v6.parse::<std::net::Ipv6Addr>() {
            Ok(_) => Ok(()),
            Err(_) => bad("has an invalid IPv6 host"),
        };
    }
    if host.parse::<std::net::Ipv4Addr>().is_ok() {
        return Ok(());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
        return bad("has an invalid host");
    }
    Ok(())
}

/// `text` cut to at most `max` bytes on a character boundary, saying how much was cut.
pub fn truncate_text(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} more bytes cut)", &text[..end], text.len() - end)
}

/// The product of `dims`, or None when it overflows `usize` (a zero dimension makes it 0,
/// whatever the others are).
pub fn checked_product(dims: &[u64]) -> Option<usize> {
    if dims.contains(&0) {
        return Some(0);
    }
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(usize::try_from(d).ok()?))
}

/// Bytes of `elements` values of `elem_size` bytes each, or None on overflow.
pub fn checked_bytes(elements: usize, elem_size: usize) -> Option<usize> {
    elements.checked_mul(elem_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(check_id("worker id", "w-0_a.b").is_ok());
        assert!(check_id("worker id", "").unwrap_err().contains("empty"));
        assert!(check_id("worker id", "a/b").unwrap_err().contains("'/'"));
        assert!(check_id("worker id", &"x".repeat(129)).unwrap_err().contains("limit is 128"));
        assert!(check_id("worker id", "é").is_err());
    }

    #[test]
    fn addresses() {
        for ok in ["127.0.0.1:7400", "[::1]:80", "worker-3.pods.cluster.local:7500", "localhost:1"] {
            assert!(check_address("address", ok).is_ok(), "{ok}");
        }
        for bad in [
            "not a host port",
            "host",
            "host:0",
            "host:65536",
            "host:+80",
            ":80",
            "[::1:80",
            "[zz]:80",
            "-a.b:80",
            "a..b:80",
            "http://a:80",
        ] {
            assert!(check_address("address", bad).is_err(), "{bad}");
        }
        let long = format!("{}:80", "a".repeat(300));
        assert!(check_address("address", &long).unwrap_err().contains("limit is 256"));
    }

    #[test]
    fn products_never_wrap() {
        assert_eq!(checked_product(&[3, 4]), Some(12));
        assert_eq!(checked_product(&[]), Some(1));
        assert_eq!(checked_product(&[1 << 56, 256]), None);
        assert_eq!(checked_product(&[u64::MAX, 2]), None);
        assert_eq!(checked_product(&[u64::MAX, 0]), Some(0), "an empty tensor is empty");
        assert_eq!(checked_product(&[1 << 31, 1 << 54, 0]), Some(0), "found by the fuzz target");
        assert_eq!(checked_bytes(1 << 62, 4), None);
    }

    #[test]
    fn truncation_keeps_char_boundaries() {
        assert_eq!(truncate_text("abc", 5), "abc");
        let t = truncate_text("ééé", 3);
        assert!(t.starts_with('é') && t.contains("more bytes cut"), "{t}");
    }
}
