//! The per-request error path: request IDs and the JSON error envelope.
//!
//! Every request gets a [`RequestId`] (kept from the client or generated), and every rejection
//! is written by [`ErrorRenderer`]. Beside the renderer sits a naive baseline, the same envelope
//! built with `serde_json::json!` + `serde_json::to_vec`, for scale.
//!
//! Run: `cargo bench --bench envelope -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::time::SystemTime;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};
use tollgate::config::{ErrorStyle, ErrorsConfig};
use tollgate::error::{ErrorRenderer, GatewayError};
use tollgate::observability::RequestId;

fn request_id(c: &mut Criterion) {
    let mut group = c.benchmark_group("request_id");
    group.bench_function("generate", |b| b.iter(RequestId::generate));

    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("api.example.com"));
    headers.insert("user-agent", HeaderValue::from_static("bench/1.0"));
    headers.insert("accept", HeaderValue::from_static("application/json"));
    headers.insert(
        "x-request-id",
        HeaderValue::from_static("client-7f3a9c21-4b2e-4d8a-9e61-0c5d2f8b1a47"),
    );
    group.bench_function("from_headers_valid_client_id", |b| {
        b.iter(|| RequestId::from_headers(black_box(&headers)))
    });
    group.finish();
}

fn envelope(c: &mut Criterion) {
    let renderer = ErrorRenderer::new(&ErrorsConfig {
        style: ErrorStyle::Envelope,
        normalize_upstream_5xx: true,
        fields: serde_json::Map::new(),
    });
    let id = RequestId::generate();
    let error = GatewayError::NoRoute;

    let mut group = c.benchmark_group("error_envelope");
    // The whole response: status, JSON body, Content-Type and Cache-Control.
    group.bench_function("renderer_response", |b| {
        b.iter(|| renderer.render(black_box(&error), black_box(&id)))
    });
    // The body alone, to compare like with like against the baseline.
    group.bench_function("renderer_body", |b| {
        b.iter(|| {
            let error = black_box(&error);
            renderer.body(error.code(), &error.message(), black_box(&id))
        })
    });
    group.bench_function("naive_json_macro", |b| {
        b.iter(|| {
            let error = black_box(&error);
            let id = black_box(&id);
            let value = serde_json::json!({
                "success": false,
                "error": { "code": error.code(), "message": error.message() },
                "request_id": id.as_str(),
                "timestamp": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            });
            serde_json::to_vec(&value).expect("a JSON value serializes")
        })
    });
    group.finish();
}

criterion_group!(benches, request_id, envelope);
criterion_main!(benches);
