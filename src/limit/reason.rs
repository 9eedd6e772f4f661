//! What kind of limit a rate-limit decision reports: a plan bucket, a route bucket or the
//! monthly quota. A refusal's error, shadow mode's `reason` and the IP throttle (which a
//! quota refusal does not feed) all go by it.

/// What kind of limit a [`Decision`](super::Decision) reports (and a refusal names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reason {
    /// A bucket of the key's plan (or of a client IP's anonymous plan).
    #[default]
    Bucket,
    /// A bucket of the route, per key.
    Route,
    /// The monthly quota.
    Quota,
}

impl Reason {
    /// `bucket`, `route` or `quota`, for logs and shadow mode's `reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Bucket => "bucket",
            Reason::Route => "route",
            Reason::Quota => "quota",
        }
    }
}
