//! `[auth]`, `[plans]` and `[[keys]]`: where keys are read from, what plans they are on, and
//! the keys themselves, from the config and from a keys file (read in pieces when large).

use std::collections::HashMap;
use std::sync::Arc;

use http::HeaderName;

use super::*;

/// Ids and digests already defined, across the config and the keys file.
#[derive(Default, Clone)]
pub(super) struct KeySeen {
    pub(super) ids: HashMap<String, String>,
    pub(super) digests: HashMap<KeyDigest, String>,
}

impl Validator<'_, '_> {
    pub(super) fn auth(&mut self, a: AuthFile) -> AuthConfig {
        let header = match &a.header {
            None => HeaderName::from_static(DEFAULT_AUTH_HEADER),
            Some(h) => HeaderName::from_bytes(h.get_ref().trim().as_bytes()).unwrap_or_else(|_| {
                self.error(
                    h.span(),
                    format!(
                        "auth.header: \"{}\" is not a valid header name",
                        h.get_ref()
                    ),
                );
                HeaderName::from_static(DEFAULT_AUTH_HEADER)
            }),
        };
        let query_param = a.query_param.as_ref().and_then(|q| {
            let q_text = q.get_ref().trim();
            if q_text.is_empty() {
                None
            } else if !q_text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
            {
                self.error(
                    q.span(),
                    "auth.query_param may only hold ASCII letters, digits, '_', '-' and '.'",
                );
                None
            } else {
                Some(q_text.to_owned())
            }
        });
        let keys_file = a.keys_file.as_ref().and_then(|k| {
            self.keys_file_span = Some(k.span());
            let path = k.get_ref().trim();
            (!path.is_empty()).then(|| PathBuf::from(path))
        });
        let store = self.enumeration(
            &a.store,
            &[("file", KeyStoreKind::File), ("redis", KeyStoreKind::Redis)],
            KeyStoreKind::File,
            "auth.store",
        );
        let keys_cache_file = a.keys_cache_file.as_ref().and_then(|k| {
            let path = k.get_ref().trim();
            (!path.is_empty()).then(|| PathBuf::from(path))
        });
        AuthConfig {
            header,
            bearer: a.bearer.unwrap_or(true),
            query_param,
            forward_key: a.forward_key.unwrap_or(false),
            keys_file,
            expiry_warning: self.duration(
                &a.expiry_warning,
                DEFAULT_EXPIRY_WARNING,
                "auth.expiry_warning",
            ),
            store,
            keys_cache_file,
        }
    }

    pub(super) fn plans(
        &mut self,
        plans: &BTreeMap<String, Spanned<PlanFile>>,
    ) -> BTreeMap<PlanName, Plan> {
        let mut out = BTreeMap::new();
        for (name, rpm) in BUILTIN_PLANS {
            let rpm = NonZeroU32::new(rpm).expect("built-in plans are non-zero");
            out.insert(
                PlanName(Arc::from(name)),
                Plan {
                    requests_per_minute: rpm,
                    burst: rpm,
                    requests_per_hour: None,
                    requests_per_day: None,
                    requests_per_month: None,
                    routes: BTreeMap::new(),
                },
            );
        }
        for (name, plan) in plans {
            if !valid_identifier(name, 64) {
                self.error(
                    plan.span(),
                    format!("plan name \"{name}\" may only hold ASCII letters, digits, '_', '-', '.' and ':' (1-64 characters)"),
                );
            }
            let p = plan.get_ref();
            let field = |f: &str| format!("plans.{name}.{f}");
            let rates = self.bucket_rates(
                (&p.requests_per_minute, &p.burst),
                (&p.requests_per_hour, &p.requests_per_day),
                &field,
            );
            let per_month = self.quota(&p.requests_per_month, &field("requests_per_month"));
            let routes = self.route_buckets(&p.routes, &format!("plans.{name}.routes"));
            if let Some(rates) = rates {
                out.insert(
                    PlanName(Arc::from(name.as_str())),
                    Plan {
                        requests_per_minute: rates.requests_per_minute,
                        burst: rates.burst,
                        requests_per_hour: rates.requests_per_hour,
                        requests_per_day: rates.requests_per_day,
                        requests_per_month: per_month,
                        routes,
                    },
                );
            }
        }
        out
    }

