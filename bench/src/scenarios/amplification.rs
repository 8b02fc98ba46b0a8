//! `fanout-amplification`: K instances, messages at a fixed rate; MQTT messages received by
//! all instances per message delivered.

use std::time::Duration;

use super::{run_step, user_names, Fleet, Sender, Step};
use crate::env::{self, Res};
use crate::report::{r3, Amplification};
use crate::Opts;

/// Σ over `ports` of the metric `name` (samples whose labels contain `label`).
async fn sum(ports: &[u16], name: &str, label: &str) -> Res<f64> {
    let mut t = 0.0;
    for p in ports {
        t += env::scrape(*p, name, label).await?;
    }
    Ok(t)
}

pub async fn amplification(opts: &Opts) -> Res<Amplification> {
    let k = opts.amp_instances;
    let fleet =
        Fleet::start(opts, &format!("amplification-k{k}"), k, user_names("a", opts.users), "amplification: connecting")
            .await?;
    let ports = fleet.ports.clone();
    let in0 = sum(&ports, "fanout_messages_in_total", "source=\"mqtt\"").await?;
    let del0 = sum(&ports, "fanout_messages_delivered_total", "").await?;
    let step = Step { label: "amplification", tag: 1, rate: opts.amp_rate, secs: opts.step_secs, size: opts.size };
    let step = run_step(&Sender::Fanout(&fleet.conns), &fleet.users, &fleet.stats, &fleet.procs(), &step).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let in1 = sum(&ports, "fanout_messages_in_total", "source=\"mqtt\"").await?;
    let del1 = sum(&ports, "fanout_messages_delivered_total", "").await?;
    let delivered = step.delivered;
    let amp = (in1 - in0) / (delivered.max(1) as f64);
    fleet.stop(Duration::ZERO).await;
    println!(
        "\nfanout-amplification: K = {k} instances, {} users, {} msg/s for {} s: {} sent, {delivered} delivered (clients), \
         {} delivered (instances' metric), {} MQTT messages in over all instances → amplification {amp:.3} \
         (a broadcast-to-every-instance design: {k}.00)",
        opts.users,
        opts.amp_rate,
        opts.step_secs,
        step.sent,
        del1 - del0,
        in1 - in0
    );
    Ok(Amplification {
        instances: k,
        users: opts.users,
        rate: opts.amp_rate,
        mqtt_in_total: in1 - in0,
        delivered_clients: delivered,
        delivered_metric: del1 - del0,
        amplification: r3(amp),
        broadcast_design_amplification: k,
        step,
    })
}
