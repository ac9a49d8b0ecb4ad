//! A local HTTP receiver for webhooks and alerts, standing in for Flagger's load tester, a
//! gate, Slack, Teams or Discord: it records every POST (path and JSON body) and answers
//! each path as a test sets it (200 by default, another status, or never).
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use tokio::net::TcpListener;

/// How the receiver answers a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    Status(u16),
    /// Hold the request until the caller gives up.
    Hang,
}

#[derive(Default)]
struct State {
    replies: HashMap<String, Reply>,
    /// Every POST, in order: (path, body).
    posts: Vec<(String, serde_json::Value)>,
}

/// The running receiver; it stops when dropped.
pub struct Receiver {
    pub port: u16,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the receiver");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State::default()));
        let task = tokio::spawn(serve(listener, Arc::clone(&state)));
        Receiver { port, state, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn reply(&self, path: &str, reply: Reply) {
        self.state
            .lock()
            .unwrap()
            .replies
            .insert(path.to_owned(), reply);
    }

    /// The bodies posted to `path`, in order.
    pub fn posts(&self, path: &str) -> Vec<serde_json::Value> {
        self.state
            .lock()
            .unwrap()
            .posts
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, b)| b.clone())
            .collect()
    }

    pub fn count(&self, path: &str) -> usize {
        self.posts(path).len()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(req: Request<Incoming>, state: Arc<Mutex<State>>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let reply = {
        let mut s = state.lock().unwrap();
        s.posts.push((path.clone(), body));
        s.replies.get(&path).copied().unwrap_or(Reply::Status(200))
    };
    match reply {
        Reply::Status(code) => Response::builder()
            .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
            .body(Full::new(Bytes::from(format!("{code} from {path}\n"))))
            .expect("static response parts are valid"),
        Reply::Hang => std::future::pending().await,
    }
}

async fn serve(listener: TcpListener, state: Arc<Mutex<State>>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = Arc::clone(&state);
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(handle(req, state).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}
