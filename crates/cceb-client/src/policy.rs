//! The pure part of the client: reconnect backoff, what a close code means,
//! which action errors are retried, and duplicate suppression. No IO, no clock.

use cceb_protocol::{close, ErrorCode};
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

/// Jittered exponential backoff: attempt `n` waits a random time in
/// `[base/2, base]` where `base = min(max, min * 2^n)` ("equal jitter": never
/// zero, never above the cap, and clients that lost the same bridge spread out).
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { min, max: max.max(min), attempt: 0 }
    }

    /// The cap of attempt `n`, before jitter.
    pub fn base(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.min.checked_mul(factor).map_or(self.max, |d| d.min(self.max))
    }

    /// The next delay; `jitter` in `[0, 1]` (a random number in production, fixed in tests).
    pub fn next_delay_with(&mut self, jitter: f64) -> Duration {
        let base = self.base(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }

    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_with(rand::random::<f64>())
    }

    /// After a connection that was stable: the next failure starts from `min` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

/// What the client does after its connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterClose {
    /// Connect again after the backoff delay. `rediscover`: ask discovery for
    /// the endpoint again (1012). `refresh_token`: call the token provider
    /// again first, and do not wait (4002).
    Reconnect { rediscover: bool, refresh_token: bool },
    /// Stop for good: the client reports `Closed` and fails what is pending.
    Stop,
}

/// Contract section 7, from a client's side. `None`: the socket dropped
/// without a close frame (network, crash): reconnect.
pub fn after_close(code: Option<u16>) -> AfterClose {
    let reconnect = AfterClose::Reconnect { rediscover: false, refresh_token: false };
    match code {
        // The session ended (`end_session`) or the client closed: nothing to resume.
        Some(close::NORMAL) => AfterClose::Stop,
        Some(close::SERVICE_RESTART) => AfterClose::Reconnect { rediscover: true, refresh_token: false },
        Some(close::TOKEN_EXPIRED) => AfterClose::Reconnect { rediscover: false, refresh_token: true },
        // The token was refused; the same token would be refused again.
        Some(close::UNAUTHORIZED) => AfterClose::Stop,
        // Another connection holds the session now; taking it back would make the two fight.
        Some(close::TAKEN_OVER) => AfterClose::Stop,
        // Every allowed session of the agent is connected; retrying cannot help.
        Some(close::TOO_MANY_SESSIONS) => AfterClose::Stop,
        // Frames this client should never send; resending them would loop.
        Some(close::UNSUPPORTED_DATA | close::MESSAGE_TOO_BIG) => AfterClose::Stop,
        // 4003 (hello too late), 4004 (window stalled: the mailbox keeps all), 1001, 1006, ...
        _ => reconnect,
    }
}

/// What to do once a connection ended: [`after_close`] plus how long to wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconnect {
    /// Connect again after `delay` (see [`AfterClose::Reconnect`]).
    After {
        delay: Duration,
        rediscover: bool,
        refresh_token: bool,
    },
    Stop,
}

/// The reconnect decision with its history, so that a token provider handing
/// out an (almost) expired token cannot make the client hot-loop:
///
/// - the backoff is reset only by a connection that stayed up `stable_after`
///   (not by `hello_reply`: the bridge may close at once after it);
/// - 4002 after a connection that lived, or the first 4002: a new token and
///   reconnect at once;
/// - 4002 again after a 4002 refresh, the connection not having lived: a new
///   token, through the backoff;
/// - 4001 after a 4002 refresh (the provider handed an expired token): a new
///   token through the backoff, at most `expired_token_retries` times in a
///   row, then stop (a 4001 otherwise stops at once, as [`after_close`] says).
///
/// Pure: the caller says how long the connection lived and brings the jitter.
#[derive(Debug, Clone)]
pub struct ReconnectPolicy {
    backoff: Backoff,
    stable_after: Duration,
    expired_token_retries: u32,
    /// The last connection ran on a token fetched because of a 4002 (or a 4001 after one).
    refreshed: bool,
    expired_retries: u32,
}

impl ReconnectPolicy {
    pub fn new(backoff: Backoff, stable_after: Duration, expired_token_retries: u32) -> ReconnectPolicy {
        ReconnectPolicy { backoff, stable_after, expired_token_retries, refreshed: false, expired_retries: 0 }
    }

    /// `code`: the close code (`None`: no close frame); `lived`: how long the
    /// connection was up after `hello_reply` (`None`: it never got there);
    /// `jitter` in `[0, 1]`, for the backoff.
    pub fn ended_with(&mut self, code: Option<u16>, lived: Option<Duration>, jitter: f64) -> Reconnect {
        if lived.is_some_and(|l| l >= self.stable_after) {
            self.backoff.reset();
            self.refreshed = false;
            self.expired_retries = 0;
        }
        if code == Some(close::TOKEN_EXPIRED) {
            let again = std::mem::replace(&mut self.refreshed, true);
            let delay = if again { self.backoff.next_delay_with(jitter) } else { Duration::ZERO };
            return Reconnect::After { delay, rediscover: false, refresh_token: true };
        }
        if code == Some(close::UNAUTHORIZED) && self.refreshed && self.expired_retries < self.expired_token_retries {
            self.expired_retries += 1;
            let delay = self.backoff.next_delay_with(jitter);
            return Reconnect::After { delay, rediscover: false, refresh_token: true };
        }
        self.refreshed = false;
        self.expired_retries = 0;
        match after_close(code) {
            AfterClose::Stop => Reconnect::Stop,
            AfterClose::Reconnect { rediscover, refresh_token } => {
                Reconnect::After { delay: self.backoff.next_delay_with(jitter), rediscover, refresh_token }
            }
        }
    }

