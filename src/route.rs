//! Route matching: the longest configured prefix wins; the route decides methods, auth,
//! scopes and the target (an upstream or a fixed response).

use http::{HeaderValue, Method, Request, Uri};

use crate::config::RouteConfig;
use crate::error::GatewayError;

/// A route ready for matching.
#[derive(Debug, Clone)]
pub struct Route {
    /// Its position in `config.routes` (file order), for per-route metrics.
    pub index: usize,
    /// The validated route.
    pub config: RouteConfig,
    /// `Allow` header for 405s, when the route limits methods.
    pub allow: Option<HeaderValue>,
}

impl Route {
    /// 405 with `Allow` for a method the route forbids.
    pub fn check_method(&self, method: &Method) -> Result<(), GatewayError> {
        if self.allows(method) {
            return Ok(());
        }
        Err(GatewayError::MethodNotAllowed {
            method: method.clone(),
            allow: self
                .allow
                .clone()
                .unwrap_or_else(|| HeaderValue::from_static("")),
        })
    }

    /// With `strip_prefix`, the path the upstream gets: `path` (or, when the route matched
    /// only once segment parameters were dropped, `params_dropped`) without the prefix,
    /// always starting with `/`. `None` without `strip_prefix`.
    pub fn stripped_path(&self, path: &str, params_dropped: Option<&str>) -> Option<String> {
        if !self.config.strip_prefix {
            return None;
        }
        let prefix = self.config.prefix.as_str();
        let rest = match path.strip_prefix(prefix) {
            Some(rest) => rest,
            None => params_dropped
                .and_then(|p| p.strip_prefix(prefix))
                .unwrap_or(""),
        };
        Some(if rest.starts_with('/') {
            rest.to_owned()
        } else {
            format!("/{rest}")
        })
    }

    /// Whether `method` may use this route. A route that allows GET also allows HEAD, as in
    /// nginx.
    pub fn allows(&self, method: &Method) -> bool {
        match &self.config.methods {
            None => true,
            Some(methods) => {
                methods.contains(method)
                    || (method == Method::HEAD && methods.contains(&Method::GET))
            }
        }
    }
}

/// Why a request path cannot be routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// `%2F` or `%5C`: a slash that some upstreams decode and some do not, so the route it
    /// belongs to is ambiguous.
    EncodedSlash,
}

/// A request path in the form routes are matched against and upstreams receive: escapes of
/// unreserved characters decoded (`%61` is `a`), runs of `/` merged, and `.` and `..`
/// segments resolved (RFC 3986, 5.2.4; `..;x` counts as `..`, as Tomcat reads it). `None` when
/// the path is already in that form, the common case, which costs one scan.
///
/// Without this, `/v1/%61dmin/x`, `/v1//admin/x` or `/v1/x/../admin/x` would match a `/v1/`
/// route and skip the scopes of `/v1/admin/`, while the upstream serves `/v1/admin/x`.
pub fn normalize_path(path: &str) -> Result<Option<String>, PathError> {
    let bytes = path.as_bytes();
    // Origin-form paths only (`*` and the like are left to the router, which finds nothing).
    let suspect = bytes.first() == Some(&b'/')
        && bytes
            .windows(2)
            .any(|w| matches!(w, [b'/', b'/' | b'.']) || w[0] == b'%');
    if !suspect {
        return Ok(None);
    }
    // Unreserved escapes decoded; anything else stays escaped as it came.
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes.get(i..i + 3) {
            Some([b'%', hi, lo]) => hex(*hi).zip(hex(*lo)).map(|(h, l)| h << 4 | l),
            _ => None,
        };
        match escaped {
            Some(b'/' | b'\\') => return Err(PathError::EncodedSlash),
            Some(b) if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') => {
                decoded.push(b);
                i += 3;
            }
            // Kept escaped, in RFC 3986's normal form (upper-case hex), as route prefixes
            // are compiled: `%c3%a9` (curl) and `%C3%A9` (browsers) are one path.
            Some(_) => {
                decoded.push(b'%');
                decoded.extend(bytes[i + 1..i + 3].iter().map(u8::to_ascii_uppercase));
                i += 3;
            }
            _ => {
                decoded.push(bytes[i]);
                i += 1;
            }
        }
    }
    let decoded = String::from_utf8(decoded).expect("only ASCII was decoded into ASCII");
    let mut segments: Vec<&str> = Vec::new();
    let parts: Vec<&str> = decoded.split('/').skip(1).collect();
    for (n, segment) in parts.iter().enumerate() {
        let last = n + 1 == parts.len();
        let name = segment.split(';').next().unwrap_or("");
        match name {
            "." => {}
            ".." => {
                segments.pop();
            }
            "" if !last => {}
            _ => segments.push(segment),
        }
        // A path ending in a dot segment names a directory: keep its trailing slash.
        if last && matches!(name, "." | "..") {
            segments.push("");
        }
    }
    let normal = format!("/{}", segments.join("/"));
    Ok((normal != path).then_some(normal))
}

