//! `[server]`, `[admin]` and `[errors]`: the listeners, and how errors are answered.

use std::net::SocketAddr;

use ipnet::IpNet;

use super::*;

/// Error body keys that `errors.fields` may not overwrite.
const RESERVED_ERROR_FIELDS: [&str; 6] = [
    "success",
    "error",
    "request_id",
    "timestamp",
    "detail",
    "code",
];

impl Validator<'_, '_> {
    pub(super) fn server(&mut self, s: ServerFile) -> ServerConfig {
        let listen = match &s.listen {
            None => vec![DEFAULT_LISTEN.parse().expect("valid default")],
            Some(spanned) => {
                let addrs: Vec<String> = match spanned.get_ref() {
                    OneOrMany::One(a) => vec![a.clone()],
                    OneOrMany::Many(list) => list.clone(),
                };
                if addrs.is_empty() {
                    self.error(
                        spanned.span(),
                        "server.listen must name at least one address",
                    );
                }
                addrs
                    .iter()
                    .filter_map(|a| self.socket_addr(a, spanned.span(), "server.listen"))
                    .collect()
            }
        };
        let trusted_proxies = s
            .trusted_proxies
            .iter()
            .flatten()
            .filter_map(|cidr| {
                let text = cidr.get_ref().trim();
                let parsed = text
                    .parse::<IpNet>()
                    .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from));
                match parsed {
                    Ok(net) => Some(net),
                    Err(_) => {
                        self.error(
                            cidr.span(),
                            format!("server.trusted_proxies: \"{text}\" is not a CIDR like \"10.0.0.0/8\" or an IP address"),
                        );
                        None
                    }
                }
            })
            .collect();
        let tls = s.tls.as_ref().and_then(|t| {
            let issues = self.issues.len();
            let cert = self.existing_file(&t.cert, "server.tls.cert");
            let key = self.existing_file(&t.key, "server.tls.key");
            if self.issues.len() > issues {
                return None;
            }
            match super::tls::server_config(&cert, &key) {
                Ok(server_config) => Some(TlsConfig {
                    cert,
                    key,
                    server_config,
                }),
                Err(error) => {
                    self.error(t.cert.span(), format!("server.tls: {error}"));
                    None
                }
            }
        });
        ServerConfig {
            listen,
            workers: match s.workers {
                Some(w) if *w.get_ref() > MAX_WORKERS => {
                    self.error(
                        w.span(),
                        format!(
                            "server.workers must be at most {MAX_WORKERS} (0 = one per core), got {}",
                            w.get_ref()
                        ),
                    );
                    0
                }
                Some(w) => *w.get_ref(),
                None => 0,
            },
            watch: s.watch.unwrap_or(false),
            header_read_timeout: self.duration(
                &s.header_read_timeout,
                DEFAULT_HEADER_READ_TIMEOUT,
                "server.header_read_timeout",
            ),
            body_read_timeout: self.duration(
                &s.body_read_timeout,
                DEFAULT_BODY_READ_TIMEOUT,
                "server.body_read_timeout",
            ),
            idle_timeout: self.duration(
                &s.idle_timeout,
                DEFAULT_IDLE_TIMEOUT,
                "server.idle_timeout",
            ),
            max_header_bytes: self.size_at_most(
                &s.max_header_bytes,
                DEFAULT_MAX_HEADER_BYTES,
                MAX_HEADER_BYTES_CEILING,
                "server.max_header_bytes",
            ),
            max_body_bytes: self.size(
                &s.max_body_bytes,
                DEFAULT_MAX_BODY_BYTES,
                "server.max_body_bytes",
            ),
            max_connections: self.positive_or(
                &s.max_connections,
                DEFAULT_MAX_CONNECTIONS,
                "server.max_connections",
            ),
            shutdown_grace: self.duration(
                &s.shutdown_grace,
                DEFAULT_SHUTDOWN_GRACE,
                "server.shutdown_grace",
            ),
            trusted_proxies,
            underscores_in_headers: s.underscores_in_headers.unwrap_or(false),
            tls,
        }
    }

    /// Addresses that could not all be bound: the same port on the same address, or on an
    /// address and the wildcard of its family (IPv6 listeners are IPv6-only, so `[::]` and
    /// `0.0.0.0` do not overlap). Found here, `check` does not pass a config that cannot start.
    pub(super) fn listen_overlaps(
        &mut self,
        listen: &[SocketAddr],
        listen_span: std::ops::Range<usize>,
        admin: SocketAddr,
        admin_span: Option<std::ops::Range<usize>>,
    ) {
        for (i, &a) in listen.iter().enumerate() {
            if let Some(&b) = listen[..i].iter().find(|&&b| addresses_overlap(a, b)) {
                self.error(
                    listen_span.clone(),
                    format!("server.listen: {b} and {a} overlap (the same port on the same address, or on an address and its wildcard); only one can be bound"),
                );
            }
            if addresses_overlap(a, admin) {
                self.error(
                    admin_span.clone().unwrap_or(listen_span.clone()),
                    format!("admin.listen {admin} overlaps server.listen {a}: they need different ports or addresses"),
                );
            }
        }
    }

    pub(super) fn admin(&mut self, a: AdminFile) -> AdminConfig {
        let default = DEFAULT_ADMIN_LISTEN.parse().expect("valid default");
        let listen = a
            .listen
            .as_ref()
            .and_then(|l| self.socket_addr(l.get_ref(), l.span(), "admin.listen"))
            .unwrap_or(default);
        // The message never repeats the value: it may be the token itself, pasted by mistake.
        let token = a
            .token
            .as_ref()
            .and_then(|t| match KeyDigest::parse(t.get_ref().trim()) {
                Ok(digest) => Some(digest),
                Err(e) => {
                    self.error(
                        t.span(),
                        format!("admin.token: {}", e.to_string().replacen("key", "token", 2)),
                    );
                    None
                }
            });
        AdminConfig { listen, token }
    }

    pub(super) fn errors(&mut self, e: ErrorsFile) -> ErrorsConfig {
        let style = self.enumeration(
            &e.style,
            &[
                ("envelope", ErrorStyle::Envelope),
                ("detail", ErrorStyle::Detail),
                ("simple", ErrorStyle::Simple),
            ],
            ErrorStyle::Envelope,
            "errors.style",
        );
        let mut fields = serde_json::Map::new();
        if let Some(spanned) = &e.fields {
            for (name, value) in spanned.get_ref() {
                if RESERVED_ERROR_FIELDS.contains(&name.as_str()) {
                    self.error(
                        spanned.span(),
                        format!("errors.fields: \"{name}\" is a field tollgate writes itself; choose another name"),
                    );
                    continue;
                }
                match toml_to_json(value) {
                    Ok(json) => {
                        fields.insert(name.clone(), json);
                    }
                    Err(err) => self.error(spanned.span(), format!("errors.fields.{name}: {err}")),
                }
            }
        }
        ErrorsConfig {
            style,
            normalize_upstream_5xx: e.normalize_upstream_5xx.unwrap_or(true),
            fields,
        }
    }
}

