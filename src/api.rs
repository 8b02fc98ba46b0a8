//! The server-side publish API, `POST /api/publish` (docs/protocol.md §8), for backends that do not speak
//! MQTT, and the development token route `POST /dev/token`.
//!
//! A publish builds the same envelope as a chat frame from a WebSocket ([`wire::chat_message`])
//! and hands it to the broker the same way ([`crate::bus::Bus::publish`]: one publish per
//! recipient topic, all or nothing), so recipients cannot tell the two apart except by `from`. The key is compared in
//! constant time; the body is capped at `--max-message-bytes`, like an inbound frame.

use bytes::{Buf, BytesMut};
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;
use subtle::ConstantTimeEq;
use warp::reply::Response;

use crate::clock::unix_now;
use crate::http::error;
use crate::metrics::ApiResult;
use crate::node::Node;
use crate::wire::{self, IdError, ListError, Recipients, MAX_RECIPIENTS};

/// `from` of a published message when the body gives none.
pub const DEFAULT_FROM: &str = "system";

/// A valid publish body.
#[derive(Debug)]
pub struct Publish<'a> {
    pub to: Recipients,
    pub from: String,
    pub message: &'a RawValue,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBody<'a> {
    #[serde(borrow, default)]
    to: Option<&'a RawValue>,
    #[serde(borrow, default)]
    broadcast: Option<&'a RawValue>,
    #[serde(borrow, default)]
    message: Option<&'a RawValue>,
    #[serde(borrow, default)]
    from: Option<&'a RawValue>,
}

const SHAPE: &str = r#"expected a JSON object like {"to":"bob","message":"hi"}, {"to":["a","b"],"message":…} or {"broadcast":true,"message":…}"#;

fn user_id(v: &RawValue, field: &str) -> Result<String, String> {
    wire::user_id(v).map_err(|e| id_error(e, field, v))
}

fn id_error(e: IdError, field: &str, v: &RawValue) -> String {
    match e {
        IdError::NotAString => format!("{field} must be a string (a user id), got {}", v.get()),
        IdError::Invalid(why) => format!("invalid user id in {field}: {why}"),
    }
}

/// Validates a publish body. Every error is a sentence for the 400 answer.
pub fn parse(body: &[u8]) -> Result<Publish<'_>, String> {
    let text = std::str::from_utf8(body).map_err(|_| format!("the body is not UTF-8 text; {SHAPE}"))?;
    if !text.trim_start_matches([' ', '\t', '\n', '\r']).starts_with('{') {
        return Err(format!("the body is not a JSON object; {SHAPE}"));
    }
    let raw: RawBody = serde_json::from_str(text).map_err(|e| format!("invalid JSON body ({e}); {SHAPE}"))?;
    let broadcast = match raw.broadcast {
        None => false,
        Some(v) => serde_json::from_str::<bool>(v.get())
            .map_err(|_| format!("\"broadcast\" must be true or false, got {}", v.get()))?,
    };
    let to = match (raw.to, broadcast) {
        (Some(_), true) => return Err("give either \"to\" or \"broadcast\": true, not both".into()),
        (None, true) => Recipients::All,
        (None, false) => {
            return Err(
                "say who gets the message: \"to\": \"<user id>\", \"to\": [<user ids>] or \"broadcast\": true".into()
            )
        }
        (Some(v), false) if v.get().starts_with('[') => {
            Recipients::Many(wire::recipient_list(v).map_err(|e| match e {
                ListError::NotAList => "\"to\" is not a valid list of user ids".to_string(),
                ListError::Empty => "\"to\" is an empty list; give 1-100 user ids".to_string(),
                ListError::Id(i, e) => match e {
                    IdError::NotAString => format!("\"to\"[{i}] must be a string (a user id)"),
                    IdError::Invalid(why) => format!("invalid user id in \"to\"[{i}]: {why}"),
                },
                ListError::TooMany => format!("\"to\" has more than {MAX_RECIPIENTS} distinct user ids"),
            })?)
        }
        (Some(v), false) => Recipients::One(user_id(v, "\"to\"")?),
    };
    let message = raw.message.ok_or("\"message\" is required (any JSON value except null)")?;
    let from = match raw.from {
        None => DEFAULT_FROM.to_string(),
        Some(v) => user_id(v, "\"from\"")?,
    };
    Ok(Publish { to, from, message })
}

