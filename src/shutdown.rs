//! Graceful shutdown: one `watch` channel that turns `true` on SIGTERM or Ctrl-C, which
//! every task selects on.

use futures_util::{Stream, StreamExt as _};
use tokio::sync::watch;

/// Drive `stream` on a task of its own until it ends or `shutdown` turns true, handing each
/// error to `on_error`. For kube-runtime watches, whose stores fill as a side effect and
/// whose errors are retried by their backoff.
pub fn spawn_until<S, T, E>(
    stream: S,
    mut shutdown: watch::Receiver<bool>,
    on_error: impl Fn(E) + Send + 'static,
) where
    S: Stream<Item = Result<T, E>> + Send + 'static,
    T: Send,
    E: Send,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            let item = tokio::select! {
                () = stopping(&mut shutdown) => return,
                item = stream.next() => item,
            };
            match item {
                None => return,
                Some(Err(error)) => on_error(error),
                Some(Ok(_)) => {}
            }
        }
    });
}

/// Resolve once `shutdown` turns true (or its sender is gone).
pub async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|&s| s).await;
}

/// A receiver that turns true on SIGTERM or Ctrl-C.
pub fn on_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        signal().await;
        let _ = tx.send(true);
    });
    rx
}

/// Resolve on SIGTERM or Ctrl-C.
async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
