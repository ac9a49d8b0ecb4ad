//! SigV4 and the AWS credential chain, end to end: the real binary, with IRSA's environment
//! (`AWS_ROLE_ARN`, `AWS_WEB_IDENTITY_TOKEN_FILE`), gets credentials from a local STS
//! stand-in (`AWS_ENDPOINT_URL_STS`), caches them, refreshes them before they expire, and
//! signs remote-write requests exactly as botocore would.

mod support;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use support::{eventually, free_port, FakeAdmin, Receiver, TempDir};

/// A stand-in for STS `AssumeRoleWithWebIdentity`: call `n` hands out `ASIATEST<n>`, valid
/// for the refresh window plus `slack`, and records what it was asked.
struct Sts {
    port: u16,
    calls: Arc<AtomicU32>,
    bodies: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

fn secret(n: u32) -> String {
    format!("secret-key-number-{n}")
}

fn token(n: u32) -> String {
    format!("session-token-number-{n}")
}

impl Sts {
    async fn start(slack: Duration) -> Sts {
        use http_body_util::BodyExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let calls = Arc::new(AtomicU32::new(0));
        let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c2, b2) = (calls.clone(), bodies.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (calls, bodies) = (c2.clone(), b2.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let (calls, bodies) = (calls.clone(), bodies.clone());
                            async move {
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                bodies
                                    .lock()
                                    .unwrap()
                                    .push(String::from_utf8_lossy(&body).into_owned());
                                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                                let expiry = SystemTime::now()
                                    + meshcanary::remote_write::sigv4::REFRESH_BEFORE
                                    + slack;
                                let secs = expiry
                                    .duration_since(SystemTime::UNIX_EPOCH)
                                    .unwrap()
                                    .as_secs();
                                let xml = format!(
                                    r#"<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <Credentials>
      <AccessKeyId>ASIATEST{n}</AccessKeyId>
      <SecretAccessKey>{}</SecretAccessKey>
      <SessionToken>{}</SessionToken>
      <Expiration>{}</Expiration>
    </Credentials>
    <SubjectFromWebIdentityToken>system:serviceaccount:meshcanary:meshcanary</SubjectFromWebIdentityToken>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::123456789012:assumed-role/meshcanary/test</Arn>
      <AssumedRoleId>AROATEST:test</AssumedRoleId>
    </AssumedRoleUser>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata><RequestId>00000000-0000-0000-0000-00000000000{n}</RequestId></ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>"#,
                                    secret(n),
                                    token(n),
                                    rfc3339(secs)
                                );
                                Ok::<_, std::convert::Infallible>(
                                    http::Response::builder()
                                        .header("content-type", "text/xml")
                                        .body(http_body_util::Full::new(bytes::Bytes::from(xml)))
                                        .unwrap(),
                                )
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Sts {
            port,
            calls,
            bodies,
            task,
        }
    }
}

impl Drop for Sts {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days, proleptic Gregorian).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn header<'a>(r: &'a support::Received, name: &str) -> &'a str {
    r.headers
        .get(name)
        .map(|v| v.to_str().unwrap())
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_identity_credentials_are_cached_refreshed_and_sign_like_botocore() {
    let sts = Sts::start(Duration::from_secs(4)).await;
    let receiver = Receiver::start(0, vec![]).await;
    let admin = FakeAdmin::start(
        FakeAdmin::ok(b"envoy_server_live 1\nenvoy_server_uptime 42\n", true),
        Duration::ZERO,
    )
    .await;
    let dir = TempDir::new("sigv4");
    std::fs::write(
        dir.path.join("token"),
        "eyJhbGciOiJSUzI1NiJ9.test-token.sig",
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_meshcanary"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &dir.path)
        .env("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/meshcanary")
        .env("AWS_WEB_IDENTITY_TOKEN_FILE", dir.path.join("token"))
        .env(
            "AWS_ENDPOINT_URL_STS",
            format!("http://127.0.0.1:{}", sts.port),
        )
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("MESHCANARY_LOG", "debug")
        .args([
            "agent",
            "--target",
            &format!("test/app/primary={}", admin.url()),
        ])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--full-interval", "1s", "--full-timeout", "500ms"])
        .args([
            "--remote-write-url",
            &receiver.url(),
            "--remote-write-sigv4",
            "--remote-write-sigv4-region",
            "us-east-1",
        ])
        .arg("--remote-write-queue-dir")
        .arg(dir.path.join("queue"))
        .args([
            "--remote-write-batch-deadline",
            "200ms",
            "--remote-write-shards",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let log = receiver.log.clone();
    eventually(
        Duration::from_secs(20),
        "signed requests with the first credentials",
        || {
            log.lock()
                .unwrap()
                .iter()
                .filter(|r| header(r, "authorization").contains("Credential=ASIATEST1/"))
                .count()
                >= 2
        },
    )
    .await;
    assert_eq!(
        sts.calls.load(Ordering::SeqCst),
        1,
        "fetched once, then cached"
    );
    let sts_request = sts.bodies.lock().unwrap()[0].clone();
    assert!(
        sts_request.contains("Action=AssumeRoleWithWebIdentity"),
        "{sts_request}"
    );
    assert!(
        sts_request.contains("test-token"),
        "the token file was sent"
    );

    // The first credentials expire 5 min + 4 s after issue: they are replaced within the
    // refresh window, before they expire.
    eventually(
        Duration::from_secs(20),
        "requests signed with refreshed credentials",
        || {
            log.lock()
                .unwrap()
                .iter()
                .any(|r| header(r, "authorization").contains("Credential=ASIATEST2/"))
        },
    )
    .await;
    let calls = sts.calls.load(Ordering::SeqCst);
    assert!(
        (2..=3).contains(&calls),
        "refreshed once, not on every request: {calls} STS calls"
    );

    // Two implementations agree on a real remote-write request.
    let r = receiver
        .received()
        .into_iter()
        .rev()
        .find(|r| header(r, "authorization").contains("Credential=ASIATEST2/"))
        .unwrap();
    assert_eq!(header(&r, "x-amz-security-token"), token(2));
    let mut headers = serde_json::Map::new();
    for name in [
        "content-encoding",
        "content-type",
        "x-prometheus-remote-write-version",
        "x-amz-date",
        "x-amz-security-token",
        "user-agent",
    ] {
        headers.insert(name.to_owned(), header(&r, name).into());
    }
    let input = serde_json::json!({
        "method": "POST",
        "url": format!("{}", receiver.url()),
        "headers": headers,
        "body_hex": r.raw_body.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        "key": "ASIATEST2",
        "secret": secret(2),
        "token": token(2),
        "region": "us-east-1",
        "service": "aps",
    });
    let mut py = Command::new("/usr/bin/python3")
        .arg(support::repo().join("tests/botocore_sign.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("Debian's python3 with python3-botocore (scripts/testenv.sh installs it)");
    use std::io::Write as _;
    py.stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = py.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "botocore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        header(&r, "authorization")
    );

    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let output = child.wait_with_output().unwrap();
    let logs = String::from_utf8_lossy(&output.stderr);
    for n in 1..=2 {
        assert!(
            !logs.contains(&secret(n)) && !logs.contains(&token(n)),
            "a credential was logged"
        );
    }
    assert!(!logs.contains("Signature="), "a signature was logged");
    assert!(logs.contains("Fetched AWS credentials"), "{logs}");
}
