//! The admin listener's `GET /usage/<key id>`: a key's monthly quota use and its route
//! buckets, for ops and support. `{"key_id","plan","period_start","period_end","used",
//! "limit","remaining","routes"}`; an unknown id is a 404 envelope.
//!
//! The handler (the gateway) builds the body; this module parses the path and writes the
//! answer. Key ids are public (`X-Tollgate-Key-Id`): nothing secret is shown.

use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;

/// The path prefix, followed by a key id.
pub const PREFIX: &str = "/usage/";

/// A key's usage body by key id, or `None` when no key has that id.
pub type UsageJson = Arc<dyn Fn(&str) -> Option<serde_json::Value> + Send + Sync>;

/// The status and JSON body for `path` (which starts with [`PREFIX`]).
pub fn answer(path: &str, usage: &UsageJson) -> (StatusCode, Bytes) {
    let id = &path[PREFIX.len()..];
    match usage(id).filter(|_| !id.is_empty()) {
        Some(body) => (StatusCode::OK, Bytes::from(format!("{body}\n"))),
        None => {
            // The id is echoed only if it is one (a safe identifier); anything else is not
            // repeated back.
            let shown = if !id.is_empty()
                && id.len() <= 128
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
            {
                format!("No API key has the id \"{id}\".")
            } else {
                "No API key has that id.".to_owned()
            };
            let body = serde_json::json!({
                "success": false,
                "error": { "code": "not_found", "message": shown },
            });
            (StatusCode::NOT_FOUND, Bytes::from(format!("{body}\n")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_and_unknown_ids() {
        let usage: UsageJson =
            Arc::new(|id: &str| (id == "acme").then(|| serde_json::json!({ "key_id": id })));
        let (status, body) = answer("/usage/acme", &usage);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&body[..], b"{\"key_id\":\"acme\"}\n");
        let (status, body) = answer("/usage/nobody", &usage);
        assert_eq!(status, StatusCode::NOT_FOUND);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "not_found");
        assert_eq!(v["error"]["message"], "No API key has the id \"nobody\".");
        let (status, body) = answer("/usage/%3Cscript%3E", &usage);
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(!String::from_utf8_lossy(&body).contains("script"));
        assert_eq!(answer("/usage/", &usage).0, StatusCode::NOT_FOUND);
    }
}
