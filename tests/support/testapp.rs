//! The test app that stands behind Envoy in tests and the demo: an HTTP server with fault
//! injection.
//!
//! - `GET /status/<code>` answers `<code>`;
//! - `?delay=<duration>` (e.g. `250ms`) on any request delays the answer;
//! - `PUT /admin/fault?error_percent=P&status=S&delay=D` sets a standing fault for every
//!   later request: exactly P % of them (deterministically, every 100/P-th) answer S
//!   (default 500), all are delayed by D. `GET /admin/fault` shows it, `DELETE` clears it.
//! - anything else answers 200 `ok`.
#![allow(dead_code)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpListener;

/// The standing fault, shared by all connections.
#[derive(Debug, Default)]
pub struct Fault {
    /// Percent of requests that fail, times 100 (basis points), so 0.5 % is expressible.
    error_bp: AtomicU64,
    status: AtomicU64,
    delay_ms: AtomicU64,
    served: AtomicU64,
}

impl Fault {
    pub fn set(&self, error_percent: f64, status: u16, delay: Duration) {
        self.error_bp
            .store((error_percent * 100.0).round() as u64, Ordering::Relaxed);
        self.status.store(u64::from(status), Ordering::Relaxed);
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// Whether request number `n` (0-based) fails: every time the running share crosses
    /// a whole request, so over any N requests exactly round(N*P/100) fail.
    fn fails(&self, n: u64) -> bool {
        let bp = self.error_bp.load(Ordering::Relaxed);
        (n + 1) * bp / 10_000 > n * bp / 10_000
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

fn query<'a>(req: &'a Request<Incoming>, key: &str) -> Option<&'a str> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then_some(v)
    })
}

async fn handle(req: Request<Incoming>, fault: Arc<Fault>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    if path == "/admin/fault" {
        return match *req.method() {
            Method::PUT | Method::POST => {
                let pct = query(&req, "error_percent")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0.0);
                let status = query(&req, "status")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(500);
                let delay = query(&req, "delay")
                    .and_then(|v| meshcanary::config::parse_duration(v).ok())
                    .unwrap_or_default();
                fault.set(pct, status, delay);
                text(
                    StatusCode::OK,
                    format!("fault: {pct}% -> {status}, delay {delay:?}\n"),
                )
            }
            Method::DELETE => {
                fault.set(0.0, 500, Duration::ZERO);
                text(StatusCode::OK, "fault cleared\n".into())
            }
            _ => text(StatusCode::OK, format!("{fault:?}\n")),
        };
    }
    let mut delay = Duration::from_millis(fault.delay_ms.load(Ordering::Relaxed));
    if let Some(d) = query(&req, "delay").and_then(|v| meshcanary::config::parse_duration(v).ok()) {
        delay += d;
    }
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let status = code
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok());
        return match status {
            Some(s) => text(s, format!("{}\n", s.as_u16())),
            None => text(StatusCode::BAD_REQUEST, format!("bad status {code:?}\n")),
        };
    }
    let n = fault.served.fetch_add(1, Ordering::Relaxed);
    if fault.fails(n) {
        let status = u16::try_from(fault.status.load(Ordering::Relaxed)).unwrap_or(500);
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return text(status, "injected fault\n".into());
    }
    text(StatusCode::OK, "ok\n".into())
}

/// Serve on `listener` until the task is dropped. Connections are tasks of this one, so
/// aborting it ends them too, as a killed process would (the sidecar sees resets).
pub async fn serve(listener: TcpListener, fault: Arc<Fault>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let fault = Arc::clone(&fault);
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let fault = Arc::clone(&fault);
                async move { Ok::<_, Infallible>(handle(req, fault).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    // Unused in a test binary without the libtest harness (tests/controller.rs), where
    // `#[test]` functions are not compiled.
    #[allow(unused_imports)]
    use super::*;

    #[test]
    fn fault_ratio_is_exact() {
        let f = Fault::default();
        for pct in [0.0, 0.5, 5.0, 46.0, 100.0] {
            f.set(pct, 500, Duration::ZERO);
            let fails = (0..1000).filter(|&n| f.fails(n)).count();
            assert_eq!(fails as f64, pct * 10.0, "{pct}%");
        }
    }
}
