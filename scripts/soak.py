#!/usr/bin/env python3
"""Soak test for fanout (not run in CI): connect/disconnect churn plus chat messages across
three instances on one Mosquitto, for a long time (default 30 minutes).

At the end every client leaves, and the script checks:
  * RSS of each instance has not drifted more than 10 % (warm-up sample vs last sample),
  * every instance holds no user subscription (fanout_subscriptions == 1, the broadcast topic),
  * the broker's subscription count is back to its baseline (3 broadcast subscriptions),
  * every acked message reached every connection of its recipient that was open before the
    send and stayed open 2 s past the ack, and no connection got a message twice.

Usage: scripts/soak.py [--minutes 30] [--users 60] [--rate 20] [--out target/soak]
Needs: mosquitto (apt), python3 `websockets` (installed with pip when missing),
`cargo build --release` done (uses target/release/fanout). Progress every 30 s; a JSON report
and, when matplotlib is importable, an SVG plot of RSS over time.
"""
import argparse, asyncio, json, os, random, shutil, socket, subprocess, sys, tempfile, time, urllib.request

try:
    import websockets
except ImportError:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "websockets"])
    import websockets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FANOUT = os.environ.get("FANOUT_BIN", os.path.join(ROOT, "target", "release", "fanout"))
SECRET = "soak-secret-" + os.urandom(4).hex()


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def http(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(port, series):
    _, body = http(port, "/metrics")
    for line in body.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def sys_value(mport, path):
    out = subprocess.run(["mosquitto_sub", "-p", str(mport), "-C", "1", "-W", "3", "-t", f"$SYS/{path}"],
                         capture_output=True, text=True).stdout.strip()
    try:
        return float(out)
    except ValueError:
        return None


def token(user):
    return subprocess.check_output([FANOUT, "token", user, "--ttl", "3h", "--jwt-secret", SECRET]).decode().strip()


class Stats:
    def __init__(self):
        self.sent = self.acked = self.errors = self.delivered = self.connects = 0
        self.acked_ids = {}      # id -> (recipient, sent_time, ack_time)
        self.sent_at = {}        # clientMessageId -> time
        self.received = {}       # conn key -> set(ids)
        self.lifetimes = {}      # conn key -> (user, t_open, t_close)


async def client(stats, ports, users, user, stop, rate_per_client, tokens):
    """One connection that lives a random 2–20 s, sending now and then, then reconnects."""
    n = 0
    while not stop.is_set():
        port = random.choice(ports)
        key = f"{user}#{n}"; n += 1
        try:
            async with websockets.connect(f"ws://127.0.0.1:{port}/entrypoint", subprotocols=[tokens[user]],
                                          open_timeout=10) as ws:
                hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert hello["event"] == "connected", hello
                stats.connects += 1
                t_open = time.time()
                stats.received[key] = []
                life = random.uniform(2, 20)
                deadline = t_open + life
                next_send = t_open + random.expovariate(rate_per_client)
                while time.time() < deadline and not stop.is_set():
                    timeout = max(0.0, min(deadline, next_send) - time.time())
                    try:
                        raw = await asyncio.wait_for(ws.recv(), timeout)
                        m = json.loads(raw)
                        if m["event"] == "chat_message":
                            stats.received[key].append(m["data"]["id"])
                            stats.delivered += 1
                        elif m["event"] == "ack":
                            stats.acked += 1
                            cmid = m["data"]["clientMessageId"]
                            stats.acked_ids[m["data"]["id"]] = (cmid.split("|")[0], stats.sent_at[cmid], time.time())
                        elif m["event"] == "error":
                            stats.errors += 1
                    except asyncio.TimeoutError:
                        pass
                    if time.time() >= next_send:
                        to = random.choice(users)
                        stats.sent_at[f"{to}|{stats.sent}"] = time.time()
                        await ws.send(json.dumps({"event": "send_chat_message_to_participant", "data": {
                            "participantId": to, "message": "soak", "clientMessageId": f"{to}|{stats.sent}"}}))
                        stats.sent += 1
                        next_send = time.time() + random.expovariate(rate_per_client)
                # Drain acks for what we sent before leaving.
                end = time.time() + 1
                while time.time() < end:
                    try:
                        m = json.loads(await asyncio.wait_for(ws.recv(), end - time.time()))
                        if m["event"] == "ack":
                            stats.acked += 1
                            cmid = m["data"]["clientMessageId"]
                            stats.acked_ids[m["data"]["id"]] = (cmid.split("|")[0], stats.sent_at[cmid], time.time())
                        elif m["event"] == "chat_message":
                            stats.received[key].append(m["data"]["id"]); stats.delivered += 1
                    except asyncio.TimeoutError:
                        break
                stats.lifetimes[key] = (user, t_open, time.time())
        except Exception as e:  # a refused or dropped connection is counted, then retried
            stats.errors += 1
            await asyncio.sleep(0.5)


async def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--users", type=int, default=60)
    ap.add_argument("--rate", type=float, default=20, help="chat messages per second, all clients together")
    ap.add_argument("--out", default=os.path.join(ROOT, "target", "soak"))
    a = ap.parse_args()
    if not os.path.exists(FANOUT):
        subprocess.check_call(["cargo", "build", "--release"], cwd=ROOT)
    if not shutil.which("mosquitto") and not os.path.exists("/usr/sbin/mosquitto"):
        subprocess.check_call("apt-get update && apt-get install -y mosquitto mosquitto-clients", shell=True)
    os.makedirs(a.out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="fanout-soak-")
    mport = free_port()
    with open(f"{tmp}/m.conf", "w") as f:
        f.write(f"listener {mport} 127.0.0.1\nallow_anonymous true\nuser root\nsys_interval 1\n"
                f"persistence false\nlog_dest file {tmp}/mosquitto.log\n")
    procs = [subprocess.Popen(["/usr/sbin/mosquitto", "-c", f"{tmp}/m.conf"])]
    time.sleep(0.5)
    ports, insts = [], []
    for i in range(3):
        p = free_port(); ports.append(p)
        log = open(f"{tmp}/fanout-{i}.log", "w")
        insts.append(subprocess.Popen([FANOUT, "--listen", f"127.0.0.1:{p}", "--mqtt-url", f"mqtt://127.0.0.1:{mport}",
                                       "--instance-id", f"soak{i}", "--jwt-secret", SECRET], stdout=log, stderr=log))
    procs += insts
    try:
        for p in ports:
            for _ in range(200):
                if http(p, "/readyz")[0] == 200:
                    break
                time.sleep(0.05)
        base_subs = float(len(ports))  # each instance holds the broadcast subscription only
        users = [f"user{i}" for i in range(a.users)]
        tokens = {u: token(u) for u in users}
        stats = Stats(); stop = asyncio.Event()
        per_client = a.rate / a.users
        tasks = [asyncio.create_task(client(stats, ports, users, u, stop, per_client, tokens)) for u in users]
        samples = []  # (t, [rss...])
        t0 = time.time(); end = t0 + a.minutes * 60; last_print = 0
        while time.time() < end:
            await asyncio.sleep(5)
            samples.append((time.time() - t0, [rss_kib(p.pid) for p in insts]))
            if time.time() - last_print >= 30:
                last_print = time.time()
                el = time.time() - t0
                print(f"[{el/60:5.1f}/{a.minutes:.0f} min] connects {stats.connects} sent {stats.sent} acked {stats.acked} "
                      f"delivered {stats.delivered} errors {stats.errors} rss KiB {samples[-1][1]}", flush=True)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Everyone has left: wait for the instances and the broker to settle.
        settled = False
        for _ in range(100):
            subs = [metric(p, "fanout_subscriptions") for p in ports]
            conns = [metric(p, "fanout_connections") for p in ports]
            broker_subs = sys_value(mport, "broker/subscriptions/count")
            if subs == [1.0] * 3 and conns == [0.0] * 3 and broker_subs == base_subs:
                settled = True
                break
            time.sleep(0.2)
        warm = next((s for s in samples if s[0] >= min(120, a.minutes * 60 / 4)), samples[0])
        last = samples[-1]
        drift = [(l - w) / w * 100 for w, l in zip(warm[1], last[1])]
        # Every acked message must have reached every connection of its recipient that was open
        # from before the send until well after it; we check the weaker, exact property that
        # nothing was delivered twice to one connection and count deliveries per message.
        dup = sum(len(v) != len(set(v)) for v in stats.received.values())
        # Every acked message reached every connection of its recipient that was open (had
        # its `connected` frame) before the send and stayed open until 2 s after the ack.
        by_user = {}
        for key, (user, t_open, t_close) in stats.lifetimes.items():
            by_user.setdefault(user, []).append((key, t_open, t_close))
        expected = missed = 0
        for mid, (to, t_sent, t_ack) in stats.acked_ids.items():
            for key, t_open, t_close in by_user.get(to, []):
                if t_open < t_sent and t_close > t_ack + 2:
                    expected += 1
                    if mid not in stats.received[key]:
                        missed += 1
        report = {"minutes": a.minutes, "users": a.users, "rate": a.rate, "connects": stats.connects,
                  "sent": stats.sent, "acked": stats.acked, "delivered": stats.delivered, "errors": stats.errors,
                  "rss_warm_kib": warm[1], "rss_end_kib": last[1], "rss_drift_percent": drift,
                  "instance_subscriptions_end": subs, "broker_subscriptions": {"baseline": base_subs, "end": broker_subs},
                  "connections_end": conns, "settled": settled, "duplicate_connections": dup,
                  "deliveries_checked": expected, "deliveries_missed": missed}
        with open(os.path.join(a.out, "soak.json"), "w") as f:
            json.dump({**report, "samples": samples}, f, indent=1)
        try:
            import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
            for i in range(3):
                plt.plot([s[0] / 60 for s in samples], [s[1][i] / 1024 for s in samples], label=f"instance {i}")
            plt.xlabel("minutes"); plt.ylabel("RSS MiB"); plt.title("fanout soak: RSS over time"); plt.legend()
            plt.savefig(os.path.join(a.out, "soak-rss.svg"))
        except ImportError:
            pass
        print(json.dumps(report, indent=1))
        ok = settled and all(abs(d) <= 10 for d in drift) and dup == 0 and missed == 0 and stats.acked > 0
        print("SOAK PASSED" if ok else "SOAK FAILED")
        return 0 if ok else 1
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
