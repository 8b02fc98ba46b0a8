//! What Mosquitto accepts as one topic level in a PUBLISH or SUBSCRIBE, 1-256 bytes: its
//! `mosquitto_validate_utf8` plus no `/`, `+`, `#` — an oracle independent of fanout's own
//! user-id rules, since a topic Mosquitto refuses costs the whole broker connection.

pub fn valid_topic_level(id: &str) -> bool {
    (1..=256).contains(&id.len())
        && !id.contains(['/', '+', '#'])
        && id.chars().all(|c| {
            let c = c as u32;
            !(c <= 0x1f || (0x7f..=0x9f).contains(&c) || (0xfdd0..=0xfdef).contains(&c) || c & 0xfffe == 0xfffe)
        })
}
