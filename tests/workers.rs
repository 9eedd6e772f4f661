//! Worker threads (`server.workers`): accepted connections are dealt to the workers in turn,
//! each served whole on its worker's thread, each worker with its own idle upstream
//! connections; a shutdown drains requests in flight on every worker.
//!
//! Each test starts its own workers: they size the upstream pools, so they start before the
//! gateway is built.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tollgate::body::ResponseBody;
use tollgate::observability::RequestId;
use tollgate::server::workers::Workers;
use tollgate::{Gateway, GatewayError, Handler, RequestContext, Server};

/// The real pipeline, noting the name of the thread each request was served on.
struct NotesThreads {
    gateway: Arc<Gateway>,
    threads: Mutex<Vec<String>>,
}

impl Handler for NotesThreads {
    async fn handle(
        &self,
        request: Request<Incoming>,
        ctx: &RequestContext,
    ) -> Response<ResponseBody> {
        let name = std::thread::current().name().unwrap_or("?").to_owned();
        self.threads.lock().unwrap().push(name);
        self.gateway.handle(request, ctx).await
    }

    fn render_error(&self, error: &GatewayError, request_id: &RequestId) -> Response<ResponseBody> {
        self.gateway.render_error(error, request_id)
    }
}

/// An upstream answering each request with the port its connection came from (one port per
/// upstream connection), after `delay`.
async fn port_upstream(delay: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(move |_req: Request<Incoming>| async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(
                        peer.port().to_string(),
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// Two workers (this test's thread and one more) and a gateway proxying to `up` through them.
async fn start(
    up: SocketAddr,
    server_extra: &str,
) -> (Arc<Workers>, TestGateway, Arc<NotesThreads>) {
    let workers = Arc::new(Workers::start(2).unwrap());
    let config = config(
        server_extra,
        &format!(
            "[[upstreams]]\nname = \"up\"\nurl = \"http://{up}\"\n\
             [[routes]]\nprefix = \"/\"\nupstream = \"up\"\nauth = false\n"
        ),
    );
    let gateway = Arc::new(Gateway::new(config.clone()));
    let handler = Arc::new(NotesThreads {
        gateway: gateway.clone(),
        threads: Mutex::default(),
    });
    let server = Server::bind(&config, handler.clone())
        .await
        .unwrap()
        .with_workers(workers.clone());
    let gw = TestGateway::serve(server, gateway);
    (workers, gw, handler)
}

/// One request on a kept-alive client connection: the upstream connection's port.
async fn port_via(stream: &mut TcpStream) -> String {
    let reply = exchange_on(stream, b"GET /p HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("answered");
    assert_eq!(reply.status, 200, "{}", reply.shown());
    reply.text()
}

#[tokio::test]
async fn connections_are_served_on_each_worker_in_turn_with_its_own_upstream_connections() {
    let up = port_upstream(Duration::ZERO).await;
    let (workers, gw, handler) = start(up, "").await;
    let mut first = TcpStream::connect(gw.addr).await.unwrap();
    let a = port_via(&mut first).await;
    let mut second = TcpStream::connect(gw.addr).await.unwrap();
    let b = port_via(&mut second).await;
    let main = std::thread::current().name().unwrap().to_owned();
    assert_eq!(
        *handler.threads.lock().unwrap(),
        [main.clone(), "tollgate-worker-1".to_owned()],
        "the first connection on the accepting thread, the second on the other worker"
    );
    // The second worker does not take the first one's idle upstream connection: its sockets
    // are registered with the other thread's runtime.
    assert_ne!(a, b, "each worker opened its own upstream connection");
    for _ in 0..5 {
        assert_eq!(
            port_via(&mut first).await,
            a,
            "worker 0 reuses its connection"
        );
        assert_eq!(
            port_via(&mut second).await,
            b,
            "worker 1 reuses its connection"
        );
    }
    let threads = handler.threads.lock().unwrap().clone();
    assert_eq!(
        threads.iter().filter(|t| **t == main).count(),
        6,
        "{threads:?}"
    );
    drop(gw);
    workers.shutdown();
}

#[tokio::test]
async fn a_shutdown_drains_the_requests_in_flight_on_every_worker() {
    let up = port_upstream(Duration::from_millis(500)).await;
    let (workers, mut gw, handler) = start(up, "shutdown_grace = \"10s\"").await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        clients.push(tokio::spawn(async move { port_via(&mut stream).await }));
        // Accepted (and dealt) in this order.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        handler.threads.lock().unwrap().len(),
        4,
        "all four in flight"
    );
    let serve = gw.begin_shutdown();
    for client in clients {
        client.await.expect("every request answered 200");
    }
    serve
        .await
        .unwrap()
        .expect("serve returns Ok after draining");
    let threads = handler.threads.lock().unwrap().clone();
    assert_eq!(
        threads.iter().filter(|t| *t == "tollgate-worker-1").count(),
        2,
        "two of the four on the second worker: {threads:?}"
    );
    assert!(
        TcpStream::connect(gw.addr).await.is_err(),
        "listener closed"
    );
    workers.shutdown();
}
