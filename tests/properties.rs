//! Property tests (proptest) for the functions the fuzz targets in `fuzz/` also cover, run by
//! `cargo test`: the config parser, key extraction, request-ID validation, and the limiter
//! arithmetic behind the rate-limit headers (on governor's fake clock, so nothing sleeps).
//!
//! Case counts are kept small enough for the whole file to run in a few seconds in debug.

mod common;

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::key_store::{one_plan_store, pro_key};
use governor::clock::FakeRelativeClock;
use http::header::{AUTHORIZATION, RETRY_AFTER};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use proptest::prelude::*;
use tollgate::GatewayError;
use tollgate::auth::extract::{CredentialSource, extract};
use tollgate::auth::{ApiKey, KeyStore, authenticate};
use tollgate::config::{
    AuthConfig, Config, ConfigError, ErrorStyle, ErrorsConfig, KeyConfig, Plan, PlanName,
    RateLimitHeaders,
};
use tollgate::error::ErrorRenderer;
use tollgate::limit::bucket::buckets_for;
use tollgate::limit::headers::{PolicyHeaders, ceil_secs};
use tollgate::limit::{BucketSpec, Decision, Limiter, Window};
use tollgate::observability::request_id::{RequestId, X_REQUEST_ID, is_valid};

// ---------------------------------------------------------------------------------------------
// Config parser
// ---------------------------------------------------------------------------------------------

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_text(Path::new("fuzz.toml"), text)
}

/// Every error renders, one `fuzz.toml:line:col: message` per issue.
fn assert_renders(error: &ConfigError) {
    let rendered = error.to_string();
    for issue in error.issues() {
        assert!(issue.line >= 1 && issue.column >= 1);
        assert!(rendered.contains(&issue.to_string()));
    }
}

/// Lines that look like config: real sections and keys with plausible and implausible values.
fn toml_soup() -> impl Strategy<Value = String> {
    let section = prop::sample::select(vec![
        "[server]",
        "[server.tls]",
        "[admin]",
        "[errors]",
        "[auth]",
        "[limits]",
        "[limits.ip_throttle]",
        "[limits.failed_auth]",
        "[plans.free]",
        "[plans.x]",
        "[[keys]]",
        "[[upstreams]]",
        "[[routes]]",
    ])
    .prop_map(str::to_owned);
    let key = prop::sample::select(vec![
        "listen",
        "workers",
        "header_read_timeout",
        "max_body_bytes",
        "trusted_proxies",
        "style",
        "fields",
        "header",
        "bearer",
        "query_param",
        "backend",
        "mode",
        "headers",
        "window",
        "requests_per_minute",
        "burst",
        "id",
        "key",
        "plan",
        "scopes",
        "name",
        "url",
        "prefix",
        "upstream",
        "respond",
        "methods",
        "nonsense",
    ]);
    let value = prop::sample::select(vec![
        "0",
        "-1",
        "1",
        "4294967296",
        "9223372036854775807",
        "true",
        "\"\"",
        "\"10s\"",
        "\"0s\"",
        "\"1h 30m\"",
        "\"16KiB\"",
        "\"1GB\"",
        "\"ü\"",
        "\"127.0.0.1:80\"",
        "[\"10.0.0.0/8\", \"::1/200\"]",
        "\"http://127.0.0.1:3000/base\"",
        "\"sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"",
        "\"free\"",
        "[\"GET\", \"B@D\"]",
        "{ status = 200, body = \"ok\" }",
        "{ n = 1, error = 2 }",
        "\"/v1/\"",
        "\"core\"",
    ]);
    let line = prop_oneof![
        section,
        (key, value).prop_map(|(k, v)| format!("{k} = {v}")),
        "[ -~]{0,20}",
    ];
    prop::collection::vec(line, 0..24).prop_map(|lines| lines.join("\n"))
}

/// A plan as it would be written in `[plans.<name>]`.
#[derive(Debug, Clone)]
struct PlanSpec {
    name: String,
    rpm: u32,
    burst: Option<u32>,
    per_hour: Option<u32>,
    per_day: Option<u32>,
}

fn plan_spec() -> impl Strategy<Value = PlanSpec> {
    (
        "[a-zA-Z0-9_.:-]{1,64}",
        1..=u32::MAX,
        prop::option::of(1..=u32::MAX),
        prop::option::of(1..=u32::MAX),
        prop::option::of(1..=u32::MAX),
    )
        .prop_map(|(name, rpm, burst, per_hour, per_day)| PlanSpec {
            name,
            rpm,
            burst,
            per_hour,
            per_day,
        })
}

