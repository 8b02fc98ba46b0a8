//! What a `--smoke` run must show for the tool (and the service) to count as working. Counts
//! only, never timings: every message of every step received exactly once and acknowledged,
//! no error frames, no connection lost or refused, nothing left subscribed that should not be.

use crate::report::{Report, Section, StepReport};

/// Every failed check, as a sentence.
pub fn failures(report: &Report, expected: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let mut check = |cond: bool, what: String| {
        if !cond {
            out.push(what);
        }
    };
    let mut names: Vec<&str> = expected.to_vec();
    names.dedup();
    for name in names {
        let want = expected.iter().filter(|e| **e == name).count();
        let got = report.scenarios.iter().filter(|s| s.name() == name).count();
        check(got == want, format!("{name}: {got} of {want} reports (a run did not happen or failed; see above)"));
    }
    for f in &report.failures {
        check(false, format!("{}: {}", f.scenario, f.error));
    }
    for s in &report.scenarios {
        let name = s.name();
        match s {
            Section::Direct(sw) | Section::BrokerFloor(sw) | Section::NoTier(sw) => {
                check(!sw.steps.is_empty(), format!("{name}: no steps"));
                for st in &sw.steps {
                    step(&mut check, name, st, st.sent);
                }
            }
            Section::RestartStorm(r) => {
                check(!r.rows.is_empty(), format!("{name}: no runs"));
                for row in &r.rows {
                    check(
                        row.delivered_ms.is_some(),
                        format!("{name}: {} users: no message after the storm", row.users),
                    );
                }
            }
            Section::SubScale(sc) => {
                check(!sc.engines.is_empty(), format!("{name}: no engines"));
                for e in &sc.engines {
                    check(!e.rows.is_empty(), format!("{name} ({}): no rows", e.engine));
                    check(
                        e.stopped.is_none(),
                        format!("{name} ({}): {}", e.engine, e.stopped.as_deref().unwrap_or("")),
                    );
                    for r in &e.rows {
                        let at = format!("{name} ({}) S={}", e.engine, r.target_subscriptions);
                        check(
                            r.complete && r.added_confirmed == r.added && r.added_refused == 0,
                            format!(
                                "{at}: {} of {} synthetic subscriptions confirmed, {} refused",
                                r.added_confirmed, r.added, r.added_refused
                            ),
                        );
                        check(
                            r.subscriptions == r.target_subscriptions as u64,
                            format!("{at}: the broker holds {} user subscriptions", r.subscriptions),
                        );
                        step(&mut check, &at, &r.chat, r.chat.sent);
                    }
                }
            }
            Section::IdleMemory(m) => {
                check(
                    m.connected == m.connections as f64,
                    format!("{name} ({:?}): {} connections held of {}", m.side, m.connected, m.connections),
                );
            }
            Section::Idle(i) => {
                let n = i.connections as f64;
                check(
                    i.instance_connections_metric == n,
                    format!(
                        "idle: instance reported {} connections while {n} were open",
                        i.instance_connections_metric
                    ),
                );
                check(
                    i.instance_connections_after_close == 0.0,
                    format!("idle: {} connections left after closing all", i.instance_connections_after_close),
                );
                check(i.cycle_failures == 0, format!("idle: {} connect/close cycles failed", i.cycle_failures));
                check(
                    i.instance_connections_after_cycles == 0.0,
                    format!("idle: {} connections left after the cycles", i.instance_connections_after_cycles),
                );
                check(
                    i.subscriptions_left_incl_broadcast == 1.0,
                    format!(
                        "idle: {} subscriptions left after the cycles (1 = the broadcast topic)",
                        i.subscriptions_left_incl_broadcast
                    ),
                );
            }
            Section::FanoutAmplification(a) => {
                step(&mut check, name, &a.step, a.step.sent);
                let sent = a.step.sent as f64;
                check(
                    a.mqtt_in_total == sent,
                    format!("{name}: {} MQTT messages in over all instances for {sent} sent", a.mqtt_in_total),
                );
                check(
                    a.delivered_metric == sent,
                    format!("{name}: instances counted {} deliveries for {sent} sent", a.delivered_metric),
                );
            }
            Section::Churn(c) => {
                // The stable users' acks include those of the churn messages: checked below.
                step(&mut check, name, &c.stable_traffic, c.stable_traffic.acks);
                let n = c.churn_connections;
                check(
                    c.churn_failed == 0 && c.churn_connected == n,
                    format!(
                        "churn: {} of {n} churned connections failed ({} connected)",
                        c.churn_failed, c.churn_connected
                    ),
                );
                check(
                    c.churn_messages_sent == n,
                    format!("churn: {} of {n} churn messages sent", c.churn_messages_sent),
                );
                check(
                    c.churn_messages_delivered == n,
                    format!("churn: {} of {n} churned users got their message", c.churn_messages_delivered),
                );
                check(
                    c.subscribe_lines == n && c.unsubscribe_lines == n,
                    format!(
                        "churn: broker log shows {} SUBSCRIBE and {} UNSUBSCRIBE for {n} churned connections",
                        c.subscribe_lines, c.unsubscribe_lines
                    ),
                );
                let want = c.stable_traffic.sent + c.churn_messages_sent;
                check(
                    c.acks_stable_and_churn == want,
                    format!("churn: {} acks for {want} messages sent by stable users", c.acks_stable_and_churn),
                );
                let left = (c.stable_users + c.instances) as f64;
                check(
                    c.subscriptions_left_incl_broadcast == left,
                    format!(
                        "churn: {} subscriptions left, want {left} (stable users + 1 broadcast per instance)",
                        c.subscriptions_left_incl_broadcast
                    ),
                );
            }
        }
    }
    out
}

/// One step: every message received exactly once, `acks` acknowledgements, no error, no
/// connection lost.
fn step(check: &mut impl FnMut(bool, String), name: &str, st: &StepReport, acks: u64) {
    let at = format!("{name} at {} msg/s", st.offered_rate);
    check(st.sent > 0, format!("{at}: nothing sent"));
    check(st.delivered == st.sent, format!("{at}: {} of {} messages received", st.delivered, st.sent));
    check(st.duplicates == 0, format!("{at}: {} duplicate deliveries", st.duplicates));
    check(st.late_from_earlier_step == 0, format!("{at}: {} messages of an earlier step", st.late_from_earlier_step));
    check(st.acks == acks, format!("{at}: {} acks for {acks} messages", st.acks));
    check(st.errors == 0, format!("{at}: {} errors", st.errors));
    check(
        st.connections_closed == 0,
        format!("{at}: {} connections closed under the generator", st.connections_closed),
    );
}
