//! Time-based one-time passwords (RFC 6238: HMAC-SHA1, 30 s steps, 6 digits).

use hmac::{Hmac, Mac};
use sha1::Sha1;

pub const STEP_SECONDS: u64 = 30;

/// Decodes an RFC 4648 base32 secret, as authenticator apps show it (case and spaces
/// ignored, padding optional).
pub fn decode_base32(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 5 / 8);
    let (mut buffer, mut bits) = (0u64, 0u32);
    for c in text.chars().filter(|c| !c.is_whitespace() && *c != '=') {
        let value = match c.to_ascii_uppercase() {
            c @ 'A'..='Z' => c as u64 - 'A' as u64,
            c @ '2'..='7' => c as u64 - '2' as u64 + 26,
            _ => return None,
        };
        buffer = (buffer << 5) | value;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The 6-digit code for time step `step`.
pub fn code(secret: &[u8], step: u64) -> u32 {
    let mut mac = match Hmac::<Sha1>::new_from_slice(secret) {
        Ok(m) => m,
        // HMAC takes keys of any length; this cannot happen.
        Err(_) => return u32::MAX,
    };
    mac.update(&step.to_be_bytes());
    let digest = mac.finalize().into_bytes();
    let offset = (digest[19] & 0x0f) as usize;
    let value = u32::from_be_bytes([
        digest[offset] & 0x7f,
        digest[offset + 1],
        digest[offset + 2],
        digest[offset + 3],
    ]);
    value % 1_000_000
}

/// The time step a code entered at `unix_seconds` matches, trying the steps before and
/// after too (clock drift); `None` when none matches.
pub fn matching_step(secret: &[u8], entered: &str, unix_seconds: u64) -> Option<u64> {
    let entered: u32 = entered
        .trim()
        .parse()
        .ok()
        .filter(|_| entered.trim().len() == 6)?;
    let now = unix_seconds / STEP_SECONDS;
    [now, now.saturating_sub(1), now + 1]
        .into_iter()
        .find(|step| code(secret, *step) == entered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6238_sha1_vectors() {
        // RFC 6238 appendix B, truncated to 6 digits.
        let secret = b"12345678901234567890";
        assert_eq!(code(secret, 59 / 30), 287_082);
        assert_eq!(code(secret, 1_111_111_109 / 30), 81_804);
        assert_eq!(code(secret, 1_234_567_890 / 30), 5_924);
        assert_eq!(code(secret, 20_000_000_000 / 30), 353_130);
    }

    #[test]
    fn base32_decodes_like_authenticator_apps() {
        assert_eq!(
            decode_base32("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ").unwrap(),
            b"12345678901234567890"
        );
        assert_eq!(
            decode_base32("gezd gnbv").unwrap(),
            decode_base32("GEZDGNBV").unwrap()
        );
        assert!(decode_base32("not base32!").is_none());
    }

    #[test]
    fn adjacent_steps_match_and_others_do_not() {
        let secret = b"12345678901234567890";
        let t = 1_234_567_890;
        let now = format!("{:06}", code(secret, t / 30));
        let prev = format!("{:06}", code(secret, t / 30 - 1));
        let old = format!("{:06}", code(secret, t / 30 - 3));
        assert_eq!(matching_step(secret, &now, t), Some(t / 30));
        assert_eq!(matching_step(secret, &prev, t), Some(t / 30 - 1));
        assert_eq!(matching_step(secret, &old, t), None);
        assert_eq!(matching_step(secret, "12345", t), None);
    }
}