/// A key as it would be written in `[[keys]]`, with the (generated, test-only) secret.
#[derive(Debug, Clone)]
struct KeySpec {
    id: String,
    secret: String,
    /// Index into the plans available (defined ones, then the built-ins).
    plan: usize,
    scopes: Vec<String>,
    rpm: Option<u32>,
    disabled: bool,
}

fn key_spec() -> impl Strategy<Value = KeySpec> {
    (
        "[a-zA-Z0-9_.:-]{1,100}",
        "[A-Za-z0-9]{8,40}",
        any::<usize>(),
        prop::collection::vec("[a-z]{1,8}:(read|write)", 0..4),
        prop::option::of(1..=u32::MAX),
        any::<bool>(),
    )
        .prop_map(|(id, secret, plan, scopes, rpm, disabled)| KeySpec {
            id,
            secret: format!("tg_test_{secret}"),
            plan,
            scopes,
            rpm,
            disabled,
        })
}

fn toml_string(s: &str) -> String {
    // Generated names hold no quote or backslash, so a basic string needs no escapes.
    format!("\"{s}\"")
}

/// The config text for these plans and keys. Key ids and secrets get their index appended so
/// they are distinct (duplicates are a different property).
fn render(plans: &[PlanSpec], keys: &[KeySpec]) -> (String, Vec<String>, Vec<String>) {
    let mut text = String::new();
    for p in plans {
        text.push_str(&format!(
            "[plans.{}]\nrequests_per_minute = {}\n",
            toml_string(&p.name),
            p.rpm
        ));
        for (field, value) in [
            ("burst", p.burst),
            ("requests_per_hour", p.per_hour),
            ("requests_per_day", p.per_day),
        ] {
            if let Some(v) = value {
                text.push_str(&format!("{field} = {v}\n"));
            }
        }
    }
    let available = available_plans(plans);
    let (mut ids, mut secrets) = (Vec::new(), Vec::new());
    for (i, k) in keys.iter().enumerate() {
        let id = format!("{}-{i}", &k.id[..k.id.len().min(100)]);
        let secret = format!("{}_{i}", k.secret);
        let scopes: Vec<String> = k.scopes.iter().map(|s| toml_string(s)).collect();
        text.push_str(&format!(
            "[[keys]]\nid = {}\nkey = \"{}\"\nplan = {}\nscopes = [{}]\ndisabled = {}\n",
            toml_string(&id),
            ApiKey::new(secret.clone()).digest(),
            toml_string(&available[k.plan % available.len()]),
            scopes.join(", "),
            k.disabled,
        ));
        if let Some(rpm) = k.rpm {
            text.push_str(&format!("requests_per_minute = {rpm}\n"));
        }
        ids.push(id);
        secrets.push(secret);
    }
    (text, ids, secrets)
}

