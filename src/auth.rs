//! Token verification and minting, and the user-id rules. No I/O; the clock is read only to
//! check `exp` and `nbf` (by jsonwebtoken's validation, and [`crate::clock`] for `exp`).

use std::path::PathBuf;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::clock::{unix_millis, unix_now};

/// How tokens are verified.
#[derive(Debug, Clone)]
pub enum AuthMode {
    /// HS256 with a shared secret; `dev` is true for the built-in development secret.
    Secret { secret: String, dev: bool },
    /// RS256/ES256 with this PEM public key.
    PublicKey { pem: Vec<u8>, path: PathBuf },
}

/// Clock-skew allowance for `exp` and `nbf` (the library default of 60 s is too lax).
pub const LEEWAY_SECS: u64 = 5;
/// Longest token accepted; anything larger is refused before decoding.
pub const MAX_TOKEN_BYTES: usize = 8192;
/// Longest user id, in bytes of UTF-8.
pub const MAX_USER_ID_BYTES: usize = 256;
/// Latest expiry taken from a token (9999-12-31T23:59:59Z); a later `exp` counts as this.
/// A deadline near `u64::MAX` seconds would overflow the session's expiry timer.
pub const MAX_EXPIRES_AT: u64 = 253_402_300_799;

/// Why a token was refused. The `Display` text is what the 401 body says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token: pass it as the WebSocket subprotocol, ?token=, or Authorization: Bearer")]
    Missing,
    #[error("token is larger than {MAX_TOKEN_BYTES} bytes")]
    TooLong,
    #[error("token is malformed")]
    Malformed,
    #[error("token algorithm is not accepted (expected {0})")]
    Algorithm(&'static str),
    #[error("token signature is invalid")]
    Signature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    #[error("token has no exp claim")]
    MissingExp,
    #[error("token has no sub claim (the user id)")]
    MissingSub,
    #[error("invalid user id in sub: {0}")]
    BadSub(&'static str),
}

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    /// Unix seconds.
    pub expires_at: u64,
    pub broadcast: bool,
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<serde_json::Value>,
    exp: Option<serde_json::Value>,
    #[serde(default)]
    scope: Option<serde_json::Value>,
}

#[derive(Serialize)]
struct MintClaims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'a str>,
}

/// Checks a user id against the rules of docs/protocol.md §2: 1–256 bytes of UTF-8 without `/`, `+`,
/// `#` or control characters, so that `prefix + id` is exactly one MQTT topic level. Unicode
/// noncharacters are refused too: Mosquitto treats a topic holding one as malformed UTF-8 and
/// drops the whole broker connection (MQTT 3.1.1 §1.5.3).
pub fn check_user_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() {
        return Err("empty");
    }
    if id.len() > MAX_USER_ID_BYTES {
        return Err("longer than 256 bytes");
    }
    if id.contains(['/', '+', '#']) {
        return Err("contains '/', '+' or '#'");
    }
    if id.chars().any(char::is_control) {
        return Err("contains a control character");
    }
    if id.chars().any(is_noncharacter) {
        return Err("contains a Unicode noncharacter (U+FDD0-U+FDEF or U+xxFFFE/U+xxFFFF)");
    }
    Ok(())
}

/// U+FDD0..=U+FDEF and the last two code points of every plane.
pub fn is_noncharacter(c: char) -> bool {
    let c = c as u32;
    (0xFDD0..=0xFDEF).contains(&c) || c & 0xFFFE == 0xFFFE
}

/// Verifies tokens for one configuration.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    alg_name: &'static str,
    encoding: Option<EncodingKey>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").field("alg", &self.alg_name).finish()
    }
}

fn validation(alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = LEEWAY_SECS;
    v.validate_exp = true;
    v.validate_nbf = true;
    // We configure no audience; tokens that carry one (common with identity providers) are
    // still accepted rather than refused for a check nobody asked for.
    v.validate_aud = false;
    // `exp` and `sub` are checked by us so the 401 can say exactly what is missing.
    v.required_spec_claims.clear();
    v
}

impl Verifier {
    pub fn new(mode: &AuthMode) -> Result<Self, String> {
        match mode {
            AuthMode::Secret { secret, .. } => Self::from_secret(secret.as_bytes()),
            AuthMode::PublicKey { pem, .. } => Self::from_public_pem(pem),
        }
    }

    pub fn from_secret(secret: &[u8]) -> Result<Self, String> {
        let key = DecodingKey::from_secret(secret).map_err(|e| e.to_string())?;
        let enc = EncodingKey::from_secret(secret).map_err(|e| e.to_string())?;
        Ok(Verifier { key, validation: validation(Algorithm::HS256), alg_name: "HS256", encoding: Some(enc) })
    }

