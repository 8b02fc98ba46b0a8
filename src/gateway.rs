//! HTTP routes (warp): the WebSocket upgrade with authentication before any upgrade,
//! `/healthz`, `/readyz`, `/metrics`, the publish API (`/api/publish`, [`crate::api`]), its
//! OpenAPI document (`/api/openapi.json`), the chat page (`/`), the JavaScript client it uses
//! (`/fanout-client.js`) and, with the development secret only, `/dev/token`.

use std::sync::Arc;

use http::{HeaderMap, StatusCode};
use hyper::upgrade::OnUpgrade;
use tokio_util::task::TaskTracker;
use warp::filters::path::FullPath;
use warp::reply::Response;
use warp::{Filter, Rejection};

use crate::auth::{AuthError, AuthMode, Verifier};
use crate::http::{error, json};
use crate::limits::{ConnLimiter, LimitError};
use crate::node::Node;
use crate::session;

/// Everything the routes need.
pub struct Gateway {
    pub node: Arc<Node>,
    pub verifier: Verifier,
    /// Upgraded sessions, so shutdown can wait for them (warp does not track them).
    pub sessions: TaskTracker,
    /// Connection limits, checked before the upgrade.
    pub limits: Arc<ConnLimiter>,
}

/// Where the token was found, and what to echo in `Sec-WebSocket-Protocol`.
#[derive(Debug, PartialEq, Eq)]
pub struct FoundToken {
    pub token: String,
    pub echo: Option<String>,
}

/// Finds the token: subprotocol (`<token>` or `bearer, <token>`), then `?token=`, then
/// `Authorization: Bearer`.
pub fn find_token(headers: &HeaderMap, query: &str) -> Option<FoundToken> {
    let offered: Vec<String> = headers
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if let Some(pos) = offered.iter().position(|p| p.eq_ignore_ascii_case("bearer")) {
        if let Some(token) = offered.get(pos + 1) {
            return Some(FoundToken { token: token.clone(), echo: Some(offered[pos].clone()) });
        }
    }
    // A JWT is three base64url parts: that is the token a browser passed as the subprotocol.
    if let Some(token) = offered.iter().find(|p| p.split('.').count() == 3) {
        return Some(FoundToken { token: token.clone(), echo: Some(token.clone()) });
    }
    if let Some((_, t)) = url::form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "token") {
        return Some(FoundToken { token: t.into_owned(), echo: None });
    }
    let auth = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = auth.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| FoundToken { token: token.trim().to_string(), echo: None })
}

/// The `Sec-WebSocket-Accept` value for a valid WebSocket upgrade request (RFC 6455 §4.2.1),
/// or `None` when the request is not one. The upgrade is done here rather than with warp's
/// `ws()` filter so that the socket gets [`crate::session::ws_config`]: warp's builder cannot
/// shrink tungstenite's 128 KiB read buffer, which dominated memory per idle connection.
pub fn websocket_accept(headers: &HeaderMap) -> Option<String> {
    let has = |name: http::header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has(http::header::CONNECTION, "upgrade") || !has(http::header::UPGRADE, "websocket") {
        return None;
    }
    if headers.get(http::header::SEC_WEBSOCKET_VERSION)?.as_bytes() != b"13" {
        return None;
    }
    let key = headers.get(http::header::SEC_WEBSOCKET_KEY)?;
    Some(tungstenite::handshake::derive_accept_key(key.as_bytes()))
}

/// The OpenAPI 3 description of every route (kept in the repository, served as is).
pub const OPENAPI_JSON: &str = include_str!("../docs/openapi.json");
/// The chat page; `/*FANOUT_PAGE_CONFIG*/null` is replaced by the page's settings.
pub const PAGE_HTML: &str = include_str!("page.html");
/// The JavaScript client (`clients/js`, npm package `fanout-client`), an ES module served at
/// `/fanout-client.js` for the chat page and for pages that import it from the service itself.
pub const CLIENT_JS: &str = include_str!("../clients/js/fanout-client.js");

/// The chat page with its settings (WebSocket path, whether the dev mint button works).
pub fn page_html(ws_path: &str, dev_mint: bool) -> String {
    let cfg = serde_json::json!({"wsPath": ws_path, "devMint": dev_mint}).to_string().replace('<', "\\u003c");
    PAGE_HTML.replacen("/*FANOUT_PAGE_CONFIG*/null", &cfg, 1)
}