fn available_plans(plans: &[PlanSpec]) -> Vec<String> {
    let mut names: Vec<String> = plans.iter().map(|p| p.name.clone()).collect();
    names.extend(["free", "pro", "enterprise"].map(str::to_owned));
    names
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).expect("generated non-zero")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn config_parser_never_panics_on_any_text(text in any::<String>()) {
        if let Err(e) = parse(&text) {
            assert_renders(&e);
        }
    }

    #[test]
    fn config_parser_never_panics_on_config_shaped_text(text in toml_soup()) {
        match parse(&text) {
            Err(e) => assert_renders(&e),
            Ok(config) => {
                // What a reload builds from an accepted config must not panic either.
                KeyStore::new(&config.keys, &config.plans, None);
                tollgate::route::Router::new(&config.routes);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn valid_plans_and_keys_round_trip_through_validation(
        plans in prop::collection::vec(plan_spec(), 0..4),
        keys in prop::collection::vec(key_spec(), 0..6),
    ) {
        // A plan name defined twice is a duplicate TOML table (a syntax error): keep the first.
        let mut seen = std::collections::HashSet::new();
        let plans: Vec<PlanSpec> =
            plans.into_iter().filter(|p| seen.insert(p.name.clone())).collect();
        let (text, ids, secrets) = render(&plans, &keys);
        let config = match parse(&text) {
            Ok(c) => c,
            Err(e) => panic!("valid config rejected:\n{e}\n---\n{text}"),
        };
        for p in &plans {
            let got = &config.plans[&PlanName(Arc::from(p.name.as_str()))];
            prop_assert_eq!(got, &Plan {
                requests_per_minute: nz(p.rpm),
                burst: nz(p.burst.unwrap_or(p.rpm)),
                requests_per_hour: p.per_hour.map(nz),
                requests_per_day: p.per_day.map(nz),
                requests_per_month: None,
                routes: Default::default(),
            });
        }
        prop_assert_eq!(config.keys.len(), keys.len());
        let available = available_plans(&plans);
        for (i, (k, got)) in keys.iter().zip(&config.keys).enumerate() {
            prop_assert_eq!(&*got.id.0, ids[i].as_str());
            prop_assert_eq!(got.digests[0].digest, ApiKey::new(secrets[i].clone()).digest());
            prop_assert_eq!(&*got.plan.0, available[k.plan % available.len()].as_str());
            prop_assert_eq!(&got.scopes, &k.scopes);
            prop_assert_eq!(got.requests_per_minute, k.rpm.map(nz));
            prop_assert_eq!(got.disabled, k.disabled);
        }
        // The store built from it finds each enabled key by its secret, and no disabled one.
        let store = KeyStore::new(&config.keys, &config.plans, None);
        for (i, k) in keys.iter().enumerate() {
            let found = store.lookup(secrets[i].as_bytes());
            prop_assert_eq!(found.map(|r| &*r.id.0), (!k.disabled).then_some(ids[i].as_str()));
        }
    }

    #[test]
    fn out_of_range_rates_are_reported_at_their_line(
        name in "[a-z]{1,10}",
        rpm in prop_oneof![i64::MIN..=0, (u32::MAX as i64 + 1)..=i64::MAX],
        padding in 0usize..5,
    ) {
        let text = format!("{}[plans.{name}]\nrequests_per_minute = {rpm}\n", "\n".repeat(padding));
        let error = parse(&text).expect_err("rate out of range");
        assert_renders(&error);
        let line = padding + 2;
        let rendered = error.to_string();
        prop_assert!(
            rendered.contains(&format!("fuzz.toml:{line}:"))
                && rendered.contains("requests_per_minute"),
            "{}", rendered
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Key extraction and authentication
// ---------------------------------------------------------------------------------------------

/// Test-only secrets: `(id, secret)`; the store below holds them on plan `pro`.
const TEST_KEYS: [(&str, &str); 2] = [
    ("prop-a", "tg_test_propkey_a_0123456789"),
    ("prop-b", "tg_test_propkey_b_0123456789"),
];

fn store() -> KeyStore {
    store_with(&TEST_KEYS.map(|(id, secret)| (id.to_owned(), secret.to_owned())))
}

fn store_with(keys: &[(String, String)]) -> KeyStore {
    let keys: Vec<KeyConfig> = keys
        .iter()
        .map(|(id, secret)| pro_key(id, secret, &[]))
        .collect();
    one_plan_store(&keys)
}

fn auth_config(header: &str, bearer: bool, query_param: Option<&str>) -> AuthConfig {
    AuthConfig {
        header: HeaderName::from_bytes(header.as_bytes()).expect("valid header name"),
        bearer,
        query_param: query_param.map(str::to_owned),
        forward_key: false,
        keys_file: None,
        expiry_warning: tollgate::config::DEFAULT_EXPIRY_WARNING,
        store: tollgate::config::KeyStoreKind::File,
        keys_cache_file: None,
    }
}

/// Where a fuzzed header goes: the key header, `Authorization`, or an unrelated one.
fn header_name() -> impl Strategy<Value = HeaderName> {
    prop_oneof![
        Just(HeaderName::from_static("x-api-key")),
        Just(AUTHORIZATION),
        "x-[a-z0-9-]{1,12}".prop_map(|n| HeaderName::from_bytes(n.as_bytes()).unwrap()),
    ]
}

/// Header values as hyper would hand them over: any bytes `HeaderValue` accepts, including
/// obs-text (invalid UTF-8), often shaped like a bearer credential.
fn header_value() -> impl Strategy<Value = HeaderValue> {
    // Control bytes (which hyper refuses before tollgate sees them) become 'x'.
    let raw = prop::collection::vec(any::<u8>(), 0..48).prop_map(|raw| {
        raw.into_iter()
            .map(|b| {
                if (b < 0x20 && b != b'\t') || b == 0x7f {
                    b'x'
                } else {
                    b
                }
            })
            .collect::<Vec<u8>>()
    });
    (
        prop::option::of(prop::sample::select(vec!["Bearer ", "bearer\t", "Basic "])),
        raw,
    )
        .prop_map(|(prefix, raw)| {
            let mut bytes = prefix.map(|p| p.as_bytes().to_vec()).unwrap_or_default();
            bytes.extend(raw);
            HeaderValue::from_bytes(&bytes).expect("no control bytes")
        })
}

/// Key characters that need no escaping anywhere (header, bearer token, query).
fn plain_key() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_.~-]{1,64}"
}

fn percent_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("%{b:02X}")).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn extraction_never_panics_on_any_header_bytes(
        headers in prop::collection::vec((header_name(), header_value()), 0..6),
        query in prop::option::of("[ -~]{0,40}"),
        bearer in any::<bool>(),
        query_param in prop::option::of("[a-z_]{1,8}"),
        required in any::<bool>(),
    ) {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(name, value);
        }
        let uri = query
            .and_then(|q| Uri::try_from(format!("/p?{q}")).ok())
            .unwrap_or_else(|| Uri::from_static("/p"));
        let config = auth_config("x-api-key", bearer, query_param.as_deref());
        let found = extract(&map, &uri, &config);
        if let Ok(Some(p)) = &found {
            prop_assert!(!p.key.is_empty());
        }
        let store = store();
        match authenticate(&map, &uri, &config, &store, &Default::default(), required, &[]) {
            Ok(Some(identity)) => {
                let presented = found.unwrap().unwrap();
                let (_, secret) =
                    TEST_KEYS.iter().find(|(id, _)| *id == &*identity.record.id.0).unwrap();
                prop_assert_eq!(&*presented.key, secret.as_bytes());
            }
            Ok(None) => prop_assert!(!required && matches!(found, Ok(None))),
            Err(e) => prop_assert!(
                matches!(e, GatewayError::MissingApiKey | GatewayError::InvalidApiKey),
                "{:?}", e
            ),
        }
    }

    #[test]
    fn a_key_in_the_configured_header_is_found(
        key in plain_key(),
        header in "x-[a-z0-9-]{1,20}",
        pad in prop::sample::select(vec!["", " ", "\t", "  "]),
        id in "[a-z]{1,10}",
    ) {
        let config = auth_config(&header, true, Some("api_key"));
        let mut map = HeaderMap::new();
        map.insert(
            config.header.clone(),
            HeaderValue::from_str(&format!("{pad}{key}{pad}")).unwrap(),
        );
        let uri = Uri::from_static("/v1/x?a=1");
        let p = extract(&map, &uri, &config).unwrap().expect("key found");
        prop_assert_eq!(&*p.key, key.as_bytes());
        prop_assert_eq!(p.source, CredentialSource::Header);
        let store = store_with(&[(id.clone(), key.clone())]);
        let who = authenticate(&map, &uri, &config, &store, &Default::default(), true, &[]).unwrap().unwrap();
        prop_assert_eq!(&*who.record.id.0, id.as_str());
    }

    #[test]
    fn a_bearer_token_is_found(
        key in plain_key(),
        scheme in prop::sample::select(vec!["Bearer", "bearer", "BEARER", "BeArEr"]),
        gap in prop::sample::select(vec![" ", "\t", "   "]),
    ) {
        let config = auth_config("x-api-key", true, None);
        let mut map = HeaderMap::new();
        map.insert(AUTHORIZATION, HeaderValue::from_str(&format!("{scheme}{gap}{key}")).unwrap());
        let root = Uri::from_static("/");
        let p = extract(&map, &root, &config).unwrap().expect("key found");
        prop_assert_eq!(&*p.key, key.as_bytes());
        prop_assert_eq!(p.source, CredentialSource::Bearer);
        // With `bearer = false` the same header is no credential.
        let off = auth_config("x-api-key", false, None);
        prop_assert!(extract(&map, &root, &off).unwrap().is_none());
    }

    #[test]
    fn a_key_in_the_query_is_found_plain_or_percent_encoded(
        key in plain_key(),
        raw_key in prop::collection::vec(any::<u8>(), 1..32),
        before in prop::collection::vec("[a-z]{1,5}=[a-z0-9]{0,5}", 0..3),
        after in prop::collection::vec("[a-z]{1,5}=[a-z0-9]{0,5}", 0..3),
    ) {
        let config = auth_config("x-api-key", true, Some("api_key"));
        let map = HeaderMap::new();
        let others = |v: &[String]| {
            v.iter().filter(|p| !p.starts_with("api_key=")).cloned().collect::<Vec<_>>()
        };
        let forms = [
            (key.clone(), key.as_bytes().to_vec()),
            (percent_encode(&raw_key), raw_key.clone()),
        ];
        for (encoded, expected) in forms {
            let mut pairs = others(&before);
            pairs.push(format!("api_key={encoded}"));
            pairs.extend(others(&after));
            let uri: Uri = format!("/v1/x?{}", pairs.join("&")).parse().unwrap();
            let p = extract(&map, &uri, &config).unwrap().expect("key found");
            prop_assert_eq!(&*p.key, expected.as_slice());
            prop_assert_eq!(p.source, CredentialSource::Query);
            // The query forwarded upstream keeps every other pair and drops the key.
            let kept = tollgate::auth::extract::query_without(uri.query().unwrap(), "api_key");
            let rest = [others(&before), others(&after)].concat();
            prop_assert_eq!(kept, (!rest.is_empty()).then(|| rest.join("&")));
        }
    }

    #[test]
    fn invalid_utf8_in_the_key_header_is_a_401(
        prefix in prop::collection::vec(0x21u8..0x7f, 0..16),
        high in prop::collection::vec(0x80u8..=0xff, 1..8),
        suffix in prop::collection::vec(0x21u8..0x7f, 0..16),
        required in any::<bool>(),
    ) {
        let bytes = [prefix, high, suffix].concat();
        prop_assume!(std::str::from_utf8(&bytes).is_err());
        let config = auth_config("x-api-key", true, None);
        let mut map = HeaderMap::new();
        map.insert("x-api-key", HeaderValue::from_bytes(&bytes).unwrap());
        let store = store();
        let error = authenticate(&map, &Uri::from_static("/"), &config, &store, &Default::default(), required, &[])
            .expect_err("not a key");
        prop_assert!(matches!(error, GatewayError::InvalidApiKey));
        prop_assert_eq!(error.status(), StatusCode::UNAUTHORIZED);
    }
}

