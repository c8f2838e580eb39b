//! Webhooks: when a job with a `callback_url` ends, its final job document is
//! POSTed there, signed, and retried with exponential backoff until a 2xx or
//! the attempt limit. Pending deliveries live in the store (created in the
//! same transaction that ends the job), so they survive restarts, and any
//! node may deliver them.
//!
//! Server-side request forgery is refused: loopback, private, link-local,
//! shared and cloud-metadata addresses are rejected at submit (for an IP
//! literal) and again after DNS resolution at delivery, unless the host is
//! listed with `--allow-callback-host`. A delivery connects to the very
//! address it checked, so a second DNS answer cannot redirect it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::{watch, Notify};
use tracing::{info, warn};
use uuid::Uuid;

use crate::domain::{now_micros, rfc3339, DeliveryAttempt};
use crate::metrics::{Metrics, OutcomeLabel};
use crate::store::{Store, WebhookOutcome};

/// How long one delivery may take.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// First retry delay; doubles per attempt, up to `MAX_BACKOFF`.
const BASE_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Deliveries claimed per pass (and run concurrently).
const BATCH: u32 = 16;
/// A claimed delivery is not claimed again by another node for this long.
const CLAIM_LEASE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_secs(1);

/// Webhook settings.
#[derive(Clone)]
pub struct WebhookConfig {
    pub secret: Option<String>,
    /// Hosts exempt from the address checks (exact host names or IP literals).
    pub allowed_hosts: Vec<String>,
    pub max_attempts: u32,
}

impl WebhookConfig {
    fn allowed(&self, host: &str) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.allowed_hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
    }

    /// Checks a `callback_url` at submit: a valid http(s) URL with a host,
    /// not an IP literal in a refused range (unless allowed). Host names are
    /// checked again after resolution, at delivery.
    pub fn check_at_submit(&self, raw: &str) -> Result<(), String> {
        if self.secret.is_none() {
            return Err("this server has no --webhook-secret, so it cannot sign callbacks".into());
        }
        let url = reqwest::Url::parse(raw).map_err(|e| format!("is not a valid URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err("must be an http:// or https:// URL".into());
        }
        let host = url.host_str().ok_or("has no host")?;
        if self.allowed(host) {
            return Ok(());
        }
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        match literal.parse::<IpAddr>() {
            Ok(ip) => match refused_reason(ip) {
                Some(why) => {
                    Err(format!("points at {ip}, {why} (list the host with --allow-callback-host to permit it)"))
                }
                None => Ok(()),
            },
            Err(_) => Ok(()),
        }
    }
}

/// Why an address may not be called back, if it may not.
pub fn refused_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            if v4.is_loopback() {
                Some("a loopback address")
            } else if v4.is_private() {
                Some("a private address")
            } else if v4.is_link_local() {
                Some("a link-local or cloud-metadata address")
            } else if v4.is_unspecified() || v4.is_broadcast() || a == 0 {
                Some("not a routable address")
            } else if a == 100 && (64..128).contains(&b) {
                Some("a shared (carrier-grade NAT) address")
            } else if (a == 192 && b == 0 && v4.octets()[2] == 0) || (a == 198 && (18..20).contains(&b)) {
                Some("a reserved (protocol assignment or benchmarking) address")
            } else if v4.is_multicast() || a >= 240 {
                Some("a multicast or reserved address")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return refused_reason(IpAddr::V4(v4));
            }
            let seg = v6.segments();
            let embedded =
                |hi: u16, lo: u16| IpAddr::V4(std::net::Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo)));
            // Prefixes that carry an IPv4 address inside: judge that address.
            if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return refused_reason(embedded(seg[6], seg[7])); // NAT64
            }
            if seg[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified() {
                return Some("a deprecated IPv4-compatible address");
            }
            if seg[0] == 0x2002 {
                return refused_reason(embedded(seg[1], seg[2]));
            }
            let first = seg[0];
            if v6.is_loopback() {
                Some("a loopback address")
            } else if v6.is_unspecified() || v6.is_multicast() {
                Some("not a routable address")
            } else if first & 0xfe00 == 0xfc00 {
                Some("a private (unique local) address")
            } else if first & 0xffc0 == 0xfe80 {
                Some("a link-local address")
            } else if first == 0xfd00 && v6.segments()[1..4] == [0xec2, 0, 0] {
                Some("a cloud-metadata address")
            } else {
                None
            }
        }
    }
}

