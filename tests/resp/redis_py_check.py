"""Drives Treaty's Redis-protocol doors with redis-py (PyPI's `redis`), a
client nobody on this project wrote. Run by tests/tests/redis.rs against a
real cluster; exits non-zero (with the failed check) on any difference.

usage: redis_py_check.py CERTS PORT [PORT ...]
"""

import multiprocessing
import random
import socket
import ssl
import sys
import time

import redis

CERTS = sys.argv[1]
PORTS = [int(p) for p in sys.argv[2:]]


def connect(port, **kw):
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        ssl=True,
        ssl_ca_certs=f"{CERTS}/ca.pem",
        ssl_certfile=f"{CERTS}/client-admin.pem",
        ssl_keyfile=f"{CERTS}/client-admin.key",
        # The nodes' certificates name Treaty identities, not 127.0.0.1.
        ssl_check_hostname=False,
        socket_timeout=30,
        **kw,
    )


def check(what, got, want):
    if got != want:
        print(f"FAILED {what}: got {got!r}, want {want!r}", flush=True)
        sys.exit(1)
    print(f"ok {what}", flush=True)


def expect_error(what, fn, fragment):
    try:
        fn()
    except redis.ResponseError as e:
        check(what, fragment in str(e), True)
        return str(e)
    print(f"FAILED {what}: no error", flush=True)
    sys.exit(1)


def basics():
    r = connect(PORTS[0])
    check("ping", r.ping(), True)
    check("set", r.set("py:greeting", "hello"), True)
    check("get", r.get("py:greeting"), b"hello")
    check("get through another door", connect(PORTS[1]).get("py:greeting"), b"hello")
    check("get missing", r.get("py:nothing"), None)
    check("mset", r.mset({"py:a": "1", "py:b": "2", "py:c": "3"}), True)
    check("mget", r.mget("py:a", "py:b", "py:nothing", "py:c"), [b"1", b"2", None, b"3"])
    check("incr new", r.incr("py:n"), 1)
    check("incrby", r.incrby("py:n", 41), 42)
    check("decr", r.decr("py:n"), 41)
    check("set nx on existing", r.set("py:a", "x", nx=True), None)
    check("set xx on missing", r.set("py:zz", "x", xx=True), None)
    check("set get", r.set("py:a", "9", get=True), b"1")
    check("getset", r.getset("py:b", "20"), b"2")
    check("exists", r.exists("py:a", "py:b", "py:nothing"), 2)
    check("delete counts what existed", r.delete("py:a", "py:nothing"), 1)
    # Participants count their keys at most every 2 s (DBSIZE is cheap).
    time.sleep(2.5)
    check("dbsize counts the keys", r.dbsize(), 4)
    check("select 0", r.execute_command("SELECT", 0), True)
    check("client name", (r.client_setname("checker"), r.client_getname()), (True, "checker"))
    names = sorted(k for k in r.scan_iter(match="py:*", count=2))
    check("scan_iter with match", names, [b"py:b", b"py:c", b"py:greeting", b"py:n"])
    check("keys", sorted(r.keys("py:[bc]")), [b"py:b", b"py:c"])
    info = r.info()
    check("info names the role", info.get("role"), "master")
    check("info shows the cluster's members", info.get("members"), [1, 2, 3, 4, 5])
    # Errors in Redis's words, and the data stays as it was.
    expect_error("expiry is refused", lambda: r.set("py:t", "v", ex=10), "do not expire")
    expect_error("unknown command", lambda: r.execute_command("FLUSHALL"), "unknown command")
    expect_error("incr of text", lambda: r.incr("py:greeting"), "not an integer")
    expect_error("value over 1 MiB", lambda: r.set("py:big", b"x" * (1024 * 1024 + 1)), "the limit is")
    expect_error("key over 1 KiB", lambda: r.set(b"k" * 2000, "v"), "the limit is 1024")
    check("nothing changed after the errors", (r.get("py:greeting"), r.exists("py:big")), (b"hello", 0))


