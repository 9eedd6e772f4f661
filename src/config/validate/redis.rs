//! `[redis]` and its short form `limits.redis_url`: exactly one of `url`, `sentinels` (with
//! `master_name`) or `cluster`; addresses, the password's environment variable and the TLS
//! files are checked here, so `check` finds what would otherwise fail on the first request.
//! Nothing read here is echoed: URLs may carry a password.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::*;

/// Which of `url`, `sentinels`, `cluster` a `[redis]` section sets, with the span of each.
type Chosen = Vec<(&'static str, std::ops::Range<usize>)>;

impl Validator<'_, '_> {
    /// The connection config: `[redis]` if present, else `limits.redis_url`, else the default.
    pub(super) fn redis(
        &mut self,
        redis: Option<Spanned<RedisFile>>,
        short_form: Option<&SpannedStr>,
    ) -> RedisConfig {
        let Some(redis) = redis else {
            return match short_form {
                None => RedisConfig::single(DEFAULT_REDIS_URL),
                Some(url) => {
                    self.redis_url(url, "limits.redis_url");
                    RedisConfig::single(url.get_ref().trim())
                }
            };
        };
        let section = redis.span();
        let r = redis.into_inner();
        if let Some(url) = short_form {
            self.error(
                url.span(),
                "limits.redis_url: the [redis] section also names the connection; keep one (limits.redis_url is the short form of [redis] url)",
            );
        }
        let mut chosen: Chosen = Vec::new();
        if let Some(u) = &r.url {
            chosen.push(("url", u.span()));
        }
        if let Some(s) = &r.sentinels {
            chosen.push(("sentinels", s.span()));
        }
        if let Some(c) = &r.cluster {
            chosen.push(("cluster", c.span()));
        }
        for (name, span) in chosen.iter().skip(1) {
            self.error(
                span.clone(),
                format!(
                    "redis.{name}: conflicts with redis.{}: set exactly one of url, sentinels, cluster",
                    chosen[0].0
                ),
            );
        }
        if r.master_name.is_some() != r.sentinels.is_some() {
            let span = r
                .master_name
                .as_ref()
                .map(|m| m.span())
                .unwrap_or_else(|| r.sentinels.as_ref().map_or(section.clone(), |s| s.span()));
            self.error(
                span,
                "redis.sentinels and redis.master_name go together: the sentinels are asked for the primary watched under master_name",
            );
        }

        let (target, tls) = if let Some(sentinels) = &r.sentinels {
            let (sentinels, tls) = self.redis_nodes(sentinels, "redis.sentinels");
            let master_name = r
                .master_name
                .as_ref()
                .map(|m| m.get_ref().trim().to_owned())
                .unwrap_or_default();
            if let Some(m) = &r.master_name
                && (master_name.is_empty() || master_name.contains(char::is_whitespace))
            {
                self.error(m.span(), "redis.master_name: must be a name without spaces");
            }
            (
                RedisTarget::Sentinel {
                    sentinels,
                    master_name,
                },
                tls,
            )
        } else if let Some(cluster) = &r.cluster {
            let (nodes, tls) = self.redis_nodes(cluster, "redis.cluster");
            (RedisTarget::Cluster { nodes }, tls)
        } else {
            let url = match &r.url {
                Some(u) => {
                    self.redis_url(u, "redis.url");
                    u.get_ref().trim().to_owned()
                }
                None => DEFAULT_REDIS_URL.to_owned(),
            };
            let tls = url.starts_with("rediss://");
            (RedisTarget::Single { url }, tls)
        };

        let password = r.password_env.as_ref().and_then(|name| {
            let var = name.get_ref().trim();
            match std::env::var(var) {
                Ok(password) if !password.is_empty() => Some(RedisPassword::new(password)),
                _ => {
                    self.error(
                        name.span(),
                        format!("redis.password_env: the environment variable \"{var}\" is not set (or empty)"),
                    );
                    None
                }
            }
        });

        for (file, name) in [
            (&r.ca_file, "redis.ca_file"),
            (&r.client_cert, "redis.client_cert"),
            (&r.client_key, "redis.client_key"),
        ] {
            if let Some(file) = file
                && !tls
            {
                self.error(
                    file.span(),
                    format!("{name}: only used with TLS: write the address(es) as rediss://"),
                );
            }
        }
        let ca_pem = r.ca_file.as_ref().and_then(|f| {
            self.pem_file(f, "redis.ca_file", |pem| {
                let certs = CertificateDer::pem_slice_iter(pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?;
                if certs.is_empty() {
                    return Err("no CERTIFICATE in the file".to_owned());
                }
                Ok(())
            })
        });
        let client_identity = match (&r.client_cert, &r.client_key) {
            (Some(cert), Some(key)) => {
                let cert_pem = self.pem_file(cert, "redis.client_cert", |pem| {
                    match CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>() {
                        Ok(certs) if !certs.is_empty() => Ok(()),
                        Ok(_) => Err("no CERTIFICATE in the file".to_owned()),
                        Err(e) => Err(e.to_string()),
                    }
                });
                let key_pem = self.pem_file(key, "redis.client_key", |pem| {
                    PrivateKeyDer::from_pem_slice(pem)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                });
                cert_pem
                    .zip(key_pem)
                    .map(|(cert_pem, key_pem)| ClientIdentity { cert_pem, key_pem })
            }
            (Some(one), None) | (None, Some(one)) => {
                self.error(
                    one.span(),
                    "redis.client_cert and redis.client_key go together (mutual TLS needs both)",
                );
                None
            }
            (None, None) => None,
        };

        RedisConfig {
            target,
            tls,
            password,
            ca_pem,
            client_identity,
        }
    }

    /// Checks a single-server URL as the client will parse it.
    fn redis_url(&mut self, u: &SpannedStr, name: &str) {
        let text = u.get_ref().trim();
        let problem = if !["redis://", "rediss://", "unix://", "redis+unix://"]
            .iter()
            .any(|p| text.starts_with(p) && text.len() > p.len())
        {
            Some("not a URL like \"redis://127.0.0.1:6379\" or \"rediss://...\"".to_owned())
        } else {
            ::redis::IntoConnectionInfo::into_connection_info(text)
                .err()
                .map(|e| {
                    format!(
                        "not a usable Redis URL ({})",
                        e.detail().unwrap_or(e.category())
                    )
                })
        };
        if let Some(problem) = problem {
            self.error(u.span(), format!("{name}: {problem}"));
        }
    }

    /// `host:port` (or `redis://host:port`, `rediss://host:port`) entries, and whether they
    /// ask for TLS (all alike).
    fn redis_nodes(
        &mut self,
        list: &Spanned<Vec<SpannedStr>>,
        name: &str,
    ) -> (Vec<(String, u16)>, bool) {
        if list.get_ref().is_empty() {
            self.error(list.span(), format!("{name}: list at least one host:port"));
        }
        let mut nodes = Vec::new();
        let mut schemes = Vec::new();
        for entry in list.get_ref() {
            let text = entry.get_ref().trim();
            let (tls, rest) = if let Some(rest) = text.strip_prefix("rediss://") {
                (true, rest)
            } else {
                (false, text.strip_prefix("redis://").unwrap_or(text))
            };
            schemes.push(tls);
            let rest = rest.trim_end_matches('/');
            let parsed = rest.rsplit_once(':').and_then(|(host, port)| {
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
                let ok = !host.is_empty() && !host.contains(['@', '/', ' ']) && !rest.contains('@');
                ok.then(|| (host.to_owned(), port))
            });
            match parsed {
                Some(node) => nodes.push(node),
                None => self.error(
                    entry.span(),
                    format!("{name}: \"{text}\" is not host:port (e.g. \"10.0.0.1:6379\"); a password goes in password_env"),
                ),
            }
        }
        let tls = schemes.first().copied().unwrap_or(false);
        if schemes.iter().any(|s| *s != tls) {
            self.error(
                list.span(),
                format!("{name}: mixes rediss:// and plain addresses: TLS is all or nothing"),
            );
        }
        (nodes, tls)
    }

    /// Reads a PEM file and checks it with `check`; its bytes when usable.
    fn pem_file(
        &mut self,
        file: &SpannedStr,
        name: &str,
        check: impl Fn(&[u8]) -> Result<(), String>,
    ) -> Option<Vec<u8>> {
        let path = file.get_ref();
        match std::fs::read(path) {
            Ok(pem) => match check(&pem) {
                Ok(()) => Some(pem),
                Err(why) => {
                    self.error(file.span(), format!("{name}: \"{path}\": {why}"));
                    None
                }
            },
            Err(e) => {
                self.error(file.span(), format!("{name}: cannot read \"{path}\": {e}"));
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str) -> Result<Config, Vec<ConfigIssue>> {
        load(Path::new("t.toml"), text, |_| unreachable!("no keys file"))
            .map_err(|e| e.issues().to_vec())
    }

    /// One snippet per mistake: (TOML, expected line, fragment of the message).
    const MISTAKES: &[(&str, usize, &str)] = &[
        (
            "[redis]\nurl = \"redis://a:1\"\nsentinels = [\"b:2\"]\nmaster_name = \"m\"",
            3,
            "redis.sentinels: conflicts with redis.url: set exactly one of url, sentinels, cluster",
        ),
        (
            "[redis]\nsentinels = [\"b:2\"]\nmaster_name = \"m\"\ncluster = [\"c:3\"]",
            4,
            "redis.cluster: conflicts with redis.sentinels",
        ),
        (
            "[redis]\ncluster = [\"10.0.0.1\"]",
            2,
            "\"10.0.0.1\" is not host:port",
        ),
        ("[redis]\ncluster = [\"h:0\"]", 2, "is not host:port"),
        ("[redis]\ncluster = [\"h:99999\"]", 2, "is not host:port"),
        ("[redis]\ncluster = []", 2, "list at least one host:port"),
        (
            "[redis]\nsentinels = [\"h:1\", \"x\"]\nmaster_name = \"m\"",
            2,
            "redis.sentinels: \"x\" is not host:port",
        ),
        (
            "[redis]\nsentinels = [\"a:1\"]",
            2,
            "redis.sentinels and redis.master_name go together",
        ),
        (
            "[redis]\nurl = \"redis://a:1\"\nmaster_name = \"m\"",
            3,
            "go together",
        ),
        (
            "[redis]\ncluster = [\"rediss://a:1\", \"b:2\"]",
            2,
            "mixes rediss:// and plain addresses",
        ),
        (
            "[redis]\nurl = \"http://a:1\"",
            2,
            "redis.url: not a URL like",
        ),
        (
            "[redis]\nurl = \"redis://a:1\"\nca_file = \"ca.pem\"",
            3,
            "redis.ca_file: only used with TLS",
        ),
        (
            "[redis]\nurl = \"rediss://a:1\"\nca_file = \"/nonexistent/ca.pem\"",
            3,
            "redis.ca_file: cannot read \"/nonexistent/ca.pem\"",
        ),
        (
            "[redis]\nurl = \"rediss://a:1\"\nclient_key = \"/nonexistent/k.pem\"",
            3,
            "redis.client_cert and redis.client_key go together",
        ),
        (
            "[redis]\nurl = \"redis://a:1\"\npassword_env = \"TOLLGATE_TEST_NEVER_SET\"",
            3,
            "redis.password_env: the environment variable \"TOLLGATE_TEST_NEVER_SET\" is not set",
        ),
        (
            "[redis]\nurl = \"redis://a:1\"\nbogus = 1",
            3,
            "unknown key `bogus` in [redis]",
        ),
    ];

    #[test]
    fn every_redis_mistake_is_reported_at_its_line() {
        for (text, line, fragment) in MISTAKES {
            let issues = load_str(text).expect_err(text);
            assert!(
                issues
                    .iter()
                    .any(|i| i.line == *line && i.message.contains(fragment)),
                "{text}: want line {line} with {fragment:?}, got {issues:#?}"
            );
        }
    }

    #[test]
    fn a_file_that_is_not_pem_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("ca.pem");
        std::fs::write(&bad, "not a certificate").unwrap();
        let text = format!(
            "[redis]\nurl = \"rediss://a:1\"\nca_file = \"{}\"",
            bad.display()
        );
        let issues = load_str(&text).unwrap_err();
        assert_eq!(issues.len(), 1, "{issues:#?}");
        assert!(
            issues[0].message.contains("no CERTIFICATE in the file"),
            "{issues:#?}"
        );
    }

    #[test]
    fn each_mode_is_read_with_its_addresses_and_tls() {
        let c = load_str("[limits]\nredis_url = \"redis://r:7000\"").unwrap();
        assert_eq!(
            c.redis.target,
            RedisTarget::Single {
                url: "redis://r:7000".into()
            },
            "limits.redis_url is the short form"
        );
        assert!(!c.redis.tls);
        let c = load_str("").unwrap();
        assert_eq!(
            c.redis.target,
            RedisTarget::Single {
                url: DEFAULT_REDIS_URL.into()
            }
        );
        let c = load_str(
            "[redis]\nsentinels = [\"rediss://10.0.0.1:26379\", \"rediss://[::1]:26380\"]\nmaster_name = \"main\"\npassword_env = \"PATH\"",
        )
        .unwrap();
        assert_eq!(
            c.redis.target,
            RedisTarget::Sentinel {
                sentinels: vec![("10.0.0.1".into(), 26379), ("::1".into(), 26380)],
                master_name: "main".into()
            }
        );
        assert!(c.redis.tls);
        assert_eq!(
            c.redis.password.as_ref().map(|p| p.expose().to_owned()),
            std::env::var("PATH").ok(),
            "the password is read from the variable password_env names"
        );
        assert!(!format!("{:?}", c.redis).contains(&std::env::var("PATH").unwrap()));
        let c = load_str("[redis]\ncluster = [\"a:1\", \"b:2\", \"c:3\"]").unwrap();
        assert_eq!(
            c.redis.target,
            RedisTarget::Cluster {
                nodes: vec![("a".into(), 1), ("b".into(), 2), ("c".into(), 3)]
            }
        );
        assert_eq!(c.redis.target.mode_name(), "cluster");
        let c = load_str("[redis]\nurl = \"rediss://:pw@r:6380\"").unwrap();
        assert!(c.redis.tls);
    }
}