    /// An RSA (RS256) or EC P-256 (ES256) public key in PEM.
    pub fn from_public_pem(pem: &[u8]) -> Result<Self, String> {
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(Verifier { key, validation: validation(Algorithm::RS256), alg_name: "RS256", encoding: None });
        }
        match DecodingKey::from_ec_pem(pem) {
            Ok(key) => {
                Ok(Verifier { key, validation: validation(Algorithm::ES256), alg_name: "ES256", encoding: None })
            }
            Err(e) => Err(format!("not an RSA or EC public key in PEM ({e})")),
        }
    }

    pub fn algorithm(&self) -> &'static str {
        self.alg_name
    }

    /// Verifies a token and returns who it is for.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        use jsonwebtoken::errors::ErrorKind as K;
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLong);
        }
        // Refuse any other algorithm (including "none") with a clear reason before decoding.
        match jsonwebtoken::decode_header(token) {
            Ok(h) if h.alg == self.validation.algorithms[0] => {}
            Ok(_) => return Err(AuthError::Algorithm(self.alg_name)),
            Err(_) if names_an_algorithm(token) => return Err(AuthError::Algorithm(self.alg_name)),
            Err(_) => return Err(AuthError::Malformed),
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| match e.kind() {
            K::InvalidSignature => AuthError::Signature,
            K::ExpiredSignature => AuthError::Expired,
            K::ImmatureSignature => AuthError::NotYetValid,
            K::InvalidAlgorithm | K::InvalidAlgorithmName => AuthError::Algorithm(self.alg_name),
            K::MissingRequiredClaim(c) if c == "exp" => AuthError::MissingExp,
            _ => AuthError::Malformed,
        })?;
        let claims = data.claims;
        let expires_at = match claims.exp {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().or_else(|| n.as_f64().map(|f| f as u64)).ok_or(AuthError::Malformed)?.min(MAX_EXPIRES_AT)
            }
            Some(_) => return Err(AuthError::Malformed),
            None => return Err(AuthError::MissingExp),
        };
        // The leeway is for `nbf` (a clock a little ahead of ours); `exp` is not extended: a
        // connection accepted past its `exp` would only be closed with 4001 at once, and a
        // client reconnecting with the same token would loop.
        if expires_at.saturating_mul(1000) <= unix_millis() {
            return Err(AuthError::Expired);
        }
        let user_id = match claims.sub {
            Some(serde_json::Value::String(s)) => s,
            Some(_) => return Err(AuthError::BadSub("not a string")),
            None => return Err(AuthError::MissingSub),
        };
        check_user_id(&user_id).map_err(AuthError::BadSub)?;
        let broadcast = match claims.scope {
            Some(serde_json::Value::String(s)) => s.split_whitespace().any(|s| s == "broadcast"),
            Some(serde_json::Value::Array(a)) => a.iter().any(|v| v.as_str() == Some("broadcast")),
            _ => false,
        };
        Ok(Identity { user_id, expires_at, broadcast })
    }

    /// Mints an HS256 token (only with a secret; public-key mode has no private key).
    pub fn mint(&self, user_id: &str, ttl: Duration, scope: Option<&str>) -> Result<String, String> {
        let enc = self
            .encoding
            .as_ref()
            .ok_or("minting needs --jwt-secret; with --jwt-public-key tokens come from your identity provider")?;
        check_user_id(user_id).map_err(|e| format!("invalid user id: {e}"))?;
        let now = unix_now();
        let claims = MintClaims { sub: user_id, iat: now, exp: now + ttl.as_secs().max(1), scope };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, enc).map_err(|e| e.to_string())
    }
}

