//! Hostile input corpus (issue 4): malformed, mistyped, oversized and deeply nested frames,
//! ids with wildcards, control characters and odd Unicode, raw WebSocket frames (binary,
//! fragmented, invalid UTF-8), and JWT attacks at the upgrade. Every case is a row in a table
//! and asserts its specified outcome exactly (error code, ack + verbatim delivery, close code,
//! 401 or the HTTP layer's refusal). After every case the connection (or, for cases that end
//! it, another one of the same user) still chats; at the end the process is alive (`/healthz`
//! 200), and the broker link never dropped (`fanout_mqtt_reconnects_total` 0, no new MQTT
//! connect in Mosquitto's log).

use std::collections::BTreeMap;

use crate::auth::unsigned_token;
use crate::support::*;
use futures_util::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

/// `--max-message-bytes` of the frame-corpus instance: large enough for 10k recipients and
/// 100k levels of nesting, so those reach the decoder instead of the size limit.
const MAX: usize = 256 * 1024;
const SEND: &str = "send_chat_message_to_participant";
const MANY: &str = "send_chat_message_to_many_participants";
const ALL: &str = "send_chat_message_to_all_participants";
const SENDER: &str = "alice";
const BOB: &str = "bob";
/// Recipients with unusual but valid ids; each holds a connection during the corpus. The last
/// is 128 × "é": 256 bytes of UTF-8, the longest valid id.
fn odd_users() -> Vec<String> {
    vec!["ünïcødé-😀".into(), "$SYS".into(), "a\u{2028}b\u{202e}\u{200d}".into(), "é".repeat(128)]
}

// ---------------------------------------------------------------------------------------------
// frame corpus
// ---------------------------------------------------------------------------------------------

enum Input {
    Text(String),
    Binary(Vec<u8>),
    /// Raw WebSocket frames, written as they are (the client only masks them).
    Frames(Vec<Frame>),
}