/// True when `Authorization` is `Bearer <key>`. The comparison takes the same time wherever
/// the first differing byte is (a different length is told apart at once; the length of the
/// key is not a secret worth protecting).
pub fn key_matches(key: &str, headers: &HeaderMap) -> bool {
    let Some(auth) = headers.get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else { return false };
    let Some((scheme, given)) = auth.trim().split_once(' ') else { return false };
    scheme.eq_ignore_ascii_case("bearer") && bool::from(given.trim().as_bytes().ct_eq(key.as_bytes()))
}

/// Reads at most `cap` bytes of a body; `Err` with the 400 message when it is larger or the
/// read failed.
pub async fn read_capped<S, B>(headers: &HeaderMap, body: S, cap: usize) -> Result<BytesMut, String>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let too_large = || format!("the body is larger than {cap} bytes (--max-message-bytes)");
    let declared = headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > cap as u64) {
        return Err(too_large());
    }
    let mut out = BytesMut::with_capacity(declared.map_or(1024, |n| n as usize));
    let mut body = std::pin::pin!(body);
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk.map_err(|e| format!("could not read the body: {e}"))?;
        if out.len() + chunk.remaining() > cap {
            return Err(too_large());
        }
        while chunk.has_remaining() {
            let c = chunk.chunk();
            let n = c.len();
            out.extend_from_slice(c);
            chunk.advance(n);
        }
    }
    Ok(out)
}

/// `POST /api/publish` after the route matched. `draining` is true during shutdown.
pub async fn publish<S, B>(sh: &Node, headers: HeaderMap, body: S) -> Response
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let m = &sh.metrics;
    let Some(key) = sh.cfg.api_key.as_deref() else {
        return error(StatusCode::NOT_FOUND, "not_found", "the publish API is off: start fanout with --api-key");
    };
    if !key_matches(key, &headers) {
        m.api_publish(ApiResult::Unauthorized);
        tracing::info!("publish API: 401 (missing or wrong key)");
        return crate::http::unauthorized("missing or wrong key: send Authorization: Bearer <--api-key>");
    }
    let bad = |why: String| {
        m.api_publish(ApiResult::BadRequest);
        error(StatusCode::BAD_REQUEST, "bad_request", why)
    };
    let body = match read_capped(&headers, body, sh.cfg.max_message_bytes).await {
        Ok(b) => b,
        Err(why) => return bad(why),
    };
    let p = match parse(&body) {
        Ok(p) => p,
        Err(why) => return bad(why),
    };
    let unavailable = |why: &str| {
        m.api_publish(ApiResult::Unavailable);
        error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", why)
    };
    if sh.draining() {
        return unavailable("instance is shutting down; retry on another instance");
    }
    if !sh.bus.connected() {
        return unavailable("the broker link is down; nothing was sent, retry later");
    }
    m.api_message_in();
    // Exactly the WebSocket path: the node builds one envelope and publishes it per topic.
    let msg_id = match sh.publish(&p.from, &p.to, p.message, None).await {
        Ok(id) => id,
        Err(_) => return unavailable("the broker did not accept the message in time; it was not sent"),
    };
    m.api_publish(ApiResult::Accepted);
    tracing::debug!(id = %msg_id, from = %p.from, "published through the API");
    crate::http::json(StatusCode::ACCEPTED, serde_json::json!({"id": msg_id}))
}

