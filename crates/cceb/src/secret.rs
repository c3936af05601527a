//! The one comparison of secrets (admin token, session key hashes).

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Whether `a` and `b` are equal, without revealing through timing how much
/// of them matched or how long either is (both are hashed first).
pub fn same(a: &[u8], b: &[u8]) -> bool {
    Sha256::digest(a).ct_eq(&Sha256::digest(b)).into()
}

#[cfg(test)]
mod tests {
    use super::same;

    #[test]
    fn equal_secrets_match_and_any_difference_or_length_does_not() {
        assert!(same(b"abc", b"abc"));
        assert!(same(b"", b""));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
        assert!(!same(b"", b"\0"));
    }
}