/// Whether two listening addresses cannot both be bound (see `Validator::listen_overlaps`).
/// Port 0 (any free port) never overlaps.
pub(super) fn addresses_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    let ip = |s: SocketAddr| match s.ip() {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        v4 => v4,
    };
    let (x, y) = (ip(a), ip(b));
    a.port() == b.port()
        && a.port() != 0
        && x.is_ipv4() == y.is_ipv4()
        && (x == y || x.is_unspecified() || y.is_unspecified())
}

/// A TOML value as JSON for `errors.fields`. A date-time becomes its RFC 3339 text (serde
/// would write toml's private wrapper object); JSON has no NaN or infinity, so those are
/// refused rather than turned into `null`.
fn toml_to_json(value: &toml::Value) -> Result<serde_json::Value, String> {
    use serde_json::Value as Json;
    Ok(match value {
        toml::Value::String(s) => Json::String(s.clone()),
        toml::Value::Integer(i) => Json::from(*i),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(Json::Number)
            .ok_or_else(|| format!("{f} has no JSON form; use a finite number or a string"))?,
        toml::Value::Boolean(b) => Json::Bool(*b),
        toml::Value::Datetime(d) => Json::String(d.to_string()),
        toml::Value::Array(items) => {
            Json::Array(items.iter().map(toml_to_json).collect::<Result<_, _>>()?)
        }
        toml::Value::Table(table) => Json::Object(
            table
                .iter()
                .map(|(k, v)| Ok((k.clone(), toml_to_json(v)?)))
                .collect::<Result<_, String>>()?,
        ),
    })
}
