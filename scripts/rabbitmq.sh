#!/usr/bin/env bash
# A RabbitMQ cluster on loopback with the MQTT plugin: for the cluster tests, the native stack
# (scripts/stack.sh with STACK_BROKER=rabbitmq) and the broker benchmarks. No Docker, no
# system service: each node is an Erlang VM started from Debian's rabbitmq-server package with
# its own name, ports and state directory, so several clusters can run side by side.
#
#   scripts/rabbitmq.sh up [N]    start N nodes (default 3), wait until they form one cluster,
#                                 print one line per node: "node <i> <name> mqtt <port>"
#   scripts/rabbitmq.sh kill <i>  SIGKILL node i (a crash)
#   scripts/rabbitmq.sh start <i> start node i again (it rejoins the cluster)
#   scripts/rabbitmq.sh status    which nodes run, and the cluster's view
#   scripts/rabbitmq.sh down      stop every node
#
# Settings (environment):
#   RMQ_DIR         state: configs, data, logs, pids          (default: .rabbitmq)
#   RMQ_NAME        node-name prefix: nodes are <prefix><i>@localhost (default: rmq)
#   RMQ_QUEUE_TYPE  queue type of persistent MQTT sessions: quorum (replicated on every node,
#                   survives the loss of a node) or classic (lives on one node)  (default: quorum)
#   RMQ_OWNER_PID   take the cluster down when this process is gone (tests set it, so an
#                   interrupted or killed test run leaves no Erlang VM running)
# rabbitmq-server is installed with apt when missing. The Erlang cookie is $HOME's, shared by
# the nodes and rabbitmqctl run as the same user.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${RMQ_DIR:-$ROOT/.rabbitmq}"
NAME="${RMQ_NAME:-rmq}"
QUEUE_TYPE="${RMQ_QUEUE_TYPE:-quorum}"
BIN=/usr/lib/rabbitmq/bin

say() { printf 'rabbitmq: %s\n' "$*" >&2; }
die() { printf 'rabbitmq: %s\n' "$*" >&2; exit 1; }
# The end of every node's output and log, for a start that failed (the caller's directory may
# be a temporary one that is gone by the time someone reads the message).
node_logs() {
  local f
  for f in "$DIR"/n*/stdout "$DIR"/n*/log/*.log; do
    [ -s "$f" ] || continue
    printf -- '--- %s (last 15 lines)\n' "$f" >&2
    tail -n 15 "$f" >&2
  done
}

ensure_installed() {
  [ -x "$BIN/rabbitmq-server" ] && command -v mosquitto_pub >/dev/null && return
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  say "installing rabbitmq-server"
  $sudo apt-get update >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y rabbitmq-server mosquitto-clients >&2
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
node_name() { printf '%s%s@localhost' "$NAME" "$1"; }
ctl() { "$BIN/rabbitmqctl" -n "$(node_name "$1")" "${@:2}"; }

# What every node needs before the first one boots, created once and atomically: on a fresh
# machine, nodes started together would otherwise race to create the Erlang cookie (and could
# end up with different ones) and to start the port mapper (epmd) that names them.
prepare_erlang() {
  local c="$HOME/.erlang.cookie" t
  if [ ! -s "$c" ]; then
    t="$(mktemp "$HOME/.erlang.cookie.XXXXXX")"
    python3 -c 'import secrets, string; print("".join(secrets.choice(string.ascii_uppercase) for _ in range(20)), end="")' > "$t"
    chmod 400 "$t"
    ln "$t" "$c" 2>/dev/null || true # the first writer wins; the others keep its cookie
    rm -f "$t"
  fi
  local epmd=/usr/bin/epmd deadline=$((SECONDS + 30))
  [ -x "$epmd" ] || epmd="$(ls /usr/lib/erlang/erts-*/bin/epmd 2>/dev/null | head -n 1)"
  "$epmd" -names >/dev/null 2>&1 && return
  "$epmd" -daemon
  until "$epmd" -names >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || die "the Erlang port mapper (epmd) did not start within 30 s"
    sleep 0.1
  done
}

# Writes node i's config (ports chosen once, kept for restarts).
configure() {
  local i="$1" n="$2" d="$DIR/n$1"
  mkdir -p "$d"
  if [ ! -f "$d/ports" ]; then
    echo "$(free_port) $(free_port) $(free_port)" > "$d/ports"
  fi
  read -r amqp dist mqtt < "$d/ports"
  {
    echo "listeners.tcp.default = 127.0.0.1:$amqp"
    echo "mqtt.listeners.tcp.default = 127.0.0.1:$mqtt"
    echo "mqtt.allow_anonymous = true"
    echo "mqtt.durable_queue_type = $QUEUE_TYPE"
    echo "loopback_users = none"
    echo "cluster_formation.peer_discovery_backend = classic_config"
    for j in $(seq 1 "$n"); do echo "cluster_formation.classic_config.nodes.$j = $(node_name "$j")"; done
  } > "$d/rabbitmq.conf"
  echo "[rabbitmq_mqtt]." > "$d/enabled_plugins"
}

start_node() {
  local i="$1" d="$DIR/n$1"
  read -r amqp dist mqtt < "$d/ports"
  # Its own session and process group, so `kill` takes the whole node down like a crash.
  setsid env RABBITMQ_NODENAME="$(node_name "$i")" RABBITMQ_NODE_PORT="$amqp" RABBITMQ_DIST_PORT="$dist" \
    RABBITMQ_MNESIA_BASE="$d/mnesia" RABBITMQ_LOG_BASE="$d/log" RABBITMQ_FEATURE_FLAGS_FILE="$d/feature_flags" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" RABBITMQ_CONFIG_FILE="$d/rabbitmq" \
    RABBITMQ_PID_FILE="$d/pid" RABBITMQ_PLUGINS_EXPAND_DIR="$d/plugins-expand" ERL_CRASH_DUMP="$d/erl_crash.dump" \
    "$BIN/rabbitmq-server" > "$d/stdout" 2>&1 < /dev/null &
  echo $! > "$d/pgid"
}