    /// The rates of a plan or a route bucket: `requests_per_minute` and `burst` (which a year
    /// must refill: governor works in u64 nanoseconds, and a bucket that takes centuries
    /// overflows its arithmetic), `requests_per_hour` and `requests_per_day`. `None` when
    /// `requests_per_minute` is wrong (said).
    pub(super) fn bucket_rates(
        &mut self,
        (per_minute, burst_value): (&Spanned<i64>, &Option<Spanned<i64>>),
        (per_hour, per_day): (&Option<Spanned<i64>>, &Option<Spanned<i64>>),
        field: &dyn Fn(&str) -> String,
    ) -> Option<RouteBucket> {
        let rpm = self.positive(per_minute, &field("requests_per_minute"));
        let positive = |v: &Option<Spanned<i64>>, name: &str, this: &mut Self| {
            v.as_ref().and_then(|v| this.positive(v, &field(name)))
        };
        let burst = positive(burst_value, "burst", self);
        let per_hour = positive(per_hour, "requests_per_hour", self);
        let per_day = positive(per_day, "requests_per_day", self);
        if let (Some(rpm), Some(b), Some(spanned)) = (rpm, burst, burst_value.as_ref()) {
            let max = u64::from(rpm.get()) * (super::units::MAX_DURATION.as_secs() / 60);
            if u64::from(b.get()) > max {
                self.error(
                    spanned.span(),
                    format!(
                        "{} = {b} takes more than 365 days to refill at requests_per_minute = {rpm}; at most {max}",
                        field("burst")
                    ),
                );
            }
        }
        let rpm = rpm?;
        Some(RouteBucket {
            requests_per_minute: rpm,
            burst: burst.unwrap_or(rpm),
            requests_per_hour: per_hour,
            requests_per_day: per_day,
        })
    }

    pub(super) fn keys(
        &mut self,
        keys: &[KeyFile],
        plans: &BTreeMap<PlanName, Plan>,
        seen: &mut KeySeen,
        out: &mut Vec<KeyConfig>,
    ) {
        for k in keys {
            let id = k.id.get_ref().trim();
            if !valid_identifier(id, 128) {
                self.error(
                    k.id.span(),
                    "key id may only hold ASCII letters, digits, '_', '-', '.' and ':' (1-128 characters)",
                );
            }
            let here = format!(
                "{}:{}",
                self.src.path.display(),
                self.src.issue(k.id.span(), "").line
            );
            if let Some(first) = seen.ids.insert(id.to_owned(), here.clone()) {
                self.error(
                    k.id.span(),
                    format!("duplicate key id \"{id}\" (first defined at {first})"),
                );
            }
            let digests = self.digests(k, id, &here, seen);
            let plan = PlanName(Arc::from(k.plan.get_ref().trim()));
            if !plans.contains_key(&plan) {
                let known: Vec<&str> = plans.keys().map(|p| &*p.0).collect();
                self.error(
                    k.plan.span(),
                    format!(
                        "key \"{id}\": plan \"{plan}\" is not defined; defined plans: {}",
                        known.join(", ")
                    ),
                );
            }
            let rpm = k
                .requests_per_minute
                .as_ref()
                .and_then(|r| self.positive(r, &format!("key \"{id}\": requests_per_minute")));
            let scopes = self.scopes(&k.scopes);
            let per_month = self.quota(
                &k.requests_per_month,
                &format!("key \"{id}\": requests_per_month"),
            );
            let routes = self.route_buckets(&k.routes, &format!("key \"{id}\": routes"));
            let expires_at = k
                .expires_at
                .as_ref()
                .and_then(|e| self.instant(e.get_ref(), e.span(), id, "expires_at"));
            let created_at = k
                .created_at
                .as_ref()
                .and_then(|e| self.instant(e.get_ref(), e.span(), id, "created_at"));
            let metadata = k
                .metadata
                .as_ref()
                .map(|m| self.metadata(m, id))
                .unwrap_or_default();
            if !digests.is_empty() {
                out.push(KeyConfig {
                    id: KeyId(Arc::from(id)),
                    digests,
                    plan,
                    scopes,
                    requests_per_minute: rpm,
                    disabled: k.disabled,
                    requests_per_month: per_month,
                    routes,
                    expires_at,
                    metadata,
                    created_at,
                });
            }
        }
    }

