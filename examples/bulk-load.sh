#!/usr/bin/env bash
# Bulk load: generates N put lines and streams them through `treaty run -`.
# Independent lines are pipelined, so this is not bound by one round trip each.
#   examples/bulk-load.sh 100000 | treaty run -
n="${1:-10000}"
seq 1 "$n" | awk '{ printf "put user/%08d \"name %d\"\n", $1, $1 }'
