//! What a `--smoke` run must show for the tool (and the service) to count as working.

use crate::report::{Report, Section};

/// Prints every failed check; true when none failed.
pub fn checks(report: &Report) -> bool {
    let mut ok = true;
    let mut check = |cond: bool, what: &str| {
        if !cond {
            eprintln!("smoke: FAILED: {what}");
            ok = false;
        }
    };
    for s in &report.scenarios {
        match s {
            Section::Direct(sw) | Section::BrokerFloor(sw) => {
                let name = if matches!(s, Section::Direct(_)) { "direct" } else { "broker-floor" };
                for st in &sw.steps {
                    check(st.delivered_ratio == 1.0, &format!("\"{name}\" delivered every message"));
                }
            }
            Section::Idle(i) => {
                check(i.rss_per_connection_kib > 0.0, "idle RSS per connection measured");
                check(i.cycle_failures == 0, "idle connect/close cycles all succeeded");
            }
            Section::FanoutAmplification(a) => {
                check((a.amplification - 1.0).abs() < 0.01, "amplification is 1.00");
            }
            Section::Churn(c) => {
                check(c.churn_delivery_ratio == 1.0, "churned users got their message");
                check(c.packets_per_connection > 0.0, "broker log counted");
            }
        }
    }
    ok
}
