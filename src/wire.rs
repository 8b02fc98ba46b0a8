//! Client and server frames, error codes and close codes (docs/protocol.md §3-§6).
//!
//! Inbound frames are decoded once; the chat `message` stays a borrowed [`RawValue`] and is
//! copied verbatim into the outbound envelope, which is serialised once and published as is.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::auth::check_user_id;

/// Most distinct recipients of one `send_chat_message_to_many_participants`.
pub const MAX_RECIPIENTS: usize = 100;
/// Longest `clientMessageId`, in bytes.
pub const MAX_CLIENT_MESSAGE_ID: usize = 256;

/// A close the server sends: the code and its reason, paired in one place
/// (docs/protocol.md §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close {
    pub code: u16,
    pub reason: &'static str,
}

/// Every close the server sends.
pub mod close {
    use super::Close;

    /// The peer closed or went away; what the log records (no close frame is sent).
    pub const NORMAL: u16 = 1000;
    pub const SHUTTING_DOWN: Close = Close { code: 1001, reason: "instance shutting down" };
    pub const IDLE: Close = Close { code: 1001, reason: "idle timeout" };
    pub const PROTOCOL_ERROR: Close = Close { code: 1002, reason: "WebSocket protocol error" };
    pub const INVALID_UTF8: Close = Close { code: 1007, reason: "invalid UTF-8 in a text frame" };
    pub const TOO_BIG: Close = Close { code: 1009, reason: "message too big" };
    pub const BROKER_UNAVAILABLE: Close = Close { code: 1013, reason: "broker unavailable, try again later" };
    pub const TOKEN_EXPIRED: Close = Close { code: 4001, reason: "token expired" };
    pub const SLOW_CONSUMER: Close = Close { code: 4008, reason: "slow consumer: outbound queue overflowed" };
}

/// Error codes (docs/protocol.md §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadJson,
    UnknownEvent,
    InvalidParticipant,
    TooManyRecipients,
    Forbidden,
    RateLimited,
    Unavailable,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 7] = [
        ErrorCode::BadJson,
        ErrorCode::UnknownEvent,
        ErrorCode::InvalidParticipant,
        ErrorCode::TooManyRecipients,
        ErrorCode::Forbidden,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::UnknownEvent => "unknown_event",
            ErrorCode::InvalidParticipant => "invalid_participant",
            ErrorCode::TooManyRecipients => "too_many_recipients",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
        }
    }
}

/// A rejected frame: the code, a human message, and the sender's `clientMessageId` if one
/// could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
    pub client_message_id: Option<String>,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError { code, message: message.into(), client_message_id: None }
    }
}

/// Who a chat message goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recipients {
    One(String),
    /// Distinct ids in first-given order.
    Many(Vec<String>),
    All,
}

/// Why a user id given as JSON was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdError {
    NotAString,
    /// It breaks the user-id rules, for this reason.
    Invalid(&'static str),
}

/// A user id given as a JSON value: a string that keeps the user-id rules.
pub fn user_id(v: &RawValue) -> Result<String, IdError> {
    let id: String = serde_json::from_str(v.get()).map_err(|_| IdError::NotAString)?;
    check_user_id(&id).map_err(IdError::Invalid)?;
    Ok(id)
}

/// Why a list of recipients was refused; each caller words it for its own answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListError {
    NotAList,
    Empty,
    /// The entry at this index is not a valid user id.
    Id(usize, IdError),
    /// More than [`MAX_RECIPIENTS`] distinct ids.
    TooMany,
}

/// A JSON list of user ids (`participantIds`, or `to` of the publish API): each a valid user
/// id, duplicates folded in first-given order, 1 to [`MAX_RECIPIENTS`] distinct.
pub fn recipient_list(json: &RawValue) -> Result<Vec<String>, ListError> {
    let list: Vec<&RawValue> = serde_json::from_str(json.get()).map_err(|_| ListError::NotAList)?;
    if list.is_empty() {
        return Err(ListError::Empty);
    }
    let mut out: Vec<String> = Vec::with_capacity(list.len().min(MAX_RECIPIENTS));
    for (i, v) in list.into_iter().enumerate() {
        let id = user_id(v).map_err(|e| ListError::Id(i, e))?;
        if !out.contains(&id) {
            if out.len() == MAX_RECIPIENTS {
                return Err(ListError::TooMany);
            }
            out.push(id);
        }
    }
    Ok(out)
}

