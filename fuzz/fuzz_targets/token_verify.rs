//! `Verifier::verify` with a fixed secret on arbitrary strings, and `gateway::find_token` on
//! the same bytes used as `Sec-WebSocket-Protocol` / `Authorization` values and as the query
//! string. Inputs starting with a 0 byte are instead used as the claims of a token signed with
//! the right secret, so the claim checks (`exp`, `nbf`, `sub`, `scope`) are reached too, not
//! only the signature check. No input may panic; an accepted token carries a user id that is
//! one valid MQTT topic level and an expiry the session timer can hold.
#![no_main]

use base64::Engine;
use fanout::auth::{Verifier, MAX_EXPIRES_AT};
use fanout::gateway::find_token;
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;

const SECRET: &[u8] = b"fuzz-secret";

/// What Mosquitto accepts as one topic level (see frame_decode.rs).
fn valid_topic_level(id: &str) -> bool {
    (1..=256).contains(&id.len())
        && !id.contains(['/', '+', '#'])
        && id.chars().all(|c| {
            let c = c as u32;
            !(c <= 0x1f || (0x7f..=0x9f).contains(&c) || (0xfdd0..=0xfdef).contains(&c) || c & 0xfffe == 0xfffe)
        })
}

fn check(v: &Verifier, token: &str) {
    if let Ok(id) = v.verify(token) {
        assert!(valid_topic_level(&id.user_id), "accepted sub {:?}", id.user_id);
        assert!(id.expires_at <= MAX_EXPIRES_AT, "expires_at {}", id.expires_at);
    }
}

fuzz_target!(|data: &[u8]| {
    thread_local! {
        static V: Verifier = Verifier::from_secret(SECRET).expect("verifier");
    }
    if let Some((&0, claims)) = data.split_first() {
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let msg = format!("{}.{}", b64(br#"{"alg":"HS256","typ":"JWT"}"#), b64(claims));
        let key = EncodingKey::from_secret(SECRET).expect("key");
        let sig = jsonwebtoken::crypto::sign(msg.as_bytes(), &key, Algorithm::HS256).expect("sign");
        V.with(|v| check(v, &format!("{msg}.{sig}")));
        return;
    }
    if let Ok(token) = std::str::from_utf8(data) {
        V.with(|v| check(v, token));
    }
    // The same bytes as header values (when they are valid header values) and as a query.
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_bytes(data) {
        headers.append(http::header::SEC_WEBSOCKET_PROTOCOL, v.clone());
        headers.append(http::header::AUTHORIZATION, v);
    }
    let query = String::from_utf8_lossy(data);
    if let Some(found) = find_token(&headers, &query) {
        V.with(|v| check(v, &found.token));
    }
    let _ = find_token(&http::HeaderMap::new(), &query);
});
