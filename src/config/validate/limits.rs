//! `[limits]`: the rate-limit backend, its failure policy, and the per-IP tripwires.

use super::*;

impl Validator<'_, '_> {
    fn tripwire(
        &mut self,
        count: &Option<Spanned<i64>>,
        window: &Option<SpannedStr>,
        block_for: &Option<SpannedStr>,
        defaults: (u32, Duration, Duration),
        (table, count_name): (&str, &str),
    ) -> Tripwire {
        Tripwire {
            count: self.positive_or(count, defaults.0, &format!("{table}.{count_name}")),
            window: self.duration(window, defaults.1, &format!("{table}.window")),
            block_for: self.duration(block_for, defaults.2, &format!("{table}.block_for")),
        }
    }

    pub(super) fn limits(&mut self, l: LimitsFile) -> LimitsConfig {
        let ip_throttle = l.ip_throttle.as_ref().map(|t| {
            self.tripwire(
                &t.rejections,
                &t.window,
                &t.block_for,
                (
                    DEFAULT_IP_THROTTLE_REJECTIONS,
                    DEFAULT_IP_THROTTLE_WINDOW,
                    DEFAULT_IP_THROTTLE_BLOCK,
                ),
                ("limits.ip_throttle", "rejections"),
            )
        });
        let failed_auth = l.failed_auth.as_ref().map(|t| {
            self.tripwire(
                &t.attempts,
                &t.window,
                &t.block_for,
                (
                    DEFAULT_FAILED_AUTH_ATTEMPTS,
                    DEFAULT_FAILED_AUTH_WINDOW,
                    DEFAULT_FAILED_AUTH_BLOCK,
                ),
                ("limits.failed_auth", "attempts"),
            )
        });
        let nz = |n| NonZeroU32::new(n).expect("defaults are non-zero");
        LimitsConfig {
            backend: self.enumeration(
                &l.backend,
                &[
                    ("local", LimitBackend::Local),
                    ("redis", LimitBackend::Redis),
                ],
                LimitBackend::Local,
                "limits.backend",
            ),
            backend_timeout: self.duration(
                &l.backend_timeout,
                DEFAULT_BACKEND_TIMEOUT,
                "limits.backend_timeout",
            ),
            on_backend_error: self.enumeration(
                &l.on_backend_error,
                &[
                    ("local", BackendErrorPolicy::Local),
                    ("allow", BackendErrorPolicy::Allow),
                    ("deny", BackendErrorPolicy::Deny),
                ],
                BackendErrorPolicy::Local,
                "limits.on_backend_error",
            ),
            headers: self.enumeration(
                &l.headers,
                &[
                    ("x-ratelimit", RateLimitHeaders::XRateLimit),
                    ("ietf", RateLimitHeaders::Ietf),
                    ("both", RateLimitHeaders::Both),
                ],
                RateLimitHeaders::XRateLimit,
                "limits.headers",
            ),
            mode: self.enumeration(
                &l.mode,
                &[
                    ("enforce", LimitMode::Enforce),
                    ("shadow", LimitMode::Shadow),
                ],
                LimitMode::Enforce,
                "limits.mode",
            ),
            ip_throttle: ip_throttle.unwrap_or(Tripwire {
                count: nz(DEFAULT_IP_THROTTLE_REJECTIONS),
                window: DEFAULT_IP_THROTTLE_WINDOW,
                block_for: DEFAULT_IP_THROTTLE_BLOCK,
            }),
            state_file: l
                .state_file
                .as_ref()
                .map(|f| f.get_ref().trim())
                .filter(|f| !f.is_empty())
                .map(PathBuf::from),
            failed_auth: failed_auth.unwrap_or(Tripwire {
                count: nz(DEFAULT_FAILED_AUTH_ATTEMPTS),
                window: DEFAULT_FAILED_AUTH_WINDOW,
                block_for: DEFAULT_FAILED_AUTH_BLOCK,
            }),
        }
    }
}
