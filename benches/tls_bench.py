#!/usr/bin/env python3
"""TLS benchmarks: Tollgate against nginx in the same run, interleaved (docs/benchmarks.md).

  1. HTTPS termination: wrk over TLS (keep-alive) to Tollgate's --https-addr and to nginx
     terminating TLS with the same certificate (ECDSA P-256) and the Mozilla
     "intermediate" settings, both proxying to the same plain origin; paths / and /4k at
     8 and 64 connections. Requests/s, server CPU per request, p99.
  2. New TLS 1.3 handshakes per second, full (-new) and resumed (-reuse), with parallel
     `openssl s_time` clients.
  3. HTTPS upstream: plain wrk to Tollgate and to nginx, each proxying to the same TLS
     origin (nginx) with keep-alive and session reuse.

Everything listens on 127.0.0.1 and every run is bounded in time. Needs nginx, wrk and
openssl (apt-get install nginx wrk openssl) and a release build (cargo build --release).

  benches/tls_bench.py                      # 3 rounds of 5 s runs
  benches/tls_bench.py --rounds 5 --duration 10 --only handshakes
"""
import argparse, json, os, re, shutil, signal, statistics, subprocess, sys, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("TOLLGATE_BIN", os.path.join(ROOT, "target", "release", "tollgate"))
LUA = os.path.join(ROOT, "benches", "baseline", "wrk_json.lua")
W = os.path.join(os.environ.get("TMPDIR", "/tmp"), "tollgate-tls-bench")
CLK = os.sysconf("SC_CLK_TCK")

ORIGIN, ORIGIN_TLS = 18180, 18543
NGINX_EDGE, NGINX_UP = 18443, 18181
TG_EDGE_HTTPS, TG_EDGE_PLAIN, TG_UP = 28443, 28080, 28180

procs = []


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True, **kw)


def certs():
    d = os.path.join(W, "certs")
    os.makedirs(d, exist_ok=True)
    sh(f"""cd {d} && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca.key \
        && openssl req -x509 -new -key ca.key -subj /CN=bench-ca -days 30 -out ca.pem \
        && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out server.key \
        && openssl req -new -key server.key -subj /CN=bench.test -out server.csr \
        && printf 'subjectAltName=DNS:bench.test,DNS:origin.test,IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n' > ext \
        && openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 -extfile ext -out server.pem""")
    return d


MOZILLA = """
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_ecdh_curve X25519:prime256v1:secp384r1;
    ssl_ciphers ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305;
    ssl_prefer_server_ciphers off;
    ssl_session_timeout 1d;
    ssl_session_cache shared:MozSSL:10m;
    ssl_session_tickets off;"""


def nginx_conf(name, body, workers):
    run = os.path.join(W, "run")
    os.makedirs(run, exist_ok=True)
    path = os.path.join(W, f"{name}.conf")
    with open(path, "w") as f:
        f.write(f"""worker_processes {workers};
pid {run}/{name}.pid;
error_log {run}/{name}.err warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  default_type text/plain;
  tcp_nodelay on;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  client_body_temp_path {run}/{name}-cb; proxy_temp_path {run}/{name}-pt; fastcgi_temp_path {run}/{name}-ft; uwsgi_temp_path {run}/{name}-ut; scgi_temp_path {run}/{name}-st;
{body}
}}
""")
    sh(f"nginx -c {path} -p {W}")
    pid = int(open(f"{run}/{name}.pid").read())
    return pid