/// `POST /dev/token?user=<id>[&scope=broadcast][&ttl=1h]` with the development secret: a token
/// for the chat page's "mint" button. The route does not exist with any other auth setting.
pub fn dev_token(verifier: &crate::auth::Verifier, query: &str) -> Response {
    let q: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    let Some(user) = q.get("user") else {
        return error(StatusCode::BAD_REQUEST, "bad_request", "give ?user=<user id>");
    };
    let ttl = match q.get("ttl").map(|t| humantime::parse_duration(t)) {
        None => std::time::Duration::from_secs(3600),
        Some(Ok(d)) if d.as_secs() >= 1 && d.as_secs() <= 7 * 86400 => d,
        Some(_) => return error(StatusCode::BAD_REQUEST, "bad_request", "ttl must be 1s-7d, e.g. 1h"),
    };
    let scope = q.get("scope").filter(|s| !s.is_empty());
    match verifier.mint(user, ttl, scope.map(String::as_str)) {
        Ok(token) => crate::http::json(
            StatusCode::OK,
            serde_json::json!({"token": token, "userId": user, "expiresAt": unix_now() + ttl.as_secs()}),
        ),
        Err(why) => error(StatusCode::BAD_REQUEST, "bad_request", why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> String {
        parse(body.as_bytes()).map(|p| format!("{p:?}")).expect_err(body)
    }

    #[test]
    fn valid_bodies() {
        let p = parse(br#"{"to":"bob","message":{"text":"hi"}}"#).unwrap();
        assert_eq!(
            (p.to, p.from.as_str(), p.message.get()),
            (Recipients::One("bob".into()), "system", r#"{"text":"hi"}"#)
        );
        let p = parse(br#"{"to":["a","b","a"],"message":1,"from":"billing"}"#).unwrap();
        assert_eq!((p.to, p.from.as_str()), (Recipients::Many(vec!["a".into(), "b".into()]), "billing"));
        let p = parse(br#" {"broadcast":true,"message":"x"}"#).unwrap();
        assert_eq!(p.to, Recipients::All);
        let p = parse(br#"{"to":"bob","broadcast":false,"message":false}"#).unwrap();
        assert_eq!(p.to, Recipients::One("bob".into()));
    }

    #[test]
    fn every_malformed_body_says_why() {
        let many: Vec<String> = (0..101).map(|i| format!("u{i}")).collect();
        let too_many = serde_json::json!({"to": many, "message": "x"}).to_string();
        for (body, says) in [
            ("", "not a JSON object"),
            ("[1]", "not a JSON object"),
            ("{", "invalid JSON"),
            (r#"{"to":"bob"}"#, "\"message\" is required"),
            (r#"{"to":"bob","message":null}"#, "\"message\" is required"),
            (r#"{"message":"x"}"#, "say who gets"),
            (r#"{"to":"bob","broadcast":true,"message":"x"}"#, "not both"),
            (r#"{"broadcast":"yes","message":"x"}"#, "true or false"),
            (r#"{"to":5,"message":"x"}"#, "must be a string"),
            (r#"{"to":[],"message":"x"}"#, "empty list"),
            (r#"{"to":["a",7],"message":"x"}"#, "\"to\"[1] must be a string"),
            (r#"{"to":"a/b","message":"x"}"#, "invalid user id in \"to\""),
            (r##"{"to":["ok","#"],"message":"x"}"##, "invalid user id in \"to\"[1]"),
            (r#"{"to":"bob","message":"x","from":""}"#, "invalid user id in \"from\""),
            (r#"{"to":"bob","message":"x","from":3}"#, "\"from\" must be a string"),
            (r#"{"to":"bob","message":"x","form":"a"}"#, "unknown field `form`"),
            (&too_many, "more than 100"),
        ] {
            let e = err(body);
            assert!(e.contains(says), "{body}: {e}");
        }
        assert!(parse(&[0xff, b'{']).unwrap_err().contains("UTF-8"));
    }

    #[test]
    fn key_is_checked_exactly() {
        let h = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(http::header::AUTHORIZATION, v.parse().unwrap());
            h
        };
        let key = "0123456789abcdef";
        assert!(key_matches(key, &h("Bearer 0123456789abcdef")));
        assert!(key_matches(key, &h("bearer 0123456789abcdef")));
        assert!(!key_matches(key, &h("Bearer 0123456789abcdeF")));
        assert!(!key_matches(key, &h("Bearer 0123456789abcde")));
        assert!(!key_matches(key, &h("Basic 0123456789abcdef")));
        assert!(!key_matches(key, &h("0123456789abcdef")));
        assert!(!key_matches(key, &HeaderMap::new()));
    }
}
