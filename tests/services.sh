#!/usr/bin/env bash
# Start the team-setup services this machine has installed (PostgreSQL, Redis) when they are not running.
set -u
if command -v pg_ctlcluster >/dev/null 2>&1; then
  if ! pg_isready -h 127.0.0.1 -q 2>/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || echo "services: PostgreSQL did not start" >&2
  fi
else
  echo "services: PostgreSQL is not installed" >&2
fi
if command -v redis-server >/dev/null 2>&1; then
  if ! redis-cli -h 127.0.0.1 ping >/dev/null 2>&1; then
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log \
      || echo "services: Redis did not start" >&2
  fi
else
  echo "services: Redis is not installed" >&2
fi
exit 0