def start_nginx(c):
    www = os.path.join(W, "www")
    os.makedirs(www, exist_ok=True)
    with open(os.path.join(www, "4k"), "w") as f:
        f.write("x" * 4096)
    pids = {}
    pids["origin"] = nginx_conf("origin", f"""
  server {{
    listen 127.0.0.1:{ORIGIN} backlog=4096;
    listen 127.0.0.1:{ORIGIN_TLS} ssl backlog=4096;
    ssl_certificate {c}/server.pem; ssl_certificate_key {c}/server.key;{MOZILLA}
    location = /   {{ return 200 "ok"; }}
    location = /4k {{ root {www}; }}
  }}""", 2)
    pids["nginx-edge"] = nginx_conf("nginx-edge", f"""
  upstream origin {{ server 127.0.0.1:{ORIGIN}; keepalive 64; keepalive_requests 1000000; }}
  server {{
    listen 127.0.0.1:{NGINX_EDGE} ssl http2 backlog=4096;
    ssl_certificate {c}/server.pem; ssl_certificate_key {c}/server.key;{MOZILLA}
    location / {{ proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}""", 2)
    pids["nginx-up"] = nginx_conf("nginx-up", f"""
  upstream origin_tls {{ server 127.0.0.1:{ORIGIN_TLS}; keepalive 64; keepalive_requests 1000000; }}
  server {{
    listen 127.0.0.1:{NGINX_UP} backlog=4096;
    location / {{
      proxy_pass https://origin_tls; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_ssl_server_name on; proxy_ssl_name origin.test; proxy_ssl_session_reuse on;
      proxy_ssl_verify on; proxy_ssl_trusted_certificate {c}/ca.pem; proxy_ssl_protocols TLSv1.2 TLSv1.3;
    }}
  }}""", 2)
    return pids


def indent(pem, n):
    return "".join(" " * n + l + "\n" for l in pem.strip().splitlines())


def start_tollgate(name, spec, https=None, plain=None, grpc=None, admin=None):
    d = os.path.join(W, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    with open(os.path.join(d, "spec.yaml"), "w") as f:
        f.write(spec)
    args = [BIN, "node", "--bootstrap", "--data-dir", os.path.join(d, "data"), "--spec", os.path.join(d, "spec.yaml"),
            "--proxy-addr", f"127.0.0.1:{plain}", "--grpc-addr", f"127.0.0.1:{grpc}",
            "--admin-addr", f"127.0.0.1:{admin}", "--access-log", "off", "--metering", "off"]
    if https:
        args += ["--https-addr", f"127.0.0.1:{https}"]
    log = open(os.path.join(d, "node.log"), "w")
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)
    procs.append(p)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1)
            return p, d
        except Exception:
            time.sleep(0.2)
    sys.exit(f"{name} did not start; see {d}/node.log")


def cli(d, grpc, *args, stdin=None):
    env = dict(os.environ, TOLLGATE_NODE=f"127.0.0.1:{grpc}",
               TOLLGATE_TOKEN=open(os.path.join(d, "data", "operator-token")).read().strip(),
               TOLLGATE_CA=os.path.join(d, "data", "cluster-ca.pem"))
    return subprocess.run([BIN, *args], env=env, check=True, capture_output=True, text=True,
                          input=stdin, timeout=30)


def cpu_ticks(pids):
    """utime+stime of these processes and their children (nginx workers)."""
    total = 0
    wanted = set(pids)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        pid, ppid = int(entry), int(fields[1])
        if pid in wanted or ppid in wanted:
            total += int(fields[11]) + int(fields[12])
    return total


def wrk(url, conns, duration, pids):
    before = cpu_ticks(pids)
    out = subprocess.run(["wrk", "-t2", f"-c{conns}", f"-d{duration}s", "--latency", "--timeout", "5s",
                          "-s", LUA, url], capture_output=True, text=True, timeout=duration + 30).stdout
    ticks = cpu_ticks(pids) - before
    m = re.search(r"^WRKJSON (\{.*\})$", out, re.M)
    if not m:
        return {"error": out[-500:]}
    r = json.loads(m.group(1))
    errors = r["err_connect"] + r["err_read"] + r["err_write"] + r["err_status"] + r["err_timeout"]
    return {"rps": r["rps"], "p99_ms": r["p99_us"] / 1000, "errors": errors,
            "cpu_us_per_req": ticks / CLK * 1e6 / max(r["requests"], 1)}


