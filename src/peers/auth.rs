//! Peer authentication: a peer sends its projected ServiceAccount token (audience
//! `--peer-audience`) as a bearer token; the receiver asks the API server with a TokenReview
//! whether it is valid for that audience and belongs to the agents' own ServiceAccount.
//!
//! Verdicts are cached by a keyed hash of the token (the token itself is never stored or
//! logged): accepted tokens for two minutes, rejected ones for ten seconds, so a leader
//! polling every second costs one review per token rotation, and an API server outage does
//! not cut peers off for the length of the cache.
//!
//! The cache holds at most [`MAX_CACHED`] verdicts; when full, the one closest to expiry
//! goes (a flood of made-up tokens evicts other made-up tokens' short-lived rejections,
//! never the controller's accepted token wholesale). At most [`MAX_REVIEWS`] reviews are
//! in flight at once, so a flood costs the API server a bounded rate, not one request per
//! connection.

use std::collections::HashMap;
use std::hash::{BuildHasher as _, Hasher as _};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use kube::Client;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::ResultLabels;
use crate::telemetry::lock;

const ACCEPTED_FOR: Duration = Duration::from_secs(120);
const REJECTED_FOR: Duration = Duration::from_secs(10);
/// Verdicts kept at most.
pub const MAX_CACHED: usize = 1024;
/// TokenReviews in flight at most; further requests wait their turn.
pub const MAX_REVIEWS: usize = 4;

/// Why a peer request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    #[error("the API server rejected the token: {0}")]
    Rejected(String),
    #[error("the token belongs to {0}, not to the agents' ServiceAccount")]
    WrongUser(String),
    #[error("the API server could not review the token: {0}")]
    Unavailable(String),
}

impl AuthError {
    /// The `reason` label of `meshcanary_peer_requests_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "no_token",
            AuthError::Rejected(_) => "token_rejected",
            AuthError::WrongUser(_) => "wrong_user",
            AuthError::Unavailable(_) => "review_failed",
        }
    }
}

/// A verdict and until when it holds.
type Cached = (Result<(), AuthError>, Instant);

/// Reviews peer tokens, with a cache.
pub struct Reviewer {
    client: Client,
    audience: String,
    /// `system:serviceaccount:<namespace>:<name>` of the agents.
    allowed_user: String,
    key: std::collections::hash_map::RandomState,
    cache: Mutex<HashMap<u64, Cached>>,
    reviews: tokio::sync::Semaphore,
    /// `meshcanary_peer_token_reviews`.
    counted: Family<ResultLabels, Counter>,
}

impl Reviewer {
    pub fn new(
        client: Client,
        audience: String,
        allowed_user: String,
        counted: Family<ResultLabels, Counter>,
    ) -> Self {
        Reviewer {
            client,
            audience,
            allowed_user,
            key: std::collections::hash_map::RandomState::new(),
            cache: Mutex::new(HashMap::new()),
            reviews: tokio::sync::Semaphore::new(MAX_REVIEWS),
            counted,
        }
    }

    /// Verdicts in the cache now.
    pub fn cached(&self) -> usize {
        lock(&self.cache).len()
    }

    /// Check an `Authorization` header value.
    ///
    /// ### Errors
    /// Why the request is refused.
    pub async fn check(&self, authorization: Option<&str>) -> Result<(), AuthError> {
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Missing)?;
        let mut h = self.key.build_hasher();
        h.write(token.as_bytes());
        let id = h.finish();
        let now = Instant::now();
        if let Some((verdict, until)) = lock(&self.cache).get(&id) {
            if *until > now {
                return verdict.clone();
            }
        }
        let verdict = {
            let _turn = self.reviews.acquire().await;
            self.review(token).await
        };
        let result = match &verdict {
            Ok(()) => "ok",
            Err(e) => e.reason(),
        };
        self.counted.get_or_create(&ResultLabels { result }).inc();
        let ttl = match &verdict {
            Ok(()) => ACCEPTED_FOR,
            // Not cached: the next request asks again.
            Err(AuthError::Unavailable(_)) => return verdict,
            Err(_) => REJECTED_FOR,
        };
        let mut cache = lock(&self.cache);
        cache.retain(|_, (_, until)| *until > now);
        while cache.len() >= MAX_CACHED {
            let soonest = cache
                .iter()
                .min_by_key(|(_, (_, until))| *until)
                .map(|(k, _)| *k);
            match soonest {
                Some(k) => cache.remove(&k),
                None => break,
            };
        }
        cache.insert(id, (verdict.clone(), now + ttl));
        verdict
    }

    async fn review(&self, token: &str) -> Result<(), AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(AuthError::Rejected(
                status
                    .error
                    .filter(|e| !e.is_empty())
                    .unwrap_or_else(|| "not authenticated".into()),
            ));
        }
        if !status
            .audiences
            .unwrap_or_default()
            .contains(&self.audience)
        {
            return Err(AuthError::Rejected(format!(
                "not valid for audience {}",
                self.audience
            )));
        }
        let user = status.user.and_then(|u| u.username).unwrap_or_default();
        if user != self.allowed_user {
            return Err(AuthError::WrongUser(user));
        }
        Ok(())
    }
}
