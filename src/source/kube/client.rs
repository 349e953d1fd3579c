//! The API client: User-Agent, retries left to the watchers, Retry-After made visible.

use kube::Client;

/// Sent as User-Agent, so audit logs and API Priority and Fairness can tell the agent apart.
pub const USER_AGENT: &str = concat!("kube-netpol-iptables/", env!("CARGO_PKG_VERSION"));

/// The default log filter: kube-runtime's watcher logs a WARN line of its own for every 403
/// retry; the agent logs each change of a kind's readability once instead.
pub const DEFAULT_LOG_FILTER: &str = "info,kube_runtime::watcher=error";

/// A client for `config` that sends our User-Agent. kube-client's own retry of 429/503/504
/// (growing to minutes inside one request) is turned off: the watchers' backoff above decides
/// when to try again, so a returning API server is seen within seconds.
pub fn client_for(mut config: kube::Config) -> anyhow::Result<Client> {
    config.headers.push((
        axum::http::header::USER_AGENT,
        axum::http::HeaderValue::from_static(USER_AGENT),
    ));
    config.default_retry = false;
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&tower::util::MapResponseLayer::new(retry_after_into_status))
        .build())
}

type ResponseBody = Box<kube::client::DynBody>;

/// kube-client keeps only the body of an error response, but API Priority and Fairness says when
/// to come back in the Retry-After header of its 429, with a plain-text body (kube-apiserver:
/// staging/src/k8s.io/apiserver/pkg/server/filters/maxinflight.go, `tooManyRequests`). Such a
/// response is turned into the `Status` kube-apiserver sends elsewhere for 429, with
/// `details.retryAfterSeconds`, which `retry_after` reads.
fn retry_after_into_status(
    response: axum::http::Response<ResponseBody>,
) -> axum::http::Response<ResponseBody> {
    use http_body_util::BodyExt;
    if response.status() != axum::http::StatusCode::TOO_MANY_REQUESTS {
        return response;
    }
    let Some(secs) = response
        .headers()
        .get(axum::http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok())
    else {
        return response;
    };
    let status = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "reason": "TooManyRequests", "code": 429,
        "message": format!("too many requests, retry after {secs} s"),
        "details": {"retryAfterSeconds": secs},
    });
    let (parts, _) = response.into_parts();
    let body = kube::client::Body::from(status.to_string().into_bytes())
        .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>);
    axum::http::Response::from_parts(parts, Box::new(body) as ResponseBody)
}

/// A client from `--kubeconfig`, or in-cluster configuration (falling back to the usual
/// kubeconfig discovery when not in a pod).
pub async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| anyhow::anyhow!("cannot read kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| anyhow::anyhow!("invalid kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer().await.map_err(|e| {
            anyhow::anyhow!("no in-cluster configuration and no kubeconfig found ({e}); pass --kubeconfig or --manifests")
        })?,
    };
    client_for(config)
}