impl Gateway {
    fn upgrade(self: &Arc<Self>, headers: HeaderMap, query: String, on_upgrade: Option<OnUpgrade>) -> Response {
        let m = &self.node.metrics;
        if self.node.draining() {
            return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "instance is shutting down");
        }
        let found = find_token(&headers, &query);
        let verified = match &found {
            None => Err(AuthError::Missing),
            Some(f) => self.verifier.verify(&f.token),
        };
        let id = match verified {
            Ok(id) => id,
            Err(e) => {
                m.auth_failed();
                tracing::info!(reason = %e, "upgrade refused: 401");
                return crate::http::unauthorized(e);
            }
        };
        let (Some(accept), Some(on_upgrade)) = (websocket_accept(&headers), on_upgrade) else {
            return error(StatusCode::UPGRADE_REQUIRED, "upgrade_required", "this endpoint speaks WebSocket only");
        };
        let permit = match self.limits.try_acquire(&id.user_id) {
            Ok(p) => p,
            Err(e) => {
                tracing::info!(user_id = %id.user_id, reason = %e, "upgrade refused: connection limit");
                let (status, code) = match e {
                    LimitError::Instance(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
                    LimitError::User(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_connections"),
                };
                return error(status, code, e);
            }
        };
        let node = self.node.clone();
        let tracker = self.sessions.clone();
        // The permit lives as long as the session (or until the upgrade fails).
        tokio::spawn(tracker.track_future(async move {
            session::serve(on_upgrade, id, node).await;
            drop(permit);
        }));
        let mut resp = Response::new(String::new().into());
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = resp.headers_mut();
        h.insert(http::header::CONNECTION, http::HeaderValue::from_static("upgrade"));
        h.insert(http::header::UPGRADE, http::HeaderValue::from_static("websocket"));
        if let Ok(v) = http::HeaderValue::from_str(&accept) {
            h.insert(http::header::SEC_WEBSOCKET_ACCEPT, v);
        }
        if let Some(echo) = found.and_then(|f| f.echo) {
            if let Ok(v) = http::HeaderValue::from_str(&echo) {
                resp.headers_mut().insert(http::header::SEC_WEBSOCKET_PROTOCOL, v);
            }
        }
        resp
    }

    fn readyz(&self) -> Response {
        let bus = &self.node.bus;
        let (ready, why) = if self.node.draining() {
            (false, "shutting down")
        } else if !bus.connected() {
            (false, "broker link down")
        } else if bus.stalled() {
            (false, "broker not answering")
        } else if !bus.ready() {
            (false, "subscriptions not confirmed yet")
        } else {
            (true, "ok")
        };
        let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        let broker = if bus.connected() { serde_json::Value::String(bus.node()) } else { serde_json::Value::Null };
        json(
            status,
            serde_json::json!({"ready": ready, "status": why, "instanceId": self.node.cfg.instance_id, "broker": broker}),
        )
    }

    fn metrics(&self) -> Response {
        let sh = &self.node;
        sh.metrics.set_ready(!sh.draining() && sh.bus.ready());
        let (queued, fullest) = sh.hub.outbox_stats();
        sh.metrics.set_outbox(queued, fullest);
        let (bytes, messages) = sh.bus.queued();
        sh.metrics.set_publish_queue(bytes, messages);
        let mut r = Response::new(sh.metrics.render().into());
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        );
        r
    }

