//! Unit tests of the connection bounds: the deadline [`Activity`] computes as requests,
//! bodies and bytes come and go; the protocol sniffing and refusal matching of [`GuardedIo`].

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::Body;

use super::activity::{PROTOCOL_H2, PROTOCOL_UNKNOWN};
use super::guarded_io::{H2_PREFACE, hyper_refusal};
use super::{Activity, Bounds, Expiry, GuardedIo, TrackedBody};
use crate::body::ResponseBody;

#[test]
fn only_hyper_refusals_in_its_exact_format_are_recognized() {
    let date = "Sun, 22 Nov 2026 12:55:00 GMT";
    let refusal = |status: &str| {
        format!(
            "HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: 0\r\ndate: {date}\r\n\r\n"
        )
    };
    for (line, status) in [
        ("400 Bad Request", 400),
        ("414 URI Too Long", 414),
        ("431 Request Header Fields Too Large", 431),
    ] {
        let found = hyper_refusal(refusal(line).as_bytes()).map(|s| s.as_u16());
        assert_eq!(found, Some(status), "{line}");
    }
    let others = [
        refusal("404 Not Found"),
        refusal("400 Bad Request").replace("\r\n\r\n", "\r\n"),
        refusal("400 Bad Request").replace("date:", "x-request-id: req_1\r\ndate:"),
        refusal("400 Bad Request").replace("content-length: 0", "content-length: 2"),
        refusal("400 Bad Request") + "ok",
        refusal("400 Bad Request").replace("HTTP/1.1", "HTTP/1.0"),
    ];
    for other in others {
        assert_eq!(hyper_refusal(other.as_bytes()), None, "{other:?}");
    }
}

const BOUNDS: Bounds = Bounds {
    header_read: Duration::from_nanos(100),
    idle: Duration::from_nanos(1_000),
    write_stall: Duration::from_nanos(500),
};

fn fresh() -> Arc<Activity> {
    let activity = Activity::new();
    activity.speaks_h1();
    activity
}

#[tokio::test]
async fn a_new_connection_gets_the_header_timeout_from_its_start() {
    let activity = fresh();
    assert_eq!(
        activity.next_deadline(&BOUNDS, None),
        Some((100, Expiry::HeadTimeout))
    );
}

#[tokio::test]
async fn between_requests_the_idle_timeout_applies_until_a_head_starts() {
    let activity = fresh();
    let in_flight = activity.request_started();
    drop(TrackedBody::new(ResponseBody::empty(), in_flight));
    let idle_since = activity.idle_since.load(Relaxed);
    assert_eq!(
        activity.next_deadline(&BOUNDS, None),
        Some((idle_since + 1_000, Expiry::Idle))
    );
    activity.bytes_read();
    let started = activity.head_started.load(Relaxed) - 1;
    assert!(started >= idle_since);
    assert_eq!(
        activity.next_deadline(&BOUNDS, None),
        Some((started + 100, Expiry::HeadTimeout))
    );
}

#[tokio::test]
async fn a_request_in_flight_has_no_deadline_until_its_response_waits() {
    let activity = fresh();
    let in_flight = activity.request_started();
    // Bytes of a request body are not a new head.
    activity.bytes_read();
    assert_eq!(activity.next_deadline(&BOUNDS, None), None);
    let body = TrackedBody::new(ResponseBody::empty(), in_flight);
    let progress = activity.body_progress.load(Relaxed);
    assert_eq!(
        activity.next_deadline(&BOUNDS, None),
        Some((progress + 500, Expiry::ResponseStalled))
    );
    drop(body);
    assert_eq!(activity.in_flight.load(Relaxed), 0);
    assert_eq!(activity.waiting_bodies.load(Relaxed), 0);
}