    pub fn ended(&mut self, code: Option<u16>, lived: Option<Duration>) -> Reconnect {
        self.ended_with(code, lived, rand::random::<f64>())
    }
}

/// Whether an action refused with `code` is sent again with the same uuid.
pub fn retry_action(code: ErrorCode) -> bool {
    matches!(code, ErrorCode::BackendUnavailable | ErrorCode::RateLimited)
}

/// Notification uuids handed to the application, so a redelivery (after
/// `ack_timeout`, or on resume after an ack that was lost with its
/// connection) is acked again instead of handled twice. Bounded: the oldest
/// uuid is forgotten first.
#[derive(Debug)]
pub struct Seen {
    cap: usize,
    order: VecDeque<String>,
    /// uuid → whether the application finished with it (its ack was sent).
    done: HashMap<String, bool>,
}

/// What to do with a notification frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// New: hand it to the application.
    Handle,
    /// Handled already: only ack it again.
    AckAgain,
    /// The application still holds it: its ack follows when it is done.
    Ignore,
}

impl Seen {
    pub fn new(cap: usize) -> Seen {
        Seen { cap: cap.max(1), order: VecDeque::new(), done: HashMap::new() }
    }

    pub fn offer(&mut self, uuid: &str) -> Delivery {
        match self.done.get(uuid) {
            Some(true) => Delivery::AckAgain,
            Some(false) => Delivery::Ignore,
            None => {
                if self.order.len() == self.cap {
                    if let Some(old) = self.order.pop_front() {
                        self.done.remove(&old);
                    }
                }
                self.order.push_back(uuid.to_owned());
                self.done.insert(uuid.to_owned(), false);
                Delivery::Handle
            }
        }
    }

