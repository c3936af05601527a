//! W3C Trace Context `traceparent` (<https://www.w3.org/TR/trace-context/>,
//! section 3.2): the one trace header the bridge carries, from an action to
//! its bus record and from an event record to the logs of its notifications.
//! Pure; every value from outside goes through [`TraceParent::parse`].

use std::fmt;

/// A valid `traceparent`, held as version `00`: the only version whose format
/// the bridge knows, and so the only one it sends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    trace_id: [u8; 16],
    parent_id: [u8; 8],
    flags: u8,
}

/// Why a value is not a `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceParentError {
    /// Not `<version>-<trace-id>-<parent-id>-<flags>` in lowercase hex, of
    /// the lengths version `00` has (or, for a later version, followed by
    /// anything but a `-` and more).
    Format,
    /// Version `ff`, which the specification forbids.
    Version,
    /// A trace-id of all zeros.
    ZeroTraceId,
    /// A parent-id of all zeros.
    ZeroParentId,
}

impl fmt::Display for TraceParentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TraceParentError::Format => {
                "`traceparent` must be `00-<32 hex trace-id>-<16 hex parent-id>-<2 hex flags>`, lowercase"
            }
            TraceParentError::Version => "`traceparent` version `ff` is invalid",
            TraceParentError::ZeroTraceId => "`traceparent` trace-id must not be all zeros",
            TraceParentError::ZeroParentId => "`traceparent` parent-id must not be all zeros",
        })
    }
}

impl std::error::Error for TraceParentError {}

/// Length of a version-`00` `traceparent`: 2 + 1 + 32 + 1 + 16 + 1 + 2.
pub const TRACEPARENT_LEN: usize = 55;

impl TraceParent {
    /// Parses a `traceparent` by the specification's rules: lowercase hex
    /// only; version `00` is exactly 55 characters; a later version (not
    /// `ff`) is read for its first four fields, and whatever follows must
    /// start with `-` (the spec's rule for versions a parser does not know);
    /// trace-id and parent-id must not be all zeros.
    pub fn parse(s: &str) -> Result<TraceParent, TraceParentError> {
        let b = s.as_bytes();
        if b.len() < TRACEPARENT_LEN {
            return Err(TraceParentError::Format);
        }
        let version = hex::<1>(&b[0..2]).ok_or(TraceParentError::Format)?[0];
        if version == 0xff {
            return Err(TraceParentError::Version);
        }
        let dashes = b[2] == b'-' && b[35] == b'-' && b[52] == b'-';
        let rest_ok = match version {
            0 => b.len() == TRACEPARENT_LEN,
            _ => b.len() == TRACEPARENT_LEN || b[TRACEPARENT_LEN] == b'-',
        };
        if !dashes || !rest_ok {
            return Err(TraceParentError::Format);
        }
        let trace_id = hex::<16>(&b[3..35]).ok_or(TraceParentError::Format)?;
        let parent_id = hex::<8>(&b[36..52]).ok_or(TraceParentError::Format)?;
        let flags = hex::<1>(&b[53..55]).ok_or(TraceParentError::Format)?[0];
        if trace_id == [0; 16] {
            return Err(TraceParentError::ZeroTraceId);
        }
        if parent_id == [0; 8] {
            return Err(TraceParentError::ZeroParentId);
        }
        Ok(TraceParent { trace_id, parent_id, flags })
    }

    pub fn trace_id(&self) -> [u8; 16] {
        self.trace_id
    }

    pub fn parent_id(&self) -> [u8; 8] {
        self.parent_id
    }

    pub fn flags(&self) -> u8 {
        self.flags
    }
}

/// Lowercase hex only (the specification refuses uppercase).
fn hex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *o = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

impl fmt::Display for TraceParent {
    /// The version-`00` form, as it goes on a bus record and into the logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("00-")?;
        self.trace_id.iter().try_for_each(|b| write!(f, "{b:02x}"))?;
        f.write_str("-")?;
        self.parent_id.iter().try_for_each(|b| write!(f, "{b:02x}"))?;
        write!(f, "-{:02x}", self.flags)
    }
}

impl std::str::FromStr for TraceParent {
    type Err = TraceParentError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TraceParent::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SPEC_EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_specifications_example_round_trips() {
        let t = TraceParent::parse(SPEC_EXAMPLE).expect("valid");
        assert_eq!(t.flags(), 1);
        assert_eq!(t.parent_id(), [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert_eq!(t.to_string(), SPEC_EXAMPLE);
        assert_eq!(SPEC_EXAMPLE.parse::<TraceParent>(), Ok(t));
    }

    #[test]
    fn invalid_values_are_refused_with_their_reason() {
        use TraceParentError::*;
        let cases = [
            ("", Format),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0", Format),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-011", Format),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x", Format),
            ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", Format),
            ("00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", Format),
            ("00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01", Format),
            ("0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", Format),
            ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", Version),
            ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", ZeroTraceId),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", ZeroParentId),
            ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x", Format),
            // Multi-byte characters where the dashes should be: no panic on a char boundary.
            ("00-4bf92f3577b34da6a3ce929d0e0e473é00f067aa0ba902b7-01", Format),
        ];
        for (s, why) in cases {
            assert_eq!(TraceParent::parse(s), Err(why), "{s:?}");
        }
    }

    #[test]
    fn a_later_version_is_read_for_its_known_fields_and_sent_on_as_00() {
        let later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next";
        assert_eq!(TraceParent::parse(later).expect("later version").to_string(), SPEC_EXAMPLE);
        let bare = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(TraceParent::parse(bare).expect("later version").to_string(), SPEC_EXAMPLE);
    }

    proptest! {
        #[test]
        fn never_panics_and_what_it_accepts_it_writes_back_as_00(s in "\\PC{0,80}") {
            if let Ok(t) = TraceParent::parse(&s) {
                let written = t.to_string();
                prop_assert_eq!(&written[3..], &s[3..TRACEPARENT_LEN]);
                prop_assert_eq!(TraceParent::parse(&written), Ok(t));
            }
        }

        #[test]
        fn every_well_formed_00_value_round_trips(
            trace in "[0-9a-f]{32}", parent in "[0-9a-f]{16}", flags in "[0-9a-f]{2}",
        ) {
            let s = format!("00-{trace}-{parent}-{flags}");
            match TraceParent::parse(&s) {
                Ok(t) => prop_assert_eq!(t.to_string(), s),
                Err(e) => prop_assert!(
                    (e == TraceParentError::ZeroTraceId && trace.bytes().all(|c| c == b'0'))
                        || (e == TraceParentError::ZeroParentId && parent.bytes().all(|c| c == b'0'))
                ),
            }
        }

        #[test]
        fn one_character_changed_is_refused_or_still_well_formed(
            trace in "[0-9a-f]{32}", parent in "[1-9a-f]{16}", at in 0usize..TRACEPARENT_LEN, c in any::<char>(),
        ) {
            let s = format!("00-{trace}-{parent}-01");
            let mut chars: Vec<char> = s.chars().collect();
            chars[at] = c;
            let changed: String = chars.into_iter().collect();
            if let Ok(t) = TraceParent::parse(&changed) {
                // Accepted only if it is still lowercase hex with its dashes.
                prop_assert!(changed.len() >= TRACEPARENT_LEN);
                prop_assert_eq!(&t.to_string()[3..], &changed[3..TRACEPARENT_LEN]);
            }
        }
    }
}
