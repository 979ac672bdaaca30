#!/usr/bin/env bash
# Host side of the vhost-user-net check, run by vhost-user-test.sh inside the test's network
# namespace (where the TAP vu0 has 10.77.0.1/24; the guest is 10.77.0.2).
#   1. listens on TCP 7778 and stores what the guest sends in W/net-g2h.bin;
#   2. pings the guest until it answers ("host-ping ok");
#   3. sends W/h2g.bin to the guest's TCP 7777 ("host-send ok").
# busybox provides nc and ping (the host may have neither). All steps together are bounded by
# DEADLINE seconds; a step that gives up says so and the caller's checks fail.
# Usage: net-host.sh W DEADLINE
set -uo pipefail
W="$1"
DEADLINE=$((SECONDS + $2))

timeout "$2" busybox nc -l -p 7778 -e sh -c "cat > '$W/net-g2h.bin'" &
RX=$!

until busybox ping -c 1 -W 1 10.77.0.2 >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$DEADLINE" ] || { echo "host-ping gave up"; kill "$RX"; exit 1; }
done
echo "host-ping ok"

# The guest starts listening before it pings us; retry while the port is still closed.
until cat "$W/h2g.bin" 2>/dev/null > /dev/tcp/10.77.0.2/7777; do
    [ "$SECONDS" -lt "$DEADLINE" ] || { echo "host-send gave up"; kill "$RX"; exit 1; }
    sleep 0.2
done 2>/dev/null
echo "host-send ok"

wait "$RX"
echo "host-receive rc=$?"
