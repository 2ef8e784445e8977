#!/usr/bin/env bash
# Fault tests across containers: a real docker engine, the real image, real
# kills and network cuts. Each test uses its own compose project and removes
# its containers, network and volumes afterwards.
#
#   docker/test.sh            all tests
#   docker/test.sh NAME...    only these (function names below, without test_)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"

if ! docker info >/dev/null 2>&1; then
  echo "################################################################"
  echo "## SKIPPED: docker compose tests (no docker engine answers)   ##"
  echo "################################################################"
  exit 0
fi

if docker compose version >/dev/null 2>&1; then compose=(docker compose); else compose=(docker-compose); fi
treaty="$root/target/release/treaty"
# This run's own image, removed at the end: runs from two checkouts never
# test each other's binaries.
export TREATY_IMAGE="${TREATY_IMAGE:-treaty:test-$$}"
trap 'docker image rm -f "$TREATY_IMAGE" >/dev/null 2>&1 || true' EXIT
passed=0
failed=0
failures=""

# Host ports: let docker pick free ones so tests never collide.
export TREATY_PORT_0=0 TREATY_PORT_1=0 TREATY_PORT_2=0 TREATY_PORT_3=0 TREATY_PORT_4=0 TREATY_PORT_5=0 TREATY_PORT_6=0
export TREATY_REDIS_PORT_1=0 TREATY_REDIS_PORT_2=0 TREATY_REDIS_PORT_3=0 TREATY_REDIS_PORT_4=0 TREATY_REDIS_PORT_5=0 \
  TREATY_REDIS_PORT_6=0
export TREATY_METRICS_PORT_0=0 TREATY_METRICS_PORT_1=0 TREATY_METRICS_PORT_2=0 TREATY_METRICS_PORT_3=0 \
  TREATY_METRICS_PORT_4=0 TREATY_METRICS_PORT_5=0 TREATY_METRICS_PORT_6=0

dc() { "${compose[@]}" -p "$project" -f "$here/docker-compose.yml" "$@"; }
cid() { dc ps -q "$1"; }
# Runs the CLI inside the cluster's network, from participant $1's container.
tx() { local n=$1; shift; docker exec "$(cid participant-$n)" /usr/local/bin/treaty --endpoints "participant-$n:700$n" "$@"; }
# Host port published for service $1 container port $2.
hostport() { dc port "$1" "$2" | sed 's/.*://'; }
host_endpoints() {
  local eps=""
  for i in 1 2 3 4 5; do eps="$eps,127.0.0.1:$(hostport participant-$i 700$i)"; done
  echo "${eps#,}"
}
fail() { echo "FAIL: $*" >&2; dc logs --tail 30 >&2 || true; return 1; }
# Waits up to 10 s for service $1's logs to contain $2. The logs are read into
# a variable first: `docker logs | grep -q` under pipefail fails whenever grep
# exits before docker logs has written everything (SIGPIPE), and the log
# driver may lag the container by a moment.
logs_contain() {
  local deadline=$((SECONDS + 10)) logs
  while :; do
    logs=$(docker logs "$(cid "$1")" 2>&1 || true)
    if grep -qF -- "$2" <<<"$logs"; then return 0; fi
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.5
  done
}
wait_healthy() { TREATY_PROJECT="$project" "$here/cluster.sh" wait; }
converged() {
  # Every participant reports the coordinator's last index and is ready.
  local deadline=$((SECONDS + ${1:-60}))
  while [ $SECONDS -lt $deadline ]; do
    if out=$(tx 1 status 2>/dev/null) && ! grep -qE "down|CATCHING|NOT IN VIEW" <<<"$out"; then
      local last
      last=$(sed -n 's/.*last commit index \([0-9]*\).*/\1/p' <<<"$out")
      if [ "$(grep -c "up *$last " <<<"$out")" -eq 6 ]; then return 0; fi
    fi
    sleep 0.5
  done
  echo "not converged:"; tx 1 status || true
  return 1
}
# Asserts every participant holds the same value for key $1 (stale local read).
same_everywhere() {
  local key=$1 expect=$2
  for i in 1 2 3 4 5; do
    local got
    got=$(tx "$i" get --stale "$key" 2>/dev/null) || got="<missing>"
    [ "$got" = "$expect" ] || fail "participant $i has $key=$got, expected $expect" || return 1
  done
}

