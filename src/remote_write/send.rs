//! One remote-write POST, and what to do about its answer.
//!
//! [`classify`] is pure: 2xx is delivered; 429 and 5xx (and no answer at all) are retried,
//! honouring `Retry-After` up to the longest backoff; 401 and 403 are retried too (for a
//! bounded time, see [`crate::remote_write`]) because the usual cause is a rotated credential
//! that the next read of its file fixes, as vmagent does; any other 4xx means the receiver
//! will never take this batch, so it is dropped and counted. [`Backoff`] is exponential
//! with full jitter, validated at construction.
//!
//! Credentials come from files read again for every POST ([`Credential`]): Secrets and
//! projected tokens are rotated under a running agent. Only the first [`MAX_ERROR_BODY`]
//! bytes of an error answer are read.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

use super::sigv4::{sign_headers, SigV4, Unsigned};

/// What to do with a batch after one attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Try again, not before `after` if the receiver said so.
    Retry {
        reason: &'static str,
        after: Option<Duration>,
    },
    /// The receiver rejected the batch for good.
    Drop {
        status: u16,
        message: String,
    },
}

/// How much of an error answer is read (its start names the problem; a receiver that
/// streams megabytes of HTML must not cost memory).
pub const MAX_ERROR_BODY: usize = 4096;

/// Decide from a status code and a `Retry-After` header value (seconds, capped at
/// `max_after`: a receiver asking for an hour must not park the shard for an hour).
pub fn classify(
    status: StatusCode,
    retry_after: Option<&str>,
    body: &str,
    max_after: Duration,
) -> Outcome {
    let after = retry_after
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s).min(max_after));
    if status.is_success() {
        Outcome::Delivered
    } else if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        Outcome::Retry {
            reason: "auth",
            after,
        }
    } else if status == StatusCode::TOO_MANY_REQUESTS {
        Outcome::Retry {
            reason: "429",
            after,
        }
    } else if status.is_server_error() {
        Outcome::Retry {
            reason: "5xx",
            after,
        }
    } else {
        Outcome::Drop {
            status: status.as_u16(),
            message: body.chars().take(256).collect(),
        }
    }
}

/// Exponential backoff with full jitter: attempt `n` waits a uniform random time in
/// `[0, min(max, min_delay * 2^n)]`.
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// ### Errors
    /// When `min` is zero or larger than `max`.
    pub fn new(min: Duration, max: Duration) -> Result<Self, String> {
        if min.is_zero() || min > max {
            return Err(format!(
                "backoff needs 0 < min <= max, got min {min:?}, max {max:?}"
            ));
        }
        Ok(Backoff {
            min,
            max,
            attempt: 0,
        })
    }

    pub fn next_delay(&mut self) -> Duration {
        let cap = self
            .min
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        cap.mul_f64(fastrand::f64())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Standard base64 with padding (for basic auth), small enough not to need a crate.
pub fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Where the `Authorization` header comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// `Bearer <file contents>`.
    Bearer { file: PathBuf },
    /// `Basic base64(user:<file contents>)`.
    Basic {
        user: String,
        password_file: PathBuf,
    },
}

/// A credential file that cannot be read or used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds characters not allowed in an HTTP header")]
    NotAHeader { path: String },
}

impl Credential {
    /// Read the file now and build the header, marked sensitive (never printed).
    ///
    /// ### Errors
    /// The file cannot be read, or its contents cannot go in a header.
    pub fn header(&self) -> Result<HeaderValue, CredentialError> {
        let path = match self {
            Credential::Bearer { file } => file,
            Credential::Basic { password_file, .. } => password_file,
        };
        let secret = std::fs::read_to_string(path)
            .map(|s| s.trim().to_owned())
            .map_err(|source| CredentialError::Read {
                path: path.display().to_string(),
                source,
            })?;
        let value = match self {
            Credential::Bearer { .. } => format!("Bearer {secret}"),
            Credential::Basic { user, .. } => {
                format!("Basic {}", base64(format!("{user}:{secret}").as_bytes()))
            }
        };
        let mut value = HeaderValue::from_str(&value).map_err(|_| CredentialError::NotAHeader {
            path: path.display().to_string(),
        })?;
        value.set_sensitive(true);
        Ok(value)
    }
}