/// `path` without the parameters of its segments (`/a;x=1/b` is `/a/b`), when it has any:
/// the form routes are matched in, as Tomcat and Spring drop them before routing.
pub fn without_params(path: &str) -> Option<String> {
    if !path.contains(';') {
        return None;
    }
    let kept: Vec<&str> = path
        .split('/')
        .map(|segment| segment.split(';').next().unwrap_or(""))
        .collect();
    Some(kept.join("/"))
}

/// `prefix` with its escapes in upper-case hex, the form [`normalize_path`] gives request
/// paths, so `%c3%a9` in a config matches what clients send.
fn upper_case_escapes(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len());
    let mut rest = prefix;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let escape = &rest[at..];
        match escape.get(1..3) {
            Some(hex) if hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
                out.push('%');
                out.push_str(&hex.to_ascii_uppercase());
                rest = &escape[3..];
            }
            _ => {
                out.push('%');
                rest = &escape[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// All routes, longest prefix first.
#[derive(Debug, Clone, Default)]
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    /// Compiles the configured routes.
    pub fn new(routes: &[RouteConfig]) -> Self {
        let mut routes: Vec<Route> = routes
            .iter()
            .enumerate()
            .map(|(index, r)| {
                let mut r = r.clone();
                r.prefix = upper_case_escapes(&r.prefix);
                (index, r)
            })
            .map(|(index, r)| Route {
                index,
                allow: r.methods.as_ref().map(|methods| {
                    let mut names: Vec<&str> = methods.iter().map(Method::as_str).collect();
                    if methods.contains(&Method::GET) && !methods.contains(&Method::HEAD) {
                        names.push("HEAD");
                    }
                    HeaderValue::from_str(&names.join(", ")).expect("method names are valid")
                }),
                config: r,
            })
            .collect();
        routes.sort_by_key(|r| std::cmp::Reverse(r.config.prefix.len()));
        Self { routes }
    }

    /// The route whose prefix is the longest prefix of `path`.
    pub fn find(&self, path: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| path.starts_with(r.config.prefix.as_str()))
    }

    /// The route of `request`, whose path is put in normal form first (and forwarded so):
    /// an encoded, doubled or dotted path must not reach a route other than the one the
    /// upstream will serve. 400 for an encoded slash, 404 when no route matches.
    pub fn resolve<B>(&self, request: &mut Request<B>) -> Result<Resolved<'_>, GatewayError> {
        match normalize_path(request.uri().path()) {
            Ok(None) => {}
            Ok(Some(normal)) => set_path(request, &normal)?,
            Err(PathError::EncodedSlash) => {
                return Err(GatewayError::BadRequest("encoded slash in the path"));
            }
        }
        let params_dropped = without_params(request.uri().path());
        let route = self
            .find(params_dropped.as_deref().unwrap_or(request.uri().path()))
            .ok_or(GatewayError::NoRoute)?;
        Ok(Resolved {
            route,
            params_dropped,
        })
    }
}

/// A request's route, from [`Router::resolve`].
#[derive(Debug)]
pub struct Resolved<'r> {
    /// The route.
    pub route: &'r Route,
    /// The path the route was matched on, when segment parameters were dropped from it.
    pub params_dropped: Option<String>,
}

