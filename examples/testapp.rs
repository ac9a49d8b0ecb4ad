//! Standalone launcher of the test app (`tests/support/testapp.rs`) for the demo and the
//! fixture capture: `testapp 127.0.0.1:9898 [error_percent]`.

#[path = "../tests/support/testapp.rs"]
mod testapp;

use std::sync::Arc;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:9898".to_owned());
    let fault = Arc::new(testapp::Fault::default());
    if let Some(pct) = args.next().and_then(|p| p.parse().ok()) {
        fault.set(pct, 500, std::time::Duration::ZERO);
    }
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("testapp listening on {addr}");
    testapp::serve(listener, fault).await;
    Ok(())
}