def pipelines():
    r = connect(PORTS[0])
    p = r.pipeline(transaction=False)
    for i in range(200):
        p.set(f"py:pipe:{i}", i)
    for i in range(200):
        p.incr("py:pipe:counter")
    p.get("py:pipe:77")
    out = p.execute()
    check("a non-transactional pipeline answers each command", (out[:2], out[200], out[399], out[400]), ([True, True], 1, 200, b"77"))
    t = r.pipeline(transaction=True)
    t.incr("py:multi").incr("py:multi").get("py:multi").set("py:multi:other", "x")
    check("MULTI/EXEC pipeline", t.execute(), [1, 2, b"2", True])


def resp3():
    r = connect(PORTS[2], protocol=3)
    check("RESP3 set", r.set("py:resp3", "three"), True)
    check("RESP3 get", r.get("py:resp3"), b"three")
    check("RESP3 missing is None", r.get("py:resp3:nothing"), None)
    check("RESP3 hello", r.execute_command("HELLO", 3)[b"proto"], 3)


def stale_reads():
    r = connect(PORTS[3])
    check("readonly", r.execute_command("READONLY"), True)
    r2 = connect(PORTS[0])
    r2.set("py:stale", "v")
    # A stale read is the replica's local state: it may lag, never invents.
    check("stale read sees the value or nothing", r.get("py:stale") in (b"v", None), True)


ACCOUNTS = [f"py:acct:{i}" for i in range(6)]


def transfers(port, n, seed, out):
    r = connect(port)
    rnd = random.Random(seed)
    done = conflicts = 0
    while done < n:
        a, b = rnd.sample(ACCOUNTS, 2)
        with r.pipeline() as p:
            try:
                p.watch(a, b)
                va, vb = int(p.get(a)), int(p.get(b))
                amount = rnd.randint(1, 20)
                if va < amount:
                    p.unwatch()
                    done += 1
                    continue
                p.multi()
                p.set(a, va - amount)
                p.set(b, vb + amount)
                p.execute()
                done += 1
            except redis.WatchError:
                conflicts += 1
    out.put(conflicts)


def bank():
    r = connect(PORTS[0])
    r.mset({a: 100 for a in ACCOUNTS})
    q = multiprocessing.Queue()
    # Two processes, through two different doors, on the same accounts.
    procs = [multiprocessing.Process(target=transfers, args=(PORTS[i], 120, i, q)) for i in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
        check("transfer process finished", p.exitcode, 0)
    conflicts = q.get() + q.get()
    print(f"WATCH conflicts retried: {conflicts}", flush=True)
    total = sum(int(v) for v in r.mget(ACCOUNTS))
    check("transfers conserve the total", total, 100 * len(ACCOUNTS))
    check("every replica holds the same total", [sum(int(v) for v in connect(p).mget(ACCOUNTS)) for p in PORTS], [600] * len(PORTS))


def tls_context():
    ctx = ssl.create_default_context(cafile=f"{CERTS}/ca.pem")
    ctx.check_hostname = False
    ctx.load_cert_chain(f"{CERTS}/client-admin.pem", f"{CERTS}/client-admin.key")
    return ctx


def read_until_closed(s):
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data, True
            data += chunk
    except (ConnectionResetError, ssl.SSLError, socket.timeout):
        return data, False


def bad_input():
    port = PORTS[0]
    # Garbage: an error, then the connection is closed.
    s = tls_context().wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))
    s.sendall(b"*1\r\n:not-a-bulk-string\r\n")
    data, closed = read_until_closed(s)
    check("garbage gets a protocol error", data.startswith(b"-ERR Protocol error"), True)
    check("and the connection closes", closed, True)
    # Over the size limit: refused, closed.
    s = tls_context().wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=20))
    try:
        s.sendall(b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$9000000\r\n" + b"x" * 7_000_000)
    except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
        pass
    data, _ = read_until_closed(s)
    check("an oversized request is refused", data == b"" or data.startswith(b"-ERR Protocol error"), True)
    # Plaintext on the TLS port: told what to do.
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"PING\r\n")
    data, _ = read_until_closed(s)
    check("plaintext is told to use TLS", b"requires TLS" in data, True)
    # The node keeps serving, with the data intact.
    r = connect(port)
    check("the door still serves", (r.ping(), r.get("py:greeting"), r.exists("big")), (True, b"hello", 0))


if __name__ == "__main__":
    basics()
    pipelines()
    resp3()
    stale_reads()
    bank()
    bad_input()
    print("ALL OK", flush=True)
