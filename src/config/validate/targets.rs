//! An upstream's `url` or `targets`: where its requests go, and how they are spread.

use http::Uri;

use super::*;

impl Validator<'_, '_> {
    /// The upstream's base URL and its targets: `url` as the one target, or `targets`. Exactly
    /// one of them; every target shares the first one's scheme and path prefix.
    pub(super) fn targets(&mut self, u: &UpstreamFile, name: &str) -> (Uri, Vec<TargetConfig>) {
        let placeholder = || Uri::from_static("http://invalid.invalid");
        let one = |url: Uri| {
            vec![TargetConfig {
                url,
                weight: NonZeroU32::MIN,
            }]
        };
        let targets = match (&u.url, &u.targets) {
            (Some(url), Some(targets)) => {
                for span in [url.span(), targets.span()] {
                    self.error(
                        span,
                        format!("upstream \"{name}\": set either url or targets, not both"),
                    );
                }
                return (placeholder(), one(placeholder()));
            }
            (None, None) => {
                self.error(
                    u.name.span(),
                    format!("upstream \"{name}\" needs a url or targets (one of them)"),
                );
                return (placeholder(), one(placeholder()));
            }
            (Some(url), None) => {
                let parsed = self
                    .target_url(url.get_ref(), url.span(), name)
                    .unwrap_or_else(placeholder);
                return (parsed.clone(), one(parsed));
            }
            (None, Some(targets)) => targets,
        };
        if targets.get_ref().is_empty() {
            self.error(
                targets.span(),
                format!("upstream \"{name}\": targets must name at least one target"),
            );
            return (placeholder(), one(placeholder()));
        }
        let mut out: Vec<TargetConfig> = Vec::new();
        for target in targets.get_ref() {
            let (text, weight) = match target.get_ref() {
                TargetFile::Url(url) => (url.as_str(), 1),
                TargetFile::Weighted(w) => (w.url.as_str(), w.weight.unwrap_or(1)),
            };
            let weight = match u32::try_from(weight).ok().and_then(NonZeroU32::new) {
                Some(weight) => weight,
                None => {
                    self.error(
                        target.span(),
                        format!(
                            "upstream \"{name}\": target weight must be a whole number from 1 to {}, got {weight}",
                            u32::MAX
                        ),
                    );
                    NonZeroU32::MIN
                }
            };
            let Some(url) = self.target_url(text, target.span(), name) else {
                continue;
            };
            if let Some(first) = out.first() {
                if first.url.scheme() != url.scheme() {
                    self.error(
                        target.span(),
                        format!(
                            "upstream \"{name}\": every target must have the same scheme; \"{text}\" is not {}://",
                            first.url.scheme_str().unwrap_or("http")
                        ),
                    );
                    continue;
                }
                if base_path(&first.url) != base_path(&url) {
                    self.error(
                        target.span(),
                        format!(
                            "upstream \"{name}\": every target must have the same base path; \"{text}\" has \"{}\", the first target \"{}\"",
                            base_path(&url),
                            base_path(&first.url)
                        ),
                    );
                    continue;
                }
                if out.iter().any(|t| t.url.authority() == url.authority()) {
                    self.error(
                        target.span(),
                        format!("upstream \"{name}\": target \"{text}\" is listed twice"),
                    );
                    continue;
                }
            }
            out.push(TargetConfig { url, weight });
        }
        match out.first() {
            Some(first) => (first.url.clone(), out),
            None => (placeholder(), one(placeholder())),
        }
    }