/// `t=<unix seconds>,v1=<hex HMAC-SHA256 of "t.body">`.
pub fn signature(secret: &str, unix: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(unix.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={unix},v1={hex}")
}

/// The backoff before attempt `attempt + 1`.
fn backoff(attempt: u32) -> Duration {
    (BASE_BACKOFF * 2u32.saturating_pow(attempt.saturating_sub(1).min(20))).min(MAX_BACKOFF)
}

/// Delivers due webhooks until `stop` turns true; `wake` hurries it.
pub async fn run(
    store: Store,
    config: WebhookConfig,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let Some(secret) = config.secret.clone() else { return };
    loop {
        match store.claim_webhooks(now_micros(), BATCH, CLAIM_LEASE.as_micros() as i64).await {
            Ok(due) => {
                let deliveries = due
                    .iter()
                    .map(|(job, url, attempts)| deliver(&store, &config, &secret, &metrics, *job, url, *attempts));
                let n = futures_util::future::join_all(deliveries).await.len();
                if n as u32 == BATCH {
                    continue;
                }
            }
            Err(e) => warn!(error = %e, "claiming webhook deliveries failed; retrying"),
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// One delivery attempt of one job's final document.
async fn deliver(
    store: &Store,
    config: &WebhookConfig,
    secret: &str,
    metrics: &Metrics,
    job: Uuid,
    url: &str,
    attempts: u32,
) {
    let attempt = attempts + 1;
    let result = post(store, config, secret, job, url).await;
    let at = rfc3339(now_micros());
    let (record, outcome) = match result {
        Ok(code) if (200..300).contains(&code) => {
            (DeliveryAttempt { at, status_code: Some(code), error: None }, WebhookOutcome::Delivered)
        }
        Ok(code) => (DeliveryAttempt { at, status_code: Some(code), error: None }, retry_or_fail(config, attempt)),
        Err(Failure::Refused(why)) => {
            (DeliveryAttempt { at, status_code: None, error: Some(why) }, WebhookOutcome::Failed)
        }
        Err(Failure::Transient(why)) => {
            (DeliveryAttempt { at, status_code: None, error: Some(why) }, retry_or_fail(config, attempt))
        }
    };
    let label = match outcome {
        WebhookOutcome::Delivered => "delivered",
        WebhookOutcome::Retry { .. } => "retry",
        WebhookOutcome::Failed => "failed",
    };
    metrics.webhook_deliveries.get_or_create(&OutcomeLabel { outcome: label.into() }).inc();
    info!(%job, attempt, outcome = label, status = ?record.status_code, error = ?record.error, "webhook delivery");
    if let Err(e) = store.record_webhook(job, &record, outcome).await {
        warn!(%job, error = %e, "could not record a webhook delivery; it is retried after its claim expires");
    }
}

fn retry_or_fail(config: &WebhookConfig, attempt: u32) -> WebhookOutcome {
    if attempt >= config.max_attempts {
        WebhookOutcome::Failed
    } else {
        WebhookOutcome::Retry { next_at: now_micros() + backoff(attempt).as_micros() as i64 }
    }
}

enum Failure {
    /// Never retried: the destination is forbidden.
    Refused(String),
    Transient(String),
}

async fn post(store: &Store, config: &WebhookConfig, secret: &str, job: Uuid, raw: &str) -> Result<u16, Failure> {
    let url = reqwest::Url::parse(raw).map_err(|e| Failure::Refused(format!("invalid URL: {e}")))?;
    let host = url.host_str().ok_or_else(|| Failure::Refused("URL has no host".into()))?.to_string();
    let port = url.port_or_known_default().unwrap_or(80);
    let lookup_host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((lookup_host.as_str(), port))
        .await
        .map_err(|e| Failure::Transient(format!("cannot resolve {host}: {e}")))?
        .collect();
    let allowed = config.allowed(&host);
    let addr = match addrs.iter().find(|a| refused_reason(a.ip()).is_some()) {
        Some(bad) if !allowed => {
            let why = refused_reason(bad.ip()).unwrap_or("refused");
            return Err(Failure::Refused(format!("{host} resolves to {}, {why}", bad.ip())));
        }
        _ => *addrs.first().ok_or_else(|| Failure::Transient(format!("{host} has no address")))?,
    };
    let doc = match store.job(job).await {
        Ok(Some(doc)) => doc,
        Ok(None) => return Err(Failure::Refused("the job was deleted".into())),
        Err(e) => return Err(Failure::Transient(format!("reading the job: {e}"))),
    };
    let body = serde_json::to_vec(&doc).expect("job documents serialise");
    let unix = now_micros() / 1_000_000;
    // Connect to the address just checked, whatever DNS says next.
    let client = reqwest::Client::builder()
        .resolve(&lookup_host, addr)
        .timeout(DELIVERY_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        // A proxy would connect wherever DNS says, not to the address checked.
        .no_proxy()
        .build()
        .map_err(|e| Failure::Transient(format!("HTTP client: {e}")))?;
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .header("user-agent", concat!("squared/", env!("CARGO_PKG_VERSION")))
        .header("squared-signature", signature(secret, unix, &body))
        .body(body)
        .send()
        .await
        .map_err(|e| Failure::Transient(format!("{e}")))?;
    Ok(response.status().as_u16())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_addresses_are_refused_and_public_ones_are_not() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "fd00:ec2::254",
        ] {
            assert!(refused_reason(ip.parse().unwrap()).is_some(), "{ip}");
        }
        for ip in ["93.184.216.34", "8.8.8.8", "2606:4700::1111"] {
            assert!(refused_reason(ip.parse().unwrap()).is_none(), "{ip}");
        }
    }

    #[test]
    fn submit_checks_ip_literals_and_leaves_names_to_delivery() {
        let config =
            WebhookConfig { secret: Some("s".into()), allowed_hosts: vec!["10.0.0.5".into()], max_attempts: 3 };
        assert!(config.check_at_submit("http://127.0.0.1:8080/hook").is_err());
        assert!(config.check_at_submit("http://[::1]/hook").is_err());
        assert!(config.check_at_submit("http://169.254.169.254/latest/meta-data").is_err());
        assert!(config.check_at_submit("http://10.0.0.5/hook").is_ok(), "allowed explicitly");
        assert!(config.check_at_submit("https://hooks.example.com/x").is_ok());
        assert!(config.check_at_submit("ftp://example.com/x").is_err());
        assert!(config.check_at_submit("http://").is_err());
        let unsigned = WebhookConfig { secret: None, ..config };
        assert!(unsigned.check_at_submit("https://hooks.example.com/x").is_err());
    }

    #[test]
    fn signatures_are_hmac_sha256_over_t_dot_body() {
        // Python: hmac.new(b'secret', b'1700000000.{"a":1}', hashlib.sha256).hexdigest()
        assert_eq!(
            signature("secret", 1_700_000_000, br#"{"a":1}"#),
            "t=1700000000,v1=49f24e537407743fa4a0242bb63b94b9a47ee99cbbe071ccd8a22550ae411686"
        );
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(30), MAX_BACKOFF);
    }
}