    /// All routes.
    pub fn routes(
        self: Arc<Self>,
    ) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone + Send + Sync + 'static {
        // The filter is cloned for every connection and every request (hyper's service): it
        // captures only `Arc`s and the page as `Bytes`, so a clone copies no strings.
        let ws_path = self.clone();
        let g = self.clone();
        // Every route matches its path before its method: a path nobody serves is 404 for
        // every method, a served path with another method is 405.
        let ws = warp::path::full()
            .and_then(move |p: FullPath| {
                let ok = p.as_str() == ws_path.node.cfg.ws_path;
                async move {
                    if ok {
                        Ok(())
                    } else {
                        Err(warp::reject::not_found())
                    }
                }
            })
            .untuple_one()
            .and(warp::get())
            .and(warp::header::headers_cloned())
            .and(warp::query::raw().or(warp::any().map(String::new)).unify())
            .and(warp::ext::optional::<OnUpgrade>())
            .map(move |h: HeaderMap, q: String, up: Option<OnUpgrade>| g.upgrade(h, q, up));
        let healthz = warp::path("healthz")
            .and(warp::path::end())
            .and(warp::get())
            .map(|| json(StatusCode::OK, serde_json::json!({"status": "ok"})));
        let g = self.clone();
        let readyz = warp::path("readyz").and(warp::path::end()).and(warp::get()).map(move || g.readyz());
        let g = self.clone();
        let metrics = warp::path("metrics").and(warp::path::end()).and(warp::get()).map(move || g.metrics());
        let g = self.clone();
        let publish = warp::path!("api" / "publish")
            .and(warp::post())
            .and(warp::header::headers_cloned())
            .and(warp::body::stream())
            .then(move |headers: HeaderMap, body| {
                let g = g.clone();
                async move { crate::api::publish(&g.node, headers, body).await }
            });
        let openapi = warp::path!("api" / "openapi.json").and(warp::get()).map(|| {
            let mut r = Response::new(OPENAPI_JSON.into());
            r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
            r
        });
        let dev = matches!(self.node.cfg.auth, AuthMode::Secret { dev: true, .. });
        let page = bytes::Bytes::from(page_html(&self.node.cfg.ws_path, dev));
        let index = warp::path::end().and(warp::get()).map(move || {
            let mut r = Response::new(page.clone().into());
            let h = r.headers_mut();
            h.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/html; charset=utf-8"));
            h.insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-cache"));
            r
        });
        let client_js = warp::path("fanout-client.js").and(warp::path::end()).and(warp::get()).map(|| {
            let mut r = Response::new(CLIENT_JS.into());
            let h = r.headers_mut();
            h.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/javascript; charset=utf-8"));
            h.insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-cache"));
            r
        });
        // Only with the built-in development secret: anyone may mint tokens then anyway.
        let g = self;
        let dev_token = warp::path!("dev" / "token")
            .and(warp::post())
            .and(warp::query::raw().or(warp::any().map(String::new)).unify())
            .map(move |q: String| {
                if dev {
                    crate::api::dev_token(&g.verifier, &q)
                } else {
                    // An answer rather than a rejection: warp would turn it into the 405 of
                    // another route.
                    error(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        "tokens are minted here only with the built-in development secret",
                    )
                }
            });
        ws.or(healthz)
            .unify()
            .or(readyz)
            .unify()
            .or(metrics)
            .unify()
            .or(publish)
            .unify()
            .or(openapi)
            .unify()
            .or(index)
            .unify()
            .or(client_js)
            .unify()
            .or(dev_token)
            .unify()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn token_sources_in_order() {
        let t = "aaa.bbb.ccc";
        let f = find_token(&headers(&[("sec-websocket-protocol", t)]), "").unwrap();
        assert_eq!(f, FoundToken { token: t.into(), echo: Some(t.into()) });
        let f = find_token(&headers(&[("sec-websocket-protocol", "bearer, aaa.bbb.ccc")]), "").unwrap();
        assert_eq!(f, FoundToken { token: t.into(), echo: Some("bearer".into()) });
        let f =
            find_token(&headers(&[("sec-websocket-protocol", "bearer"), ("sec-websocket-protocol", t)]), "").unwrap();
        assert_eq!(f.echo.as_deref(), Some("bearer"));
        let f = find_token(&headers(&[("authorization", "Bearer x.y.z")]), "a=1&token=q.r.s").unwrap();
        assert_eq!(f, FoundToken { token: "q.r.s".into(), echo: None });
        let f = find_token(&headers(&[("authorization", "Bearer x.y.z")]), "").unwrap();
        assert_eq!(f.token, "x.y.z");
        assert_eq!(find_token(&headers(&[("sec-websocket-protocol", "chat")]), ""), None);
        assert_eq!(find_token(&headers(&[("authorization", "Basic abc")]), ""), None);
    }
}