# Asserts every participant serves exactly these "key value" pairs (one
# `treaty run` batch of gets per participant instead of one exec per key).
all_have() {
  local pairs=$1 script expected got
  script=$(awk '{print "get " $1}' <<<"$pairs")
  expected=$(awk '{print $1 " = " $2}' <<<"$pairs")
  for i in 1 2 3 4 5; do
    got=$(docker exec -i "$(cid participant-$i)" /usr/local/bin/treaty --endpoints "participant-$i:700$i" run - <<<"$script" 2>/dev/null) || true
    [ "$got" = "$expected" ] || fail "participant $i differs: $(diff <(echo "$expected") <(echo "$got") | head -5)" || return 1
  done
}

run_test() {
  local name=$1
  project="treatytest-${name//_/-}-$$"
  echo "=== $name (project $project)"
  # Each project is its own cluster with its own CA, as cluster.sh up makes.
  scratch=$(mktemp -d)
  export TREATY_CERTS_DIR="$scratch/certs" TREATY_CERTS="$scratch/certs"
  "$treaty" certs create "$TREATY_CERTS_DIR" --participants 5 >/dev/null
  # Tests named replication3_* run with each key on 3 of the 5 participants.
  if [[ $name == replication3_* ]]; then export TREATY_REPLICATION=3; else unset TREATY_REPLICATION; fi
  dc up -d >/dev/null 2>&1
  local start=$SECONDS ok=1
  if wait_healthy && "test_$name"; then
    echo "--- ok: $name ($((SECONDS - start)) s)"
    passed=$((passed + 1))
  else
    echo "--- FAILED: $name"
    failed=$((failed + 1))
    failures="$failures $name"
    ok=0
  fi
  dc --profile participant-6 down -v --remove-orphans >/dev/null 2>&1 || true
  rm -rf "$scratch"
  return 0
}

test_write_one_read_all() {
  tx 1 put color blue >/dev/null
  same_everywhere color blue
  for i in 1 2 3 4 5; do
    [ "$(tx "$i" get color)" = blue ] || fail "linearizable read on $i" || return 1
  done
  # And from the host, through the published ports, with the credentials.
  [ "$("$treaty" --endpoints "$(host_endpoints)" get color)" = blue ] || fail "host read" || return 1
  # As the README says: once registered (cluster.sh up does it), no flags.
  local home="$scratch/home"
  TREATY_HOME="$home" "$treaty" --endpoints "$(host_endpoints)" certs register "$TREATY_CERTS_DIR"
  [ "$(env -u TREATY_CERTS TREATY_HOME="$home" "$treaty" --endpoints "$(host_endpoints)" get color)" = blue ] ||
    fail "host read through the registered credentials"
}