# Waits until node i's MQTT port is open. Returns 1 if the node died first (e.g. one of its
# ports was taken by another process between choosing it and binding it).
wait_mqtt() {
  local i="$1" d="$DIR/n$1" deadline=$((SECONDS + 90))
  read -r amqp dist mqtt < "$d/ports"
  until port_open "$mqtt"; do
    # (the pid itself: its process group exists only once setsid has run)
    kill -0 "$(cat "$d/pgid")" 2>/dev/null || return 1
    [ "$SECONDS" -lt "$deadline" ] || { node_logs; die "node $i did not open its MQTT port within 90 s; see $d/stdout and $d/log"; }
    sleep 0.2
  done
}

# Starts node i of n for the first time; a node that dies at start gets new ports (twice).
first_start() {
  local i="$1" n="$2" attempt
  for attempt in 1 2 3; do
    start_node "$i"
    wait_mqtt "$i" && return
    say "node $i exited while starting (attempt $attempt): $(grep -o -m1 -E '[a-z_]*already_used[^}]*|eaddrinuse' "$DIR/n$i/stdout" || echo 'see its log')"
    rm -f "$DIR/n$i/ports"
    configure "$i" "$n"
  done
  node_logs
  die "node $i did not start; see $DIR/n$i/stdout"
}

probe_mqtt() {
  local i="$1" d="$DIR/n$1" deadline=$((SECONDS + 120))
  read -r amqp dist mqtt < "$d/ports"
  until timeout 15 mosquitto_pub -h 127.0.0.1 -p "$mqtt" -i "probe-$NAME$i" -q 1 -t probe -m up >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || { node_logs; die "node $i does not take MQTT clients within 120 s; see $d/log"; }
    sleep 0.5
  done
}

running_nodes() {
  ctl 1 cluster_status --formatter json 2>/dev/null |
    python3 -c 'import json,sys; print(len(json.load(sys.stdin).get("running_nodes", [])))' 2>/dev/null || echo 0
}

print_nodes() {
  local n="$1"
  for i in $(seq 1 "$n"); do
    read -r amqp dist mqtt < "$DIR/n$i/ports"
    echo "node $i $(node_name "$i") mqtt $mqtt"
  done
}

cmd="${1:-}"
case "$cmd" in
  up)
    n="${2:-3}"
    ensure_installed
    mkdir -p "$DIR"
    echo "$n" > "$DIR/size"
    t0=$SECONDS
    prepare_erlang
    # One node after the other: nodes that boot together can form separate (or stuck) Raft
    # clusters for the MQTT plugin's client-id tracking, and then a node refuses every MQTT
    # connection ("client ID registration timed out") for minutes. Seen here with 3.10.8.
    for i in $(seq 1 "$n"); do configure "$i" "$n"; done
    if [ -n "${RMQ_OWNER_PID:-}" ]; then
      # The nodes run in their own sessions and outlive whoever started them.
      nohup bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 0.5; done; RMQ_DIR="$2" RMQ_NAME="$3" exec bash "$4" down' \
        rabbitmq-watchdog "$RMQ_OWNER_PID" "$DIR" "$NAME" "$0" </dev/null >>"$DIR/watchdog.log" 2>&1 &
    fi
    for i in $(seq 1 "$n"); do first_start "$i" "$n"; done
    deadline=$((SECONDS + 90))
    until [ "$(running_nodes)" = "$n" ]; do
      [ "$SECONDS" -lt "$deadline" ] || { node_logs; die "the $n nodes did not form one cluster within 90 s; see $DIR/n*/log"; }
      sleep 0.5
    done
    # An open port is not yet a node that takes MQTT clients: connect and publish to each.
    for i in $(seq 1 "$n"); do probe_mqtt "$i"; done
    say "$n-node cluster up in $((SECONDS - t0)) s (MQTT sessions on $QUEUE_TYPE queues)"
    print_nodes "$n"
    ;;
  kill)
    i="${2:?node number}"
    [ -f "$DIR/n$i/pgid" ] && kill -KILL -- "-$(cat "$DIR/n$i/pgid")" 2>/dev/null || true
    ;;
  start)
    i="${2:?node number}"
    start_node "$i"
    wait_mqtt "$i" || { node_logs; die "node $i exited while starting; see $DIR/n$i/stdout"; }
    ;;
  status)
    n="$(cat "$DIR/size" 2>/dev/null || echo 0)"
    print_nodes "$n"
    ctl 1 cluster_status 2>/dev/null | sed -n '/Running Nodes/,/Versions/p' || say "node 1 does not answer"
    ;;
  down)
    n="$(cat "$DIR/size" 2>/dev/null || echo 0)"
    for i in $(seq 1 "$n"); do
      [ -f "$DIR/n$i/pgid" ] && kill -TERM -- "-$(cat "$DIR/n$i/pgid")" 2>/dev/null || true
    done
    for i in $(seq 1 "$n"); do
      for _ in $(seq 1 50); do
        [ -f "$DIR/n$i/pgid" ] && kill -0 -- "-$(cat "$DIR/n$i/pgid")" 2>/dev/null || break
        sleep 0.1
      done
      [ -f "$DIR/n$i/pgid" ] && kill -KILL -- "-$(cat "$DIR/n$i/pgid")" 2>/dev/null || true
    done
    ;;
  *)
    sed -n '2,20p' "$0" >&2
    exit 2
    ;;
esac