/// A decoded client frame.
#[derive(Debug)]
pub enum ClientEvent<'a> {
    Chat { to: Recipients, message: &'a RawValue, client_message_id: Option<String> },
    Ping,
}

#[derive(Deserialize)]
struct RawFrame<'a> {
    #[serde(borrow)]
    event: &'a RawValue,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawChat<'a> {
    #[serde(borrow, default)]
    participant_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    participant_ids: Option<&'a RawValue>,
    #[serde(borrow, default)]
    message: Option<&'a RawValue>,
    #[serde(borrow, default)]
    client_message_id: Option<&'a RawValue>,
}

fn bad_json(msg: impl Into<String>) -> WireError {
    WireError::new(ErrorCode::BadJson, msg)
}

/// True when the JSON text is an object. serde's derived structs also accept the positional
/// (list) form, so `["ping"]` would otherwise decode like `{"event":"ping"}`.
fn is_object(json: &str) -> bool {
    json.trim_start_matches([' ', '\t', '\n', '\r']).starts_with('{')
}

/// Decodes one text frame. `may_broadcast` is the token's `broadcast` scope.
pub fn decode(frame: &str, may_broadcast: bool) -> Result<ClientEvent<'_>, WireError> {
    const SHAPE: &str = "expected a JSON object {\"event\":…,\"data\":…}";
    if !is_object(frame) {
        return Err(bad_json(SHAPE));
    }
    let raw: RawFrame = serde_json::from_str(frame).map_err(|e| bad_json(format!("{SHAPE}: {e}")))?;
    // Read the clientMessageId first, so that every later error can echo it.
    let chat: Option<RawChat> =
        raw.data.filter(|d| is_object(d.get())).and_then(|d| serde_json::from_str(d.get()).ok());
    let client_message_id = match chat.as_ref().and_then(|c| c.client_message_id) {
        None => None,
        Some(v) => match serde_json::from_str::<Option<String>>(v.get()) {
            Ok(Some(s)) if s.len() <= MAX_CLIENT_MESSAGE_ID => Some(s),
            Ok(None) => None,
            _ => {
                return Err(bad_json(format!(
                    "\"clientMessageId\" must be a string of at most {MAX_CLIENT_MESSAGE_ID} bytes"
                )))
            }
        },
    };
    decode_event(raw, chat, may_broadcast)
        .map_err(|mut e| {
            e.client_message_id.clone_from(&client_message_id);
            e
        })
        .map(|ev| match ev {
            ClientEvent::Chat { to, message, .. } => ClientEvent::Chat { to, message, client_message_id },
            ping => ping,
        })
}

fn decode_event<'a>(
    raw: RawFrame<'a>,
    chat: Option<RawChat<'a>>,
    may_broadcast: bool,
) -> Result<ClientEvent<'a>, WireError> {
    let event: String = serde_json::from_str(raw.event.get()).map_err(|_| bad_json("\"event\" must be a string"))?;
    match event.as_str() {
        "ping" => Ok(ClientEvent::Ping),
        "send_chat_message_to_participant"
        | "send_chat_message_to_one_participant"
        | "send_chat_message_to_many_participants"
        | "send_chat_message_to_all_participants" => {
            let chat = match (raw.data.map(RawValue::get), chat) {
                (None | Some("null"), _) => return Err(bad_json("\"data\" must be an object with a \"message\"")),
                (Some(_), None) => return Err(bad_json("\"data\" must be an object with a \"message\"")),
                (Some(_), Some(c)) => c,
            };
            let (to, message) = decode_chat(&event, chat, may_broadcast)?;
            Ok(ClientEvent::Chat { to, message, client_message_id: None })
        }
        other => {
            let shown: String = other.chars().take(64).collect();
            Err(WireError::new(ErrorCode::UnknownEvent, format!("unknown event '{shown}'")))
        }
    }
}

fn participant_error(e: IdError) -> WireError {
    let m = match e {
        IdError::NotAString => "participant ids must be strings".to_string(),
        IdError::Invalid(why) => format!("invalid participant id: {why}"),
    };
    WireError::new(ErrorCode::InvalidParticipant, m)
}