// ---------------------------------------------------------------------------------------------
// Request IDs
// ---------------------------------------------------------------------------------------------

fn assert_generated(id: &RequestId) {
    let s = id.as_str();
    assert_eq!(s.len(), 28);
    assert!(s.starts_with("req_") && s[4..].bytes().all(|b| b.is_ascii_alphanumeric()));
    assert!(is_valid(s.as_bytes()));
}

fn with_request_id(value: HeaderValue) -> HeaderMap {
    let mut map = HeaderMap::new();
    map.insert(&X_REQUEST_ID, value);
    map
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn valid_request_ids_are_kept(id in "[A-Za-z0-9._:-]{1,128}") {
        prop_assert!(is_valid(id.as_bytes()));
        let parsed = RequestId::parse(&id).expect("valid");
        prop_assert_eq!(parsed.as_str(), id.as_str());
        prop_assert_eq!(parsed.header_value().as_bytes(), id.as_bytes());
        let kept = RequestId::from_headers(&with_request_id(HeaderValue::from_str(&id).unwrap()));
        prop_assert_eq!(kept, parsed);
    }

    #[test]
    fn invalid_request_ids_are_replaced(
        bytes in prop_oneof![
            // Any bytes a header value may hold (most hold a character outside the set).
            prop::collection::vec(any::<u8>(), 0..200),
            // Only allowed characters, but too long.
            "[A-Za-z0-9._:-]{129,300}".prop_map(String::into_bytes),
            // One disallowed printable character among allowed ones.
            ("[A-Za-z0-9]{0,60}", "[ !\"#$%&'()*+,/;<=>?@\\[\\]^`{|}~]", "[A-Za-z0-9]{0,60}")
                .prop_map(|(a, b, c)| format!("{a}{b}{c}").into_bytes()),
        ],
    ) {
        prop_assume!(!is_valid(&bytes));
        if let Ok(text) = std::str::from_utf8(&bytes) {
            prop_assert!(RequestId::parse(text).is_none());
        }
        let headers = HeaderValue::from_bytes(&bytes).map(with_request_id).unwrap_or_default();
        assert_generated(&RequestId::from_headers(&headers));
    }

    #[test]
    fn generated_request_ids_are_valid_and_distinct(n in 1usize..64) {
        let ids: Vec<RequestId> = (0..n).map(|_| RequestId::generate()).collect();
        for id in &ids {
            assert_generated(id);
            prop_assert_eq!(RequestId::parse(id.as_str()), Some(id.clone()));
        }
        let distinct: std::collections::HashSet<&str> = ids.iter().map(RequestId::as_str).collect();
        prop_assert_eq!(distinct.len(), n);
    }
}