enum Expect {
    /// An `error` frame with this code, echoing this `clientMessageId` (or carrying none).
    Error(&'static str, Option<String>),
    Pong,
    /// An `ack` (echoing the cmid, if any); every user in `to` receives exactly one
    /// `chat_message` from the sender with that id whose `message` is byte for byte `raw`.
    Delivered {
        to: Vec<String>,
        raw: String,
        cmid: Option<String>,
    },
    /// The server closes the connection with this code.
    Close(u16),
    /// The server fails the connection (RFC 6455 §8.1, invalid UTF-8 in a text message):
    /// no reply frame, and the connection ends with close code 1007.
    Failed,
}

struct Case {
    name: String,
    input: Input,
    expect: Expect,
}

fn case(name: impl Into<String>, input: Input, expect: Expect) -> Case {
    Case { name: name.into(), input, expect }
}

fn text(s: impl Into<String>) -> Input {
    Input::Text(s.into())
}

/// A frame with `data` given as raw JSON text.
fn frame(event: &str, data_raw: &str) -> String {
    format!(r#"{{"event":{},"data":{data_raw}}}"#, json!(event))
}

/// `send_chat_message_to_participant` with `participantId` and `message` as raw JSON text.
fn to_one(pid_raw: &str, message_raw: &str, cmid: Option<&str>) -> String {
    let cm = cmid.map(|c| format!(r#","clientMessageId":{}"#, json!(c))).unwrap_or_default();
    frame(SEND, &format!(r#"{{"participantId":{pid_raw},"message":{message_raw}{cm}}}"#))
}

/// `send_chat_message_to_many_participants` with `participantIds` as raw JSON text.
fn to_many(pids_raw: &str, message_raw: &str, cmid: Option<&str>) -> String {
    let cm = cmid.map(|c| format!(r#","clientMessageId":{}"#, json!(c))).unwrap_or_default();
    frame(MANY, &format!(r#"{{"participantIds":{pids_raw},"message":{message_raw}{cm}}}"#))
}

fn js(s: &str) -> String {
    json!(s).to_string()
}

fn nested_arrays(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

fn nested_objects(depth: usize) -> String {
    format!("{}0{}", r#"{"a":"#.repeat(depth), "}".repeat(depth))
}

fn err(code: &'static str) -> Expect {
    Expect::Error(code, None)
}

fn err_c(code: &'static str, cmid: &str) -> Expect {
    Expect::Error(code, Some(cmid.to_string()))
}

fn to_bob(raw: impl Into<String>) -> Expect {
    Expect::Delivered { to: vec![BOB.to_string()], raw: raw.into(), cmid: None }
}

fn data_frame(payload: &[u8], data: Data, fin: bool) -> Frame {
    Frame::message(payload.to_vec(), OpCode::Data(data), fin)
}

/// `payload` as a text message split into continuation frames at `cuts` (byte offsets).
fn fragmented(payload: &[u8], cuts: &[usize], first: Data) -> Vec<Frame> {
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(payload.len());
    let n = bounds.len() - 1;
    (0..n)
        .map(|i| {
            let op = if i == 0 { first } else { Data::Continue };
            data_frame(&payload[bounds[i]..bounds[i + 1]], op, i == n - 1)
        })
        .collect()
}

fn frame_cases() -> Vec<Case> {
    use Expect::*;
    let ping = r#"{"event":"ping"}"#;
    let hi = js("hi");
    let cmid_256 = "c".repeat(256);
    let mut v = vec![
        // --- malformed JSON -------------------------------------------------------------------
        case("empty text frame", text(""), err("bad_json")),
        case("whitespace only", text(" \n\t\r "), err("bad_json")),
        case("not JSON", text("{not json"), err("bad_json")),
        case("plain word", text("hello"), err("bad_json")),
        case("truncated object", text(r#"{"event":"ping""#), err("bad_json")),
        case("trailing garbage", text(format!("{ping} x")), err("bad_json")),
        case("two objects in one frame", text(format!("{ping}{ping}")), err("bad_json")),
        case("byte order mark before the object", text(format!("\u{feff}{ping}")), err("bad_json")),
        case("single quotes", text("{'event':'ping'}"), err("bad_json")),
        case("trailing comma", text(r#"{"event":"ping",}"#), err("bad_json")),
        case("comment", text(r#"{"event":"ping"/* x */}"#), err("bad_json")),
        case("NaN as message", text(to_one(r#""bob""#, "NaN", None)), err("bad_json")),
        case("invalid escape in message", text(to_one(r#""bob""#, r#""\x41""#, None)), err("bad_json")),
        case("raw control character in a string", text(to_one(r#""bob""#, "\"a\u{1}b\"", None)), err("bad_json")),
        case("raw NUL after the object", text(format!("{ping}\0")), err("bad_json")),
        case("raw NUL inside the event name", text("{\"event\":\"pi\0ng\"}"), err("bad_json")),
        case("duplicate event key", text(r#"{"event":"ping","event":"ping"}"#), err("bad_json")),
        case("top-level null", text("null"), err("bad_json")),
        case("top-level number", text("42"), err("bad_json")),
        case("top-level string", text(r#""ping""#), err("bad_json")),
        case("top-level array with a ping", text(r#"["ping"]"#), err("bad_json")),
        case(
            "top-level array shaped like a chat frame",
            text(format!(r#"["{SEND}",{{"participantId":"bob","message":"x"}}]"#)),
            err("bad_json"),
        ),
        case("empty object", text("{}"), err("bad_json")),
        // --- wrong types ----------------------------------------------------------------------
        case("event null", text(r#"{"event":null}"#), err("bad_json")),
        case(
            "event number, cmid echoed",
            text(r#"{"event":7,"data":{"clientMessageId":"c-7"}}"#),
            err_c("bad_json", "c-7"),
        ),
        case("event list", text(r#"{"event":["ping"]}"#), err("bad_json")),
        case("event object", text(r#"{"event":{"name":"ping"}}"#), err("bad_json")),
        case("data a string", text(frame(SEND, r#""bob hi""#)), err("bad_json")),
        case("data a number", text(frame(SEND, "1")), err("bad_json")),
        case("data a positional list", text(frame(SEND, r#"["bob",null,"hi"]"#)), err("bad_json")),
        case("data null", text(frame(SEND, "null")), err("bad_json")),
        case("data missing", text(format!(r#"{{"event":"{SEND}"}}"#)), err("bad_json")),
        case(
            "message missing",
            text(frame(SEND, r#"{"participantId":"bob","clientMessageId":"c-nomsg"}"#)),
            err_c("bad_json", "c-nomsg"),
        ),
        case("message null", text(to_one(r#""bob""#, "null", Some("c-null"))), err_c("bad_json", "c-null")),
        case("participantId a number", text(to_one("5", &hi, Some("c-p5"))), err_c("invalid_participant", "c-p5")),
        case("participantId null", text(to_one("null", &hi, Some("c-pn"))), err_c("invalid_participant", "c-pn")),
        case("participantId an object", text(to_one(r#"{"id":"bob"}"#, &hi, None)), err("invalid_participant")),
        case("participantId a list", text(to_one(r#"["bob"]"#, &hi, None)), err("invalid_participant")),
        case("participantId true", text(to_one("true", &hi, None)), err("invalid_participant")),
        case(
            "participantid in the wrong case",
            text(frame(SEND, r#"{"participantid":"bob","message":"x"}"#)),
            err("invalid_participant"),
        ),
        case(
            "participantIds a string",
            text(to_many(r#""bob""#, &hi, Some("c-ms"))),
            err_c("invalid_participant", "c-ms"),
        ),
        case("participantIds an object", text(to_many(r#"{"0":"bob"}"#, &hi, None)), err("invalid_participant")),
        case("participantIds empty", text(to_many("[]", &hi, None)), err("invalid_participant")),
        case("participantIds [null]", text(to_many("[null]", &hi, None)), err("invalid_participant")),
        case("participantIds with a number", text(to_many(r#"["bob",5]"#, &hi, None)), err("invalid_participant")),
        case(
            "clientMessageId a number",
            text(frame(SEND, r#"{"participantId":"bob","message":1,"clientMessageId":17}"#)),
            err("bad_json"),
        ),
        case(
            "clientMessageId an object",
            text(frame(SEND, r#"{"participantId":"bob","message":1,"clientMessageId":{}}"#)),
            err("bad_json"),
        ),
        case(
            "clientMessageId null means none",
            text(frame(SEND, r#"{"participantId":"bob","message":1,"clientMessageId":null}"#)),
            to_bob("1"),
        ),
        case("event in upper case", text(r#"{"event":"PING"}"#), err("unknown_event")),
        case("event with a trailing space", text(r#"{"event":"ping "}"#), err("unknown_event")),
        case("event with an escaped NUL", text(r#"{"event":"ping\u0000"}"#), err("unknown_event")),
        case("event spelled with a unicode escape", text(r#"{"event":"\u0070ing"}"#), Pong),
        case("event of 100 KB", text(format!(r#"{{"event":"{}"}}"#, "e".repeat(100_000))), err("unknown_event")),
        case(
            "broadcast without the scope",
            text(frame(ALL, r#"{"message":"x","clientMessageId":"c-all"}"#)),
            err_c("forbidden", "c-all"),
        ),
        case(
            "client-supplied from is ignored",
            text(frame(SEND, r#"{"participantId":"bob","message":"spoof","from":"mallory","to":"eve","id":"x"}"#)),
            to_bob(r#""spoof""#),
        ),
        // --- nesting --------------------------------------------------------------------------
        case(
            "message: 10k nested lists",
            text(to_one(r#""bob""#, &nested_arrays(10_000), None)),
            to_bob(nested_arrays(10_000)),
        ),
        case(
            "message: 100k nested lists",
            text(to_one(r#""bob""#, &nested_arrays(100_000), None)),
            to_bob(nested_arrays(100_000)),
        ),
        case(
            "message: 10k nested objects",
            text(to_one(r#""bob""#, &nested_objects(10_000), None)),
            to_bob(nested_objects(10_000)),
        ),
        case("whole frame: 10k nested lists", text(nested_arrays(10_000)), err("bad_json")),
        case("event: 10k nested lists", text(format!(r#"{{"event":{}}}"#, nested_arrays(10_000))), err("bad_json")),
        case("data: 10k nested lists", text(frame(SEND, &nested_arrays(10_000))), err("bad_json")),
        case(
            "participantId: 10k nested lists",
            text(to_one(&nested_arrays(10_000), &hi, None)),
            err("invalid_participant"),
        ),
        case(
            "participantIds: 10k nested lists",
            text(to_many(&nested_arrays(10_000), &hi, None)),
            err("invalid_participant"),
        ),
        case(
            "unknown field: 10k nested lists, ping",
            text(format!(r#"{{"event":"ping","x":{}}}"#, nested_arrays(10_000))),
            Pong,
        ),
        case("unterminated 10k nested lists", text(to_one(r#""bob""#, &"[".repeat(10_000), None)), err("bad_json")),
        // --- sizes ----------------------------------------------------------------------------
        case(
            "10k distinct recipients",
            text(to_many(&ids_json(10_000, "u"), &hi, Some("c-10k"))),
            err_c("too_many_recipients", "c-10k"),
        ),
        case("101 distinct recipients", text(to_many(&ids_json(101, "u"), &hi, None)), err("too_many_recipients")),
        case(
            "100 distinct recipients",
            text(to_many(
                &json!(std::iter::once(BOB.to_string()).chain((1..100).map(|i| format!("u{i}"))).collect::<Vec<_>>())
                    .to_string(),
                r#""to 100""#,
                Some("c-100"),
            )),
            Delivered { to: vec![BOB.into()], raw: r#""to 100""#.into(), cmid: Some("c-100".into()) },
        ),
        case(
            "bob 10k times is one recipient",
            text(to_many(&json!(vec![BOB; 10_000]).to_string(), r#""once""#, None)),
            to_bob(r#""once""#),
        ),
        case(
            "clientMessageId of 256 bytes",
            text(to_one(r#""bob""#, "2", Some(&cmid_256))),
            Delivered { to: vec![BOB.into()], raw: "2".into(), cmid: Some(cmid_256.clone()) },
        ),
        case(
            "clientMessageId of 257 bytes",
            text(to_one(r#""bob""#, "2", Some(&format!("{cmid_256}x")))),
            err("bad_json"),
        ),
        // --- ids: wildcards, control characters, NUL, Unicode ----------------------------------
        case("participantId #", text(to_one(r##""#""##, &hi, Some("c-hash"))), err_c("invalid_participant", "c-hash")),
        case("participantId +", text(to_one(r#""+""#, &hi, None)), err("invalid_participant")),
        case("participantId bob/#", text(to_one(r##""bob/#""##, &hi, None)), err("invalid_participant")),
        case("participantId a/b", text(to_one(r#""a/b""#, &hi, None)), err("invalid_participant")),
        case("participantId $SYS/#", text(to_one(r##""$SYS/#""##, &hi, None)), err("invalid_participant")),
        case("participantId empty", text(to_one(r#""""#, &hi, None)), err("invalid_participant")),
        case("participantId bob + escaped NUL", text(to_one(r#""bob\u0000""#, &hi, None)), err("invalid_participant")),
        case("participantId escaped NUL only", text(to_one(r#""\u0000""#, &hi, None)), err("invalid_participant")),
        case("participantId with DEL", text(to_one(r#""a\u007fb""#, &hi, None)), err("invalid_participant")),
        case("participantId with C1 control NEL", text(to_one(r#""a\u0085b""#, &hi, None)), err("invalid_participant")),
        case("participantId with newline", text(to_one(r#""a\nb""#, &hi, None)), err("invalid_participant")),
        case("participantId with tab", text(to_one(r#""a\tb""#, &hi, None)), err("invalid_participant")),
        case(
            "participantId of 257 ASCII bytes",
            text(to_one(&js(&"x".repeat(257)), &hi, None)),
            err("invalid_participant"),
        ),
        case(
            "participantId of 258 bytes in 129 chars",
            text(to_one(&js(&"é".repeat(129)), &hi, None)),
            err("invalid_participant"),
        ),
        case("participantId a lone surrogate", text(to_one(r#""\ud800""#, &hi, None)), err("invalid_participant")),
        case(
            "participantId with noncharacter U+FFFF",
            text(to_one(r#""a\uffff""#, &hi, Some("c-ffff"))),
            err_c("invalid_participant", "c-ffff"),
        ),
        case(
            "participantId with noncharacter U+FDD0",
            text(to_one(&js("\u{fdd0}"), &hi, None)),
            err("invalid_participant"),
        ),
        case(
            "participantIds with a +",
            text(to_many(r#"["bob","+"]"#, &hi, Some("c-mp"))),
            err_c("invalid_participant", "c-mp"),
        ),
        case(
            "participantIds with escaped NUL",
            text(to_many(r#"["bob","\u0000"]"#, &hi, None)),
            err("invalid_participant"),
        ),
        // --- message contents are forwarded verbatim ------------------------------------------
        case("message empty string", text(to_one(r#""bob""#, r#""""#, None)), to_bob(r#""""#)),
        case(
            "message with escaped NUL and controls",
            text(to_one(r#""bob""#, r#""a\u0000b\u0001\u001f""#, None)),
            to_bob(r#""a\u0000b\u0001\u001f""#),
        ),
        case("message a lone surrogate escape", text(to_one(r#""bob""#, r#""\ud800""#, None)), to_bob(r#""\ud800""#)),
        case("message 1e999", text(to_one(r#""bob""#, "1e999", None)), to_bob("1e999")),
        case("message a 400-digit integer", text(to_one(r#""bob""#, &"9".repeat(400), None)), to_bob("9".repeat(400))),
        case("message false", text(to_one(r#""bob""#, "false", None)), to_bob("false")),
        case(
            "message with RTL override, ZWJ and emoji",
            text(to_one(r#""bob""#, &js("\u{202e}abc\u{200d}😀👩‍👩‍👧"), None)),
            to_bob(js("\u{202e}abc\u{200d}😀👩‍👩‍👧")),
        ),
        case(
            "message with internal whitespace",
            text(to_one(r#""bob""#, "{ \"a\" :\t[ 1 ,2 ] }", None)),
            to_bob("{ \"a\" :\t[ 1 ,2 ] }"),
        ),
    ];
    // Valid but unusual ids route to their owners.
    for (i, u) in odd_users().into_iter().enumerate() {
        let raw = format!("\"odd {i}\"");
        v.push(case(
            format!("participantId {u:?}"),
            text(to_one(&js(&u), &raw, None)),
            Delivered { to: vec![u], raw, cmid: None },
        ));
    }
    // Exactly at the size limit is accepted.
    let head = to_one(r#""bob""#, r#""""#, None);
    let fill = "y".repeat(MAX - head.len());
    let at_limit = to_one(r#""bob""#, &js(&fill), None);
    assert_eq!(at_limit.len(), MAX);
    v.push(case("frame of exactly --max-message-bytes", text(at_limit), to_bob(js(&fill))));

    // --- binary and raw frames ---------------------------------------------------------------
    let chat = to_one(r#""bob""#, r#""fragmented""#, Some("c-frag"));
    // A clientMessageId is unique per sender (the envelope id derives from it): a second
    // delivered case needs its own.
    let chat2 = to_one(r#""bob""#, r#""fragmented""#, Some("c-frag-2"));
    let unicode_chat = to_one(r#""bob""#, &js("ü😀ü"), None);
    let split_at = unicode_chat.find('😀').unwrap() + 2; // in the middle of the emoji
    v.extend([
        case("binary frame holding a valid ping", Input::Binary(ping.as_bytes().to_vec()), err("bad_json")),
        case("binary frame holding a valid chat", Input::Binary(chat.as_bytes().to_vec()), err("bad_json")),
        case("binary frame of invalid UTF-8", Input::Binary(vec![0xff, 0xfe, 0x00, 0xc0]), err("bad_json")),
        case("empty binary frame", Input::Binary(Vec::new()), err("bad_json")),
        case(
            "text message in three continuation frames",
            Input::Frames(fragmented(chat.as_bytes(), &[5, 40], Data::Text)),
            Delivered { to: vec![BOB.into()], raw: r#""fragmented""#.into(), cmid: Some("c-frag".into()) },
        ),
        case(
            "continuation split inside a 4-byte character",
            Input::Frames(fragmented(unicode_chat.as_bytes(), &[split_at], Data::Text)),
            to_bob(js("ü😀ü")),
        ),
        case(
            "ping event in one-byte fragments",
            Input::Frames(fragmented(ping.as_bytes(), &(1..ping.len()).collect::<Vec<_>>(), Data::Text)),
            Pong,
        ),
        case(
            "control ping between fragments",
            Input::Frames({
                let mut f = fragmented(chat2.as_bytes(), &[10], Data::Text);
                f.insert(1, Frame::ping(b"between".to_vec()));
                f
            }),
            Delivered { to: vec![BOB.into()], raw: r#""fragmented""#.into(), cmid: Some("c-frag-2".into()) },
        ),
        case(
            "fragmented binary message",
            Input::Frames(fragmented(ping.as_bytes(), &[4], Data::Binary)),
            err("bad_json"),
        ),
        // --- cases that end the connection (each on a fresh connection of the sender) ---------
        case(
            "text frame of invalid UTF-8",
            Input::Frames(vec![data_frame(b"{\"event\":\"\xff\"}", Data::Text, true)]),
            Failed,
        ),
        case(
            "overlong UTF-8 encoding of /",
            Input::Frames(vec![data_frame(b"{\"event\":\"\xc0\xaf\"}", Data::Text, true)]),
            Failed,
        ),
        case(
            "UTF-8 encoded surrogate",
            Input::Frames(vec![data_frame(b"{\"event\":\"\xed\xa0\x80\"}", Data::Text, true)]),
            Failed,
        ),
        case(
            "truncated UTF-8 at the end of a text message",
            Input::Frames(vec![data_frame(b"{\"event\":\"\xf0\x9f", Data::Text, true)]),
            Failed,
        ),
        case(
            "invalid UTF-8 in a continuation frame",
            Input::Frames(vec![
                data_frame(b"{\"event\":", Data::Text, false),
                data_frame(b"\"\xfe\"}", Data::Continue, true),
            ]),
            Failed,
        ),
        case(
            "text frame one byte over the limit",
            text(to_one(r#""bob""#, &js(&format!("{fill}y")), None)),
            Close(1009),
        ),
        case("binary frame over the limit", Input::Binary(vec![b'x'; MAX + 1]), Close(1009)),
        case(
            "fragments that add up to more than the limit",
            Input::Frames(fragmented(&vec![b' '; MAX + 1], &[MAX / 2], Data::Text)),
            Close(1009),
        ),
    ]);
    v
}

fn ids_json(n: usize, prefix: &str) -> String {
    json!((0..n).map(|i| format!("{prefix}{i}")).collect::<Vec<_>>()).to_string()
}

async fn send_input(c: &mut Client, input: &Input) {
    match input {
        Input::Text(t) => c.send(Message::text(t.clone())).await,
        Input::Binary(b) => c.send(Message::binary(b.clone())).await,
        Input::Frames(fs) => {
            for f in fs {
                c.send(Message::Frame(f.clone())).await;
            }
        }
    }
}

/// How a connection ended.
#[derive(Debug, PartialEq)]
enum Ending {
    Close(u16),
    /// The stream ended (or errored) without a close frame.
    Dropped,
}

/// Waits for the server to end the connection; panics on a data frame or after 5 s.
async fn wait_end(c: &mut Client, what: &str) -> Ending {
    loop {
        match tokio::time::timeout(RECV_TIMEOUT, c.ws.next()).await {
            Err(_) => panic!("{what}: the connection is still open after {RECV_TIMEOUT:?}"),
            Ok(None) | Ok(Some(Err(_))) => return Ending::Dropped,
            Ok(Some(Ok(Message::Close(f)))) => return Ending::Close(f.map_or(1005, |f| u16::from(f.code))),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)))) => continue,
            Ok(Some(Ok(m))) => panic!("{what}: expected the connection to end, got {m:?}"),
        }
    }
}

/// Next reply frame as text; error and pong replies are small and parse as JSON.
async fn reply(c: &mut Client, what: &str) -> Value {
    let t = match c.recv_timeout(RECV_TIMEOUT).await {
        Some(Message::Text(t)) => t.to_string(),
        other => panic!("{what}: expected a text reply, got {other:?}"),
    };
    assert!(t.len() < 1024, "{what}: a reply must not echo the input back ({} bytes): {:.200}", t.len(), t);
    serde_json::from_str(&t).unwrap_or_else(|e| panic!("{what}: reply is not JSON ({e}): {t}"))
}

/// Reads one `chat_message` for `user` and checks id, sender and the verbatim message. The
/// envelope is not parsed as a whole (a 100k-deep message exceeds serde_json's recursion limit).
async fn expect_delivery(c: &mut Client, user: &str, id: &str, raw: &str, what: &str) {
    let t = match c.recv_timeout(RECV_TIMEOUT).await {
        Some(Message::Text(t)) => t.to_string(),
        other => panic!("{what}: {user:?} expected a chat_message, got {other:?}"),
    };
    let head = format!(r#"{{"event":"chat_message","data":{{"id":"{id}","from":"{SENDER}","to":"#);
    assert!(t.starts_with(&head), "{what}: {user:?} got {:.300}", t);
    assert!(t.contains(&format!(r#","message":{raw},"sentAt":"#)), "{what}: message not verbatim: {:.300}", t);
}

async fn ping_pong(c: &mut Client, what: &str) {
    c.emit("ping", json!({})).await;
    let v = reply(c, what).await;
    assert_eq!(v, json!({"event":"pong","data":{}}), "{what}: the next frame after the case must be the pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_corpus_gets_specified_answers() {
    let m = Mosquitto::start();
    let inst = Instance::start(
        InstanceOpts::broker(&m)
            .arg("--max-message-bytes")
            .arg(MAX.to_string())
            .arg("--rate-limit")
            .arg("10000")
            .arg("--rate-burst")
            .arg("10000"),
    )
    .await;
    let cid = inst.client_id();
    let mut alice = inst.connect(SENDER).await;
    let mut recipients: BTreeMap<String, Client> = BTreeMap::new();
    for u in std::iter::once(BOB.to_string()).chain(odd_users()) {
        let c = inst.connect(&u).await;
        assert_eq!(c.connected["userId"], json!(u));
        recipients.insert(u, c);
    }
    let connects_before = m.connect_count(&cid);
    assert_eq!(connects_before, 2, "one clean connect at start, then the persistent session");

    let cases = frame_cases();
    assert!(cases.len() >= 50, "corpus has only {} cases", cases.len());
    let mut errors: BTreeMap<&str, usize> = BTreeMap::new();
    let mut failed_codes = Vec::new();
    for c in &cases {
        let what = c.name.as_str();
        match &c.expect {
            Expect::Close(_) | Expect::Failed => {
                let mut victim = inst.connect(SENDER).await;
                send_input(&mut victim, &c.input).await;
                let end = wait_end(&mut victim, what).await;
                match &c.expect {
                    Expect::Close(code) => assert_eq!(end, Ending::Close(*code), "{what}"),
                    _ => {
                        assert_eq!(end, Ending::Close(1007), "{what}: invalid UTF-8 must close with 1007");
                        failed_codes.push(end);
                    }
                }
                // The sender's other connection is unaffected.
                ping_pong(&mut alice, what).await;
                continue;
            }
            _ => {}
        }
        send_input(&mut alice, &c.input).await;
        match &c.expect {
            Expect::Error(code, cmid) => {
                let v = reply(&mut alice, what).await;
                assert_eq!(v["event"], json!("error"), "{what}: {v}");
                assert_eq!(v["data"]["code"], json!(code), "{what}: {v}");
                assert!(v["data"]["message"].as_str().is_some_and(|s| !s.is_empty()), "{what}: no human message: {v}");
                assert_eq!(v["data"].get("clientMessageId").and_then(Value::as_str), cmid.as_deref(), "{what}: {v}");
                *errors.entry(code).or_default() += 1;
            }
            Expect::Pong => {
                let v = reply(&mut alice, what).await;
                assert_eq!(v, json!({"event":"pong","data":{}}), "{what}");
            }
            Expect::Delivered { to, raw, cmid } => {
                let v = reply(&mut alice, what).await;
                assert_eq!(v["event"], json!("ack"), "{what}: {v}");
                assert_eq!(v["data"].get("clientMessageId").and_then(Value::as_str), cmid.as_deref(), "{what}: {v}");
                let id = v["data"]["id"].as_str().unwrap_or_else(|| panic!("{what}: ack without id: {v}"));
                for u in to {
                    let r = recipients.get_mut(u.as_str()).unwrap();
                    expect_delivery(r, u, id, raw, what).await;
                }
            }
            Expect::Close(_) | Expect::Failed => unreachable!(),
        }
        ping_pong(&mut alice, what).await;
    }

    // Nothing of the rejected input reached anyone: each recipient's next frame is its pong.
    for (u, c) in recipients.iter_mut() {
        ping_pong(c, &format!("recipient {u:?} after the corpus")).await;
    }
    // A chat round trip still works both ways.
    let ack = alice.chat_acked(BOB, json!("after the corpus"), "c-end").await;
    let bob = recipients.get_mut(BOB).unwrap();
    assert_eq!(bob.expect_event("chat_message").await["id"], ack["id"]);
    bob.chat_acked(SENDER, json!("back"), "c-back").await;
    assert_eq!(alice.expect_event("chat_message").await["message"], json!("back"));

    // Every error frame was counted, by code.
    let metrics = inst.metrics().await;
    for (code, n) in &errors {
        let series = format!("fanout_client_errors_total{{code=\"{code}\"}}");
        assert_eq!(parse_metric(&metrics, &series), Some(*n as f64), "{series}");
    }
    // Alive, and the broker link never dropped.
    assert_eq!(get(inst.port, "/healthz").await.expect("GET /healthz").status, 200);
    assert_eq!(parse_metric(&metrics, "fanout_mqtt_reconnects_total"), Some(0.0), "broker reconnects");
    assert_eq!(parse_metric(&metrics, "fanout_mqtt_connected"), Some(1.0));
    assert_eq!(m.connect_count(&cid), connects_before, "{cid} reconnected to the broker");
    eprintln!("frame corpus: {} cases, errors by code {errors:?}, invalid UTF-8 endings {failed_codes:?}", cases.len());
}

// ---------------------------------------------------------------------------------------------
// token corpus
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Debug)]
enum Verifying {
    /// `--jwt-secret SECRET` (HS256).
    Secret,
    /// `--jwt-public-key tests/fixtures/rsa_public.pem` (RS256).
    PublicKey,
}

#[derive(Clone, Copy, Debug)]
enum Place {
    /// Subprotocol, `bearer, <token>` subprotocol, `?token=` and `Authorization: Bearer`,
    /// each in its own request.
    Everywhere,
    Subprotocol,
    BearerSubprotocol,
    Query,
    Header,
}

#[derive(Debug)]
enum Outcome {
    Unauthorized,
    /// Accepted: `connected` for this user id, then a ping round trip.
    Accepted(&'static str),
    /// Refused by the HTTP layer with this status before fanout sees the request.
    Refused(u16),
}

struct TokenCase {
    name: &'static str,
    on: Verifying,
    token: String,
    place: Place,
    expect: Outcome,
}

fn fixture(name: &str) -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn b64(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// A token with a hand-written header and payload, signed with `key` as `alg` (whatever the
/// header says).
fn raw_token(header: &str, payload: &str, key: &EncodingKey, alg: Algorithm) -> String {
    let msg = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let sig = jsonwebtoken::crypto::sign(msg.as_bytes(), key, alg).expect("sign");
    format!("{msg}.{sig}")
}

fn token_cases() -> Vec<TokenCase> {
    use Outcome::*;
    use Place::*;
    use Verifying::*;
    let now = now_secs();
    let ok = |sub: &str| json!({"sub": sub, "iat": now, "exp": now + 3600});
    let ok_payload = ok("mallory").to_string();
    let hs = |secret: &[u8], alg: Algorithm, claims: &Value| {
        jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), claims, &EncodingKey::from_secret(secret).unwrap())
            .unwrap()
    };
    let secret = EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
    let rsa = EncodingKey::from_rsa_pem(&fixture("rsa_private.pem")).expect("rsa_private.pem");
    let attacker = EncodingKey::from_rsa_pem(&fixture("rsa_attacker_private.pem")).expect("rsa_attacker_private.pem");
    let pem = fixture("rsa_public.pem");
    let rs = |key: &EncodingKey, alg: Algorithm, claims: &Value| {
        jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), claims, key).unwrap()
    };
    // HMAC with an empty key equals HMAC with one zero byte (keys are zero-padded): the
    // "kid points at /dev/null" attack.
    let empty_key = EncodingKey::from_secret(&[0]).unwrap();
    let with_kid = |kid: &str, key: &EncodingKey| {
        raw_token(&json!({"alg":"HS256","typ":"JWT","kid":kid}).to_string(), &ok_payload, key, Algorithm::HS256)
    };
    let valid = hs(SECRET.as_bytes(), Algorithm::HS256, &ok("mallory"));
    let (vh, vp, _) = {
        let p: Vec<&str> = valid.split('.').collect();
        (p[0].to_string(), p[1].to_string(), p[2].to_string())
    };
    let big = |n: usize| {
        hs(SECRET.as_bytes(), Algorithm::HS256, &json!({"sub":"mallory","exp":now+3600,"pad":"p".repeat(n)}))
    };
    let t100k = big(75_000);
    assert!((100_000..101_000).contains(&t100k.len()), "{}", t100k.len());
    let t50k = big(37_000);
    assert!((49_000..51_000).contains(&t50k.len()), "{}", t50k.len());
    let c = |name, on, token: String, place, expect| TokenCase { name, on, token, place, expect };
    vec![
        // --- algorithm attacks ---------------------------------------------------------------
        c("alg none", Secret, unsigned_token(&ok("mallory")), Everywhere, Unauthorized),
        c(
            "alg None",
            Secret,
            format!("{}.{}.", b64(br#"{"alg":"None","typ":"JWT"}"#), b64(ok_payload.as_bytes())),
            Everywhere,
            Unauthorized,
        ),
        c(
            "alg nOnE",
            Secret,
            format!("{}.{}.", b64(br#"{"alg":"nOnE"}"#), b64(ok_payload.as_bytes())),
            Everywhere,
            Unauthorized,
        ),
        c(
            "alg none with a valid HS256 signature attached",
            Secret,
            {
                let msg = format!("{}.{}", b64(br#"{"alg":"none"}"#), b64(ok_payload.as_bytes()));
                let sig = jsonwebtoken::crypto::sign(msg.as_bytes(), &secret, Algorithm::HS256).unwrap();
                format!("{msg}.{sig}")
            },
            Everywhere,
            Unauthorized,
        ),
        c(
            "no alg in the header",
            Secret,
            raw_token(r#"{"typ":"JWT"}"#, &ok_payload, &secret, Algorithm::HS256),
            Everywhere,
            Unauthorized,
        ),
        c(
            "alg HS384 with the right secret",
            Secret,
            hs(SECRET.as_bytes(), Algorithm::HS384, &ok("mallory")),
            Everywhere,
            Unauthorized,
        ),
        c(
            "alg HS512 with the right secret",
            Secret,
            hs(SECRET.as_bytes(), Algorithm::HS512, &ok("mallory")),
            Subprotocol,
            Unauthorized,
        ),
        c(
            "header says RS256, HMAC signature",
            Secret,
            raw_token(r#"{"alg":"RS256"}"#, &ok_payload, &secret, Algorithm::HS256),
            Everywhere,
            Unauthorized,
        ),
        c(
            "RS256 token on an HS256 instance",
            Secret,
            rs(&rsa, Algorithm::RS256, &ok("mallory")),
            Everywhere,
            Unauthorized,
        ),
        // --- HS/RS confusion (public-key instance) -------------------------------------------
        c(
            "valid RS256 (positive control)",
            PublicKey,
            rs(&rsa, Algorithm::RS256, &ok("rsa-user")),
            Subprotocol,
            Accepted("rsa-user"),
        ),
        c(
            "valid RS256 in the query",
            PublicKey,
            rs(&rsa, Algorithm::RS256, &ok("rsa-user")),
            Query,
            Accepted("rsa-user"),
        ),
        c(
            "HS256 signed with the public key PEM",
            PublicKey,
            hs(&pem, Algorithm::HS256, &ok("mallory")),
            Everywhere,
            Unauthorized,
        ),
        c(
            "HS256 signed with the PEM without its last newline",
            PublicKey,
            hs(pem.strip_suffix(b"\n").unwrap_or(&pem), Algorithm::HS256, &ok("mallory")),
            Everywhere,
            Unauthorized,
        ),
        c(
            "header says RS256, HMAC with the PEM as secret",
            PublicKey,
            raw_token(r#"{"alg":"RS256"}"#, &ok_payload, &EncodingKey::from_secret(&pem).unwrap(), Algorithm::HS256),
            Everywhere,
            Unauthorized,
        ),
        c("alg none on the public-key instance", PublicKey, unsigned_token(&ok("mallory")), Everywhere, Unauthorized),
        c(
            "RS256 signed with another key",
            PublicKey,
            rs(&attacker, Algorithm::RS256, &ok("mallory")),
            Everywhere,
            Unauthorized,
        ),
        c("PS256 with the right key", PublicKey, rs(&rsa, Algorithm::PS256, &ok("mallory")), Subprotocol, Unauthorized),
        c("RS512 with the right key", PublicKey, rs(&rsa, Algorithm::RS512, &ok("mallory")), Subprotocol, Unauthorized),
        c(
            "HS256 with the other instance's secret",
            PublicKey,
            hs(SECRET.as_bytes(), Algorithm::HS256, &ok("mallory")),
            Subprotocol,
            Unauthorized,
        ),
        c(
            "expired RS256",
            PublicKey,
            rs(&rsa, Algorithm::RS256, &json!({"sub":"rsa-user","exp":now - 60})),
            Subprotocol,
            Unauthorized,
        ),
        // --- kid and other header tricks ------------------------------------------------------
        c(
            "kid path traversal, empty-key signature",
            Secret,
            with_kid("../../../../../../dev/null", &empty_key),
            Everywhere,
            Unauthorized,
        ),
        c(
            "kid SQL injection, signed with the injected key",
            Secret,
            with_kid("x' UNION SELECT 'key' --", &EncodingKey::from_secret(b"key").unwrap()),
            Everywhere,
            Unauthorized,
        ),
        c(
            "kid path traversal is ignored: right secret accepted",
            Secret,
            with_kid("../../../../etc/passwd", &secret),
            Subprotocol,
            Accepted("mallory"),
        ),
        c(
            "kid SQL injection is ignored: right secret accepted",
            Secret,
            with_kid("1' OR '1'='1", &secret),
            Header,
            Accepted("mallory"),
        ),
        c(
            "jku to an attacker's key set",
            Secret,
            raw_token(
                r#"{"alg":"HS256","jku":"http://127.0.0.1:1/jwks.json"}"#,
                &ok_payload,
                &empty_key,
                Algorithm::HS256,
            ),
            Everywhere,
            Unauthorized,
        ),
        c(
            "embedded jwk with the attacker's oct key",
            Secret,
            raw_token(
                &json!({"alg":"HS256","jwk":{"kty":"oct","k":b64(b"attacker")}}).to_string(),
                &ok_payload,
                &EncodingKey::from_secret(b"attacker").unwrap(),
                Algorithm::HS256,
            ),
            Everywhere,
            Unauthorized,
        ),
        c(
            "header with 2000 nested lists, wrong secret",
            Secret,
            raw_token(
                &format!(r#"{{"alg":"HS256","x":{}}}"#, nested_arrays(2000)),
                &ok_payload,
                &empty_key,
                Algorithm::HS256,
            ),
            Subprotocol,
            Unauthorized,
        ),
        // --- claims ---------------------------------------------------------------------------
        c(
            "expired a minute ago",
            Secret,
            hs(SECRET.as_bytes(), Algorithm::HS256, &json!({"sub":"mallory","exp":now - 60})),
            Everywhere,
            Unauthorized,
        ),
        c(
            "expired just past the 5 s leeway",
            Secret,
            hs(SECRET.as_bytes(), Algorithm::HS256, &json!({"sub":"mallory","exp":now - 7})),
            Subprotocol,
            Unauthorized,
        ),
        c(
            "expired 2 s ago (exp gets no leeway: it would be closed with 4001 at once)",
            Secret,
            hs(SECRET.as_bytes(), Algorithm::HS256, &json!({"sub":"mallory","exp":now - 2})),
            Subprotocol,
            Unauthorized,
        ),
        c(
            "nbf two minutes ahead",
            Secret,
            hs(SECRET.as_bytes(), Algorithm::HS256, &json!({"sub":"mallory","nbf":now + 120,"exp":now + 3600})),
            Everywhere,
            Unauthorized,
        ),
        c(
            "nbf within the leeway",
            Secret,
            hs(SECRET.as_bytes(), Algorithm::HS256, &json!({"sub":"nbf-user","nbf":now + 2,"exp":now + 3600})),
            Subprotocol,
            Accepted("nbf-user"),
        ),
        c(
            "exp a string",
            Secret,
            hs(SECRET.as_bytes(), Algorithm::HS256, &json!({"sub":"mallory","exp":(now + 3600).to_string()})),
            Subprotocol,
            Unauthorized,
        ),
        c(
            "exp negative",
            Secret,
            hs(SECRET.as_bytes(), Algorithm::HS256, &json!({"sub":"mallory","exp":-1})),
            Subprotocol,
            Unauthorized,
        ),
        c(
            "exp null",
            Secret,
            hs(SECRET.as_bytes(), Algorithm::HS256, &json!({"sub":"mallory","exp":null})),
            Subprotocol,
            Unauthorized,
        ),
        c(
            "exp u64::MAX",
            Secret,
            hs(SECRET.as_bytes(), Algorithm::HS256, &json!({"sub":"far-future","exp":u64::MAX})),
            Subprotocol,
            Accepted("far-future"),
        ),
        c(
            "exp 1e19 as a float",
            Secret,
            raw_token(r#"{"alg":"HS256"}"#, r#"{"sub":"far-float","exp":1e19}"#, &secret, Algorithm::HS256),
            Subprotocol,
            Accepted("far-float"),
        ),
        c("sub #", Secret, hs(SECRET.as_bytes(), Algorithm::HS256, &ok("#")), Everywhere, Unauthorized),
        c("sub with a NUL", Secret, hs(SECRET.as_bytes(), Algorithm::HS256, &ok("a\0b")), Subprotocol, Unauthorized),
        c(
            "sub with noncharacter U+FFFF",
            Secret,
            hs(SECRET.as_bytes(), Algorithm::HS256, &ok("a\u{ffff}")),
            Subprotocol,
            Unauthorized,
        ),
        c(
            "sub a list",
            Secret,
            hs(SECRET.as_bytes(), Algorithm::HS256, &json!({"sub":["alice"],"exp":now + 3600})),
            Subprotocol,
            Unauthorized,
        ),
        c(
            "sub in Unicode",
            Secret,
            hs(SECRET.as_bytes(), Algorithm::HS256, &ok("ünïcødé-😀")),
            Subprotocol,
            Accepted("ünïcødé-😀"),
        ),
        c(
            "duplicate sub claim",
            Secret,
            raw_token(
                r#"{"alg":"HS256"}"#,
                &format!(r#"{{"sub":"alice","sub":"admin","exp":{}}}"#, now + 3600),
                &secret,
                Algorithm::HS256,
            ),
            Subprotocol,
            Unauthorized,
        ),
        // --- structure ------------------------------------------------------------------------
        c(
            "payload swapped, signature kept",
            Secret,
            format!("{vh}.{}.{}", b64(ok("admin").to_string().as_bytes()), valid.rsplit('.').next().unwrap()),
            Everywhere,
            Unauthorized,
        ),
        c("signature stripped", Secret, format!("{vh}.{vp}."), Everywhere, Unauthorized),
        c("four parts", Secret, format!("{valid}.x"), Subprotocol, Unauthorized),
        c("two parts", Secret, format!("{vh}.{vp}"), Query, Unauthorized),
        c("not base64", Secret, "!!!.@@@.###".into(), Query, Unauthorized),
        c("header not JSON", Secret, format!("{}.{vp}.AAAA", b64(b"alg=HS256")), Subprotocol, Unauthorized),
        // --- size -----------------------------------------------------------------------------
        c("9 KB token, valid signature", Secret, big(9_000), Everywhere, Unauthorized),
        // Request heads are capped at 32 KiB (tokens are at most 8 KiB): hyper answers 431
        // before fanout reads them.
        c("50 KB token in the query", Secret, t50k, Query, Refused(431)),
        c("100 KB token in the query", Secret, t100k.clone(), Query, Refused(431)),
        c("100 KB token in Authorization", Secret, t100k.clone(), Header, Refused(431)),
        c("100 KB token as the subprotocol", Secret, t100k.clone(), Subprotocol, Refused(431)),
        c("100 KB token after bearer in the subprotocol", Secret, t100k, BearerSubprotocol, Refused(431)),
    ]
}

async fn attempt(inst: &Instance, token: &str, place: Place) -> HttpResponse {
    match place {
        Place::Subprotocol => upgrade_attempt(inst.port, "/entrypoint", &[("Sec-WebSocket-Protocol", token)]).await,
        Place::BearerSubprotocol => {
            upgrade_attempt(inst.port, "/entrypoint", &[("Sec-WebSocket-Protocol", &format!("bearer, {token}"))]).await
        }
        Place::Query => upgrade_attempt(inst.port, &format!("/entrypoint?token={token}"), &[]).await,
        Place::Header => {
            upgrade_attempt(inst.port, "/entrypoint", &[("Authorization", &format!("Bearer {token}"))]).await
        }
        Place::Everywhere => unreachable!(),
    }
}

fn places(p: Place) -> Vec<Place> {
    match p {
        Place::Everywhere => vec![Place::Subprotocol, Place::BearerSubprotocol, Place::Query, Place::Header],
        p => vec![p],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_corpus_gets_401_or_is_accepted_as_specified() {
    let m = Mosquitto::start();
    let pem_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rsa_public.pem");
    let hs_inst = Instance::start(InstanceOpts::broker(&m)).await;
    let rs_inst =
        Instance::start(InstanceOpts::broker(&m).arg("--jwt-public-key").arg(pem_path.display().to_string())).await;
    let connects_before = (m.connect_count(&hs_inst.client_id()), m.connect_count(&rs_inst.client_id()));

    let cases = token_cases();
    assert!(cases.len() >= 50, "token corpus has only {} cases", cases.len());
    let mut refusals = [0usize; 2];
    for c in &cases {
        let inst = if c.on == Verifying::Secret { &hs_inst } else { &rs_inst };
        for place in places(c.place) {
            let what = format!("{} ({place:?}, {:?} instance, {} byte token)", c.name, c.on, c.token.len());
            match &c.expect {
                Outcome::Unauthorized => {
                    let r = attempt(inst, &c.token, place).await;
                    assert_eq!(r.status, 401, "{what}: {} {:?} {}", r.status, r.headers, r.body);
                    assert!(r.header("sec-websocket-accept").is_none(), "{what}: upgraded");
                    let v: Value =
                        serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{what}: body ({e}): {}", r.body));
                    assert_eq!(v["error"], json!("unauthorized"), "{what}: {v}");
                    assert!(v["message"].as_str().is_some_and(|s| !s.is_empty()), "{what}: {v}");
                    refusals[(c.on == Verifying::PublicKey) as usize] += 1;
                }
                Outcome::Refused(status) => {
                    let r = attempt(inst, &c.token, place).await;
                    assert_eq!(r.status, *status, "{what}: {} {:?} {}", r.status, r.headers, r.body);
                    assert!(r.header("sec-websocket-accept").is_none(), "{what}: upgraded");
                }
                Outcome::Accepted(user) => {
                    let auth = match place {
                        Place::Subprotocol => Auth::Subprotocol(&c.token),
                        Place::BearerSubprotocol => Auth::BearerSubprotocol(&c.token),
                        Place::Query => Auth::Query(&c.token),
                        Place::Header => Auth::Header(&c.token),
                        Place::Everywhere => unreachable!(),
                    };
                    let mut client = Client::connect_ok(inst, auth).await;
                    assert_eq!(client.connected["userId"], json!(user), "{what}: {}", client.connected);
                    ping_pong(&mut client, &what).await;
                    client.close().await;
                }
            }
        }
    }

    // A header block beyond the 32 KiB head limit never reaches fanout: 431, no upgrade.
    let status = oversized_header_attempt(hs_inst.port, 1_000_000).await;
    assert!(matches!(status, None | Some(431)), "1 MB Authorization header: status {status:?}");

    // Only the refusals that reached fanout were counted (414 and 431 are hyper's).
    for (inst, n) in [(&hs_inst, refusals[0]), (&rs_inst, refusals[1])] {
        assert_eq!(inst.metric("fanout_auth_failures_total").await, Some(n as f64), "{}", inst.id);
        assert_eq!(get(inst.port, "/healthz").await.expect("GET /healthz").status, 200);
        assert_eq!(inst.metric("fanout_mqtt_reconnects_total").await, Some(0.0), "{}: broker reconnects", inst.id);
        // Still serving: a normal user chats with itself.
        let mut c = if inst.id == hs_inst.id {
            inst.connect("carol").await
        } else {
            Client::connect_ok(
                inst,
                Auth::Subprotocol(&rs(&EncodingKey::from_rsa_pem(&fixture("rsa_private.pem")).unwrap(), "carol")),
            )
            .await
        };
        c.chat_acked("carol", json!("self"), "c-self").await;
        assert_eq!(c.expect_event("chat_message").await["message"], json!("self"));
    }
    assert_eq!(
        (m.connect_count(&hs_inst.client_id()), m.connect_count(&rs_inst.client_id())),
        connects_before,
        "an instance reconnected to the broker"
    );
    eprintln!("token corpus: {} cases, 401s {refusals:?}, 1 MB header: {status:?}", cases.len());
}

/// An upgrade request with an `Authorization` header of `size` bytes. Returns the status of
/// the response, or `None` when the server reset the connection instead (it may do so while
/// the rest of the request is still unread); panics on a 101 or when no answer comes in 5 s.
async fn oversized_header_attempt(port: u16, size: usize) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    let req = format!(
        "GET /entrypoint HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Authorization: Bearer {}\r\n\r\n",
        "a".repeat(size)
    );
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(RECV_TIMEOUT, async {
        let _ = s.write_all(req.as_bytes()).await; // may fail once the server gave up
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("no answer to an oversized header within 5 s");
    let text = String::from_utf8_lossy(&head);
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok());
    assert_ne!(status, Some(101), "upgraded despite a {size}-byte header: {text}");
    status
}

fn rs(key: &EncodingKey, sub: &str) -> String {
    let now = now_secs();
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), &json!({"sub": sub, "iat": now, "exp": now + 3600}), key)
        .unwrap()
}
