//! The data-connection preamble: `GCB-CONNECT <32 lowercase hex>\n`.
//!
//! Every TCP connection to the relay port, and every dial-back a listener
//! makes, starts with exactly these 45 bytes. The broker reads exactly this
//! many bytes (never more, so the payload that follows stays in the kernel
//! buffer until the splice) and rejects a connection as soon as a byte
//! cannot belong to a valid preamble.

/// The fixed prefix.
pub const PREFIX: &[u8] = b"GCB-CONNECT ";
/// Total preamble length: prefix + 32 hex chars + `\n`.
pub const LEN: usize = 45;

/// Why bytes are not a preamble.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PreambleError {
    /// A byte at this offset cannot be part of a preamble.
    #[error("invalid preamble byte at offset {0}")]
    BadByte(usize),
    /// Fewer than [`LEN`] bytes.
    #[error("preamble incomplete: {0} of 45 bytes")]
    Incomplete(usize),
}

/// Formats the preamble for a connect id.
pub fn encode(id: &[u8; 16]) -> [u8; LEN] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; LEN];
    out[..PREFIX.len()].copy_from_slice(PREFIX);
    for (i, b) in id.iter().enumerate() {
        out[PREFIX.len() + 2 * i] = HEX[usize::from(b >> 4)];
        out[PREFIX.len() + 2 * i + 1] = HEX[usize::from(b & 0xf)];
    }
    out[LEN - 1] = b'\n';
    out
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// Checks a (possibly partial) preamble: `Err(BadByte)` as soon as any byte
/// so far is wrong, so junk is rejected without waiting for 45 bytes.
pub fn check_prefix(buf: &[u8]) -> Result<(), PreambleError> {
    for (i, &c) in buf.iter().enumerate().take(LEN) {
        let ok = if i < PREFIX.len() {
            c == PREFIX[i]
        } else if i < LEN - 1 {
            hex_val(c).is_some()
        } else {
            c == b'\n'
        };
        if !ok {
            return Err(PreambleError::BadByte(i));
        }
    }
    Ok(())
}

/// Parses a complete preamble into the 16 id bytes.
pub fn parse(buf: &[u8]) -> Result<[u8; 16], PreambleError> {
    check_prefix(buf)?;
    if buf.len() < LEN {
        return Err(PreambleError::Incomplete(buf.len()));
    }
    let mut id = [0u8; 16];
    let hex = &buf[PREFIX.len()..LEN - 1];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        // check_prefix validated every hex char.
        let hi = hex_val(pair[0]).ok_or(PreambleError::BadByte(PREFIX.len() + 2 * i))?;
        let lo = hex_val(pair[1]).ok_or(PreambleError::BadByte(PREFIX.len() + 2 * i + 1))?;
        id[i] = (hi << 4) | lo;
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let id: [u8; 16] = core::array::from_fn(|i| (i as u8).wrapping_mul(37));
        let p = encode(&id);
        assert_eq!(p.len(), 45);
        assert!(p.starts_with(b"GCB-CONNECT "));
        assert_eq!(p[44], b'\n');
        assert_eq!(parse(&p), Ok(id));
    }

    #[test]
    fn exact_text() {
        let p = encode(&[0xab; 16]);
        assert_eq!(
            &p[..],
            b"GCB-CONNECT abababababababababababababababab\n".as_slice()
        );
    }

    #[test]
    fn partial_prefix_ok_and_incomplete() {
        let p = encode(&[1; 16]);
        for n in 0..LEN {
            assert_eq!(check_prefix(&p[..n]), Ok(()));
            assert_eq!(parse(&p[..n]), Err(PreambleError::Incomplete(n)));
        }
    }

    #[test]
    fn junk_rejected_early() {
        assert_eq!(
            check_prefix(b"GET / HTTP/1.1"),
            Err(PreambleError::BadByte(1))
        );
        assert_eq!(
            check_prefix(b"GCB-CONNECX"),
            Err(PreambleError::BadByte(10))
        );
        let mut p = encode(&[0; 16]);
        p[20] = b'A'; // uppercase hex is not allowed
        assert_eq!(parse(&p), Err(PreambleError::BadByte(20)));
        let mut p = encode(&[0; 16]);
        p[44] = b'\r';
        assert_eq!(parse(&p), Err(PreambleError::BadByte(44)));
    }
}
