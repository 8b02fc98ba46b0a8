#!/usr/bin/env python3
"""Proves that `fanout-bench --smoke` can fail.

Applies one deliberate mutation at a time to a copy of this crate (the generator, never the
service), builds it, runs `--smoke` against the service binary, and requires the run to fail
with the expected check. Prints, per mutation, every check that failed.

    python3 bench/mutations.py                 # all mutations
    python3 bench/mutations.py drop dup        # those whose name contains "drop" or "dup"

Needs target/release/fanout (cargo build --release --bin fanout at the repository root).
Takes about a minute per mutation (an incremental build and a smoke run). The `old` text of
a mutation must match the source exactly once: when the code moves on, update the mutation.
"""

import json
import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORK = os.environ.get("MUTANTS_DIR", "/tmp/fanout-bench-mutants")

# (name, what it breaks, file under src/, old text, new text, substrings that must appear among
# the failed checks)
MUTATIONS = [
    (
        "drop-1-in-50",
        "the generator skips every 50th frame but counts it as sent",
        "scenarios/mod.rs",
        "Sender::Fanout(conns) => conns[from].tx.send(chat_frame(&users[to], &msg)).is_ok(),",
        "Sender::Fanout(conns) => sent % 50 == 7 || conns[from].tx.send(chat_frame(&users[to], &msg)).is_ok(),",
        ["messages received", "acks for"],
    ),
    (
        "dup-1-in-50",
        "the generator sends every 50th frame twice",
        "scenarios/mod.rs",
        "Sender::Fanout(conns) => conns[from].tx.send(chat_frame(&users[to], &msg)).is_ok(),",
        "Sender::Fanout(conns) => { if sent % 50 == 7 { let _ = conns[from].tx.send(chat_frame(&users[to], &msg)); }"
        " conns[from].tx.send(chat_frame(&users[to], &msg)).is_ok() }",
        ["duplicate deliveries"],
    ),
    (
        "drop-and-dup",
        "k frames dropped and k others sent twice: the old check (copies counted) read 1.0",
        "scenarios/mod.rs",
        "Sender::Fanout(conns) => conns[from].tx.send(chat_frame(&users[to], &msg)).is_ok(),",
        "Sender::Fanout(conns) => sent % 50 == 7 || { if sent % 50 == 8 { let _ = conns[from].tx.send(chat_frame(&users[to], &msg)); }"
        " conns[from].tx.send(chat_frame(&users[to], &msg)).is_ok() },",
        ["messages received", "duplicate deliveries"],
    ),
    (
        "skip-acks",
        "the fanout client ignores `ack` frames",
        "client.rs",
        "Inbound::Ack => {\n                        stats.acks.fetch_add(1, Relaxed);\n                    }",
        "Inbound::Ack => {}",
        ["acks for"],
    ),
    (
        "error-frame",
        "one frame per step the service must refuse (unknown event)",
        "scenarios/mod.rs",
        "Sender::Fanout(conns) => conns[from].tx.send(chat_frame(&users[to], &msg)).is_ok(),",
        "Sender::Fanout(conns) => { if sent == 3 { let _ = conns[from].tx.send(r#\"{\"event\":\"no_such_event\"}\"#.to_string()); }"
        " conns[from].tx.send(chat_frame(&users[to], &msg)).is_ok() }",
        ["errors"],
    ),
    (
        "lost-connection",
        "direct: one user's socket is closed before the sweep",
        "scenarios/direct.rs",
        "    let fleet = Fleet::start(",
        "    let mut fleet = Fleet::start(",
        ["connections closed", "messages received", "errors"],
        (
            "    let procs = fleet.procs();",
            "    fleet.conns[0] = crate::client::Conn { tx: tokio::sync::mpsc::unbounded_channel().0 };\n"
            "    let procs = fleet.procs();",
        ),
    ),
    (
        "floor-ignores-puback",
        "broker-floor's publishers do not count PUBACKs",
        "scenarios/floor.rs",
        "Ok(Event::Incoming(Packet::PubAck(_))) => {\n                        st.acks.fetch_add(1, Relaxed);\n                    }",
        "Ok(Event::Incoming(Packet::PubAck(_))) => {}",
        ["broker-floor at 200 msg/s", "acks for"],
    ),
    (
        "no-tier-withholds-puback",
        "no-tier clients never PUBACK what they receive (Mosquitto stops at 20 in flight per client)",
        "mqtt_ws.rs",
        "let _ = tx.send(Out::PubAck(p.pkid));",
        "let _ = (&tx, p.pkid);",
        ["no-tier at", "messages received"],
    ),
    (
        "no-tier-bad-publish",
        "a no-tier client publishes once per step to a wildcard topic (Mosquitto drops it)",
        "scenarios/mod.rs",
        "conns[from].publish(no_tier::topic(&users[to]), envelope(&users[from], &users[to], &msg))",
        "{ if sent == 3 { conns[from].publish(\"msg/#\".into(), Vec::new()); }"
        " conns[from].publish(no_tier::topic(&users[to]), envelope(&users[from], &users[to], &msg)) }",
        ["no-tier at", "connections closed"],
    ),
    (
        "amplification-second-device",
        "amplification: user a0 also connected to the other instance",
        "scenarios/amplification.rs",
        "    let ports = fleet.ports.clone();",
        "    let ports = fleet.ports.clone();\n"
        "    let tok = crate::client::tokens(&opts.jwt_secret, &[\"a0\".to_string()])?.remove(0);\n"
        "    let extra = crate::client::connect(fleet.srcs[0], env::ws_addr(ports[1]), &tok, Duration::from_secs(5)).await?;\n"
        "    let _extra = crate::client::run(extra, fleet.stats.clone());",
        ["MQTT messages in over all instances"],
    ),
    (
        "churn-failed-connect",
        "churn: the first churned user presents a bad token",
        "scenarios/churn.rs",
        "let Ok(mut ws) = client::connect(src, dst, &token, Duration::from_secs(10)).await else {",
        "let token = if n == 0 { \"x\".to_string() } else { token };\n"
        "    let Ok(mut ws) = client::connect(src, dst, &token, Duration::from_secs(10)).await else {",
        ["churned connections failed"],
    ),
    (
        "churn-socket-left-open",
        "churn: the first churned user never closes its socket",
        "scenarios/churn.rs",
        "    let _ = ws.close(None).await;",
        "    if n == 0 {\n        std::mem::forget(ws);\n        return;\n    }\n    let _ = ws.close(None).await;",
        ["subscriptions left", "UNSUBSCRIBE"],
    ),
    (
        "idle-cycle-left-open",
        "idle: one connect/close cycle never closes",
        "scenarios/idle.rs",
        "                    Ok(mut ws) => {\n                        let _ = ws.close(None).await;",
        "                    Ok(mut ws) if i == 0 && seed == 1 => std::mem::forget(ws),\n"
        "                    Ok(mut ws) => {\n                        let _ = ws.close(None).await;",
        ["connections left after the cycles", "subscriptions left after the cycles"],
    ),
    (
        "synth-skips-a-packet",
        "sub-scale: the synthetic subscriber never sends its first SUBSCRIBE packet of a session",
        "scenarios/synth.rs",
        "for chunk in topics.chunks(TOPICS_PER_PACKET) {",
        "for chunk in topics.chunks(TOPICS_PER_PACKET).skip(1) {",
        ["synthetic subscriptions confirmed", "the broker holds"],
    ),
    (
        "scenario-skipped",
        "the churn scenario silently does not run",
        "main.rs",
        "        match run_job(*job, &opts, &rates).await {",
        "        if *job == Job::Churn {\n            continue;\n        }\n        match run_job(*job, &opts, &rates).await {",
        ["churn: 0 of 1 reports"],
    ),
]


