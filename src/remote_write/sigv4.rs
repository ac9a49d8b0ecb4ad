//! SigV4 for Amazon Managed Service for Prometheus (service `aps`), with credentials from
//! `aws-config`'s default chain (environment, profile, web identity token / IRSA, EKS Pod
//! Identity, instance metadata), cached and refreshed before they expire.
//!
//! A credentials provider called directly does not cache (the SDK caches in its clients),
//! so [`CredentialCache`] keeps the last credentials and fetches new ones once they are
//! within [`REFRESH_BEFORE`] of expiry; concurrent senders wait for one fetch. Every attempt,
//! retries included, is signed anew. Credentials and signatures are never logged.

use std::time::{Duration, SystemTime};

use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;

/// Credentials are refreshed this long before they expire.
pub const REFRESH_BEFORE: Duration = Duration::from_secs(5 * 60);

/// Why a request could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("no AWS credentials from the default chain: {0}")]
    Credentials(String),
    #[error("signing the request: {0}")]
    Signing(String),
}

/// The region in an AMP workspace host (`aps-workspaces.<region>.amazonaws.com`).
pub fn region_from_host(host: &str) -> Option<String> {
    let rest = host.strip_prefix("aps-workspaces.")?;
    let (region, domain) = rest.split_once('.')?;
    (domain.starts_with("amazonaws.com") && !region.is_empty()).then(|| region.to_owned())
}

/// A request as it will be sent, before signing.
#[derive(Clone, Copy, Debug)]
pub struct Unsigned<'a> {
    pub method: &'a str,
    pub url: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

/// Sign `request` as `credentials` for `service` in `region` at `time`: the headers to add
/// (`x-amz-date`, `authorization`, `x-amz-security-token` with temporary credentials).
///
/// ### Errors
/// `Signing` when the request cannot be expressed for SigV4 (e.g. a header that is not text).
pub fn sign_headers(
    credentials: &Credentials,
    region: &str,
    service: &str,
    time: SystemTime,
    request: Unsigned<'_>,
) -> Result<Vec<(String, String)>, SignError> {
    let identity = credentials.clone().into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| SignError::Signing(e.to_string()))?
        .into();
    let signable = SignableRequest::new(
        request.method,
        request.url,
        request.headers.iter().copied(),
        SignableBody::Bytes(request.body),
    )
    .map_err(|e| SignError::Signing(e.to_string()))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| SignError::Signing(e.to_string()))?
        .into_parts();
    Ok(instructions
        .headers()
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect())
}

/// Credentials from a provider, cached until [`REFRESH_BEFORE`] their expiry.
#[derive(Debug)]
pub struct CredentialCache {
    provider: SharedCredentialsProvider,
    cached: tokio::sync::Mutex<Option<Credentials>>,
}

impl CredentialCache {
    pub fn new(provider: SharedCredentialsProvider) -> Self {
        CredentialCache {
            provider,
            cached: tokio::sync::Mutex::new(None),
        }
    }

    /// The default chain of `aws-config`, in `region`.
    pub async fn default_chain(region: &str) -> Self {
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(region.to_owned()))
            .load()
            .await;
        let provider = config.credentials_provider().unwrap_or_else(|| {
            SharedCredentialsProvider::new(Credentials::new("", "", None, None, "none"))
        });
        Self::new(provider)
    }

    /// Current credentials, fetching new ones when none are cached or they expire soon.
    ///
    /// ### Errors
    /// `Credentials` when the chain has none (the message says which sources failed).
    pub async fn get(&self) -> Result<Credentials, SignError> {
        let mut cached = self.cached.lock().await;
        let fresh = cached.as_ref().is_some_and(|c| {
            c.expiry().is_none_or(|exp| {
                exp.duration_since(SystemTime::now())
                    .is_ok_and(|left| left > REFRESH_BEFORE)
            })
        });
        if !fresh {
            let credentials = self
                .provider
                .provide_credentials()
                .await
                .map_err(|e| SignError::Credentials(format!("{e:?}")))?;
            if credentials.access_key_id().is_empty() {
                return Err(SignError::Credentials(
                    "the chain found no source of credentials".into(),
                ));
            }
            tracing::info!(expires = ?credentials.expiry(), "Fetched AWS credentials for remote write");
            *cached = Some(credentials);
        }
        Ok(cached.clone().expect("set above"))
    }
}

/// What signing needs: where and as whom.
#[derive(Debug)]
pub struct SigV4 {
    pub region: String,
    pub service: String,
    pub credentials: CredentialCache,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Credentials {
        Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            None,
            None,
            "test",
        )
    }

    fn at_test_suite_time() -> SystemTime {
        // 20150830T123600Z
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_440_938_160)
    }

    fn authorization(method: &str) -> String {
        let request = Unsigned {
            method,
            url: "https://example.amazonaws.com/",
            headers: &[],
            body: b"",
        };
        let headers = sign_headers(
            &example(),
            "us-east-1",
            "service",
            at_test_suite_time(),
            request,
        )
        .unwrap();
        headers
            .into_iter()
            .find(|(n, _)| n == "authorization")
            .unwrap()
            .1
    }

    /// AWS's published SigV4 test suite, cases `get-vanilla` and `post-vanilla`.
    #[test]
    fn aws_test_suite_vanilla_cases_byte_for_byte() {
        assert_eq!(
            authorization("GET"),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
        assert_eq!(
            authorization("POST"),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"
        );
    }

    #[test]
    fn regions_from_amp_hosts() {
        assert_eq!(
            region_from_host("aps-workspaces.eu-west-1.amazonaws.com").as_deref(),
            Some("eu-west-1")
        );
        assert_eq!(
            region_from_host("aps-workspaces.cn-north-1.amazonaws.com.cn").as_deref(),
            Some("cn-north-1")
        );
        assert_eq!(region_from_host("prometheus.local"), None);
    }

    #[tokio::test]
    async fn cached_until_close_to_expiry() {
        #[derive(Debug)]
        struct Counting(std::sync::Arc<std::sync::atomic::AtomicU32>, Duration);
        impl ProvideCredentials for Counting {
            fn provide_credentials<'a>(
                &'a self,
            ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
            where
                Self: 'a,
            {
                let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let expiry = SystemTime::now() + self.1;
                aws_credential_types::provider::future::ProvideCredentials::ready(Ok(
                    Credentials::new(
                        format!("AKID{n}"),
                        "secret",
                        Some("token".into()),
                        Some(expiry),
                        "counting",
                    ),
                ))
            }
        }
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let long = Counting(calls.clone(), Duration::from_secs(3600));
        let cache = CredentialCache::new(SharedCredentialsProvider::new(long));
        for _ in 0..10 {
            assert_eq!(cache.get().await.unwrap().access_key_id(), "AKID0");
        }
        assert_eq!(
            calls.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "fetched once"
        );
        // Credentials inside the refresh window are replaced at every use until fresh ones come.
        let short = Counting(Default::default(), REFRESH_BEFORE - Duration::from_secs(1));
        let cache = CredentialCache::new(SharedCredentialsProvider::new(short));
        cache.get().await.unwrap();
        assert_eq!(cache.get().await.unwrap().access_key_id(), "AKID1");
    }
}
