//! The JSON answers every HTTP route shares: `{"error": <code>, "message": <why>}` for
//! refusals, plain JSON bodies otherwise (docs/protocol.md §8).

use http::{HeaderValue, StatusCode};
use warp::reply::Response;

/// A JSON body with `status`.
pub fn json(status: StatusCode, body: serde_json::Value) -> Response {
    let mut r = Response::new(body.to_string().into());
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// A refusal: `{"error": code, "message": message}`.
pub fn error(status: StatusCode, code: &str, message: impl std::fmt::Display) -> Response {
    json(status, serde_json::json!({"error": code, "message": message.to_string()}))
}

/// A 401 refusal, with the `WWW-Authenticate: Bearer` challenge.
pub fn unauthorized(message: impl std::fmt::Display) -> Response {
    let mut r = error(StatusCode::UNAUTHORIZED, "unauthorized", message);
    r.headers_mut().insert(http::header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}
