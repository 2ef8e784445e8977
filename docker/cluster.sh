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
#   docker/cluster.sh cli ARGS the host CLI with this cluster's endpoints and credentials
#   docker/cluster.sh redis-cli [ARGS]  the host's redis-cli on participant 1's Redis door, with the certificates
#   docker/cluster.sh prometheus   start Prometheus scraping every node, if its image is on this machine (never pulled)
#   docker/cluster.sh backup DIR   copy the coordinator's data (stopped for the copy) and the certificates
#   docker/cluster.sh restore DIR  put a backup's coordinator data back (refused by the cluster if it is old)
#   docker/cluster.sh add-participant      start participant-6 and admit it (`treaty member add`)
#   docker/cluster.sh remove-participant N remove participant N for good (`treaty member remove`), stop it
#
# Security: every connection is TLS with the cluster's own CA. `up` creates the
# certificates once, in docker/certs/<project> (mounted read-only at /certs in
# every container), and registers them for the published host endpoints, so
# the host CLI finds them without flags.
#
# Environment: TREATY_PROJECT (compose project name, default "treaty"),
# TREATY_PORT_0..5 (host ports), TREATY_REDIS_PORT_1..5 (host ports of the
# Redis doors, default 7371..7375), TREATY_METRICS_PORT_0..5 (metrics; 0 is
# the coordinator's status page, default 7090..7095), TREATY_UP_TIMEOUT (seconds, default 90),
# TREATY_IMAGE (the image to build and run, default treaty:<project>).
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
export TREATY_CERTS_DIR="${TREATY_CERTS_DIR:-$here/certs/$project}"
export TREATY_IMAGE="${TREATY_IMAGE:-treaty:$project}"
host_cli="$root/target/$target/release/treaty"
host_endpoints() {
  local eps="" i
  for i in 1 2 3 4 5; do
    local var="TREATY_PORT_$i"
    eps="$eps,127.0.0.1:${!var:-700$i}"
  done
  echo "${eps#,}"
}
ensure_certs() {
  if [ ! -f "$TREATY_CERTS_DIR/ca.pem" ]; then
    echo "==> creating the cluster's CA and certificates in $TREATY_CERTS_DIR"
    "$host_cli" certs create "$TREATY_CERTS_DIR" --participants 5 >/dev/null
  fi
}

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
  echo "==> building image $TREATY_IMAGE"
  docker build -q -t "$TREATY_IMAGE" -f "$here/Dockerfile" "$stage" >/dev/null
  docker image ls "$TREATY_IMAGE" --format "image $TREATY_IMAGE {{.Size}}"
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
    ensure_certs
    echo "==> starting project $project"
    dc up -d --remove-orphans "$@"
    wait_healthy
    "$host_cli" --endpoints "$(host_endpoints),127.0.0.1:${TREATY_PORT_0:-7000}" certs register "$TREATY_CERTS_DIR"
    echo "Treaty is up. Participants on 127.0.0.1:${TREATY_PORT_1:-7001}..${TREATY_PORT_5:-7005}, coordinator on 127.0.0.1:${TREATY_PORT_0:-7000}."
    echo "Security: TLS with the cluster's own CA; certificates in $TREATY_CERTS_DIR"
    echo "Shell: docker/cluster.sh repl    Status: docker/cluster.sh status    Stop: docker/cluster.sh down"
    echo "From the host: target/$target/release/treaty put greeting hello   (or: docker/cluster.sh cli put greeting hello)"
    echo "Redis protocol: 127.0.0.1:${TREATY_REDIS_PORT_1:-7371}..${TREATY_REDIS_PORT_5:-7375} with TLS (docker/cluster.sh redis-cli runs redis-cli with the certificates)"
    echo "Status page: http://127.0.0.1:$(dc port coordinator 9090 | sed 's/.*://')/   Metrics: /metrics there and on 127.0.0.1:${TREATY_METRICS_PORT_1:-7091}..${TREATY_METRICS_PORT_5:-7095}"
    ;;
  wait) wait_healthy ;;
  down) dc down "$@" ;;
  destroy)
    dc down -v "$@"
    if [ -x "$host_cli" ] && [ -d "$TREATY_CERTS_DIR" ]; then
      "$host_cli" --endpoints "$(host_endpoints),127.0.0.1:${TREATY_PORT_0:-7000}" certs unregister "$TREATY_CERTS_DIR" || true
    fi
    rm -rf "$TREATY_CERTS_DIR"
    ;;
  cli) "$host_cli" --certs "$TREATY_CERTS_DIR" --endpoints "$(host_endpoints)" "$@" ;;
  prometheus)
    image="${TREATY_PROMETHEUS_IMAGE:-prom/prometheus:latest}"
    if ! docker image inspect "$image" >/dev/null 2>&1; then
      echo "cluster.sh: no local image $image: load one first (docker load -i FILE) or set TREATY_PROMETHEUS_IMAGE; nothing is pulled" >&2
      exit 1
    fi
    dc --profile prometheus up -d --no-deps prometheus
    echo "Prometheus: http://127.0.0.1:$(dc --profile prometheus port prometheus 9090 | sed 's/.*://')/"
    ;;
  redis-cli)
    command -v redis-cli >/dev/null || { echo "cluster.sh: redis-cli is not installed (Debian: apt-get install redis-tools)" >&2; exit 1; }
    port=$(dc port participant-1 6379 | sed 's/.*://')
    [ -n "$port" ] || { echo "cluster.sh: participant-1 is not running (docker/cluster.sh up)" >&2; exit 1; }
    exec redis-cli -p "$port" --tls --cacert "$TREATY_CERTS_DIR/ca.pem" \
      --cert "$TREATY_CERTS_DIR/client-admin.pem" --key "$TREATY_CERTS_DIR/client-admin.key" "$@"
    ;;
  backup)
    dest="${1:?usage: docker/cluster.sh backup DIR}"
    [ ! -e "$dest" ] || { echo "cluster.sh: $dest exists; pick a new directory" >&2; exit 2; }
    mkdir -p "$dest"
    echo "==> stopping the coordinator for a consistent copy (writes pause, reads go on)"
    dc stop coordinator >/dev/null
    docker cp "$(dc ps -q coordinator)":/data "$dest/coordinator-data"
    cp -r "$TREATY_CERTS_DIR" "$dest/certs"
    dc start coordinator >/dev/null
    wait_healthy
    echo "backed up the coordinator's data and the certificates to $dest"
    ;;
  restore)
    src="${1:?usage: docker/cluster.sh restore DIR}"
    [ -d "$src/coordinator-data" ] || { echo "cluster.sh: $src holds no coordinator-data (made by backup)" >&2; exit 2; }
    echo "==> replacing the coordinator's data with $src"
    dc stop coordinator >/dev/null
    dc rm -f coordinator >/dev/null
    docker volume rm "${project}_coordinator-data" >/dev/null
    dc up --no-start coordinator >/dev/null 2>&1
    docker cp "$src/coordinator-data/." "$(dc ps -q coordinator)":/data
    dc start coordinator >/dev/null
    echo "restored. If the participants have seen commits this copy does not hold, the coordinator refuses"
    echo "writes and says so (treaty status): nothing is lost; restore a newer copy."
    ;;
  add-participant)
    # The contract: start the node with its own id, address and certificate,
    # then admit it; it copies a snapshot, catches up and enters the view.
    if [ ! -f "$TREATY_CERTS_DIR/participant-6.pem" ]; then
      "$host_cli" certs issue "$TREATY_CERTS_DIR" participant 6 >/dev/null
    fi
    echo "==> starting participant-6"
    dc --profile participant-6 up -d --no-recreate participant-6 >/dev/null 2>&1
    echo "==> admitting it: treaty member add participant-6:7006 --wait"
    dc run --rm -T client member add participant-6:7006 --wait --timeout "${TREATY_UP_TIMEOUT:-300}"
    ;;
  remove-participant)
    id="${1:?usage: docker/cluster.sh remove-participant ID}"
    echo "==> treaty member remove $id --wait"
    dc run --rm -T client member remove "$id" --wait
    # Refused for good from now on: stop it rather than let docker restart it.
    dc --profile participant-6 stop "participant-$id" >/dev/null 2>&1 || true
    echo "participant-$id is stopped; its volume is kept (docker volume rm ${project}_participant-$id-data deletes it)"
    ;;
  logs) dc logs -f "$@" ;;
  repl) dc run --rm client repl ;;
  status) dc run --rm -T client status ;;
  compose) dc "$@" ;;
  *)
    echo "usage: docker/cluster.sh up|down|destroy|logs|repl|status|cli|redis-cli|prometheus|backup|restore|add-participant|remove-participant|build|wait|compose ARGS" >&2
    exit 2
    ;;
esac