#[tokio::test]
async fn on_http2_the_longest_waiting_body_sets_the_deadline() {
    let activity = Activity::new();
    activity.speaks_h2();
    let stalled = TrackedBody::new(ResponseBody::empty(), activity.request_started());
    let first = activity.next_deadline(&BOUNDS, None);
    assert!(matches!(first, Some((_, Expiry::ResponseStalled))));
    // Other streams start, are asked for their bodies to the end, and finish: the
    // connection makes progress, but the stalled stream's wait goes on.
    let waker = futures_util::task::noop_waker();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1)).await;
        let mut flowing = TrackedBody::new(ResponseBody::empty(), activity.request_started());
        let polled = Pin::new(&mut flowing).poll_frame(&mut Context::from_waker(&waker));
        assert!(matches!(polled, Poll::Ready(None)));
        drop(flowing);
        assert_eq!(activity.next_deadline(&BOUNDS, None), first);
    }
    // With the stalled one gone, a later wait sets it.
    let later = TrackedBody::new(ResponseBody::empty(), activity.request_started());
    drop(stalled);
    let (at, expiry) = activity.next_deadline(&BOUNDS, None).unwrap();
    assert_eq!(expiry, Expiry::ResponseStalled);
    assert!(at > first.unwrap().0);
    drop(later);
    let waits = activity.waits();
    assert_eq!(waits.free.len(), waits.since.len(), "every slot freed");
}

#[tokio::test]
async fn http2_bytes_between_requests_do_not_start_a_head() {
    let activity = Activity::new();
    activity.speaks_h2();
    activity.bytes_read();
    let idle_since = activity.idle_since.load(Relaxed);
    assert_eq!(
        activity.next_deadline(&BOUNDS, None),
        Some((idle_since + 1_000, Expiry::Idle))
    );
}

#[tokio::test]
async fn a_closing_connection_with_nothing_in_flight_is_dropped_after_the_header_bound() {
    let activity = fresh();
    assert_eq!(
        activity.next_deadline(&BOUNDS, Some(7)),
        Some((107, Expiry::CloseOverdue))
    );
    let _in_flight = activity.request_started();
    assert_eq!(activity.next_deadline(&BOUNDS, Some(7)), None);
}

#[tokio::test]
async fn the_preface_decides_the_protocol_even_byte_by_byte() {
    use tokio::io::AsyncReadExt;
    for (input, h2) in [(&H2_PREFACE[..], true), (&b"PRI * HTTP/1.1\r\n"[..], false)] {
        let activity = Activity::new();
        let (mut client, server) = tokio::io::duplex(64);
        let mut io = GuardedIo::new(server, activity.clone(), Duration::from_secs(1));
        let mut buf = [0u8; 1];
        for byte in input {
            tokio::io::AsyncWriteExt::write_all(&mut client, &[*byte])
                .await
                .unwrap();
            io.read_exact(&mut buf).await.unwrap();
        }
        let protocol = activity.protocol.load(Relaxed);
        assert_eq!(protocol == PROTOCOL_H2, h2, "{input:?}");
        assert_ne!(protocol, PROTOCOL_UNKNOWN);
    }
}

/// Within one poll of a connection the clock is read once: what happens in it is stamped
/// with one time. Outside a poll, and in the next one, the time is read again.
#[tokio::test]
async fn within_one_poll_of_a_connection_the_clock_is_read_once() {
    use super::activity::PollClock;
    let activity = fresh();
    let pause = || std::thread::sleep(Duration::from_millis(2));
    let (first, second) = {
        let _poll = PollClock::enter();
        let first = activity.now();
        pause();
        (first, activity.now())
    };
    assert_eq!(first, second, "one read per poll");
    pause();
    let outside = activity.now();
    assert!(outside >= second + 2_000_000, "read again outside a poll");
    pause();
    assert!(activity.now() >= outside + 2_000_000, "and each time");
    let _poll = PollClock::enter();
    let next = activity.now();
    assert!(next >= outside + 2_000_000, "the next poll reads it again");
}
