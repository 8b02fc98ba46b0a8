//! `Verifier::verify` with a fixed secret on arbitrary strings, and `gateway::find_token`
//! on the same bytes used as `Sec-WebSocket-Protocol` / `Authorization` values and as the
//! query string. No input may panic; an accepted token must carry a valid user id.
#![no_main]

use fanout::auth::{check_user_id, Verifier};
use fanout::gateway::find_token;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    thread_local! {
        static V: Verifier = Verifier::from_secret(b"fuzz-secret").expect("verifier");
    }
    if let Ok(token) = std::str::from_utf8(data) {
        V.with(|v| {
            if let Ok(id) = v.verify(token) {
                assert!(check_user_id(&id.user_id).is_ok(), "accepted bad sub {:?}", id.user_id);
            }
        });
    }
    // The same bytes as header values (when they are valid header values) and as a query.
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_bytes(data) {
        headers.append(http::header::SEC_WEBSOCKET_PROTOCOL, v.clone());
        headers.append(http::header::AUTHORIZATION, v);
    }
    let query = String::from_utf8_lossy(data);
    if let Some(found) = find_token(&headers, &query) {
        V.with(|v| {
            let _ = v.verify(&found.token);
        });
    }
    let _ = find_token(&http::HeaderMap::new(), &query);
});