def apply(src_dir, file, old, new):
    path = os.path.join(src_dir, file)
    text = open(path).read()
    n = text.count(old)
    if n != 1:
        raise SystemExit(f"{file}: the text to mutate occurs {n} times (want 1): {old!r}")
    open(path, "w").write(text.replace(old, new))


def condensed(line):
    """A failed check without its numbers, so that the same check reads the same."""
    return re.sub(r"\d+(\.\d+)?", "N", line)


def main():
    wanted = sys.argv[1:]
    fanout = os.path.join(REPO, "target", "release", "fanout")
    if not os.path.exists(fanout):
        raise SystemExit(f"{fanout} missing: cargo build --release --bin fanout")
    os.makedirs(WORK, exist_ok=True)
    env = dict(os.environ, CARGO_TARGET_DIR=os.path.join(WORK, "target"))
    results = []
    for m in MUTATIONS:
        name, what, file, old, new, expect = m[:6]
        extra = m[6] if len(m) > 6 else None
        if wanted and not any(w in name for w in wanted):
            continue
        crate = os.path.join(WORK, "crate")
        shutil.rmtree(crate, ignore_errors=True)
        os.makedirs(crate)
        for f in ("Cargo.toml", "Cargo.lock"):
            shutil.copy(os.path.join(HERE, f), crate)
        shutil.copytree(os.path.join(HERE, "src"), os.path.join(crate, "src"))
        src = os.path.join(crate, "src")
        apply(src, file, old, new)
        if extra:
            apply(src, file, *extra)
        print(f"== {name}: {what}", flush=True)
        b = subprocess.run(
            ["cargo", "build", "--release", "--quiet", "--manifest-path", os.path.join(crate, "Cargo.toml")],
            env=env,
            capture_output=True,
            text=True,
        )
        if b.returncode != 0:
            print(b.stderr[-3000:])
            results.append((name, "BUILD FAILED", []))
            continue
        out = os.path.join(WORK, "out", name)
        shutil.rmtree(out, ignore_errors=True)
        r = subprocess.run(
            [os.path.join(WORK, "target", "release", "fanout-bench"), "--smoke", "--fanout", fanout, "--out", out],
            capture_output=True,
            text=True,
        )
        failed = [l[len("smoke: FAILED: "):] for l in r.stderr.splitlines() if l.startswith("smoke: FAILED: ")]
        missing = [e for e in expect if not any(e in f for f in failed)]
        verdict = "caught" if r.returncode != 0 and not missing else f"NOT CAUGHT (exit {r.returncode}, missing {missing})"
        checks = []
        for f in failed:
            c = condensed(f)
            if c not in checks:
                checks.append(c)
        print(f"   {verdict}; failed checks:")
        for f in failed[:12]:
            print(f"     {f}")
        if len(failed) > 12:
            print(f"     … {len(failed) - 12} more")
        # What the check before de-duplication saw: copies counted as deliveries.
        try:
            rep = json.load(open(os.path.join(out, "report.json")))
            for s in rep["scenarios"]:
                if s["scenario"] == "direct":
                    old_ratio = [(st["delivered"] + st["duplicates"]) / st["sent"] for st in s["steps"]]
                    print(f"   direct, copies counted as deliveries (the old check): {old_ratio}")
        except (OSError, KeyError, ValueError):
            pass
        results.append((name, verdict, checks))
    print("\nmutation | verdict | failed checks")
    for name, verdict, checks in results:
        print(f"{name} | {verdict} | {'; '.join(checks)}")
    sys.exit(0 if all(v == "caught" for _, v, _ in results) else 1)


if __name__ == "__main__":
    main()
