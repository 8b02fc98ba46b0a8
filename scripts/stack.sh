#!/usr/bin/env bash
# The native twin of compose.yaml: Mosquitto, nginx and N fanout instances on loopback, without
# Docker, from the same mosquitto/mosquitto.conf and nginx/nginx.conf (rendered for loopback
# ports and a state directory).
#
#   scripts/stack.sh up [N]     start (N instances, default 5) and print how to connect
#   scripts/stack.sh status     what runs, and whether each instance is ready
#   scripts/stack.sh down       stop everything (instances first, with SIGTERM: clean shutdown)
#
# Settings (environment):
#   STACK_DIR             state: rendered configs, logs, pids, JWT secret   (default: .stack)
#   STACK_PORT            nginx, the one address clients use                (default: 3000)
#   STACK_MQTT_PORT       the stack's Mosquitto                              (default: 1884; 1883
#                         is left to a system mosquitto that Debian's package may have started)
#   STACK_INSTANCE_PORTS  space-separated ports, one per instance           (default: 3001, 3002, …)
#   STACK_JWT_SECRET      HS256 secret for every instance (default: random, kept in STACK_DIR)
#   FANOUT_BIN            use this fanout binary instead of `cargo build --release`
#   STACK_BROKER          mosquitto (default) or rabbitmq: a 3-node RabbitMQ cluster
#                         (scripts/rabbitmq.sh; instance i attaches to node i mod 3 and is
#                         given every node for failover)
#   STACK_OWNER_PID       take the stack down when this process is gone (tests set it, so an
#                         interrupted or killed test run leaves nothing running)
# Mosquitto and nginx are installed with apt when missing.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${STACK_DIR:-$ROOT/.stack}"
PORT="${STACK_PORT:-3000}"
MQTT_PORT="${STACK_MQTT_PORT:-1884}"

say() { printf 'stack: %s\n' "$*"; }
die() { printf 'stack: %s\n' "$*" >&2; exit 1; }

