//! What must hold for every input of `wire::decode` (with both values of `may_broadcast`) and
//! `wire::envelope_id`: a decoded chat has 1..=100 recipients that are each one valid topic
//! level, and a `message` that is not `null`; anything decoded is a JSON object, and a chat's
//! `data` is one too; the envelope built from it holds the message verbatim and its id reads
//! back; every error has a non-empty message, and an echoed `clientMessageId` is at most 256
//! bytes. Shared by the fuzz target and the seed replay in `cargo test`.

use fanout::wire::{self, ClientEvent, Recipients, MAX_CLIENT_MESSAGE_ID, MAX_RECIPIENTS};

use super::topic::valid_topic_level;

pub fn check(data: &[u8]) {
    let _ = wire::envelope_id(data);
    let Ok(frame) = std::str::from_utf8(data) else { return };
    // The frame as a generic JSON value, when serde_json can hold it (depth <= 128).
    let value: Option<serde_json::Value> = serde_json::from_str(frame).ok();
    for may_broadcast in [false, true] {
        let decoded = wire::decode(frame, may_broadcast);
        if let (Ok(_), Some(v)) = (&decoded, &value) {
            assert!(v.is_object(), "a frame that is not a JSON object decoded");
        }
        match decoded {
            Ok(ClientEvent::Ping) => {}
            Ok(ClientEvent::Chat { to, message, client_message_id }) => {
                if let Some(v) = &value {
                    assert!(v["data"].is_object(), "a chat whose data is not a JSON object decoded");
                }
                match &to {
                    Recipients::One(u) => assert!(valid_topic_level(u), "bad recipient {u:?}"),
                    Recipients::Many(v) => {
                        assert!(!v.is_empty() && v.len() <= MAX_RECIPIENTS, "{} recipients", v.len());
                        for u in v {
                            assert!(valid_topic_level(u), "bad recipient {u:?}");
                        }
                    }
                    Recipients::All => assert!(may_broadcast, "broadcast without the scope"),
                }
                assert_ne!(message.get(), "null");
                if let Some(c) = &client_message_id {
                    assert!(c.len() <= MAX_CLIENT_MESSAGE_ID);
                }
                // The envelope built from it is one JSON text with the message verbatim.
                let env = wire::chat_message("00000000-0000-4000-8000-000000000000", "me", &to, message, 1, None);
                assert!(env.contains(message.get()));
                assert!(wire::envelope_id(env.as_bytes()).is_some());
            }
            Err(e) => {
                assert!(!e.message.is_empty());
                if let Some(c) = &e.client_message_id {
                    assert!(c.len() <= MAX_CLIENT_MESSAGE_ID);
                }
                let _ = wire::error(&e);
            }
        }
    }
}
