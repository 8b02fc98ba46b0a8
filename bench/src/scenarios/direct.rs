//! `direct`: N users over M instances, a sweep of offered rates.

use std::time::Duration;

use super::{print_steps, sweep, user_names, Fleet, Sender};
use crate::env::{self, Res};
use crate::report::{max_ok_rate, Sweep};
use crate::Opts;

pub async fn direct(opts: &Opts, rates: &[f64], run: u32) -> Res<Sweep> {
    let name = format!("direct-m{}-n{}-run{run}", opts.instances, opts.users);
    let fleet = Fleet::start(opts, &name, opts.instances, user_names("u", opts.users), "direct: connecting").await?;
    let procs = fleet.procs();
    let (idle_cpu, steps) =
        sweep(&Sender::Fanout(&fleet.conns), &fleet.users, &fleet.stats, &procs, opts, rates, "direct").await;
    let rss: Vec<u64> = procs.instances.iter().map(|p| env::rss_kib(*p)).collect();
    let broker_rss = env::rss_kib_sum(&procs.brokers);
    let connect_rate = fleet.connect_rate;
    fleet.stop(Duration::from_millis(200)).await;
    print_steps(
        &format!("direct (run {run}): {} instances, {} users, {} B messages", opts.instances, opts.users, opts.size),
        &idle_cpu,
        &steps,
    );
    Ok(Sweep {
        run,
        instances: Some(opts.instances),
        clients: None,
        users: opts.users,
        message_bytes: opts.size,
        step_secs: opts.step_secs,
        connect_rate_per_s: Some(crate::report::r3(connect_rate)),
        instance_rss_kib_after: Some(rss),
        broker_rss_kib_after: Some(broker_rss),
        idle_cpu,
        max_ok_rate: max_ok_rate(&steps),
        steps,
    })
}