fn decode_chat<'a>(
    event: &str,
    chat: RawChat<'a>,
    may_broadcast: bool,
) -> Result<(Recipients, &'a RawValue), WireError> {
    let to = match event {
        "send_chat_message_to_many_participants" => {
            let ids = chat.participant_ids.ok_or_else(|| {
                WireError::new(
                    ErrorCode::InvalidParticipant,
                    "\"participantIds\" is required: a list of 1-100 user ids",
                )
            })?;
            let invalid = |m: String| WireError::new(ErrorCode::InvalidParticipant, m);
            Recipients::Many(recipient_list(ids).map_err(|e| match e {
                ListError::NotAList => invalid("\"participantIds\" must be a list of user ids".into()),
                ListError::Empty => invalid("\"participantIds\" is empty".into()),
                ListError::Id(_, e) => participant_error(e),
                ListError::TooMany => WireError::new(
                    ErrorCode::TooManyRecipients,
                    format!("at most {MAX_RECIPIENTS} distinct recipients per message"),
                ),
            })?)
        }
        "send_chat_message_to_all_participants" => {
            if !may_broadcast {
                return Err(WireError::new(
                    ErrorCode::Forbidden,
                    "sending to all participants needs the 'broadcast' scope in the token",
                ));
            }
            Recipients::All
        }
        _ => {
            let id = chat
                .participant_id
                .ok_or_else(|| WireError::new(ErrorCode::InvalidParticipant, "\"participantId\" is required"))?;
            Recipients::One(user_id(id).map_err(participant_error)?)
        }
    };
    let message = chat.message.filter(|m| m.get() != "null").ok_or_else(|| bad_json("\"message\" is required"))?;
    Ok((to, message))
}

/// The `to` field of a chat envelope.
#[derive(Serialize)]
#[serde(untagged)]
enum To<'a> {
    One(&'a str),
    Many(&'a [String]),
    All(()),
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ChatData<'a> {
    id: &'a str,
    from: &'a str,
    to: To<'a>,
    message: &'a RawValue,
    sent_at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_message_id: Option<&'a str>,
}

#[derive(Serialize)]
struct Frame<D> {
    event: &'static str,
    data: D,
}

fn to_string<T: Serialize>(v: &T) -> String {
    // Serialising these plain structs cannot fail: every field is a string, number or raw JSON.
    serde_json::to_string(v).unwrap_or_default()
}

/// The `chat_message` frame delivered to every recipient connection, and published as is.
pub fn chat_message(
    id: &str,
    from: &str,
    to: &Recipients,
    message: &RawValue,
    sent_at: u64,
    client_message_id: Option<&str>,
) -> String {
    let to = match to {
        Recipients::One(u) => To::One(u),
        Recipients::Many(v) => To::Many(v),
        Recipients::All => To::All(()),
    };
    to_string(&Frame { event: "chat_message", data: ChatData { id, from, to, message, sent_at, client_message_id } })
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AckData<'a> {
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_message_id: Option<&'a str>,
}

pub fn ack(id: &str, client_message_id: Option<&str>) -> String {
    to_string(&Frame { event: "ack", data: AckData { id, client_message_id } })
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorData<'a> {
    code: ErrorCode,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_message_id: Option<&'a str>,
}

pub fn error(e: &WireError) -> String {
    to_string(&Frame {
        event: "error",
        data: ErrorData { code: e.code, message: &e.message, client_message_id: e.client_message_id.as_deref() },
    })
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConnectedData<'a> {
    user_id: &'a str,
    connection_id: &'a str,
    instance_id: &'a str,
    expires_at: u64,
}

pub fn connected(user_id: &str, connection_id: &str, instance_id: &str, expires_at: u64) -> String {
    to_string(&Frame { event: "connected", data: ConnectedData { user_id, connection_id, instance_id, expires_at } })
}

pub const PONG: &str = r#"{"event":"pong","data":{}}"#;

/// Namespace of the name-based (v5) ids of messages that carry a `clientMessageId`.
const MESSAGE_ID_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6f1e_9a4c_3b2d_4e8f_a1c0_5d7e_2b94_c613);

