//! Active health checks (`[upstreams.health_check]`): every `interval`, a `GET path` to every
//! target of the upstream, from every instance. A probe is good when its response head
//! arrives within `timeout` with a status in `expect`; `unhealthy_after` failures in a row
//! take a target out of rotation and `healthy_after` good ones in a row put it back. New
//! targets start healthy.
//!
//! Part of the proxy box. Probes travel like requests (the target's pool for plain http,
//! hyper-util's client for https) and count toward nothing else: passive ejection judges
//! only client requests.

use std::sync::Weak;

use arc_swap::ArcSwap;
use http::header::{HOST, USER_AGENT};
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use tokio::time::Instant;

use super::targets::{Target, TargetSet};
use super::tls::Connector;
use super::{Deadline, Transport, absolute_uri, attempt};
use crate::body::RequestBody;
use crate::config::HealthCheck;

/// A probe's response body is read (so its connection stays in the pool) up to this much;
/// past it the connection is dropped.
const MAX_PROBE_BODY: usize = 64 * 1024;

/// `User-Agent` of every probe, so upstream logs can tell probes from clients.
const PROBE_AGENT: &str = "tollgate-health-check";

/// Probes the targets of the set now and every `interval` after, until the set is dropped.
pub(super) async fn run(
    set: Weak<ArcSwap<TargetSet>>,
    check: HealthCheck,
    upstream: String,
    client: Client<Connector, RequestBody>,
) {
    let Ok(path) = check.path.parse::<PathAndQuery>() else {
        return;
    };
    let mut ticks = tokio::time::interval(check.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(shared) = set.upgrade() else { return };
        let targets = shared.load_full();
        drop(shared);
        let probes = targets
            .targets
            .iter()
            .map(|target| probe(target, &path, &check, &upstream, &client));
        let results = futures_util::future::join_all(probes).await;
        for (target, good) in targets.targets.iter().zip(results) {
            let Some(up) = target
                .health
                .probed(good, check.healthy_after, check.unhealthy_after)
            else {
                continue;
            };
            if up {
                if !target.health.is_out(std::time::Instant::now()) {
                    target.healthy.set(1);
                }
                tracing::info!(
                    upstream,
                    upstream_target = %target.label,
                    passed = check.healthy_after,
                    "upstream target passes its health checks; back in rotation"
                );
            } else {
                target.healthy.set(0);
                tracing::info!(
                    upstream,
                    upstream_target = %target.label,
                    failed = check.unhealthy_after,
                    "upstream target fails its health checks; out of rotation"
                );
            }
        }
    }
}

/// One probe of `target`: whether its answer came in time with an expected status.
async fn probe(
    target: &Target,
    path: &PathAndQuery,
    check: &HealthCheck,
    upstream: &str,
    client: &Client<Connector, RequestBody>,
) -> bool {
    let mut request = Request::new(RequestBody::empty());
    request
        .headers_mut()
        .insert(USER_AGENT, HeaderValue::from_static(PROBE_AGENT));
    let transport = match (&target.pool, &target.host) {
        (Some(pool), host) => {
            *request.uri_mut() = Uri::from(path.clone());
            if let Some(host) = host {
                request.headers_mut().insert(HOST, host.clone());
            }
            Transport::Pool(pool)
        }
        (None, _) => match absolute_uri(&target.url, path.clone()) {
            Ok(uri) => {
                *request.uri_mut() = uri;
                Transport::Client(target.clients.as_deref().map_or(client, |c| &c.request))
            }
            Err(_) => return false,
        },
    };
    let deadline = Deadline {
        at: Instant::now() + check.timeout,
        timeout: check.timeout,
        body: None,
    };
    let Ok((response, _)) = attempt(
        transport,
        &mut Some(request),
        &Default::default(),
        &deadline,
        upstream,
    )
    .await
    else {
        return false;
    };
    let status = response.status().as_u16();
    let good = (check.expect.0..=check.expect.1).contains(&status);
    // Read the (small) body so the connection can serve the next probe or request.
    let mut body = response.into_body();
    let mut read = 0;
    let _ = tokio::time::timeout_at(deadline.at, async {
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, |d| d.len());
            if read > MAX_PROBE_BODY {
                break;
            }
        }
    })
    .await;
    good
}

/// The background tasks of one upstream (its prober and its resolver), stopped when the
/// upstream is replaced by a reload or dropped.
#[derive(Debug, Default)]
pub(super) struct Background {
    tasks: std::sync::Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Background {
    /// Spawns `task` on the current runtime (none outside one: `check` builds no tasks).
    pub(super) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let handle = runtime.spawn(task).abort_handle();
            self.tasks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(handle);
        }
    }

    /// Stops every task.
    pub(super) fn stop(&self) {
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop();
    }
}