// ---------------------------------------------------------------------------------------------
// Limiter arithmetic and the rate-limit headers
// ---------------------------------------------------------------------------------------------

fn minute(limit: u32, burst: u32) -> BucketSpec {
    BucketSpec {
        window: Window::Minute,
        limit: nz(limit),
        burst: nz(burst),
    }
}

/// The response headers the gateway writes for `decision` at `unix_now`, a 429's included.
fn response_headers(policy: &PolicyHeaders, decision: &Decision, unix_now: Duration) -> HeaderMap {
    let mut headers = if decision.allowed {
        HeaderMap::new()
    } else {
        // As the stack turns a rejection into an error.
        let error = GatewayError::RateLimited {
            limit: decision.spec.limit.get(),
            window: decision.spec.window,
            retry_after: decision.retry_after,
            route: None,
        };
        let renderer = ErrorRenderer::new(&ErrorsConfig {
            style: ErrorStyle::Envelope,
            normalize_upstream_5xx: true,
            fields: Default::default(),
        });
        let response = renderer.render(&error, &RequestId::generate());
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        response.headers().clone()
    };
    policy.apply(
        &mut headers,
        RateLimitHeaders::Both,
        decision,
        unix_now,
        || Duration::ZERO,
    );
    headers
}

fn number(headers: &HeaderMap, name: &str) -> u64 {
    headers[name].to_str().unwrap().parse().unwrap()
}