    /// The digests of `key = ...`: one, or a list whose entries may carry an `expires_at`.
    /// Each must be distinct from every other digest of the config and keys file.
    fn digests(
        &mut self,
        k: &KeyFile,
        id: &str,
        here: &str,
        seen: &mut KeySeen,
    ) -> Vec<DigestConfig> {
        let span = k.key.span();
        let entries: Vec<(&str, Option<&str>)> = match k.key.get_ref() {
            KeyDigestsFile::One(text) => vec![(text.as_str(), None)],
            KeyDigestsFile::Many(list) => list
                .iter()
                .map(|entry| match entry {
                    DigestEntryFile::Digest(text) => (text.as_str(), None),
                    DigestEntryFile::Expiring(e) => (e.digest.as_str(), e.expires_at.as_deref()),
                })
                .collect(),
        };
        if entries.is_empty() {
            self.error(
                span.clone(),
                format!("key \"{id}\": the key list is empty; give at least one digest"),
            );
        }
        let mut out = Vec::with_capacity(entries.len());
        for (text, expires_at) in entries {
            // The message never repeats the value: it may be a plaintext key pasted by mistake.
            let digest = match KeyDigest::parse(text.trim()) {
                Ok(d) => d,
                Err(e) => {
                    self.error(span.clone(), format!("key \"{id}\": {e}"));
                    continue;
                }
            };
            if let Some(first) = seen.digests.insert(digest, here.to_owned()) {
                self.error(
                    span.clone(),
                    format!("key \"{id}\" has the same digest as the key at {first}; each key must be distinct"),
                );
            }
            let expires_at =
                expires_at.and_then(|e| self.instant(e, span.clone(), id, "digest expires_at"));
            out.push(DigestConfig { digest, expires_at });
        }
        out
    }

    /// An RFC 3339 instant of key `id`, in seconds since the Unix epoch.
    fn instant(
        &mut self,
        text: &str,
        span: std::ops::Range<usize>,
        id: &str,
        field: &str,
    ) -> Option<u64> {
        super::super::units::parse_rfc3339(text)
            .map_err(|e| self.error(span, format!("key \"{id}\": {field}: {e}")))
            .ok()
    }

    /// `metadata = { name = "value" }`: at most [`MAX_KEY_METADATA`] entries, names
    /// `[a-z0-9_-]`, values printable ASCII of at most [`MAX_KEY_METADATA_VALUE`] bytes (they
    /// become header values upstream).
    fn metadata(
        &mut self,
        metadata: &Spanned<BTreeMap<String, String>>,
        id: &str,
    ) -> Vec<(String, String)> {
        let span = metadata.span();
        let map = metadata.get_ref();
        if map.len() > MAX_KEY_METADATA {
            self.error(
                span.clone(),
                format!(
                    "key \"{id}\": metadata has {} entries; at most {MAX_KEY_METADATA}",
                    map.len()
                ),
            );
        }
        let mut out = Vec::with_capacity(map.len());
        for (name, value) in map {
            if let Err(e) = check_metadata(name, value) {
                self.error(span.clone(), format!("key \"{id}\": {e}"));
                continue;
            }
            out.push((name.clone(), value.clone()));
        }
        out
    }
}