# HTTP status of GET <path> on 127.0.0.1:<port> (empty when nothing answers). Pure bash, so
# no curl is needed.
http_status() {
  local port="$1" path="$2" line=""
  {
    exec 3<>"/dev/tcp/127.0.0.1/$port" &&
      printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1:%s\r\n\r\n' "$path" "$port" >&3 &&
      IFS= read -r -t 3 line <&3
    exec 3<&- 3>&-
  } 2>/dev/null || true
  line="${line%$'\r'}"
  printf '%s' "$(printf '%s' "$line" | awk '{print $2}')"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A process that exited but was not reaped yet (a zombie) counts as gone.
pid_running() {
  local st
  st="$(sed -E 's/^.*\) ([A-Za-z]).*$/\1/' "/proc/$1/stat" 2>/dev/null)" || return 1
  [ -n "$st" ] && [ "$st" != "Z" ] && [ "$st" != "X" ]
}
alive() { [ -f "$1" ] && pid_running "$(cat "$1")"; }

find_bin() {
  local name="$1" d
  if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return; fi
  for d in /usr/sbin /usr/local/sbin /sbin; do
    if [ -x "$d/$name" ]; then echo "$d/$name"; return; fi
  done
  return 1
}

install_missing() {
  local want=()
  find_bin mosquitto >/dev/null || want+=(mosquitto)
  find_bin nginx >/dev/null || want+=(nginx)
  [ ${#want[@]} -eq 0 ] && return
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  say "installing ${want[*]} with apt"
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y "${want[@]}"
}

# mosquitto/mosquitto.conf with the listener on 127.0.0.1:<MQTT_PORT>.
render_mosquitto() {
  sed -E "s|^listener[[:space:]].*|listener $MQTT_PORT 127.0.0.1|" "$ROOT/mosquitto/mosquitto.conf" >"$DIR/mosquitto.conf"
}

# nginx/nginx.conf with the `# stack:` lines rewritten: listen on 127.0.0.1:<PORT>, one upstream
# server line per instance, logs and temp files under the state directory.
render_nginx() {
  awk -v port="$PORT" -v dir="$DIR" -v ports="$*" '
    /# stack: listen/     { sub(/listen[^;]*;/, "listen 127.0.0.1:" port ";") }
    /# stack: access_log/ { sub(/access_log[^;]*;/, "access_log " dir "/nginx-access.log;") }
    /# stack: http_extra/ {
      n = split("client_body proxy fastcgi uwsgi scgi", t, " ")
      for (i = 1; i <= n; i++) printf "    %s_temp_path %s/nginx-tmp/%s;\n", t[i], dir, t[i]
      next
    }
    /# stack: upstream/ {
      n = split(ports, p, " ")
      for (i = 1; i <= n; i++) { line = $0; sub(/fanout:3000/, "127.0.0.1:" p[i], line); print line }
      next
    }
    { print }
  ' "$ROOT/nginx/nginx.conf" >"$DIR/nginx.conf"
}

wait_until() { # <seconds> <description> <command...>
  local secs="$1" what="$2" i
  shift 2
  for ((i = 0; i < secs * 10; i++)); do
    if "$@"; then return 0; fi
    sleep 0.1
  done
  die "$what did not happen within ${secs}s (logs in $DIR)"
}

ready() { [ "$(http_status "$1" /readyz)" = "200" ]; }

cmd_up() {
  local n="${1:-5}"
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive number, got '$n'"
  mkdir -p "$DIR"
  for f in "$DIR"/*.pid; do
    if [ -e "$f" ] && alive "$f"; then die "already running (state in $DIR): scripts/stack.sh down first"; fi
  done
  rm -f "$DIR"/*.pid
  if [ -n "${STACK_OWNER_PID:-}" ]; then
    # The stack's processes are started with nohup and outlive whoever started them; this
    # watchdog runs `down` once the owner has exited, however it exited.
    nohup bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 0.5; done; STACK_DIR="$2" exec bash "$3" down' \
      stack-watchdog "$STACK_OWNER_PID" "$DIR" "$ROOT/scripts/stack.sh" </dev/null >>"$DIR/watchdog.log" 2>&1 &
    echo $! >"$DIR/watchdog.pid"
  fi

  local ports=()
  if [ -n "${STACK_INSTANCE_PORTS:-}" ]; then
    read -r -a ports <<<"$STACK_INSTANCE_PORTS"
    [ "${#ports[@]}" -eq "$n" ] || die "STACK_INSTANCE_PORTS has ${#ports[@]} ports for $n instances"
  else
    for ((i = 1; i <= n; i++)); do ports+=($((PORT + i))); done
  fi
  for p in "$PORT" "$MQTT_PORT" "${ports[@]}"; do
    if port_open "$p"; then die "port $p is in use (set STACK_PORT / STACK_MQTT_PORT / STACK_INSTANCE_PORTS)"; fi
  done

  install_missing
  local bin="${FANOUT_BIN:-}"
  if [ -z "$bin" ]; then
    say "building fanout (cargo build --release)"
    (cd "$ROOT" && cargo build --release --bin fanout)
    bin="$ROOT/target/release/fanout"
  fi
  [ -x "$bin" ] || die "no fanout binary at $bin"

  local secret="${STACK_JWT_SECRET:-}"
  if [ -z "$secret" ]; then
    [ -s "$DIR/jwt-secret" ] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/jwt-secret"
    secret="$(cat "$DIR/jwt-secret")"
  else
    printf '%s' "$secret" >"$DIR/jwt-secret"
  fi
  chmod 600 "$DIR/jwt-secret"
  echo "$bin" >"$DIR/fanout-bin"
  printf 'PORT=%s\nMQTT_PORT=%s\n' "$PORT" "$MQTT_PORT" >"$DIR/ports"

  render_mosquitto
  render_nginx "${ports[@]}"
  mkdir -p "$DIR/nginx-tmp"

  local nodes=()
  if [ "${STACK_BROKER:-mosquitto}" = rabbitmq ]; then
    say "starting a 3-node RabbitMQ cluster (scripts/rabbitmq.sh)"
    local line
    while read -r line; do
      nodes+=("mqtt://127.0.0.1:$(echo "$line" | awk '{print $5}')")
    done < <(RMQ_DIR="$DIR/rabbitmq" RMQ_NAME=stack "$ROOT/scripts/rabbitmq.sh" up 3)
    [ "${#nodes[@]}" -eq 3 ] || die "the RabbitMQ cluster did not start (see $DIR/rabbitmq)"
    MQTT_PORT="${nodes[0]##*:}"
    printf 'PORT=%s\nMQTT_PORT=%s\n' "$PORT" "$MQTT_PORT" >"$DIR/ports"
    echo rabbitmq >"$DIR/broker"
  else
    say "starting mosquitto on 127.0.0.1:$MQTT_PORT"
    nohup "$(find_bin mosquitto)" -c "$DIR/mosquitto.conf" </dev/null >/dev/null 2>>"$DIR/mosquitto.log" &
    echo $! >"$DIR/mosquitto.pid"
    wait_until 10 "mosquitto listening on $MQTT_PORT" port_open "$MQTT_PORT"
    nodes=("mqtt://127.0.0.1:$MQTT_PORT")
    echo mosquitto >"$DIR/broker"
  fi

  say "starting $n fanout instances on ports ${ports[*]}"
  : >"$DIR/instances"
  for ((i = 0; i < n; i++)); do
    local id="n$((i + 1))" p="${ports[$i]}" urls="" k
    # Every node, starting with this instance's own (i mod the node count).
    for ((k = 0; k < ${#nodes[@]}; k++)); do
      urls+="${urls:+,}${nodes[$(((i + k) % ${#nodes[@]}))]}"
    done
    FANOUT_JWT_SECRET="$secret" RUST_LOG="${RUST_LOG:-info}" nohup "$bin" serve \
      --listen "127.0.0.1:$p" --mqtt-url "$urls" --instance-id "$id" \
      </dev/null >>"$DIR/fanout-$id.log" 2>&1 &
    echo $! >"$DIR/fanout-$id.pid"
    echo "$id $p" >>"$DIR/instances"
  done
  while read -r id p; do
    wait_until 30 "instance $id ready on $p (/readyz 200)" ready "$p"
  done <"$DIR/instances"

  say "starting nginx on 127.0.0.1:$PORT"
  "$(find_bin nginx)" -t -q -p "$DIR" -c "$DIR/nginx.conf" -g "pid $DIR/nginx.pid; error_log $DIR/nginx-error.log;" \
    || die "nginx rejected $DIR/nginx.conf"
  nohup "$(find_bin nginx)" -p "$DIR" -c "$DIR/nginx.conf" \
    -g "daemon off; pid $DIR/nginx.pid; error_log $DIR/nginx-error.log;" </dev/null >>"$DIR/nginx-error.log" 2>&1 &
  echo $! >"$DIR/nginx-main.pid"
  wait_until 10 "nginx proxying /readyz on $PORT" ready "$PORT"

  local rel_bin="$bin"
  [[ "$bin" == "$ROOT/"* ]] && rel_bin="${bin#"$ROOT"/}"
  cat <<EOF

fanout stack is up: ws://127.0.0.1:$PORT/entrypoint (nginx) -> $n instances -> Mosquitto 127.0.0.1:$MQTT_PORT
State, rendered configs and logs: $DIR

  Mint tokens (the stack's secret is in $DIR/jwt-secret):
    ALICE=\$($rel_bin token alice --jwt-secret "\$(cat $DIR/jwt-secret)")
    BOB=\$($rel_bin token bob --jwt-secret "\$(cat $DIR/jwt-secret)")
  Connect (websocat, or a browser console on http://127.0.0.1:$PORT/):
    websocat -H "Sec-WebSocket-Protocol: \$BOB" ws://127.0.0.1:$PORT/entrypoint
    const ws = new WebSocket('ws://127.0.0.1:$PORT/entrypoint', '<ALICE token>');
  Chat: {"event":"send_chat_message_to_participant","data":{"participantId":"bob","message":"hi"}}
  Inject: mosquitto_pub -h 127.0.0.1 -p $MQTT_PORT -q 1 -t msg/alice -m '{"event":"chat_message","data":{"from":"ops","message":"hello"}}'
  Which instance holds whom: grep -E ' msg/' $DIR/mosquitto.log
  Status: scripts/stack.sh status     Stop: scripts/stack.sh down
EOF
}

cmd_status() {
  [ -d "$DIR" ] || { say "not running (no $DIR)"; return 3; }
  # shellcheck disable=SC1091
  [ -f "$DIR/ports" ] && . "$DIR/ports"
  local up=0 total=0
  if alive "$DIR/mosquitto.pid"; then say "mosquitto  pid $(cat "$DIR/mosquitto.pid")  127.0.0.1:$MQTT_PORT"; else say "mosquitto  DOWN"; fi
  if [ -f "$DIR/instances" ]; then
    while read -r id p; do
      total=$((total + 1))
      if alive "$DIR/fanout-$id.pid"; then
        local st
        st="$(http_status "$p" /readyz)"
        [ "$st" = "200" ] && up=$((up + 1))
        say "fanout $id  pid $(cat "$DIR/fanout-$id.pid")  127.0.0.1:$p  /readyz ${st:-no answer}"
      else
        say "fanout $id  DOWN"
      fi
    done <"$DIR/instances"
  fi
  if alive "$DIR/nginx-main.pid"; then say "nginx      pid $(cat "$DIR/nginx-main.pid")  127.0.0.1:$PORT  /readyz $(http_status "$PORT" /readyz)"; else say "nginx      DOWN"; fi
  say "$up/$total instances ready"
  [ "$total" -gt 0 ] && [ "$up" -eq "$total" ]
}

stop_pid_file() { # <pid file> <seconds to wait after SIGTERM>
  local f="$1" secs="$2" pid i
  [ -f "$f" ] || return 0
  pid="$(cat "$f")"
  [[ "$pid" =~ ^[0-9]+$ ]] && [ "$pid" -gt 1 ] || { rm -f "$f"; return 0; }
  if pid_running "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < secs * 20; i++)); do
      pid_running "$pid" || break
      sleep 0.05
    done
    if pid_running "$pid"; then
      say "pid $pid ($(basename "$f" .pid)) ignored SIGTERM for ${secs}s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$f"
}

cmd_down() {
  [ -d "$DIR" ] || { say "not running (no $DIR)"; return 0; }
  # The watchdog is not needed any more (unless this is the watchdog itself).
  if [ -f "$DIR/watchdog.pid" ] && [ "$(cat "$DIR/watchdog.pid")" != "$$" ]; then
    kill "$(cat "$DIR/watchdog.pid")" 2>/dev/null || true
  fi
  rm -f "$DIR/watchdog.pid"
  # nginx first (no new sockets), then the instances in parallel (each closes its sockets with
  # 1001 and removes its MQTT session; bounded by 10 s), the broker last.
  stop_pid_file "$DIR/nginx-main.pid" 5
  local f
  for f in "$DIR"/fanout-*.pid; do
    [ -e "$f" ] && stop_pid_file "$f" 12 &
  done
  wait
  stop_pid_file "$DIR/mosquitto.pid" 5
  if [ "$(cat "$DIR/broker" 2>/dev/null)" = rabbitmq ]; then
    RMQ_DIR="$DIR/rabbitmq" RMQ_NAME=stack "$ROOT/scripts/rabbitmq.sh" down
  fi
  rm -f "$DIR/nginx.pid"
  say "stopped (logs kept in $DIR)"
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  render) # internal: render the configs only (used by docs and tests): render <instance ports…>
    shift; mkdir -p "$DIR"; render_mosquitto; render_nginx "$@"; say "rendered $DIR/mosquitto.conf and $DIR/nginx.conf" ;;
  *) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