/// The envelope `id` of a message from `sender`. With a `clientMessageId` it is derived from
/// (sender, clientMessageId) — a name-based UUID (v5) — so a resend after a lost ack carries
/// the same id and the recipients' duplicate filters drop the copy; a `clientMessageId` must
/// therefore be unique per sender. Without one the id is random (v4).
pub fn message_id(sender: &str, client_message_id: Option<&str>) -> uuid::Uuid {
    match client_message_id {
        // A user id never holds a control character, so NUL separates the two unambiguously.
        Some(c) => uuid::Uuid::new_v5(&MESSAGE_ID_NAMESPACE, format!("{sender}\0{c}").as_bytes()),
        None => uuid::Uuid::new_v4(),
    }
}

/// Reads the message id from the start of a `chat_message` envelope made by [`chat_message`]
/// (`{"event":"chat_message","data":{"id":"<uuid>",…`) without parsing the rest. Payloads of
/// any other shape (for example injected with `mosquitto_pub`) give `None`: they are not
/// de-duplicated.
pub fn envelope_id(payload: &[u8]) -> Option<u128> {
    const HEAD: &[u8] = br#"{"event":"chat_message","data":{"id":""#;
    let rest = payload.strip_prefix(HEAD)?;
    let id = std::str::from_utf8(rest.get(..36)?).ok()?;
    uuid::Uuid::try_parse(id).ok().map(|u| u.as_u128())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn err(frame: &str) -> WireError {
        decode(frame, false).unwrap_err()
    }

    #[test]
    fn tutorial_frame_decodes() {
        let f = r#"{"event":"send_chat_message_to_participant","data":{"message":"test","participantId":"bob"}}"#;
        match decode(f, false).unwrap() {
            ClientEvent::Chat { to, message, client_message_id } => {
                assert_eq!(to, Recipients::One("bob".into()));
                assert_eq!(message.get(), r#""test""#);
                assert_eq!(client_message_id, None);
            }
            _ => panic!(),
        }
    }

    #[test]
    fn many_dedupes_in_first_given_order() {
        let f = r#"{"event":"send_chat_message_to_many_participants","data":{"message":{"a":[1,2]},"participantIds":["c","a","c","b","a"],"clientMessageId":"m1"}}"#;
        match decode(f, false).unwrap() {
            ClientEvent::Chat { to, message, client_message_id } => {
                assert_eq!(to, Recipients::Many(vec!["c".into(), "a".into(), "b".into()]));
                assert_eq!(message.get(), r#"{"a":[1,2]}"#);
                assert_eq!(client_message_id.as_deref(), Some("m1"));
            }
            _ => panic!(),
        }
    }

    #[test]
    fn error_codes() {
        assert_eq!(err("nope").code, ErrorCode::BadJson);
        assert_eq!(err("[1]").code, ErrorCode::BadJson);
        assert_eq!(err(r#"{"event":5}"#).code, ErrorCode::BadJson);
        assert_eq!(
            err(r#"{"event":"send_chat_message_to_participant","data":{"participantId":"b"}}"#).code,
            ErrorCode::BadJson
        );
        assert_eq!(err(r#"{"event":"send_chat_message_to_participant"}"#).code, ErrorCode::BadJson);
        assert_eq!(err(r#"{"event":"dance","data":{}}"#).code, ErrorCode::UnknownEvent);
        let e = err(r#"{"event":"dance","data":{"clientMessageId":"c9"}}"#);
        assert_eq!((e.code, e.client_message_id.as_deref()), (ErrorCode::UnknownEvent, Some("c9")));
        let e = err(r#"{"event":7,"data":{"clientMessageId":"c9"}}"#);
        assert_eq!((e.code, e.client_message_id.as_deref()), (ErrorCode::BadJson, Some("c9")));
        for id in [
            json!("#"),
            json!("+"),
            json!("a/b"),
            json!(""),
            json!("a".repeat(300)),
            json!("a\u{1}"),
            json!("a\u{ffff}"),
            json!(5),
        ] {
            let f = json!({"event":"send_chat_message_to_participant","data":{"message":"x","participantId":id,"clientMessageId":"c"}});
            let e = err(&f.to_string());
            assert_eq!(e.code, ErrorCode::InvalidParticipant, "{id}");
            assert_eq!(e.client_message_id.as_deref(), Some("c"));
        }
        let ids: Vec<String> = (0..101).map(|i| format!("u{i}")).collect();
        let f = json!({"event":"send_chat_message_to_many_participants","data":{"message":"x","participantIds":ids}});
        assert_eq!(err(&f.to_string()).code, ErrorCode::TooManyRecipients);
        let f = json!({"event":"send_chat_message_to_many_participants","data":{"message":"x","participantIds":[]}});
        assert_eq!(err(&f.to_string()).code, ErrorCode::InvalidParticipant);
        let f = r#"{"event":"send_chat_message_to_all_participants","data":{"message":"x"}}"#;
        assert_eq!(err(f).code, ErrorCode::Forbidden);
        assert!(matches!(decode(f, true).unwrap(), ClientEvent::Chat { to: Recipients::All, .. }));
    }

    #[test]
    fn lists_are_not_objects() {
        // The positional form serde derives for structs is not a frame.
        assert_eq!(err(r#"["ping"]"#).code, ErrorCode::BadJson);
        assert_eq!(
            err(r#" ["send_chat_message_to_participant",{"participantId":"b","message":1}]"#).code,
            ErrorCode::BadJson
        );
        let f = r#"{"event":"send_chat_message_to_participant","data":["b",null,"hi"]}"#;
        assert_eq!(err(f).code, ErrorCode::BadJson);
        // Whitespace before the object is fine.
        assert!(matches!(decode(" \n\t\r{\"event\":\"ping\"}", false).unwrap(), ClientEvent::Ping));
        let f = r#"{"event":"send_chat_message_to_participant","data": {"participantId":"b","message":1}}"#;
        assert!(matches!(decode(f, false).unwrap(), ClientEvent::Chat { .. }));
    }

    #[test]
    fn deep_nesting_inside_message_is_kept_verbatim() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let f = format!(
            r#"{{"event":"send_chat_message_to_participant","data":{{"participantId":"b","message":{deep}}}}}"#
        );
        match decode(&f, false).unwrap() {
            ClientEvent::Chat { message, .. } => assert_eq!(message.get(), deep),
            _ => panic!(),
        }
        assert_eq!(err(&deep).code, ErrorCode::BadJson);
    }

    #[test]
    fn client_message_id_gives_a_stable_id_per_sender() {
        let a = message_id("alice", Some("c-1"));
        assert_eq!(a, message_id("alice", Some("c-1")), "a resend must carry the same id");
        assert_eq!(a.get_version_num(), 5);
        assert_ne!(a, message_id("alice", Some("c-2")));
        assert_ne!(a, message_id("bob", Some("c-1")), "two senders may use the same clientMessageId");
        // The separator keeps (sender, id) pairs apart that would concatenate alike.
        assert_ne!(message_id("ab", Some("c")), message_id("a", Some("bc")));
        let r = message_id("alice", None);
        assert_eq!(r.get_version_num(), 4);
        assert_ne!(r, message_id("alice", None));
    }

    #[test]
    fn ping_with_or_without_data() {
        assert!(matches!(decode(r#"{"event":"ping"}"#, false).unwrap(), ClientEvent::Ping));
        assert!(matches!(decode(r#"{"event":"ping","data":{}}"#, false).unwrap(), ClientEvent::Ping));
    }

    #[test]
    fn envelope_round_trip_and_id() {
        let msg: &RawValue = serde_json::from_str(r#"{"text":"hi"}"#).unwrap();
        let id = uuid::Uuid::new_v4();
        let s = chat_message(
            &id.to_string(),
            "alice",
            &Recipients::Many(vec!["b".into(), "c".into()]),
            msg,
            17,
            Some("c-1"),
        );
        let v: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(
            v,
            json!({"event":"chat_message","data":{"id":id.to_string(),"from":"alice","to":["b","c"],"message":{"text":"hi"},"sentAt":17,"clientMessageId":"c-1"}})
        );
        assert_eq!(envelope_id(s.as_bytes()), Some(id.as_u128()));
        let s = chat_message(&id.to_string(), "alice", &Recipients::All, msg, 17, None);
        let v: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["data"]["to"], Value::Null);
        assert!(v["data"].get("clientMessageId").is_none());
        assert_eq!(envelope_id(b"{\"event\":\"chat_message\",\"data\":{\"from\":\"ops\"}}"), None);
    }
}