test_strangers_are_refused() {
  local net out code other
  net="${project}_treaty"
  tx 1 put color blue >/dev/null
  # A container on the cluster's network without credentials.
  out=$(docker run --rm --network "$net" "$TREATY_IMAGE" --endpoints participant-1:7001 get color 2>&1) && code=0 || code=$?
  [ "$code" -eq 2 ] && grep -q "no client credentials" <<<"$out" || fail "no credentials: code $code: $out" || return 1
  # ... that insists on plaintext.
  out=$(docker run --rm --network "$net" "$TREATY_IMAGE" --insecure --endpoints participant-1:7001 put color red 2>&1) && code=0 || code=$?
  [ "$code" -eq 3 ] && grep -q "requires TLS" <<<"$out" || fail "plaintext: code $code: $out" || return 1
  # ... or brings certificates from another cluster's CA.
  other="$scratch/other"
  "$treaty" certs create "$other" --participants 5 >/dev/null
  out=$(docker run --rm --network "$net" -v "$other:/certs:ro" -e TREATY_CERTS=/certs "$TREATY_IMAGE" \
    --endpoints participant-1:7001 put color red 2>&1) && code=0 || code=$?
  [ "$code" -eq 3 ] && grep -q "another CA" <<<"$out" || fail "foreign CA: code $code: $out" || return 1
  # ... even posing as participant 3 with a certificate of its own CA.
  out=$(docker run --rm --network "$net" -v "$other:/certs:ro" -e TREATY_CERTS=/certs -e TREATY_ID=3 \
    -e TREATY_DATA_DIR=/tmp/d -e TREATY_LISTEN=0.0.0.0:7003 -e TREATY_COORDINATOR=coordinator:7000 \
    --entrypoint /usr/local/bin/treaty-participant "$TREATY_IMAGE" 2>&1) && code=0 || code=$?
  [ "$code" -ne 0 ] && grep -q "another CA" <<<"$out" || fail "foreign participant: code $code: $out" || return 1
  echo "    e.g. $(tail -1 <<<"$out")"
  same_everywhere color blue
}

test_backup_and_restore() {
  local out
  tx 1 put a 1 >/dev/null
  TREATY_PROJECT="$project" "$here/cluster.sh" backup "$scratch/b1" >/dev/null || fail "backup 1" || return 1
  for i in 2 3 4; do tx 1 put a "$i" >/dev/null; done
  TREATY_PROJECT="$project" "$here/cluster.sh" backup "$scratch/b2" >/dev/null || fail "backup 2" || return 1
  # The old copy: refused, nothing lost.
  TREATY_PROJECT="$project" "$here/cluster.sh" restore "$scratch/b1" >/dev/null || fail "restore 1" || return 1
  local deadline=$((SECONDS + 30))
  until out=$(tx 1 put a 5 2>&1; true) && grep -q "fenced" <<<"$out"; do
    grep -q "^OK" <<<"$out" && { fail "the old coordinator copy accepted a write: $out"; return 1; }
    [ $SECONDS -lt $deadline ] || { fail "not fenced: $out"; return 1; }
    sleep 1
  done
  echo "    old copy: $(cut -c1-160 <<<"$out")..."
  same_everywhere a 4 || return 1
  # The newest copy: writes go on where they were.
  TREATY_PROJECT="$project" "$here/cluster.sh" restore "$scratch/b2" >/dev/null || fail "restore 2" || return 1
  wait_healthy || return 1
  deadline=$((SECONDS + 30))
  until tx 1 put a 5 >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { fail "writes did not resume after restoring the newest copy"; return 1; }
    sleep 1
  done
  converged && same_everywhere a 5
}

test_kill_participant_mid_batch() {
  local eps acked=()
  eps=$(host_endpoints)
  for i in $(seq 1 60); do
    if [ "$i" -eq 20 ]; then docker kill "$(cid participant-3)" >/dev/null; fi
    if [ "$i" -eq 40 ]; then dc start participant-3 >/dev/null; fi
    if "$treaty" --endpoints "$eps" put "batch/$i" "v$i" >/dev/null 2>&1; then acked+=("$i"); fi
  done
  [ "${#acked[@]}" -ge 30 ] || fail "only ${#acked[@]} of 60 writes succeeded" || return 1
  wait_healthy && converged || return 1
  all_have "$(for i in "${acked[@]}"; do echo "batch/$i v$i"; done)" || return 1
  echo "    ${#acked[@]} of 60 acknowledged writes present on all five"
}