/// A URL as it may be logged: any `user:password@` replaced.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://<redacted>@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// Where and how to POST.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub url: Uri,
    /// Read again for every POST; never logged.
    pub credential: Option<Credential>,
    pub timeout: Duration,
    /// The longest `Retry-After` honoured.
    pub max_retry_after: Duration,
}

/// The HTTP side of remote write: http or https, SigV4-signed when configured.
#[derive(Clone, Debug)]
pub struct Sender {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    endpoint: Endpoint,
    sigv4: Option<Arc<SigV4>>,
    /// The last header built from the credential, used while its file cannot be read (a
    /// rotation in progress), and the last read error, to log each distinct one once.
    credential_cache: Arc<Mutex<(Option<HeaderValue>, Option<String>)>>,
}

/// Headers every remote-write POST carries (before any signature).
const HEADERS: [(&str, &str); 4] = [
    ("content-encoding", "snappy"),
    ("content-type", "application/x-protobuf"),
    ("x-prometheus-remote-write-version", "0.1.0"),
    (
        "user-agent",
        concat!("meshcanary/", env!("CARGO_PKG_VERSION")),
    ),
];

impl Sender {
    pub fn new(endpoint: Endpoint, sigv4: Option<Arc<SigV4>>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(endpoint.timeout));
        connector.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        Sender {
            client: Client::builder(TokioExecutor::new()).build(https),
            endpoint,
            sigv4,
            credential_cache: Arc::default(),
        }
    }

    /// The `Authorization` header for this POST, from the credential file as it is now.
    fn authorization(&self) -> Option<HeaderValue> {
        let credential = self.endpoint.credential.as_ref()?;
        let mut cache = self
            .credential_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match credential.header() {
            Ok(value) => {
                if cache.1.take().is_some() {
                    tracing::info!("Remote-write credential file readable again");
                }
                cache.0 = Some(value);
            }
            Err(error) => {
                let message = error.to_string();
                if cache.1.as_deref() != Some(message.as_str()) {
                    tracing::warn!(%error, "Remote-write credential unreadable; using the last one read");
                    cache.1 = Some(message);
                }
            }
        }
        cache.0.clone()
    }

    /// POST one snappy-compressed `WriteRequest`, signed anew if SigV4 is on.
    pub async fn post(&self, body: Bytes) -> Outcome {
        let mut req = Request::post(self.endpoint.url.clone());
        for (name, value) in HEADERS {
            req = req.header(name, value);
        }
        if let Some(auth) = self.authorization() {
            req = req.header(http::header::AUTHORIZATION, auth);
        }
        if let Some(sigv4) = &self.sigv4 {
            let credentials = match sigv4.credentials.get().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot sign remote write");
                    return Outcome::Retry {
                        reason: "credentials",
                        after: None,
                    };
                }
            };
            let url = self.endpoint.url.to_string();
            let request = Unsigned {
                method: "POST",
                url: &url,
                headers: &HEADERS,
                body: &body,
            };
            let signed = sign_headers(
                &credentials,
                &sigv4.region,
                &sigv4.service,
                SystemTime::now(),
                request,
            );
            match signed {
                Ok(headers) => {
                    for (name, value) in headers {
                        let Ok(mut value) = HeaderValue::from_str(&value) else {
                            continue;
                        };
                        value.set_sensitive(
                            name == "authorization" || name == "x-amz-security-token",
                        );
                        req = req.header(name, value);
                    }
                }
                Err(e) => {
                    return Outcome::Drop {
                        status: 0,
                        message: e.to_string(),
                    }
                }
            }
        }
        let Ok(req) = req.body(Full::new(body)) else {
            return Outcome::Drop {
                status: 0,
                message: "could not build the request".into(),
            };
        };
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|_| "connect")?;
            let status = resp.status();
            let retry_after = resp
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let mut body = resp.into_body();
            let mut text = Vec::new();
            // Only the start of the answer: the rest is left unread (the connection is
            // then closed rather than reused).
            while text.len() < MAX_ERROR_BODY {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            let room = MAX_ERROR_BODY - text.len();
                            text.extend_from_slice(&data[..data.len().min(room)]);
                        }
                    }
                    Some(Err(_)) => return Err("body_read"),
                    None => break,
                }
            }
            Ok::<_, &'static str>(classify(
                status,
                retry_after.as_deref(),
                &String::from_utf8_lossy(&text),
                self.endpoint.max_retry_after,
            ))
        };
        match tokio::time::timeout(self.endpoint.timeout, exchange).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(reason)) => Outcome::Retry {
                reason,
                after: None,
            },
            Err(_) => Outcome::Retry {
                reason: "timeout",
                after: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_decide_retry_or_drop() {
        let cap = Duration::from_secs(30);
        assert_eq!(
            classify(StatusCode::NO_CONTENT, None, "", cap),
            Outcome::Delivered
        );
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, Some("3"), "", cap),
            Outcome::Retry {
                reason: "429",
                after: Some(Duration::from_secs(3))
            }
        );
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, Some("86400"), "", cap),
            Outcome::Retry {
                reason: "429",
                after: Some(cap)
            },
            "Retry-After is capped"
        );
        assert_eq!(
            classify(StatusCode::BAD_GATEWAY, None, "", cap),
            Outcome::Retry {
                reason: "5xx",
                after: None
            }
        );
        assert_eq!(
            classify(StatusCode::BAD_REQUEST, None, "out of order sample", cap),
            Outcome::Drop {
                status: 400,
                message: "out of order sample".into()
            }
        );
        for status in [StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN] {
            assert_eq!(
                classify(status, None, "", cap),
                Outcome::Retry {
                    reason: "auth",
                    after: None
                }
            );
        }
    }

    #[test]
    fn urls_are_logged_without_their_credentials() {
        assert_eq!(
            redact("https://user:s3cret@aps.example/api/v1/remote_write?x=a@b"),
            "https://<redacted>@aps.example/api/v1/remote_write?x=a@b"
        );
        assert_eq!(
            redact("http://127.0.0.1:9090/write"),
            "http://127.0.0.1:9090/write"
        );
        assert_eq!(redact("not a url"), "not a url");
    }

    #[test]
    fn credentials_are_read_from_their_files_each_time() {
        let dir = std::env::temp_dir().join(format!("meshcanary-cred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "one\n").unwrap();
        let bearer = Credential::Bearer { file: file.clone() };
        assert_eq!(bearer.header().unwrap(), "Bearer one");
        assert!(bearer.header().unwrap().is_sensitive());
        std::fs::write(&file, "two").unwrap();
        assert_eq!(bearer.header().unwrap(), "Bearer two");
        let basic = Credential::Basic {
            user: "Aladdin".into(),
            password_file: file.clone(),
        };
        std::fs::write(&file, "open sesame").unwrap();
        assert_eq!(
            basic.header().unwrap(),
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
        std::fs::write(&file, "bad\u{1}value").unwrap();
        assert!(matches!(
            bearer.header(),
            Err(CredentialError::NotAHeader { .. })
        ));
        std::fs::remove_file(&file).unwrap();
        assert!(matches!(bearer.header(), Err(CredentialError::Read { .. })));
        let _ = std::fs::remove_dir(&dir);
    }

    #[test]
    fn base64_matches_the_rfc_examples() {
        assert_eq!(
            base64(b"Aladdin:open sesame"),
            "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
    }

    #[test]
    fn backoff_grows_to_its_cap_with_full_jitter() {
        let mut b = Backoff::new(Duration::from_millis(30), Duration::from_secs(30)).unwrap();
        let delays: Vec<Duration> = (0..30).map(|_| b.next_delay()).collect();
        for (n, d) in delays.iter().enumerate() {
            let cap = Duration::from_millis(30)
                .saturating_mul(1 << n.min(20))
                .min(Duration::from_secs(30));
            assert!(*d <= cap, "attempt {n}: {d:?} > {cap:?}");
        }
        assert!(
            delays[20..].iter().any(|d| *d > Duration::from_secs(1)),
            "reaches long waits"
        );
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(30));
        assert!(Backoff::new(Duration::ZERO, Duration::from_secs(1)).is_err());
        assert!(Backoff::new(Duration::from_secs(2), Duration::from_secs(1)).is_err());
    }
}
