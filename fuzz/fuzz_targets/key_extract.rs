//! Key extraction and authentication on arbitrary requests: any header bytes (invalid UTF-8
//! included), any request target, any auth settings. Nothing may panic, and the answers must
//! agree with each other: a found key is never empty, `authenticate` fails only with the 401/403
//! errors, and it admits exactly the keys the store holds.

#![no_main]

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::{Arc, LazyLock};

use arbitrary::Arbitrary;
use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use libfuzzer_sys::fuzz_target;
use tollgate::GatewayError;
use tollgate::auth::extract::{bearer_token, extract, query_pairs, query_without};
use tollgate::auth::{ApiKey, KeyStore, authenticate};
use tollgate::config::{AuthConfig, KeyConfig, KeyId, Plan, PlanName};

/// Test keys the store knows (generated for the fuzzer, never real).
const KEYS: [(&str, &str, &[&str]); 3] = [
    ("fuzz-a", "tg_test_fuzzkeyA1", &["read"]),
    ("fuzz-b", "tg_test_fuzzkeyB2", &["read", "write"]),
    ("fuzz-off", "tg_test_fuzzkeyC3", &[]),
];

static STORE: LazyLock<KeyStore> = LazyLock::new(|| {
    let plan = PlanName(Arc::from("pro"));
    let rpm = NonZeroU32::new(300).unwrap();
    let plans: BTreeMap<PlanName, Plan> = [(
        plan.clone(),
        Plan {
            requests_per_minute: rpm,
            burst: rpm,
            requests_per_hour: None,
            requests_per_day: None,
            requests_per_month: None,
            routes: Default::default(),
        },
    )]
    .into_iter()
    .collect();
    let keys: Vec<KeyConfig> = KEYS
        .iter()
        .map(|(id, secret, scopes)| KeyConfig {
            id: KeyId(Arc::from(*id)),
            digests: vec![tollgate::config::DigestConfig::new(ApiKey::new(*secret).digest())],
            plan: plan.clone(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            requests_per_minute: None,
            disabled: *id == "fuzz-off",
            requests_per_month: None,
            routes: Default::default(),
            expires_at: None,
            metadata: Vec::new(),
            created_at: None,
        })
        .collect();
    KeyStore::new(&keys, &plans, None)
});

/// Which header a fuzzed header lands in: the interesting ones by choice, or any name.
#[derive(Arbitrary, Debug)]
enum Name {
    KeyHeader,
    Authorization,
    Other(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// `auth.header`; the default when not a valid header name.
    key_header: Vec<u8>,
    bearer: bool,
    query_param: Option<String>,
    headers: Vec<(Name, Vec<u8>)>,
    /// The request target.
    target: Vec<u8>,
    required: bool,
    scopes: Vec<String>,
}

fuzz_target!(|input: Input| {
    let header = HeaderName::from_bytes(&input.key_header)
        .unwrap_or_else(|_| HeaderName::from_static("x-api-key"));
    let config = AuthConfig {
        header: header.clone(),
        bearer: input.bearer,
        query_param: input.query_param.clone(),
        forward_key: false,
        keys_file: None,
        expiry_warning: tollgate::config::DEFAULT_EXPIRY_WARNING,
        store: tollgate::config::KeyStoreKind::File,
        keys_cache_file: None,
    };
    let mut headers = HeaderMap::new();
    for (name, value) in &input.headers {
        let name = match name {
            Name::KeyHeader => header.clone(),
            Name::Authorization => AUTHORIZATION,
            Name::Other(raw) => match HeaderName::from_bytes(raw) {
                Ok(n) => n,
                Err(_) => continue,
            },
        };
        // hyper hands the gateway only what `HeaderValue` accepts: obs-text (invalid UTF-8)
        // yes, control bytes no.
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.append(name, value);
        }
    }
    let uri = Uri::try_from(input.target.as_slice()).unwrap_or_else(|_| Uri::from_static("/"));

    for value in headers.get_all(AUTHORIZATION) {
        if let Some(token) = bearer_token(value.as_bytes()) {
            assert!(token.len() + 6 <= value.len());
            assert!(!token.first().is_some_and(u8::is_ascii_whitespace));
            assert!(!token.last().is_some_and(u8::is_ascii_whitespace));
        }
    }
    if let Some(query) = uri.query() {
        for (name, _) in query_pairs(query) {
            assert!(!name.contains(&b'&'));
        }
        if let Some(param) = &input.query_param
            && let Some(kept) = query_without(query, param)
        {
            assert!(!kept.is_empty());
            assert!(query_pairs(&kept).all(|(n, _)| n != param.as_bytes()));
        }
    }

    let extracted = extract(&headers, &uri, &config);
    if let Ok(Some(presented)) = &extracted {
        assert!(!presented.key.is_empty(), "an empty value is no key");
    }
    let outcome = authenticate(
        &headers,
        &uri,
        &config,
        &*STORE,
        &Default::default(),
        input.required,
        &input.scopes,
    );
    match (&extracted, &outcome) {
        (Err(_), Err(GatewayError::InvalidApiKey)) => {}
        (Err(_), _) => panic!("conflicting credentials must be refused"),
        (Ok(None), Ok(None)) => assert!(!input.required),
        (Ok(None), Err(GatewayError::MissingApiKey)) => assert!(input.required),
        (Ok(Some(presented)), Ok(Some(identity))) => {
            let (_, secret, scopes) = KEYS
                .iter()
                .find(|(id, _, _)| *id == &*identity.record.id.0)
                .expect("the identity is a stored key");
            assert_eq!(&*presented.key, secret.as_bytes());
            assert!(input.scopes.iter().all(|s| scopes.contains(&s.as_str())));
        }
        (Ok(Some(_)), Err(GatewayError::InvalidApiKey | GatewayError::ScopeDenied { .. })) => {}
        (extracted, outcome) => panic!("inconsistent: {extracted:?} then {outcome:?}"),
    }
});