/// Replaces the request's path, keeping its query.
fn set_path<B>(request: &mut Request<B>, path: &str) -> Result<(), GatewayError> {
    let invalid = || GatewayError::BadRequest("invalid path");
    let target = match request.uri().query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    let mut parts = request.uri().clone().into_parts();
    parts.path_and_query = Some(target.parse().map_err(|_| invalid())?);
    *request.uri_mut() = Uri::from_parts(parts).map_err(|_| invalid())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FixedResponse, RouteTarget};

    fn route(prefix: &str, methods: Option<Vec<Method>>) -> RouteConfig {
        RouteConfig {
            prefix: prefix.to_owned(),
            target: RouteTarget::Respond(FixedResponse {
                status: http::StatusCode::OK,
                body: bytes::Bytes::new(),
                content_type: HeaderValue::from_static("text/plain"),
            }),
            scopes: vec![],
            methods,
            auth: false,
            strip_prefix: false,
            cost: 1,
        }
    }

    #[test]
    fn longest_prefix_wins() {
        let r = Router::new(&[
            route("/", None),
            route("/v1/", None),
            route("/v1/admin/", None),
        ]);
        assert_eq!(r.find("/v1/admin/x").unwrap().config.prefix, "/v1/admin/");
        assert_eq!(r.find("/v1/users").unwrap().config.prefix, "/v1/");
        assert_eq!(r.find("/other").unwrap().config.prefix, "/");
        let r = Router::new(&[route("/v1/", None)]);
        assert!(r.find("/v2/").is_none());
    }

    #[test]
    fn paths_are_routed_in_normal_form() {
        let normal = |p: &str| normalize_path(p).map(|n| n.unwrap_or_else(|| p.to_owned()));
        for (given, expected) in [
            ("/v1/users", "/v1/users"),
            ("/v1/users/", "/v1/users/"),
            ("/", "/"),
            ("/v1/%61dmin/users", "/v1/admin/users"),
            ("/v1/%7Euser/%2e%2E/admin", "/v1/admin"),
            ("/v1//admin///users", "/v1/admin/users"),
            ("/v1/x/../admin/users", "/v1/admin/users"),
            ("/v1/./admin/./users", "/v1/admin/users"),
            ("/v1/public/..;/admin/users", "/v1/admin/users"),
            ("/v1/admin/..", "/v1/"),
            ("/v1/admin/.", "/v1/admin/"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/v1/a%20b/c%3Fd", "/v1/a%20b/c%3Fd"),
            ("/caf%c3%a9/x%3f", "/caf%C3%A9/x%3F"),
            ("/v1/50%", "/v1/50%"),
            ("/v1/%zz", "/v1/%zz"),
            ("/v1/admin;jsessionid=1/x", "/v1/admin;jsessionid=1/x"),
            ("/v1/.well-known/x", "/v1/.well-known/x"),
            ("*", "*"),
        ] {
            assert_eq!(normal(given).as_deref(), Ok(expected), "{given}");
        }
        assert_eq!(normalize_path("/v1/users"), Ok(None), "no allocation");
        assert_eq!(
            without_params("/v1/admin;x=1/users;y").as_deref(),
            Some("/v1/admin/users")
        );
        assert_eq!(without_params("/v1/users"), None);
        for slash in ["/v1%2Fadmin/x", "/v1/%2f", "/v1%5Cadmin", "/a/%5c"] {
            assert_eq!(
                normalize_path(slash),
                Err(PathError::EncodedSlash),
                "{slash}"
            );
        }
    }

    /// A prefix written with lower-case escapes matches what browsers (upper case) and curl
    /// (lower case) send: both sides are compared in upper-case hex.
    #[test]
    fn escapes_match_in_either_case() {
        for prefix in ["/caf%C3%A9/", "/caf%c3%a9/"] {
            let r = Router::new(&[route(prefix, None)]);
            for path in ["/caf%C3%A9/menu", "/caf%c3%a9/menu", "/caf%C3%a9/menu"] {
                let normal = normalize_path(path)
                    .unwrap()
                    .unwrap_or_else(|| path.to_owned());
                assert!(r.find(&normal).is_some(), "{prefix} {path}");
            }
        }
    }

    #[test]
    fn methods_and_allow() {
        let r = Router::new(&[route("/", Some(vec![Method::GET, Method::POST]))]);
        let found = r.find("/").unwrap();
        assert!(found.allows(&Method::GET));
        assert!(found.allows(&Method::HEAD));
        assert!(!found.allows(&Method::DELETE));
        assert_eq!(found.allow.as_ref().unwrap(), "GET, POST, HEAD");
    }
}