def s_time(port, mode, duration, clients):
    # Each connection fetches / (with -reuse, TLS 1.3 tickets arrive after the handshake,
    # so a connection must read something before its session can be resumed).
    ps = [subprocess.Popen(["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-tls1_3", f"-{mode}",
                            "-www", "/", "-time", str(duration)],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
          for _ in range(clients)]
    total = 0.0
    for p in ps:
        out, _ = p.communicate(timeout=duration + 30)
        m = re.search(r"(\d+) connections in (\d+) real seconds", out)
        if m:
            total += int(m.group(1)) / max(int(m.group(2)), 1)
    return total


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--only", choices=["https", "handshakes", "upstream"])
    ap.add_argument("--out", default=os.path.join(W, "summary.md"))
    ap.add_argument("--hold", type=int, default=0,
                    help="after setting up, wait this many seconds (to attach a profiler) before measuring")
    a = ap.parse_args()
    if not os.path.exists(BIN):
        sys.exit(f"build first: cargo build --release ({BIN} is missing)")
    for tool in ["nginx", "wrk", "openssl"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: apt-get install nginx wrk openssl")
    shutil.rmtree(W, ignore_errors=True)
    os.makedirs(W)
    c = certs()
    pids = start_nginx(c)
    key = open(f"{c}/server.key").read()
    chain = open(f"{c}/server.pem").read()
    ca = open(f"{c}/ca.pem").read()
    edge_spec = f"""upstreams:
  origin: {{ endpoints: [{{ address: "127.0.0.1:{ORIGIN}" }}], pool: {{ max_idle_per_endpoint: 256 }} }}
routes:
  all: {{ match: {{ path: {{ prefix: / }} }}, upstream: origin }}
"""
    edge, edge_dir = start_tollgate("tollgate-edge", edge_spec, https=TG_EDGE_HTTPS, plain=TG_EDGE_PLAIN,
                                    grpc=27070, admin=27071)
    cli(edge_dir, 27070, "secret", "set", "bench-key", stdin=key)
    with open(os.path.join(edge_dir, "spec-tls.yaml"), "w") as f:
        f.write(edge_spec + f"certificates:\n  bench:\n    key_secret: bench-key\n    default: true\n    chain: |\n{indent(chain, 6)}")
    cli(edge_dir, 27070, "apply", "-f", os.path.join(edge_dir, "spec-tls.yaml"))
    up_spec = f"""upstreams:
  origin:
    endpoints: [{{ address: "127.0.0.1:{ORIGIN_TLS}" }}]
    pool: {{ max_idle_per_endpoint: 256 }}
    tls:
      server_name: origin.test
      h2: false
      ca: |
{indent(ca, 8)}routes:
  all: {{ match: {{ path: {{ prefix: / }} }}, upstream: origin }}
"""
    up, _ = start_tollgate("tollgate-up", up_spec, plain=TG_UP, grpc=27170, admin=27171)
    time.sleep(1)
    for url in [f"https://127.0.0.1:{TG_EDGE_HTTPS}/4k", f"https://127.0.0.1:{NGINX_EDGE}/4k"]:
        sh(f"curl -sf -k {url} -o /dev/null")
    for url in [f"http://127.0.0.1:{TG_UP}/4k", f"http://127.0.0.1:{NGINX_UP}/4k"]:
        sh(f"curl -sf {url} -o /dev/null")

    if a.hold:
        print(f"ready: Tollgate pid {edge.pid} (https :{TG_EDGE_HTTPS}), nginx-edge pid {pids['nginx-edge']} (:{NGINX_EDGE}); holding {a.hold} s", flush=True)
        time.sleep(a.hold)
    report = [f"# TLS benchmarks ({time.strftime('%Y-%m-%d %H:%M')}, {a.rounds} rounds, {a.duration} s runs, {os.cpu_count()} cores)\n"]

    def compare(title, contenders, scenarios):
        results = {}
        for r in range(a.rounds):
            for path, conns in scenarios:
                order = contenders[r % 2:] + contenders[:r % 2]
                for name, url, ps in order:
                    res = wrk(url + path, conns, a.duration, ps)
                    results.setdefault((path, conns, name), []).append(res)
                    print(f"{title} round {r + 1} {name} {path} c{conns}: {res}", flush=True)
        lines = [f"\n## {title}\n", "| path | conns | Tollgate req/s | nginx req/s | ratio (median of rounds) | Tollgate CPU µs/req | nginx CPU µs/req | Tollgate p99 ms | nginx p99 ms | errors |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for path, conns in scenarios:
            t = results[(path, conns, "tollgate")]
            n = results[(path, conns, "nginx")]
            ratios = [x["rps"] / y["rps"] for x, y in zip(t, n) if "rps" in x and "rps" in y]
            lines.append(f"| {path} | {conns} | {median([x['rps'] for x in t]):.0f} | {median([x['rps'] for x in n]):.0f} | "
                         f"{median(ratios):.3f} | {median([x['cpu_us_per_req'] for x in t]):.1f} | {median([x['cpu_us_per_req'] for x in n]):.1f} | "
                         f"{median([x['p99_ms'] for x in t]):.2f} | {median([x['p99_ms'] for x in n]):.2f} | "
                         f"{sum(x.get('errors', 1) for x in t + n)} |")
        report.extend(lines)

    scenarios = [("/", 8), ("/", 64), ("/4k", 8), ("/4k", 64)]
    if a.only in (None, "https"):
        compare("HTTPS termination (wrk over TLS 1.3, keep-alive)", [
            ("tollgate", f"https://127.0.0.1:{TG_EDGE_HTTPS}", [edge.pid]),
            ("nginx", f"https://127.0.0.1:{NGINX_EDGE}", [pids["nginx-edge"]])], scenarios)
    if a.only in (None, "handshakes"):
        hs = {}
        for r in range(a.rounds):
            for mode in ["new", "reuse"]:
                order = [("tollgate", TG_EDGE_HTTPS), ("nginx", NGINX_EDGE)]
                order = order[r % 2:] + order[:r % 2]
                for name, port in order:
                    rate = s_time(port, mode, a.duration, 4)
                    hs.setdefault((mode, name), []).append(rate)
                    print(f"handshakes round {r + 1} {name} {mode}: {rate:.0f}/s", flush=True)
        report += ["\n## New TLS 1.3 handshakes per second (4 parallel `openssl s_time` clients)\n",
                   "| handshake | Tollgate /s | nginx /s | ratio (median of rounds) |", "|---|---|---|---|"]
        for mode, label in [("new", "full"), ("reuse", "resumed")]:
            t, n = hs[(mode, "tollgate")], hs[(mode, "nginx")]
            report.append(f"| {label} | {median(t):.0f} | {median(n):.0f} | {median([x / y for x, y in zip(t, n)]):.3f} |")
        metrics = urllib.request.urlopen("http://127.0.0.1:27071/metrics").read().decode()
        resumed = re.search(r'tollgate_tls_handshakes_total\{resumed="true"\} (\d+)', metrics)
        report.append(f"\nTollgate counted {resumed.group(1) if resumed else 0} resumed handshakes.")
    if a.only in (None, "upstream"):
        compare("HTTPS upstream (plain wrk in; TLS 1.3 to the origin, keep-alive)", [
            ("tollgate", f"http://127.0.0.1:{TG_UP}", [up.pid]),
            ("nginx", f"http://127.0.0.1:{NGINX_UP}", [pids["nginx-up"]])], scenarios)
    text = "\n".join(report) + "\n"
    with open(a.out, "w") as f:
        f.write(text)
    print(text)


def cleanup(*_):
    for p in procs:
        p.terminate()
    for name in ["origin", "nginx-edge", "nginx-up"]:
        try:
            os.kill(int(open(os.path.join(W, "run", f"{name}.pid")).read()), signal.SIGTERM)
        except Exception:
            pass


if __name__ == "__main__":
    try:
        main()
    finally:
        cleanup()