test_coordinator_killed_between_phases() {
  tx 1 put before 1 >/dev/null
  # Recreate the coordinator with a failpoint: it dies right after the commit
  # decision is durable, before any participant hears of it.
  TREATY_FAILPOINTS_COORDINATOR="coordinator::after_decision_sync=return" dc up -d coordinator >/dev/null 2>&1
  wait_healthy
  local out id=""
  if out=$(tx 2 put doubt yes 2>&1); then
    # The client looked the transaction up after losing the coordinator and,
    # the restart policy having brought it back, found it committed.
    echo "    client saw (after looking the transaction up): $out"
  else
    # Or the coordinator was still down: the error names the id to look up.
    id=$(grep -o "treaty outcome [0-9a-f]\{32\}" <<<"$out" | head -1 | cut -d' ' -f3)
    [ -n "$id" ] || fail "the error does not say how to learn the outcome: $out" || return 1
    echo "    client saw: $out"
  fi
  logs_contain coordinator "failpoint coordinator::after_decision_sync hit" || fail "failpoint not hit" || return 1
  # Before the coordinator is back, the replicas hold the write in doubt.
  # The container restarts (restart policy) and the replicas resolve it; then
  # run the coordinator without the failpoint.
  wait_healthy && converged || return 1
  same_everywhere doubt yes || return 1
  if [ -n "$id" ]; then
    out=$(tx 3 outcome "$id" 2>&1) || fail "treaty outcome $id: $out" || return 1
    grep -q "^committed at index" <<<"$out" || fail "treaty outcome $id: $out" || return 1
    echo "    treaty outcome afterwards: $out"
  fi
  dc up -d coordinator >/dev/null 2>&1
  wait_healthy && converged && same_everywhere doubt yes
}

test_network_disconnect() {
  local net c t0 out
  net="${project}_treaty"
  c=$(cid participant-4)
  tx 1 put pre 1 >/dev/null
  docker network disconnect "$net" "$c"
  # Writes stall until participant 4's lease has surely expired (detection
  # 1 s + lease 2 s + margin), then continue without it.
  t0=$SECONDS
  out=$(tx 1 put cut 1 2>&1) || fail "write failed while participant 4 was cut off: $out" || return 1
  [ $((SECONDS - t0)) -le 6 ] || fail "write stalled $((SECONDS - t0)) s" || return 1
  echo "    write during the cut took $((SECONDS - t0)) s (whole seconds)"
  out=$(tx 1 status 2>&1 || true)
  grep -q "members \[1, 2, 3, 5\]" <<<"$out" || fail "participant 4 not excluded: $out" || return 1
  docker network connect --alias participant-4 "$net" "$c"
  local deadline=$((SECONDS + 30))
  until grep -q "members \[1, 2, 3, 4, 5\]" <<<"$(tx 1 status 2>/dev/null || true)"; do
    [ $SECONDS -lt $deadline ] || fail "participant 4 not readmitted after reconnect" || return 1
    sleep 0.5
  done
  tx 1 put after 1 >/dev/null
  converged && same_everywhere pre 1 && same_everywhere cut 1 && same_everywhere after 1
}

test_restart_and_down_up_keep_data() {
  for i in $(seq 1 10); do tx 1 put "keep/$i" "$i" >/dev/null; done
  dc restart participant-2 >/dev/null 2>&1
  wait_healthy && converged || return 1
  dc restart >/dev/null 2>&1
  wait_healthy && converged || return 1
  for i in 1 5 10; do same_everywhere "keep/$i" "$i" || return 1; done
  dc down >/dev/null 2>&1
  dc up -d >/dev/null 2>&1
  wait_healthy && converged || return 1
  all_have "$(for i in $(seq 1 10); do echo "keep/$i $i"; done)"
}