    /// `[upstreams.health_check]`: a path to `GET`, how often, and what a good answer is.
    pub(super) fn health_check(&mut self, h: &HealthCheckFile, name: &str) -> HealthCheck {
        let field = |f: &str| format!("upstream \"{name}\": health_check.{f}");
        let path = h.path.get_ref().trim();
        if !path.starts_with('/')
            || path.parse::<http::uri::PathAndQuery>().is_err()
            || path
                .bytes()
                .any(|b| b == b' ' || b == b'#' || !b.is_ascii_graphic())
        {
            self.error(
                h.path.span(),
                format!(
                    "{}: \"{path}\" must be a path starting with '/', like \"/healthz\" (ASCII, no spaces or '#')",
                    field("path")
                ),
            );
        }
        let expect = match &h.expect {
            None => DEFAULT_HEALTH_EXPECT,
            Some(text) => status_range(text.get_ref()).unwrap_or_else(|| {
                self.error(
                    text.span(),
                    format!(
                        "{}: \"{}\" is not a status range; write \"200-399\" (two statuses from 100 to 599, the first no larger) or one status, \"200\"",
                        field("expect"),
                        text.get_ref()
                    ),
                );
                DEFAULT_HEALTH_EXPECT
            }),
        };
        HealthCheck {
            path: path.to_owned(),
            interval: self.duration(&h.interval, DEFAULT_HEALTH_INTERVAL, &field("interval")),
            timeout: self.duration(&h.timeout, DEFAULT_HEALTH_TIMEOUT, &field("timeout")),
            healthy_after: self.whole_in(
                &h.healthy_after,
                1..=100,
                DEFAULT_HEALTHY_AFTER,
                &field("healthy_after"),
            ),
            unhealthy_after: self.whole_in(
                &h.unhealthy_after,
                1..=100,
                DEFAULT_UNHEALTHY_AFTER,
                &field("unhealthy_after"),
            ),
            expect,
        }
    }

    /// A whole number in `range`, or `default` when unset (or wrong, after saying so).
    pub(super) fn whole_in(
        &mut self,
        value: &Option<Spanned<i64>>,
        range: std::ops::RangeInclusive<u32>,
        default: u32,
        name: &str,
    ) -> u32 {
        let Some(value) = value else { return default };
        match u32::try_from(*value.get_ref()) {
            Ok(n) if range.contains(&n) => n,
            _ => {
                self.error(
                    value.span(),
                    format!(
                        "{name} must be a whole number from {} to {}, got {}",
                        range.start(),
                        range.end(),
                        value.get_ref()
                    ),
                );
                default
            }
        }
    }

    /// An http:// or https:// URL with a host, an optional port and path, and no query.
    fn target_url(&mut self, text: &str, span: std::ops::Range<usize>, name: &str) -> Option<Uri> {
        match text.trim().parse::<Uri>() {
            Ok(url)
                if matches!(url.scheme_str(), Some("http" | "https"))
                    && url
                        .authority()
                        .is_some_and(|a| !a.host().is_empty() && valid_port(a))
                    && url.query().is_none() =>
            {
                Some(url)
            }
            _ => {
                self.error(
                    span,
                    format!(
                        "upstream \"{name}\": url \"{text}\" must be an http:// or https:// URL with a host (and a port from 1 to 65535, if any), like \"http://127.0.0.1:3000\""
                    ),
                );
                None
            }
        }
    }
}

/// `"200-399"` or `"204"`: statuses from 100 to 599, the first no larger than the last.
fn status_range(text: &str) -> Option<(u16, u16)> {
    let status = |t: &str| {
        t.trim()
            .parse::<u16>()
            .ok()
            .filter(|s| (100..=599).contains(s))
    };
    let (low, high) = match text.split_once('-') {
        Some((low, high)) => (status(low)?, status(high)?),
        None => (status(text)?, status(text)?),
    };
    (low <= high).then_some((low, high))
}

/// The path prefix requests get, without its trailing `/`.
fn base_path(url: &Uri) -> &str {
    url.path().trim_end_matches('/')
}
/// Whether `authority`'s port, if it has one, is a usable TCP port (the http crate accepts
/// any digits, and a port it cannot read would silently become 80 or 443).
fn valid_port(authority: &http::uri::Authority) -> bool {
    match authority.as_str().rsplit_once(':') {
        // `[::1]` has colons but no port.
        Some((_, port)) if !port.contains(']') => port.parse::<u16>().is_ok_and(|p| p != 0),
        _ => true,
    }
}
