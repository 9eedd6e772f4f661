//! The config parser on arbitrary text: `Config::from_text` must never panic, every error must
//! render (with `Display`) as `file:line:col: message` lines, and a config it accepts must
//! build the runtime state a reload builds from it (key store, router, error renderer) without
//! panicking, with error bodies that are valid JSON.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tollgate::auth::KeyStore;
use tollgate::config::{Config, ConfigError};
use tollgate::error::ErrorRenderer;
use tollgate::limit::bucket::buckets_for;
use tollgate::limit::headers::PolicyHeaders;
use tollgate::observability::request_id::RequestId;
use tollgate::route::Router;

/// A config may name files it reads (`auth.keys_file`, TLS files). Reading a device such as
/// `/dev/zero` never ends, which is the operator's mistake rather than a parser bug, so inputs
/// that could name one are skipped.
fn may_name_a_device(text: &str) -> bool {
    ["/dev", "/proc", "/sys"].iter().any(|d| text.contains(d))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if may_name_a_device(text) {
        return;
    }
    match Config::from_text(Path::new("fuzz.toml"), text) {
        Err(error) => {
            let rendered = error.to_string();
            match &error {
                ConfigError::Invalid(issues) => {
                    assert!(!issues.is_empty(), "an invalid config names a mistake");
                    for issue in issues {
                        assert!(issue.line >= 1 && issue.column >= 1);
                        assert!(rendered.contains(&issue.to_string()));
                    }
                }
                ConfigError::Read { .. } => assert!(!rendered.is_empty()),
            }
        }
        Ok(config) => {
            let store = KeyStore::new(&config.keys, &config.plans, None);
            assert!(store.len() <= config.keys.len());
            for (name, plan) in &config.plans {
                let specs = buckets_for(plan, None);
                let _ = PolicyHeaders::new(&name.0, &specs);
            }
            let router = Router::new(&config.routes);
            for route in &config.routes {
                assert!(router.find(&route.prefix).is_some());
            }
            let renderer = ErrorRenderer::new(&config.errors);
            let id = RequestId::generate();
            for scope in config.routes.iter().flat_map(|r| &r.scopes) {
                let message = format!("This API key lacks the required scope '{scope}'.");
                let body = renderer.body("permission_denied", &message, &id);
                let json: serde_json::Value =
                    serde_json::from_slice(&body).expect("error bodies are JSON");
                assert!(json.is_object());
            }
        }
    }
});