test_wiped_participant_reseeds() {
  for i in $(seq 1 5); do tx 1 put "seed/$i" "$i" >/dev/null; done
  dc stop participant-5 >/dev/null 2>&1
  # A stopped container's name no longer resolves: status says so in plain
  # words, not with the resolver's error.
  local out deadline=$((SECONDS + 10))
  until out=$(tx 1 status 2>&1 || true); grep -q "participant 5 at participant-5:7005 is not running or not reachable" <<<"$out"; do
    [ $SECONDS -lt $deadline ] || fail "a stopped participant is not named in plain words: $out" || return 1
    sleep 0.5
  done
  ! grep -q "lookup address" <<<"$out" || fail "status shows the resolver's error: $out" || return 1
  echo "    $(grep "participant 5 " <<<"$out" | sed 's/  */ /g')"
  dc rm -f participant-5 >/dev/null 2>&1
  docker volume rm "${project}_participant-5-data" >/dev/null
  dc up -d participant-5 >/dev/null 2>&1
  wait_healthy && converged || return 1
  all_have "$(for i in $(seq 1 5); do echo "seed/$i $i"; done)"
}

test_bad_configuration_exits_with_a_message() {
  local net img
  net="${project}_treaty"
  img="$TREATY_IMAGE"
  # Wrong coordinator address: a replica that never joined gives up.
  local out code
  local certs=(-v "$TREATY_CERTS_DIR:/certs:ro" -e TREATY_CERTS=/certs)
  # Participant 9 gets a valid certificate: the cluster itself must refuse it.
  "$treaty" certs issue "$TREATY_CERTS_DIR" participant 9 >/dev/null
  out=$(docker run --rm --network "$net" "${certs[@]}" -e TREATY_ID=9 -e TREATY_DATA_DIR=/data -e TREATY_LISTEN=0.0.0.0:7009 \
    -e TREATY_COORDINATOR=no-such-coordinator:7000 --entrypoint /usr/local/bin/treaty-participant "$img" 2>&1) && code=0 || code=$?
  [ "$code" -ne 0 ] && grep -q "check --coordinator (TREATY_COORDINATOR)" <<<"$out" || fail "wrong coordinator: code $code: $out" || return 1
  # An id the cluster does not know (yet): it waits to be admitted with
  # `treaty member add`, and says so, rather than exiting.
  local stranger="${project}-stranger-9" deadline=$((SECONDS + 15))
  docker run -d --name "$stranger" --network "$net" "${certs[@]}" -e TREATY_ID=9 -e TREATY_DATA_DIR=/data \
    -e TREATY_LISTEN=0.0.0.0:7009 -e TREATY_COORDINATOR=coordinator:7000 --entrypoint /usr/local/bin/treaty-participant "$img" >/dev/null
  until out=$(docker logs "$stranger" 2>&1); grep -q "participant 9 is not in this cluster: admit it with \`treaty member add ADDR\`" <<<"$out"; do
    [ $SECONDS -lt $deadline ] || { docker rm -f "$stranger" >/dev/null; fail "unknown id: $out"; return 1; }
    sleep 0.5
  done
  [ "$(docker inspect -f '{{.State.Running}}' "$stranger")" = true ] || fail "an unknown id exited: $out" || return 1
  docker rm -f "$stranger" >/dev/null
  # Duplicate ids: participant-2 restarted claiming id 1 against its own volume.
  dc stop participant-2 >/dev/null 2>&1
  out=$(docker run --rm --network "$net" "${certs[@]}" -v "${project}_participant-2-data:/data" -e TREATY_ID=1 -e TREATY_DATA_DIR=/data \
    -e TREATY_LISTEN=0.0.0.0:7002 -e TREATY_COORDINATOR=coordinator:7000 --entrypoint /usr/local/bin/treaty-participant "$img" 2>&1) && code=0 || code=$?
  [ "$code" -ne 0 ] && grep -q "belongs to participant 2" <<<"$out" || fail "duplicate id: code $code: $out" || return 1
  echo "    e.g. $(tail -1 <<<"$out")"
  dc start participant-2 >/dev/null 2>&1
  wait_healthy && converged
}

