//! What must hold for every input of `Verifier::verify` (HS256, a fixed secret) and of
//! `gateway::find_token` on the same bytes used as `Sec-WebSocket-Protocol` / `Authorization`
//! values and as the query string: no panic, and an accepted token carries a user id that is
//! one valid topic level and an expiry the session timer can hold. Inputs starting with a 0 byte
//! are the claims of a token signed with the right secret, so the claim checks (`exp`, `nbf`,
//! `sub`, `scope`) are reached too. Shared by the fuzz target and the seed replay in `cargo test`.

use base64::Engine;
use fanout::auth::{Verifier, MAX_EXPIRES_AT};
use fanout::gateway::find_token;
use jsonwebtoken::{Algorithm, EncodingKey};

use super::topic::valid_topic_level;

const SECRET: &[u8] = b"fuzz-secret";

fn accepted_is_sane(v: &Verifier, token: &str) {
    if let Ok(id) = v.verify(token) {
        assert!(valid_topic_level(&id.user_id), "accepted sub {:?}", id.user_id);
        assert!(id.expires_at <= MAX_EXPIRES_AT, "expires_at {}", id.expires_at);
    }
}

pub fn check(data: &[u8]) {
    thread_local! {
        static V: Verifier = Verifier::from_secret(SECRET).expect("verifier");
    }
    if let Some((&0, claims)) = data.split_first() {
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let msg = format!("{}.{}", b64(br#"{"alg":"HS256","typ":"JWT"}"#), b64(claims));
        let key = EncodingKey::from_secret(SECRET).expect("key");
        let sig = jsonwebtoken::crypto::sign(msg.as_bytes(), &key, Algorithm::HS256).expect("sign");
        V.with(|v| accepted_is_sane(v, &format!("{msg}.{sig}")));
        return;
    }
    if let Ok(token) = std::str::from_utf8(data) {
        V.with(|v| accepted_is_sane(v, token));
    }
    // The same bytes as header values (when they are valid header values) and as a query.
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_bytes(data) {
        headers.append(http::header::SEC_WEBSOCKET_PROTOCOL, v.clone());
        headers.append(http::header::AUTHORIZATION, v);
    }
    let query = String::from_utf8_lossy(data);
    if let Some(found) = find_token(&headers, &query) {
        V.with(|v| accepted_is_sane(v, &found.token));
    }
    let _ = find_token(&http::HeaderMap::new(), &query);
}
