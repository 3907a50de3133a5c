#!/usr/bin/env bash
# Starts the local servers the tests use when they are not running:
# PostgreSQL (127.0.0.1:5432) and NATS with JetStream (127.0.0.1:4222).
# Under CI=true a server that cannot be started fails the run.
set -uo pipefail

fail() {
  echo "services: $*" >&2
  if [ "${CI:-}" = "true" ]; then exit 1; fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  for _ in $(seq 1 50); do
    port_open "$1" && return 0
    sleep 0.2
  done
  return 1
}

if ! port_open 5432; then
  echo "services: starting PostgreSQL"
  if [ -d /etc/postgresql ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
  wait_port 5432 || fail "PostgreSQL is not reachable on 127.0.0.1:5432"
fi

if ! port_open 4222; then
  echo "services: starting NATS with JetStream"
  if [ -x /usr/sbin/nats-server ]; then
    mkdir -p /var/lib/nats-server
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
      -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log || true
  fi
  wait_port 4222 || fail "NATS is not reachable on 127.0.0.1:4222"
fi
echo "services: PostgreSQL and NATS reachable"
exit 0