/// Rates from one a minute to a million a minute, and bucket depths up to 500.
fn rate() -> impl Strategy<Value = u32> {
    prop_oneof![1u32..=120, 1u32..=1_000_000]
}

fn depth() -> impl Strategy<Value = u32> {
    1u32..=500
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn a_full_bucket_admits_exactly_its_capacity(
        limit in rate(),
        burst in depth(),
        extra in 1u32..20,
    ) {
        let l = Limiter::new(&[minute(limit, burst)], FakeRelativeClock::default());
        let mut admitted = 0;
        for _ in 0..burst + extra {
            let d = l.check();
            if d.allowed {
                prop_assert_eq!(d.remaining, burst - admitted - 1, "remaining counts down");
                admitted += 1;
            } else {
                prop_assert_eq!(d.remaining, 0);
            }
        }
        prop_assert_eq!(admitted, burst);
    }

    #[test]
    fn a_plan_with_several_buckets_admits_the_smallest_capacity(
        rpm in rate(),
        burst in prop::option::of(depth()),
        per_hour in prop::option::of(1u32..=300),
        per_day in prop::option::of(1u32..=300),
    ) {
        let plan = Plan {
            requests_per_minute: nz(rpm),
            burst: nz(burst.unwrap_or(rpm.min(500))),
            requests_per_hour: per_hour.map(nz),
            requests_per_day: per_day.map(nz),
            requests_per_month: None,
            routes: Default::default(),
        };
        let capacity =
            [Some(plan.burst.get()), per_hour, per_day].into_iter().flatten().min().unwrap();
        let l = Limiter::new(&buckets_for(&plan, None), FakeRelativeClock::default());
        let mut admitted = 0;
        for _ in 0..capacity + 5 {
            let d = l.check();
            if d.allowed {
                // The reported bucket is the closest to empty.
                prop_assert_eq!(d.remaining, capacity - admitted - 1);
                admitted += 1;
            }
        }
        prop_assert_eq!(admitted, capacity);
    }

    /// An arbitrary schedule of requests and pauses: every response's headers stay in bounds,
    /// and no more is admitted than the bucket allows over the elapsed time.
    #[test]
    fn headers_stay_in_bounds_on_any_schedule(
        limit in rate(),
        burst in depth(),
        epoch_ms in 1_600_000_000_000u64..2_000_000_000_000,
        schedule in prop::collection::vec((0u64..5_000, 0u32..30), 1..30),
    ) {
        let spec = minute(limit, burst);
        let clock = FakeRelativeClock::default();
        let l = Limiter::new(&[spec], clock.clone());
        let policy = PolicyHeaders::new("prop", &[spec]);
        let (mut elapsed, mut admitted) = (Duration::ZERO, 0u64);
        for (pause_ms, requests) in schedule {
            clock.advance(Duration::from_millis(pause_ms));
            elapsed += Duration::from_millis(pause_ms);
            let unix_now = Duration::from_millis(epoch_ms) + elapsed;
            for _ in 0..requests {
                let d = l.check();
                let h = response_headers(&policy, &d, unix_now);
                let remaining = number(&h, "x-ratelimit-remaining");
                prop_assert_eq!(number(&h, "x-ratelimit-limit"), u64::from(limit));
                prop_assert!(remaining <= u64::from(burst), "Remaining within the bucket");
                if burst <= limit {
                    // The default (burst = requests_per_minute) and any smaller burst.
                    prop_assert!(remaining <= u64::from(limit), "Remaining within Limit");
                }
                prop_assert!(
                    number(&h, "x-ratelimit-reset") >= ceil_secs(unix_now),
                    "Reset never in the past"
                );
                if d.allowed {
                    admitted += 1;
                    prop_assert!(h.get(RETRY_AFTER).is_none());
                } else {
                    prop_assert!(d.retry_after > Duration::ZERO);
                    prop_assert!(number(&h, RETRY_AFTER.as_str()) >= 1, "Retry-After >= 1");
                    let ietf = h["ratelimit"].to_str().unwrap();
                    prop_assert!(!ietf.ends_with(";t=0"), "{}", ietf);
                }
            }
        }
        let refilled = elapsed.as_nanos() / spec.interval().as_nanos();
        prop_assert!(
            u128::from(admitted) <= u128::from(burst) + refilled,
            "never more than burst + refill"
        );
    }

    /// `Remaining` is exact: right after a decision, exactly that many more are admitted.
    #[test]
    fn remaining_is_exactly_what_is_left(
        limit in rate(),
        burst in depth(),
        used in 0u32..600,
        pause_ms in 0u64..120_000,
    ) {
        let clock = FakeRelativeClock::default();
        let l = Limiter::new(&[minute(limit, burst)], clock.clone());
        for _ in 0..used.min(burst) {
            l.check();
        }
        clock.advance(Duration::from_millis(pause_ms));
        let d = l.check();
        prop_assume!(d.allowed);
        let more = (0..=d.remaining + 1).filter(|_| l.check().allowed).count();
        prop_assert_eq!(more, d.remaining as usize);
    }

    /// `Retry-After` is neither early nor late: one nanosecond before it a request is still
    /// refused, at it one is admitted.
    #[test]
    fn retry_after_is_exact(limit in rate(), burst in depth(), pause_permille in 0u32..1000) {
        let clock = FakeRelativeClock::default();
        let spec = minute(limit, burst);
        let l = Limiter::new(&[spec], clock.clone());
        for _ in 0..burst {
            prop_assert!(l.check().allowed);
        }
        // Part of one interval: not yet a whole token back.
        clock.advance(spec.interval() * pause_permille / 1000);
        let d = l.check();
        prop_assert!(!d.allowed);
        prop_assert!(d.retry_after > Duration::ZERO);
        clock.advance(d.retry_after - Duration::from_nanos(1));
        prop_assert!(!l.check().allowed, "admitted before Retry-After");
        clock.advance(Duration::from_nanos(1));
        prop_assert!(l.check().allowed, "refused at Retry-After");
    }

    /// `Reset` is never early: at the reported time the bucket is full again.
    #[test]
    fn the_bucket_is_full_at_reset(
        limit in rate(),
        burst in depth(),
        used in 1u32..600,
        pause_ms in 0u64..60_000,
    ) {
        let clock = FakeRelativeClock::default();
        let l = Limiter::new(&[minute(limit, burst)], clock.clone());
        for _ in 0..used.min(burst) - 1 {
            l.check();
        }
        clock.advance(Duration::from_millis(pause_ms));
        let d = l.check();
        clock.advance(d.reset_after);
        let admitted = (0..burst + 1).filter(|_| l.check().allowed).count();
        prop_assert_eq!(admitted, burst as usize);
    }
}
