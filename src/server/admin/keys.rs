//! The admin key API's HTTP side, on the admin listener: `/keys` requests are read here
//! (bearer token, method and path, a JSON body of at most [`MAX_BODY_BYTES`]) into a
//! [`KeyOp`] for the [`KeyAdmin`] the handler provides, and its answer or [`ApiError`] is
//! written back as JSON. What a key operation does (validation, the keys file, applying it)
//! lives with whoever implements [`KeyAdmin`] (`reload::key_api`), above the stack.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

/// Largest request body the key API reads.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// One key operation, parsed from the request.
#[derive(Debug)]
pub enum KeyOp {
    /// `GET /keys?limit=N&after=<id>`.
    List {
        /// Most keys in the page.
        limit: Option<String>,
        /// The last id of the previous page.
        after: Option<String>,
    },
    /// `GET /keys/<id>`.
    Get(String),
    /// `POST /keys` with its body.
    Create(serde_json::Value),
    /// `PATCH /keys/<id>` with its body.
    Patch(String, serde_json::Value),
    /// `POST /keys/<id>/rotate` with its body.
    Rotate(String, serde_json::Value),
    /// `DELETE /keys/<id>`.
    Delete(String),
}

impl KeyOp {
    /// The audit log's `action`.
    pub fn action(&self) -> &'static str {
        match self {
            KeyOp::List { .. } => "list",
            KeyOp::Get(_) => "get",
            KeyOp::Create(_) => "create",
            KeyOp::Patch(..) => "update",
            KeyOp::Rotate(..) => "rotate",
            KeyOp::Delete(_) => "delete",
        }
    }
}

/// A refused key operation: the status, a stable code, a message, and the request field at
/// fault when there is one. Never carries a key, digest or token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// `error.code`.
    pub code: &'static str,
    /// `error.message`.
    pub message: String,
    /// `error.field`: the request field at fault.
    pub field: Option<String>,
}

impl ApiError {
    /// An error with no field.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    /// 422 `invalid_field` naming `field`.
    pub fn field(field: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_field",
            message: message.into(),
            field: Some(field.to_owned()),
        }
    }

    /// 400 `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 404 `not_found` for key `id`.
    pub fn no_key(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no key with id \"{id}\""),
        )
    }

    fn body(&self) -> serde_json::Value {
        let mut error = serde_json::json!({ "code": self.code, "message": self.message });
        if let Some(field) = &self.field {
            error["field"] = serde_json::Value::String(field.clone());
        }
        serde_json::json!({ "success": false, "error": error })
    }
}

/// A boxed key operation in flight.
pub type KeyCall<'a> =
    Pin<Box<dyn Future<Output = Result<(StatusCode, serde_json::Value), ApiError>> + Send + 'a>>;

/// What serves the key API: it checks the admin token and runs operations.
pub trait KeyAdmin: Send + Sync + std::fmt::Debug {
    /// `Ok` for the admin token; else 403 when key management is off, 401 for a missing or
    /// wrong token (counted by the failed-auth guard), 429 for a client IP it blocks.
    fn authorize(&self, token: Option<&[u8]>, client: IpAddr) -> Result<(), ApiError>;

    /// Runs an authorized operation.
    fn call(&self, op: KeyOp, client: IpAddr) -> KeyCall<'_>;
}

/// Whether `path` is the key API's.
pub fn is_key_path(path: &str) -> bool {
    path == "/keys" || path.starts_with("/keys/")
}

/// Answers one `/keys` request. Without a [`KeyAdmin`] (a handler that has none), 403 as
/// for an unset token.
pub async fn respond(
    request: Request<Incoming>,
    admin: Option<Arc<dyn KeyAdmin>>,
    client: IpAddr,
) -> Response<Full<Bytes>> {
    let outcome = match admin {
        None => Err(off()),
        Some(admin) => serve(request, &*admin, client).await,
    };
    let (status, body) = match outcome {
        Ok(ok) => ok,
        Err(error) => (error.status, error.body()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"tollgate admin\""),
        );
    }
    response
}

/// 403: no admin token is configured.
pub fn off() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "permission_denied",
        "key management is off: set admin.token",
    )
}

async fn serve(
    request: Request<Incoming>,
    admin: &dyn KeyAdmin,
    client: IpAddr,
) -> Result<(StatusCode, serde_json::Value), ApiError> {
    let token = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| bearer(v.as_bytes()));
    admin.authorize(token, client)?;
    let (parts, body) = request.into_parts();
    let segments: Vec<&str> = parts.uri.path()["/keys".len()..]
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let query = parts.uri.query().unwrap_or("");
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_owned())
    };
    let op = match (&parts.method, segments.as_slice()) {
        (&Method::GET, []) => KeyOp::List {
            limit: param("limit"),
            after: param("after"),
        },
        (&Method::POST, []) => KeyOp::Create(json_body(body).await?),
        (&Method::GET, [id]) => KeyOp::Get((*id).to_owned()),
        (&Method::PATCH, [id]) => KeyOp::Patch((*id).to_owned(), json_body(body).await?),
        (&Method::DELETE, [id]) => KeyOp::Delete((*id).to_owned()),
        (&Method::POST, [id, "rotate"]) => KeyOp::Rotate((*id).to_owned(), json_body(body).await?),
        (_, [] | [_] | [_, "rotate"]) => {
            return Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{} is not allowed on {}", parts.method, parts.uri.path()),
            ));
        }
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such key API endpoint",
            ));
        }
    };
    admin.call(op, client).await
}

/// The token of `Authorization: Bearer <token>` (scheme case-insensitive).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || rest.first() != Some(&b' ') {
        return None;
    }
    Some(rest.trim_ascii()).filter(|t| !t.is_empty())
}

/// The request body as a JSON object (an empty body is `{}`).
async fn json_body(body: Incoming) -> Result<serde_json::Value, ApiError> {
    let bytes = Limited::new(body, MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body is larger than {MAX_BODY_BYTES} bytes, or was cut off"),
            )
        })?
        .to_bytes();
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Value::Object(Default::default()));
    }
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(value @ serde_json::Value::Object(_)) => Ok(value),
        Ok(_) => Err(ApiError::bad_request("the body must be a JSON object")),
        Err(e) => Err(ApiError::bad_request(format!("the body is not JSON: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer   abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearerabc"), None);
    }

    #[test]
    fn errors_name_their_field() {
        let e = ApiError::field("plan", "plan \"gold\" is not defined");
        assert_eq!(
            e.body(),
            serde_json::json!({"success": false, "error": {"code": "invalid_field", "message": "plan \"gold\" is not defined", "field": "plan"}})
        );
        assert!(is_key_path("/keys") && is_key_path("/keys/a/rotate") && !is_key_path("/keysx"));
    }
}
