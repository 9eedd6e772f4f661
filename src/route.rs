//! Route matching: the longest configured prefix wins; the route decides methods, auth,
//! scopes and the target (an upstream or a fixed response).

use http::{HeaderValue, Method};

use crate::config::RouteConfig;

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
            .map(|(index, r)| Route {
                index,
                allow: r.methods.as_ref().map(|methods| {
                    let mut names: Vec<&str> = methods.iter().map(Method::as_str).collect();
                    if methods.contains(&Method::GET) && !methods.contains(&Method::HEAD) {
                        names.push("HEAD");
                    }
                    HeaderValue::from_str(&names.join(", ")).expect("method names are valid")
                }),
                config: r.clone(),
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
    fn methods_and_allow() {
        let r = Router::new(&[route("/", Some(vec![Method::GET, Method::POST]))]);
        let found = r.find("/").unwrap();
        assert!(found.allows(&Method::GET));
        assert!(found.allows(&Method::HEAD));
        assert!(!found.allows(&Method::DELETE));
        assert_eq!(found.allow.as_ref().unwrap(), "GET, POST, HEAD");
    }
}