    pub fn finished(&mut self, uuid: &str) {
        if let Some(d) = self.done.get_mut(uuid) {
            *d = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_doubles_from_min_to_max_with_jitter_in_the_upper_half() {
        let mut b = Backoff::new(500 * MS, Duration::from_secs(20));
        let top: Vec<Duration> = (0..9).map(|_| b.next_delay_with(1.0)).collect();
        let secs: Vec<f64> = top.iter().map(Duration::as_secs_f64).collect();
        assert_eq!(secs, [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 20.0, 20.0]);
        let mut b = Backoff::new(500 * MS, Duration::from_secs(20));
        assert_eq!(b.next_delay_with(0.0), 250 * MS);
        assert_eq!(b.next_delay_with(0.5), 750 * MS);
        // Any jitter stays within [base/2, base], however many attempts.
        let mut b = Backoff::new(500 * MS, Duration::from_secs(20));
        for _ in 0..200 {
            let d = b.next_delay();
            assert!(d >= 250 * MS && d <= Duration::from_secs(20), "{d:?}");
        }
    }

    #[test]
    fn backoff_resets_after_success_and_never_overflows() {
        let mut b = Backoff::new(10 * MS, 80 * MS);
        for _ in 0..100 {
            b.next_delay_with(1.0);
        }
        assert_eq!(b.next_delay_with(1.0), 80 * MS);
        b.reset();
        assert_eq!((b.attempt(), b.next_delay_with(1.0)), (0, 10 * MS));
        // A max below min is raised to min.
        assert_eq!(Backoff::new(10 * MS, MS).next_delay_with(1.0), 10 * MS);
    }

    #[test]
    fn close_codes_as_the_contract_says() {
        let plain = AfterClose::Reconnect { rediscover: false, refresh_token: false };
        assert_eq!(after_close(None), plain);
        assert_eq!(after_close(Some(1006)), plain);
        assert_eq!(after_close(Some(close::HELLO_TIMEOUT)), plain);
        assert_eq!(after_close(Some(close::TOO_MANY_UNACKED)), plain);
        assert_eq!(
            after_close(Some(close::SERVICE_RESTART)),
            AfterClose::Reconnect { rediscover: true, refresh_token: false }
        );
        assert_eq!(
            after_close(Some(close::TOKEN_EXPIRED)),
            AfterClose::Reconnect { rediscover: false, refresh_token: true }
        );
        for stop in [close::NORMAL, close::UNAUTHORIZED, close::TAKEN_OVER, close::TOO_MANY_SESSIONS, 1003, 1009] {
            assert_eq!(after_close(Some(stop)), AfterClose::Stop, "{stop}");
        }
    }

    fn delay(r: Reconnect) -> Option<(u64, bool)> {
        match r {
            Reconnect::After { delay, refresh_token, .. } => {
                Some((u64::try_from(delay.as_millis()).expect("small"), refresh_token))
            }
            Reconnect::Stop => None,
        }
    }

    #[test]
    fn token_expired_goes_at_once_after_a_connection_that_lived_and_through_the_backoff_after_a_refresh() {
        let ms = |n: u64| Some(Duration::from_millis(n));
        let mut p = ReconnectPolicy::new(Backoff::new(100 * MS, 800 * MS), Duration::from_secs(1), 3);
        let mut end = |code: u16, lived: Option<Duration>| delay(p.ended_with(Some(code), lived, 1.0));
        // A token that ran out on a connection that lived: a new one at once.
        assert_eq!(end(4002, ms(60_000)), Some((0, true)));
        // The provider's token was expired too: the bridge closed at once after hello_reply.
        assert_eq!(end(4002, ms(0)), Some((100, true)));
        assert_eq!(end(4002, ms(5)), Some((200, true)));
        assert_eq!(end(4002, None), Some((400, true)));
        assert_eq!(end(4002, ms(999)), Some((800, true)), "below stable_after: not lived");
        // A connection that stayed up resets both the backoff and the refresh.
        assert_eq!(end(4002, ms(1000)), Some((0, true)));
        assert_eq!(end(4002, ms(0)), Some((100, true)));
        // hello_reply alone resets nothing: a plain drop right after it continues the backoff...
        assert_eq!(end(1006, ms(10)), Some((200, false)));
        // ... and a first 4002 after that (no refresh before it) goes at once again.
        assert_eq!(end(4002, ms(10)), Some((0, true)));
    }

    #[test]
    fn unauthorized_after_a_refresh_is_retried_a_bounded_number_of_times_then_stops() {
        let new = |retries| ReconnectPolicy::new(Backoff::new(100 * MS, 800 * MS), Duration::from_secs(1), retries);
        let mut p = new(3);
        assert_eq!(delay(p.ended_with(Some(4002), Some(Duration::from_secs(5)), 1.0)), Some((0, true)));
        assert_eq!(delay(p.ended_with(Some(4001), None, 1.0)), Some((100, true)));
        assert_eq!(delay(p.ended_with(Some(4001), None, 1.0)), Some((200, true)));
        assert_eq!(delay(p.ended_with(Some(4001), None, 1.0)), Some((400, true)));
        assert_eq!(p.ended_with(Some(4001), None, 1.0), Reconnect::Stop);
        // Without a refresh before it, 4001 stops at once; so do the other final codes.
        let mut q = new(3);
        for code in [close::UNAUTHORIZED, close::NORMAL, 1003, 1009, close::TAKEN_OVER, close::TOO_MANY_SESSIONS] {
            assert_eq!(q.ended_with(Some(code), Some(10 * MS), 1.0), Reconnect::Stop, "{code}");
        }
        // A provider that catches up: the count starts again once a connection lived.
        let mut r = new(1);
        let lived = Some(Duration::from_secs(5));
        assert_ne!(r.ended_with(Some(4002), lived, 1.0), Reconnect::Stop);
        assert_ne!(r.ended_with(Some(4001), None, 1.0), Reconnect::Stop);
        assert_ne!(r.ended_with(Some(4002), lived, 1.0), Reconnect::Stop);
        assert_ne!(r.ended_with(Some(4001), None, 1.0), Reconnect::Stop);
        assert_eq!(r.ended_with(Some(4001), None, 1.0), Reconnect::Stop);
        // Other codes keep after_close's meaning, with the backoff's delay.
        let mut o = new(3);
        assert_eq!(
            o.ended_with(Some(close::SERVICE_RESTART), Some(10 * MS), 1.0),
            Reconnect::After { delay: 100 * MS, rediscover: true, refresh_token: false }
        );
        assert_eq!(
            o.ended_with(None, None, 1.0),
            Reconnect::After { delay: 200 * MS, rediscover: false, refresh_token: false }
        );
    }

    #[test]
    fn only_transient_action_errors_are_retried() {
        for code in ErrorCode::ALL {
            let transient = matches!(code, ErrorCode::BackendUnavailable | ErrorCode::RateLimited);
            assert_eq!(retry_action(code), transient, "{code}");
        }
    }

    #[test]
    fn a_redelivered_notification_is_handled_once() {
        let mut s = Seen::new(2);
        assert_eq!(s.offer("a"), Delivery::Handle);
        assert_eq!(s.offer("a"), Delivery::Ignore);
        s.finished("a");
        assert_eq!(s.offer("a"), Delivery::AckAgain);
        assert_eq!(s.offer("b"), Delivery::Handle);
        assert_eq!(s.offer("c"), Delivery::Handle);
        // "a" was the oldest of three with room for two: forgotten.
        assert_eq!(s.offer("a"), Delivery::Handle);
    }
}