test_shell_history_survives() {
  # Two shells in a row (`cluster.sh repl` runs the same service), on a real
  # terminal: the second recalls the first one's line with the Up arrow.
  python3 - "${compose[@]}" -p "$project" -f "$here/docker-compose.yml" run --rm client repl <<'PY' || fail "shell history"
import sys, pexpect
argv = sys.argv[1:]
def shell():
    s = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", timeout=60, dimensions=(40, 200))
    s.expect(r"treaty \S+> ")
    return s
s = shell()
s.sendline("put hist/key from-the-first-shell")
s.expect(r"OK \(commit index \d+\)")
s.expect(r"treaty \S+> ")
s.sendeof()
s.expect(pexpect.EOF)
s = shell()
s.send("\x1b[A")  # Up: the previous shell's last line
s.expect("put hist/key from-the-first-shell")
s.send("\r")
s.expect(r"OK \(commit index \d+\)")
s.expect(r"treaty \S+> ")
s.sendeof()
s.expect(pexpect.EOF)
print("    the second shell recalled: put hist/key from-the-first-shell")
PY
}

# Each key on 3 of 5: stored on 3 (key counts), readable through all 5;
# killing two replicas of a key's partition refuses writes to it and not to
# a partition on the other three; back, it takes writes again.
test_replication3_partition_down() {
  # Matched in a variable: `| grep -q` under pipefail fails when grep quits first.
  local status; status=$(tx 1 status)
  grep -q "replication 3 of 5 (256 partitions)" <<<"$status" || fail "status does not show replication 3: $status" || return 1
  local pairs="" script=""
  for i in $(seq 1 30); do pairs="$pairs"$'\n'"p/$i v$i"; script="$script"$'\n'"put p/$i v$i"; done
  pairs=${pairs#$'\n'}
  docker exec -i "$(cid participant-1)" /usr/local/bin/treaty --endpoints participant-1:7001 run --atomic - <<<"$script" >/dev/null ||
    fail "writing 30 keys" || return 1
  all_have "$pairs" || return 1
  # Every key on exactly 3: the participants' key counts add up to 90.
  local deadline=$((SECONDS + 10)) total=0
  while [ $SECONDS -lt $deadline ]; do
    total=$(tx 1 status | awk '$1 == "participant" {s += $8} END {print s}')
    [ "$total" = 90 ] && break
    sleep 0.5
  done
  [ "$total" = 90 ] || fail "participants hold $total copies of 30 keys, expected 90" || return 1
  # The replicas of p/1, and a key on none of the two to be killed.
  local replicas down1 down2 other="" k
  replicas=$(tx 2 placement p/1 | sed -n 's/.*on participants \([0-9, ]*\) (.*/\1/p' | tr -d ' ')
  down1=$(cut -d, -f1 <<<"$replicas"); down2=$(cut -d, -f2 <<<"$replicas")
  [ -n "$down1" ] && [ -n "$down2" ] || fail "placement of p/1: '$replicas'" || return 1
  for i in $(seq 1 30); do
    k=$(tx 2 placement "p/$i" | sed -n 's/.*on participants \([0-9, ]*\) (.*/\1/p' | tr -d ' ')
    if ! grep -qE "(^|,)($down1|$down2)(,|$)" <<<"$k"; then other="p/$i"; break; fi
  done
  [ -n "$other" ] || fail "no key of the 30 avoids participants $down1 and $down2" || return 1
  local up; up=$(printf "%s\n" 1 2 3 4 5 | grep -vxE "$down1|$down2" | head -1)
  docker kill "$(cid participant-$down1)" "$(cid participant-$down2)" >/dev/null
  local out
  if out=$(tx "$up" put p/1 refused 2>&1); then fail "a write to p/1 with 2 of its 3 replicas down committed" || return 1; fi
  grep -q "partition" <<<"$out" || fail "the refusal does not name the partition: $out" || return 1
  tx "$up" put "$other" still-ok >/dev/null || fail "a write to $other (replicas all up) was refused" || return 1
  [ "$(tx "$up" get "$other")" = still-ok ] || fail "read of $other" || return 1
  [ "$(tx "$up" get p/1)" = v1 ] || fail "p/1 changed or unreadable on its last replica" || return 1
  docker start "$(cid participant-$down1)" "$(cid participant-$down2)" >/dev/null
  converged 90 || return 1
  tx "$up" put p/1 back >/dev/null || fail "p/1 refused after its replicas came back" || return 1
  same_everywhere p/1 back
}

# A sixth participant added with the documented steps (cluster.sh
# add-participant: certificate, container, `treaty member add`) gets every
# key; participant 2 removed (cluster.sh remove-participant) leaves the view
# and writes go on without it.
test_add_and_remove_participant() {
  local script="" out
  for i in $(seq 1 20); do script="$script"$'\n'"put m/$i v$i"; done
  docker exec -i "$(cid participant-1)" /usr/local/bin/treaty --endpoints participant-1:7001 run - <<<"$script" >/dev/null ||
    fail "writing 20 keys" || return 1
  add_six || return 1
  local status; status=$(tx 1 status)
  grep -q "members \[1, 2, 3, 4, 5, 6\]" <<<"$status" || fail "participant 6 is not in the view: $status" || return 1
  six_serves 1 13 20 || return 1
  remove_two || return 1
  out=$(tx 1 status || true)
  grep -q "members \[1, 3, 4, 5, 6\]" <<<"$out" && grep -q "removed for good: participant 2" <<<"$out" ||
    fail "status after the removal: $out" || return 1
  tx 3 put after/removal yes >/dev/null || fail "a write after the removal" || return 1
  [ "$(in_six get after/removal)" = yes ] || fail "participant 6 does not serve the write made after the removal" || return 1
}

# The CLI in participant-6's container, talking to it.
in_six() {
  docker exec "$(dc --profile participant-6 ps -q participant-6)" /usr/local/bin/treaty --endpoints participant-6:7006 "$@"
}

# Participant 6 added with the documented steps (cluster.sh add-participant).
add_six() {
  local out
  out=$(TREATY_PROJECT="$project" TREATY_PORT_6=0 "$here/cluster.sh" add-participant 2>&1) || fail "add-participant: $out" || return 1
  grep -q "participant 6 is active and in the view" <<<"$out" || fail "add-participant said: $out" || return 1
  echo "    $(grep "participant 6 is" <<<"$out")"
}

# Participant 6 serves m/I as vI for each I given.
six_serves() {
  local i
  for i in "$@"; do
    [ "$(in_six get "m/$i")" = "v$i" ] || fail "participant 6 does not serve m/$i" || return 1
  done
}

# Participant 2 removed for good (cluster.sh remove-participant).
remove_two() {
  local out
  out=$(TREATY_PROJECT="$project" "$here/cluster.sh" remove-participant 2 2>&1) || fail "remove-participant: $out" || return 1
  grep -q "participant 2 is removed for good" <<<"$out" || fail "remove-participant said: $out" || return 1
}

# Sum of the KEYS column over the participants up, until it is $1 (the key
# counts are at most 2 s old, and moved keys are dropped in the background).
copies() {
  local deadline=$((SECONDS + 20)) total=0
  while [ $SECONDS -lt $deadline ]; do
    total=$(tx "${2:-1}" status | awk '$1 == "participant" && $4 == "up" {s += $8} END {print s}')
    [ "$total" = "$1" ] && return 0
    sleep 0.5
  done
  fail "participants hold $total copies, expected $1"
}

# Each key on 3 of 5, then of 6, then of 5 again: participant 6 added with
# the documented steps takes its share of the partitions (moved to it
# while the cluster runs), participant 2 removed gives its share away
# before it leaves, and every key stays on exactly 3 participants.
test_replication3_add_and_remove_participant() {
  local script="" status
  for i in $(seq 1 30); do script="$script"$'\n'"put m/$i v$i"; done
  docker exec -i "$(cid participant-1)" /usr/local/bin/treaty --endpoints participant-1:7001 run --atomic - <<<"$script" >/dev/null ||
    fail "writing 30 keys" || return 1
  copies 90 || return 1
  add_six || return 1
  status=$(tx 1 status)
  grep -q "replication 3 of 6 (256 partitions)" <<<"$status" || fail "status after the add: $status" || return 1
  grep "^participant 6 " <<<"$status" | grep -q "holds 128 of 256 partitions" ||
    fail "participant 6 does not hold its share: $status" || return 1
  copies 90 || return 1
  six_serves 1 13 30 || return 1
  remove_two || return 1
  status=$(tx 1 status)
  grep -q "replication 3 of 5 (256 partitions)" <<<"$status" && grep -q "removed for good: participant 2" <<<"$status" ||
    fail "status after the removal: $status" || return 1
  copies 90 || return 1
  tx 3 put after/removal yes >/dev/null || fail "a write after the removal" || return 1
  for i in 1 13 30; do
    [ "$(tx 4 get "m/$i")" = "v$i" ] || fail "m/$i after the removal" || return 1
  done
  [ "$(in_six get after/removal)" = yes ] || fail "participant 6 does not serve the write made after the removal" || return 1
}

# The Redis door of each container, from the host's redis-cli with the
# cluster's certificates: a write through one door reads back through the
# others, concurrent INCRs through two doors count exactly, and with a
# participant killed writes go on through the doors left.
test_redis_door() {
  if ! command -v redis-cli >/dev/null; then
    apt-get install -y -q redis-tools >/dev/null 2>&1 || fail "redis-cli is missing and apt-get could not install it" || return 1
  fi
  local certs="$TREATY_CERTS_DIR"
  rc() { local n=$1; shift; redis-cli -p "$(hostport participant-$n 6379)" --tls --cacert "$certs/ca.pem" \
    --cert "$certs/client-admin.pem" --key "$certs/client-admin.key" "$@"; }
  [ "$(TREATY_PROJECT="$project" "$here/cluster.sh" redis-cli SET door/greeting hello)" = OK ] ||
    fail "cluster.sh redis-cli SET" || return 1
  local i
  for i in 2 3 4 5; do
    [ "$(rc "$i" GET door/greeting)" = hello ] || fail "participant $i's door does not read door/greeting" || return 1
  done
  for i in $(seq 1 25); do rc 1 INCR door/n >/dev/null & rc 2 INCR door/n >/dev/null & done
  wait
  [ "$(rc 3 GET door/n)" = 50 ] || fail "50 INCRs through two doors counted $(rc 3 GET door/n)" || return 1
  docker kill "$(cid participant-4)" >/dev/null
  [ "$(rc 1 SET door/after-kill yes)" = OK ] || fail "a write through a door with participant 4 down" || return 1
  [ "$(rc 5 GET door/after-kill)" = yes ] || fail "participant 5's door does not read the write" || return 1
  # Plaintext on the door: told to use TLS, and nothing else happens.
  local port out; port=$(hostport participant-2 6379)
  out=$(timeout 5 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port; printf 'SET door/greeting plain\\r\\n' >&3; cat <&3" 2>&1 || true)
  grep -q "requires TLS" <<<"$out" || fail "plaintext on the door got: $out" || return 1
  [ "$(rc 2 GET door/greeting)" = hello ] || fail "the plaintext SET changed door/greeting" || return 1
  dc start participant-4 >/dev/null 2>&1
}

all=(write_one_read_all strangers_are_refused kill_participant_mid_batch coordinator_killed_between_phases
  network_disconnect restart_and_down_up_keep_data wiped_participant_reseeds backup_and_restore
  bad_configuration_exits_with_a_message shell_history_survives replication3_partition_down
  add_and_remove_participant replication3_add_and_remove_participant redis_door)
selected=("$@")
[ ${#selected[@]} -gt 0 ] || selected=("${all[@]}")

# Build once: the host CLI and the image.
(cd "$root" && cargo build --release --locked --bin treaty -q)
"$here/cluster.sh" build

for t in "${selected[@]}"; do run_test "$t"; done
echo "docker tests: $passed passed, $failed failed"
[ "$failed" -eq 0 ] || { echo "failed:$failures"; exit 1; }
