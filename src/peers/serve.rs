//! The peer port: `GET /v1/windows?since=<slot>` answers this node's windows as a
//! protobuf [`WindowsReply`](super::WindowsReply), to peers that authenticate
//! ([`super::auth`]).

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use prost::Message as _;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::auth::Reviewer;
use super::{PeerServerMetrics, ResultLabels};
use crate::clock::unix_ms;
use crate::telemetry::{lock, HttpMetrics};
use crate::window::Windows;

/// What the peer port answers from.
#[derive(Clone)]
pub struct PeerServer {
    /// This node's windows.
    pub windows: Arc<std::sync::Mutex<Windows>>,
    pub metrics: PeerServerMetrics,
    pub http_metrics: HttpMetrics,
    pub node: String,
    /// `None` answers anyone (only for agents outside Kubernetes and tests).
    pub reviewer: Option<Arc<Reviewer>>,
    pub limits: crate::telemetry::HttpLimits,
}

impl PeerServer {
    /// Serve until `shutdown` turns true.
    pub async fn serve(self, listener: TcpListener, shutdown: watch::Receiver<bool>) {
        let server = crate::telemetry::HttpServer {
            name: "peers",
            limits: self.limits,
            metrics: self.http_metrics.clone(),
        };
        crate::telemetry::serve_http(listener, server, shutdown, move |req| {
            let server = self.clone();
            async move { server.answer(&req).await }
        })
        .await;
    }

    async fn answer<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        let (result, response) = self.route(req).await;
        self.metrics
            .requests
            .get_or_create(&ResultLabels { result })
            .inc();
        response
    }

    async fn route<B>(&self, req: &Request<B>) -> (&'static str, Response<Full<Bytes>>) {
        let text = |status: StatusCode, body: String| {
            Response::builder()
                .status(status)
                .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
                .header(http::header::WWW_AUTHENTICATE, "Bearer")
                .body(Full::new(Bytes::from(body)))
                .unwrap_or_default()
        };
        if req.uri().path() != "/v1/windows" || req.method() != http::Method::GET {
            return (
                "not_found",
                text(
                    StatusCode::NOT_FOUND,
                    "not found: GET /v1/windows?since=N\n".into(),
                ),
            );
        }
        if let Some(reviewer) = &self.reviewer {
            let header = req
                .headers()
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            if let Err(e) = reviewer.check(header).await {
                let status = match e {
                    super::auth::AuthError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::UNAUTHORIZED,
                };
                tracing::debug!(error = %e, "Refused a peer request");
                return (e.reason(), text(status, format!("{e}\n")));
            }
        }
        let Some(since) = since(req.uri().query()) else {
            return (
                "bad_request",
                text(
                    StatusCode::BAD_REQUEST,
                    "bad request: since must be a slot number\n".into(),
                ),
            );
        };
        let reply = super::snapshot(&lock(&self.windows), since, unix_ms(), &self.node);
        (
            "ok",
            Response::builder()
                .header(http::header::CONTENT_TYPE, "application/x-protobuf")
                .body(Full::new(Bytes::from(reply.encode_to_vec())))
                .unwrap_or_default(),
        )
    }
}

/// The `since` parameter (absent: 0, everything).
fn since(query: Option<&str>) -> Option<u64> {
    let Some(query) = query else { return Some(0) };
    let mut out = 0;
    for pair in query.split('&') {
        if let Some(v) = pair.strip_prefix("since=") {
            out = v.parse().ok()?;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn since_parameter() {
        assert_eq!(super::since(None), Some(0));
        assert_eq!(super::since(Some("since=42")), Some(42));
        assert_eq!(super::since(Some("x=1&since=7")), Some(7));
        assert_eq!(super::since(Some("since=-1")), None);
        assert_eq!(super::since(Some("since=abc")), None);
    }
}
