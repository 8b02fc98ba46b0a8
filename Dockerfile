# syntax=docker/dockerfile:1
# Multi-stage build: compile in the Rust image, run from a slim Debian as a non-root user.
# The image is for use with an external broker (compose.yaml: Mosquitto), so the embedded
# development broker is left out (--no-default-features): smaller and faster to build.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# BuildKit cache mounts keep the registry and target dir between builds (fast rebuilds).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --no-default-features --bin fanout \
    && cp target/release/fanout /fanout \
    && strip /fanout

FROM debian:bookworm-slim
# No curl in the runtime image: the health check speaks HTTP with bash's /dev/tcp.
RUN printf '%s\n' '#!/bin/bash' \
      'exec 3<>/dev/tcp/127.0.0.1/${FANOUT_HEALTH_PORT:-3000} || exit 1' \
      'printf "GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n" >&3' \
      'IFS= read -r -t 2 status <&3 || exit 1' \
      '[[ "$status" == *" 200 "* ]]' > /usr/local/bin/fanout-healthcheck \
    && chmod 755 /usr/local/bin/fanout-healthcheck \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin fanout
COPY --from=build /fanout /usr/local/bin/fanout
USER 10001:10001
ENV FANOUT_LISTEN=0.0.0.0:3000
EXPOSE 3000
STOPSIGNAL SIGTERM
# `docker run IMAGE [serve flags]` serves with the instance id defaulting to the container's
# hostname (see compose.yaml; FANOUT_INSTANCE_ID or --instance-id override it);
# `docker run IMAGE token alice` / `check-token …` run those subcommands.
ENTRYPOINT ["/bin/sh", "-c", "case \"${1:-serve}\" in serve|-*) [ \"${1:-}\" = serve ] && shift; exec /usr/local/bin/fanout serve --instance-id \"${FANOUT_INSTANCE_ID:-$(cat /etc/hostname)}\" \"$@\";; *) exec /usr/local/bin/fanout \"$@\";; esac", "fanout"]
