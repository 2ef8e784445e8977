#!/usr/bin/env bash
# One command for the docker-compose cluster.
#
#   docker/cluster.sh up       build binaries and image, start, wait until healthy
#   docker/cluster.sh down     stop and remove containers (volumes are kept)
#   docker/cluster.sh destroy  like down, and delete the volumes (all data)
#   docker/cluster.sh logs     follow the logs
#   docker/cluster.sh repl     the treaty shell inside the cluster's network
#   docker/cluster.sh status   `treaty status` inside the network
#   docker/cluster.sh build    only build the binaries and the image
#
# Environment: TREATY_PROJECT (compose project name, default "treaty"),
# TREATY_PORT_0..5 (host ports), TREATY_UP_TIMEOUT (seconds, default 90).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
project="${TREATY_PROJECT:-treaty}"
target=x86_64-unknown-linux-gnu

if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
else
  echo "cluster.sh: neither 'docker compose' nor 'docker-compose' is installed" >&2
  exit 1
fi
dc() { "${compose[@]}" -p "$project" -f "$here/docker-compose.yml" "$@"; }

build() {
  echo "==> building static release binaries"
  # Static glibc binaries run FROM scratch. The getrandom cfg makes the RNG use
  # the getrandom(2) syscall, since a scratch image has no /dev/urandom.
  (cd "$root" && RUSTFLAGS='-C target-feature=+crt-static --cfg getrandom_backend="linux_getrandom"' \
    cargo build --release --locked --target "$target" --bins)
  local stage="$root/target/docker-context"
  rm -rf "$stage" && mkdir -p "$stage"
  for b in treaty treaty-coordinator treaty-participant; do
    cp "$root/target/$target/release/$b" "$stage/"
    strip "$stage/$b" 2>/dev/null || true
  done
  echo "==> building image treaty:latest"
  docker build -q -t treaty:latest -f "$here/Dockerfile" "$stage" >/dev/null
  docker image ls treaty:latest --format 'image treaty:latest {{.Size}}'
}

containers() { dc ps -q; }

wait_healthy() {
  local timeout="${TREATY_UP_TIMEOUT:-90}" start=$SECONDS
  while true; do
    local total=0 healthy=0 bad=""
    for c in $(containers); do
      total=$((total + 1))
      local s
      s=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$c")
      if [ "$s" = healthy ]; then healthy=$((healthy + 1)); else bad="$bad $(docker inspect -f '{{.Name}}' "$c"):$s"; fi
    done
    if [ "$total" -ge 6 ] && [ "$healthy" -eq "$total" ]; then
      echo "==> all $total nodes healthy after $((SECONDS - start)) s"
      return 0
    fi
    if [ $((SECONDS - start)) -ge "$timeout" ]; then
      echo "cluster.sh: not healthy after ${timeout} s:$bad" >&2
      dc logs --tail 20 >&2 || true
      return 1
    fi
    sleep 0.5
  done
}

cmd="${1:-up}"
shift || true
case "$cmd" in
  build) build ;;
  up)
    build
    echo "==> starting project $project"
    dc up -d --remove-orphans "$@"
    wait_healthy
    echo "Treaty is up. Participants on 127.0.0.1:${TREATY_PORT_1:-7001}..${TREATY_PORT_5:-7005}, coordinator on 127.0.0.1:${TREATY_PORT_0:-7000}."
    echo "Shell: docker/cluster.sh repl    Status: docker/cluster.sh status    Stop: docker/cluster.sh down"
    echo "From the host: target/$target/release/treaty put greeting hello"
    ;;
  wait) wait_healthy ;;
  down) dc down "$@" ;;
  destroy) dc down -v "$@" ;;
  logs) dc logs -f "$@" ;;
  repl) dc run --rm client repl ;;
  status) dc run --rm -T client status ;;
  compose) dc "$@" ;;
  *)
    echo "usage: docker/cluster.sh up|down|destroy|logs|repl|status|build|wait|compose ARGS" >&2
    exit 2
    ;;
esac