/// Why a metadata entry cannot be sent upstream as `X-Tollgate-Key-Meta-<Name>: <value>`.
/// Also the check of the admin API's `metadata`.
pub fn check_metadata(name: &str, value: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > MAX_KEY_METADATA_NAME
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        return Err(format!(
            "metadata name \"{}\" may only hold a-z, 0-9, '_' and '-' (1-{MAX_KEY_METADATA_NAME} characters)",
            name.escape_default()
        ));
    }
    if value.len() > MAX_KEY_METADATA_VALUE {
        return Err(format!(
            "metadata \"{name}\" is {} bytes; at most {MAX_KEY_METADATA_VALUE}",
            value.len()
        ));
    }
    if !value.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return Err(format!(
            "metadata \"{name}\" may only hold printable ASCII (it is sent as a header value)"
        ));
    }
    Ok(())
}

/// `[[keys]]` items per piece of a large keys file (a handful in unit tests, so that they
/// cross pieces).
#[cfg(not(test))]
pub(super) const KEYS_PER_PIECE: usize = 4096;
#[cfg(test)]
pub(super) const KEYS_PER_PIECE: usize = 3;

/// Loads a large keys file piece by piece: split before every [`KEYS_PER_PIECE`]th line that
/// is exactly `[[keys]]`, each piece parsed and validated on its own and dropped. toml's
/// parser holds the whole document's tokens and tree at once, about 3 KB per key (a
/// 200,000-key file peaked at 637 MB, and the freed memory stayed with the process); a piece
/// holds a few MB. Returns `false`, with nothing added, for a file of one piece, or when any
/// piece does not parse cleanly (a split inside a multi-line string or array, say): then the
/// caller parses the whole file, whose errors are the ones to report. A piece that parses is
/// exactly what that stretch of the whole file means, so a file whose every piece parses
/// gives the same keys, and the same validation messages at the same lines, as one parse.
pub(super) fn keys_by_piece(
    src: &Source<'_>,
    plans: &BTreeMap<PlanName, Plan>,
    seen: &mut KeySeen,
    keys: &mut Vec<KeyConfig>,
    issues: &mut Vec<ConfigIssue>,
) -> bool {
    let starts = piece_starts(src.text, KEYS_PER_PIECE);
    if starts.len() < 2 {
        return false;
    }
    let (seen_before, keys_before, issues_before) = (seen.clone(), keys.len(), issues.len());
    let ends = starts.iter().skip(1).map(|&(byte, _)| byte);
    for (&(start, lines_before), end) in starts.iter().zip(ends.chain([src.text.len()])) {
        let piece = Source::piece(src.path, &src.text[start..end], lines_before);
        let mut problems = Vec::new();
        let Some(file) =
            parse::<KeysFile>(&piece, "keys_file", &mut problems).filter(|_| problems.is_empty())
        else {
            *seen = seen_before;
            keys.truncate(keys_before);
            issues.truncate(issues_before);
            return false;
        };
        let mut v = Validator {
            src: &piece,
            issues,
            keys_file_span: None,
        };
        v.keys(&file.keys, plans, seen, keys);
    }
    true
}

/// Where each piece of a keys file starts: (byte offset, lines before it). The first piece
/// starts at 0; each next one at the line of every `per_piece`th `[[keys]]` header after the
/// first.
pub(super) fn piece_starts(text: &str, per_piece: usize) -> Vec<(usize, usize)> {
    let mut starts = vec![(0, 0)];
    let mut headers = 0;
    let mut offset = 0;
    for (line, content) in text.split_inclusive('\n').enumerate() {
        if content.trim() == "[[keys]]" {
            if headers > 0 && headers % per_piece == 0 {
                starts.push((offset, line));
            }
            headers += 1;
        }
        offset += content.len();
    }
    starts
}