/// True when the token's header is JSON with an `alg` that jsonwebtoken does not know
/// (such as `none`): that deserves "algorithm not accepted", not "malformed".
fn names_an_algorithm(token: &str) -> bool {
    use base64::Engine;
    let Some(head) = token.split('.').next() else { return false };
    let Ok(json) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(head.trim_end_matches('=')) else {
        return false;
    };
    serde_json::from_slice::<serde_json::Value>(&json).is_ok_and(|v| v.get("alg").is_some_and(|a| a.is_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &[u8] = b"test-secret";

    fn sign(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET).unwrap())
            .unwrap()
    }

    fn v() -> Verifier {
        Verifier::from_secret(SECRET).unwrap()
    }

    #[test]
    fn minted_token_verifies_with_scope() {
        let t = v().mint("alice", Duration::from_secs(60), Some("broadcast")).unwrap();
        let id = v().verify(&t).unwrap();
        assert_eq!(id.user_id, "alice");
        assert!(id.broadcast);
        assert!(id.expires_at >= unix_now() + 59);
        let t = v().mint("bob", Duration::from_secs(60), None).unwrap();
        assert!(!v().verify(&t).unwrap().broadcast);
    }

    #[test]
    fn tutorial_token_with_email_and_iat_is_accepted() {
        let t = sign(json!({"sub": "3f0c", "email": "a@b.c", "iat": unix_now(), "exp": unix_now() + 3600}));
        assert_eq!(v().verify(&t).unwrap().user_id, "3f0c");
    }

    #[test]
    fn failures_have_precise_reasons() {
        let now = unix_now();
        assert_eq!(v().verify(""), Err(AuthError::Missing));
        assert_eq!(v().verify("abc"), Err(AuthError::Malformed));
        assert_eq!(v().verify(&"a".repeat(MAX_TOKEN_BYTES + 1)), Err(AuthError::TooLong));
        let other = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub":"a","exp":now+60}),
            &EncodingKey::from_secret(b"other").unwrap(),
        )
        .unwrap();
        assert_eq!(v().verify(&other), Err(AuthError::Signature));
        assert_eq!(v().verify(&sign(json!({"sub":"a","exp":now-10}))), Err(AuthError::Expired));
        assert_eq!(v().verify(&sign(json!({"sub":"a","exp":now+60,"nbf":now+60}))), Err(AuthError::NotYetValid));
        assert_eq!(v().verify(&sign(json!({"sub":"a"}))), Err(AuthError::MissingExp));
        assert_eq!(v().verify(&sign(json!({"exp":now+60}))), Err(AuthError::MissingSub));
        for bad in ["#", "+", "a/b", "", "x\u{0}y", "t\tab"] {
            assert!(matches!(v().verify(&sign(json!({"sub":bad,"exp":now+60}))), Err(AuthError::BadSub(_))), "{bad:?}");
        }
        // alg: none, hand-made.
        use base64::Engine;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let none = format!(
            "{}.{}.",
            b64(br#"{"alg":"none","typ":"JWT"}"#),
            b64(format!(r#"{{"sub":"a","exp":{}}}"#, now + 60).as_bytes())
        );
        assert_eq!(v().verify(&none), Err(AuthError::Algorithm("HS256")));
        let hs384 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS384),
            &json!({"sub":"a","exp":now+60}),
            &EncodingKey::from_secret(SECRET).unwrap(),
        )
        .unwrap();
        assert_eq!(v().verify(&hs384), Err(AuthError::Algorithm("HS256")));
    }

    #[test]
    fn far_future_exp_is_capped() {
        // The cap docs/protocol.md §2.3 promises, worked out here rather than read from the code.
        let end_of_9999 = humantime::parse_rfc3339("9999-12-31T23:59:59Z").unwrap();
        let cap = end_of_9999.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(cap, 253_402_300_799);
        let t = sign(json!({"sub":"a","exp":u64::MAX}));
        assert_eq!(v().verify(&t).unwrap().expires_at, cap);
        let f = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub":"a","exp":1e19}),
            &EncodingKey::from_secret(SECRET).unwrap(),
        )
        .unwrap();
        assert_eq!(v().verify(&f).unwrap().expires_at, cap);
        for exp in [cap, cap - 1] {
            let t = sign(json!({"sub":"a","exp":exp}));
            assert_eq!(v().verify(&t).unwrap().expires_at, exp, "an exp up to the cap is kept as it is");
        }
    }

    #[test]
    fn an_expired_token_is_refused_without_leeway_and_nbf_keeps_it() {
        let t = sign(json!({"sub":"a","exp":unix_now() - 1}));
        assert_eq!(v().verify(&t), Err(AuthError::Expired));
        let t = sign(json!({"sub":"a","exp":unix_now() + 60,"nbf":unix_now() + LEEWAY_SECS - 2}));
        assert!(v().verify(&t).is_ok(), "nbf a few seconds ahead is clock skew");
    }

    #[test]
    fn leeway_is_seconds_not_a_minute() {
        let t = sign(json!({"sub":"a","exp":unix_now() - LEEWAY_SECS - 2}));
        assert_eq!(v().verify(&t), Err(AuthError::Expired));
    }

    #[test]
    fn user_id_rules() {
        assert!(check_user_id("alice").is_ok());
        assert!(check_user_id("ünïcødé-😀").is_ok());
        assert!(check_user_id(&"a".repeat(256)).is_ok());
        assert!(check_user_id(&"a".repeat(257)).is_err());
        for bad in ["", "a/b", "a+", "#", "\u{7f}", "\u{85}", "a\nb"] {
            assert!(check_user_id(bad).is_err(), "{bad:?}");
        }
        // Noncharacters: Mosquitto drops the connection that names them in a topic.
        for bad in ["a\u{fdd0}", "\u{fdef}", "\u{fffe}", "a\u{ffff}b", "\u{1fffe}", "\u{10ffff}"] {
            assert!(check_user_id(bad).is_err(), "{bad:?}");
        }
        for good in ["\u{fdcf}", "\u{fdf0}", "\u{fffd}", "\u{1fffd}", "\u{feff}", "a\u{2028}b"] {
            assert!(check_user_id(good).is_ok(), "{good:?}");
        }
    }
}
