#!/usr/bin/env python3
"""LLM gateway benchmarks (docs/benchmarks.md, "LLM gateway"), same-run comparisons:

  1. Overhead: non-streamed chat completions at fixed rates (1,000 and 5,000 req/s, h2load
     --rps, per-request times from its log) straight to the demo provider and through
     Tollgate's LLM API in front of it; rounds interleaved. Added p50 and p99.
  2. Streams: the same for streamed answers (the demo streams them without delay, so the
     time to the last byte bounds the time to the first token from above).
  3. Highest rate: closed-loop h2load, 8 connections, to the provider, through a plain
     proxied route of Tollgate (no LLM logic), through the LLM API, and through LiteLLM's
     proxy (PyPI litellm[proxy], 2 workers) when --litellm is given.
  4. Memory: node RSS idle, then with 1,000 concurrent slow streams open through it.
  5. Spend checks (--only spend): the same LLM API with a hard-capped budget (large enough
     never to refuse) and a token quota on, against both off, toggled between interleaved
     rounds: closed-loop requests/s and p99 at 1,000 req/s.
  6. Response cache (--only cache): a version with a response cache; the same
     deterministic request, so all but the first are hits: p99 at 1,000 req/s next to the
     provider's own, and closed-loop requests/s on hits.

Everything listens on 127.0.0.1; every run is bounded in time. Needs h2load (apt-get install
nghttp2-client) and a release build (cargo build --release).

  benches/llm_bench.py                        # 3 rounds of 10 s
  benches/llm_bench.py --rounds 5 --litellm   # with LiteLLM's proxy (installs it in a venv)
"""
import argparse, asyncio, json, os, shutil, signal, statistics, subprocess, sys, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("TOLLGATE_BIN", os.path.join(ROOT, "target", "release", "tollgate"))
W = os.path.join(os.environ.get("TMPDIR", "/tmp"), "tollgate-llm-bench")
PROXY, HTTPS, GRPC, ADMIN, CP, ECHO, DEV_LLM = 38080, 38443, 38070, 38071, 38072, 38090, 38091
DEMO, LITELLM = 38100, 38400
procs = []


def stop_all():
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except Exception:
            pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except Exception:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except Exception:
                pass


def start(args, log, env=None):
    p = subprocess.Popen(args, stdout=log, stderr=log, env=env, start_new_session=True)
    procs.append(p)
    return p


def wait_http(url, what, timeout=60, headers=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2)
            return
        except Exception:
            time.sleep(0.3)
    sys.exit(f"{what} did not come up ({url})")


def rss_kb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def setup():
    shutil.rmtree(W, ignore_errors=True)
    os.makedirs(W)
    log = open(os.path.join(W, "demo.log"), "w")
    start([BIN, "llm-demo", "--listen", f"127.0.0.1:{DEMO}", "--threads", "1"], log)
    wait_http(f"http://127.0.0.1:{DEMO}/_demo/stats", "the demo provider")
    data = os.path.join(W, "data")
    dev = start([BIN, "dev", "--data-dir", data, "--access-log", "off",
                 "--proxy-addr", f"127.0.0.1:{PROXY}", "--https-addr", f"127.0.0.1:{HTTPS}",
                 "--grpc-addr", f"127.0.0.1:{GRPC}", "--admin-addr", f"127.0.0.1:{ADMIN}",
                 "--cp-addr", f"127.0.0.1:{CP}", "--echo-addr", f"127.0.0.1:{ECHO}",
                 "--llm-addr", f"127.0.0.1:{DEV_LLM}"], open(os.path.join(W, "dev.log"), "w"))
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(data, "ai-api-key")):
        if time.time() > deadline:
            sys.exit("tollgate dev did not publish its LLM API; see " + W + "/dev.log")
        time.sleep(0.3)
    key = open(os.path.join(data, "ai-api-key")).read().strip()
    env = dict(os.environ, TOLLGATE_NODE=f"127.0.0.1:{GRPC}", TOLLGATE_CP=f"127.0.0.1:{CP}",
               TOLLGATE_TOKEN=open(os.path.join(data, "operator-token")).read().strip(),
               TOLLGATE_CA=os.path.join(data, "cluster-ca.pem"))
    def cli(*a):
        subprocess.run([BIN, *a], env=env, check=True, capture_output=True, text=True, timeout=30)
    # A version of the API in front of the external demo provider, and a plain route to it.
    content = os.path.join(W, "llm.yaml")
    with open(content, "w") as f:
        f.write(f"""providers:
  demo: {{ kind: openai, base_url: "http://127.0.0.1:{DEMO}/v1" }}
models:
  demo: {{ deployments: [{{ provider: demo, model: demo }}] }}
  slow: {{ first_token_timeout: 60s, timeout: 600s, deployments: [{{ provider: demo, model: "demo+slow=1000" }}] }}
""")
    cli("version", "create", "ai", "2.0.0", "-f", content)
    cli("version", "publish", "ai", "2.0.0")
    cli("api", "promote", "ai", "2.0.0")
    spec = open(os.path.join(data, "dev-spec.yaml")).read()
    spec = spec.replace("routes:\n", f"""  mock:
    endpoints:
      - address: 127.0.0.1:{DEMO}

routes:
  mock:
    match:
      path: {{ prefix: /v1/chat }}
    upstream: mock
""", 1)
    with open(os.path.join(W, "spec.yaml"), "w") as f:
        f.write(spec)
    cli("apply", "-f", os.path.join(W, "spec.yaml"))
    # A plan that prices the demo's tokens (the cost header and budgets need one).
    cli("plan", "put", "llm-bench", "--llm", "*=input:2.50,output:10")
    cli("plan", "assign", "ai", "llm-bench")
    global CLI, SPEC
    CLI, SPEC = cli, spec
    body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "hello there, how are you"}]})
    for path in ["/ai/v1/chat/completions", "/v1/chat/completions"]:
        deadline = time.time() + 20
        while True:
            try:
                r = urllib.request.urlopen(urllib.request.Request(
                    f"http://127.0.0.1:{PROXY}{path}", data=body.encode(),
                    headers={"authorization": f"Bearer {key}", "content-type": "application/json"}), timeout=5)
                if json.loads(r.read()).get("model") == "demo":
                    break
            except Exception:
                pass
            if time.time() > deadline:
                sys.exit(f"{path} is not served; see {W}/dev.log")
            time.sleep(0.3)
    return dev, key


def start_litellm():
    venv = os.path.join(os.environ.get("TMPDIR", "/tmp"), "litellm-venv")
    if not os.path.exists(os.path.join(venv, "bin", "litellm")):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "litellm[proxy]"], check=True)
    cfg = os.path.join(W, "litellm.yaml")
    with open(cfg, "w") as f:
        f.write(f"""model_list:
  - model_name: demo
    litellm_params: {{ model: openai/demo, api_base: "http://127.0.0.1:{DEMO}/v1", api_key: sk-dummy }}
litellm_settings: {{ set_verbose: false, json_logs: false, request_timeout: 30, num_retries: 0, telemetry: false }}
general_settings:
  master_key: sk-bench-1234
  disable_spend_logs: true
  disable_error_logs: true
  disable_adding_master_key_hash_to_db: true
  background_health_checks: false
""")
    logcfg = os.path.join(W, "uvicorn-log.json")
    with open(logcfg, "w") as f:
        json.dump({"version": 1, "disable_existing_loggers": False,
                   "loggers": {"uvicorn.access": {"level": "WARNING"}}}, f)
    env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR",
               NO_DOCS="True", DISABLE_ADMIN_UI="True")
    log = open(os.path.join(W, "litellm.log"), "w")
    start([os.path.join(venv, "bin", "litellm"), "--config", cfg, "--host", "127.0.0.1",
           "--port", str(LITELLM), "--num_workers", "2", "--timeout_worker_healthcheck", "60",
           "--log_config", logcfg], log, env)
    wait_http(f"http://127.0.0.1:{LITELLM}/health/liveliness", "LiteLLM", timeout=120)
    deadline = time.time() + 60
    while open(os.path.join(W, "litellm.log")).read().count("Application startup complete") < 2:
        if time.time() > deadline:
            break
        time.sleep(0.5)


def h2load(url, key, body, conns, duration, rps=None, stream=False):
    """Per-request times (ms) and requests/s; rps: the rate (None: as fast as it goes)."""
    bodyf = os.path.join(W, "body-stream.json" if stream else "body.json")
    b = body or {"model": "demo", "messages": [{"role": "user", "content": "hello there, how are you"}]}
    if stream:
        b["stream"] = True
    with open(bodyf, "w") as f:
        json.dump(b, f)
    logf = os.path.join(W, "h2load.log")
    if os.path.exists(logf):
        os.remove(logf)
    args = ["h2load", "--h1", "-c", str(conns), "-D", str(duration), "-d", bodyf,
            "-H", f"authorization: Bearer {key}", "-H", "content-type: application/json",
            "--log-file", logf, "-T", "10", "-N", "10"]
    if rps:
        args += ["--rps", str(rps / conns)]
    out = subprocess.run(args + [url], capture_output=True, text=True, timeout=duration + 60).stdout
    times, ok = [], 0
    for line in open(logf):
        parts = line.split()
        if len(parts) >= 3:
            if parts[1] == "200":
                ok += 1
            times.append(int(parts[2]) / 1000)
    rate = ok / duration
    failed = len(times) - ok
    return times, rate, failed, out


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def ttft(port, path, key, rate, duration, conns=16):
    """Open-loop streams at `rate` per second over `conns` keep-alive connections: for each,
    the time from when it was due to be sent to the first byte of its first event (ms)."""
    body = json.dumps({"model": "demo", "stream": True,
                       "messages": [{"role": "user", "content": "hello there, how are you"}]})
    req = (f"POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n"
           f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n{body}").encode()
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.2
    total = int(rate * duration)
    nxt = [0]
    out = []
    async def conn():
        r, w = await asyncio.open_connection("127.0.0.1", port)
        while True:
            i = nxt[0]
            if i >= total:
                break
            nxt[0] += 1
            due = start + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            w.write(req)
            await w.drain()
            await r.readuntil(b"\r\n\r\n")
            await r.readuntil(b"data:")
            out.append((loop.time() - due) * 1000)
            await r.readuntil(b"\r\n0\r\n\r\n")
        w.close()
    await asyncio.gather(*[conn() for _ in range(conns)])
    return out


async def open_streams(n, key, hold):
    """n streams through the LLM API, each read to its first event, held `hold` s."""
    async def one():
        r, w = await asyncio.open_connection("127.0.0.1", PROXY)
        body = json.dumps({"model": "slow", "stream": True,
                           "messages": [{"role": "user", "content": " ".join(["w"] * 30)}]})
        w.write((f"POST /ai/v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n"
                 f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n{body}").encode())
        await w.drain()
        await r.readuntil(b"\r\n\r\n")
        return r, w
    conns = await asyncio.gather(*[one() for _ in range(n)])
    await asyncio.sleep(hold)
    return conns


def memory(dev, key):
    time.sleep(2)
    idle = rss_kb(dev.pid)
    async def run():
        conns = await open_streams(1000, key, 3)
        during = rss_kb(dev.pid)
        for _, w in conns:
            w.close()
        return during
    during = asyncio.run(run())
    return idle, during


def limits(on):
    """Turns tenant ai's hard-capped budget (1,000,000 a month: never reached here) and a
    token quota (10^9 tokens a minute) on or off."""
    if on:
        CLI("budget", "set", "ai", "--monthly-limit", "1000000", "--hard-cap")
        spec = SPEC + "\nquotas:\n  tpm:\n    scope: tenant\n    limit: 1000000000\n    window: minute\n    unit: tokens\n    apis: [ai]\n"
    else:
        CLI("budget", "remove", "ai")
        spec = SPEC
    path = os.path.join(W, "spec-limits.yaml")
    with open(path, "w") as f:
        f.write(spec)
    CLI("apply", "-f", path)
    time.sleep(1)


def spend_checks(a, llm, key):
    rows = []
    for r in range(a.rounds):
        out = {}
        for on in (False, True):
            limits(on)
            _, rate, f1, _ = h2load(llm, key, None, 8, a.duration)
            t, _, f2, _ = h2load(llm, key, None, 8, a.duration, 1000)
            out[on] = (rate, pct(t, .99), f1 + f2)
        rows.append(out)
        print(f"spend checks round {r+1}: off {out[False][0]:.0f} req/s p99 {out[False][1]:.3f} ms"
              f" | on {out[True][0]:.0f} req/s p99 {out[True][1]:.3f} ms"
              f" | ratio {out[True][0]/out[False][0]:.3f}, failed {out[False][2] + out[True][2]}", flush=True)
    limits(False)
    med = lambda on, i: statistics.median(x[on][i] for x in rows)
    return {"off_rps": med(False, 0), "on_rps": med(True, 0),
            "ratio": statistics.median(x[True][0] / x[False][0] for x in rows),
            "off_p99_ms": med(False, 1), "on_p99_ms": med(True, 1)}


def cache_hits(a, direct, key):
    content = os.path.join(W, "llm-cache.yaml")
    with open(content, "w") as f:
        f.write(f"""providers:
  demo: {{ kind: openai, base_url: "http://127.0.0.1:{DEMO}/v1" }}
models:
  demo: {{ deployments: [{{ provider: demo, model: demo }}] }}
response_cache: {{ ttl: 10m }}
""")
    CLI("version", "create", "ai", "2.1.0", "-f", content)
    CLI("version", "publish", "ai", "2.1.0")
    CLI("api", "promote", "ai", "2.1.0")
    time.sleep(1)
    body = {"model": "demo", "temperature": 0, "messages": [{"role": "user", "content": "hello there, how are you"}]}
    llm = f"http://127.0.0.1:{PROXY}/ai/v1/chat/completions"
    h2load(llm, key, dict(body), 1, 1)  # the miss that fills it
    rows = []
    for r in range(a.rounds):
        d, _, df, _ = h2load(direct, "sk", dict(body), 8, a.duration, 1000)
        g, _, gf, _ = h2load(llm, key, dict(body), 8, a.duration, 1000)
        _, rate, rf, _ = h2load(llm, key, dict(body), 8, a.duration)
        rows.append((pct(d, .5), pct(d, .99), pct(g, .5), pct(g, .99), rate, df + gf + rf))
        print(f"cache hits round {r+1}: provider p50 {rows[-1][0]:.3f} p99 {rows[-1][1]:.3f} ms"
              f" | hit p50 {rows[-1][2]:.3f} p99 {rows[-1][3]:.3f} ms | hits {rate:.0f} req/s, failed {rows[-1][5]}", flush=True)
    med = lambda i: statistics.median(x[i] for x in rows)
    return {"provider_p99_ms": med(1), "hit_p50_ms": med(2), "hit_p99_ms": med(3), "hit_rps": med(4)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--litellm", action="store_true")
    ap.add_argument("--only", choices=["overhead", "ttft", "rate", "memory", "spend", "cache"])
    a = ap.parse_args()
    try:
        dev, key = setup()
        if a.litellm:
            start_litellm()
        direct = f"http://127.0.0.1:{DEMO}/v1/chat/completions"
        llm = f"http://127.0.0.1:{PROXY}/ai/v1/chat/completions"
        plain = f"http://127.0.0.1:{PROXY}/v1/chat/completions"
        results = {}
        if a.only in (None, "overhead"):
            for rate, conns in [(1000, 8), (5000, 32)]:
                for stream in (False, True):
                    name = f"{rate} req/s{' streamed' if stream else ''}"
                    rows = []
                    for r in range(a.rounds):
                        d, drate, dfail, _ = h2load(direct, "sk", None, conns, a.duration, rate, stream)
                        g, grate, gfail, _ = h2load(llm, key, None, conns, a.duration, rate, stream)
                        rows.append((pct(d, .5), pct(d, .99), pct(g, .5), pct(g, .99), drate, grate, dfail + gfail))
                        print(f"{name} round {r+1}: direct p50 {rows[-1][0]:.3f} p99 {rows[-1][1]:.3f} ms"
                              f" | gateway p50 {rows[-1][2]:.3f} p99 {rows[-1][3]:.3f} ms"
                              f" | added p50 {rows[-1][2]-rows[-1][0]:+.3f} p99 {rows[-1][3]-rows[-1][1]:+.3f} ms"
                              f" | {drate:.0f}/{grate:.0f} req/s, failed {rows[-1][6]}", flush=True)
                    med = lambda i: statistics.median(x[i] for x in rows)
                    results[name] = {"added_p50_ms": med(2) - med(0), "added_p99_ms": med(3) - med(1),
                                     "direct_p50_ms": med(0), "direct_p99_ms": med(1),
                                     "gateway_p50_ms": med(2), "gateway_p99_ms": med(3)}
        if a.only in (None, "ttft"):
            rows = []
            for r in range(a.rounds):
                d = asyncio.run(ttft(DEMO, "/v1/chat/completions", "sk", 1000, a.duration))
                g = asyncio.run(ttft(PROXY, "/ai/v1/chat/completions", key, 1000, a.duration))
                rows.append((pct(d, .5), pct(d, .99), pct(g, .5), pct(g, .99)))
                print(f"time to first token at 1000 streams/s round {r+1}: direct p50 {rows[-1][0]:.3f} p99 {rows[-1][1]:.3f} ms"
                      f" | gateway p50 {rows[-1][2]:.3f} p99 {rows[-1][3]:.3f} ms"
                      f" | added p50 {rows[-1][2]-rows[-1][0]:+.3f} p99 {rows[-1][3]-rows[-1][1]:+.3f} ms ({len(d)}/{len(g)} streams)", flush=True)
            med = lambda i: statistics.median(x[i] for x in rows)
            results["time to first token, 1000 streams/s"] = {"added_p50_ms": med(2) - med(0), "added_p99_ms": med(3) - med(1)}
        if a.only in (None, "rate"):
            targets = [("provider", direct, "sk"), ("tollgate plain route", plain, key), ("tollgate LLM API", llm, key)]
            if a.litellm:
                targets.append(("litellm proxy", f"http://127.0.0.1:{LITELLM}/v1/chat/completions", "sk-bench-1234"))
            rates = {t[0]: [] for t in targets}
            for r in range(a.rounds):
                for name, url, k in targets:
                    t, rate, failed, _ = h2load(url, k, None, 8, a.duration)
                    rates[name].append(rate)
                    print(f"highest rate round {r+1}: {name}: {rate:.0f} req/s, p50 {pct(t,.5):.2f} ms p99 {pct(t,.99):.2f} ms, failed {failed}", flush=True)
            results["highest rate"] = {k: statistics.median(v) for k, v in rates.items()}
        if a.only in (None, "memory"):
            idle, during = memory(dev, key)
            results["memory"] = {"idle_rss_mb": idle / 1024, "rss_1000_streams_mb": during / 1024,
                                 "per_stream_kb": (during - idle) / 1000}
            print(f"memory: idle {idle/1024:.1f} MiB, with 1,000 streams open {during/1024:.1f} MiB, "
                  f"{(during-idle)/1000:.1f} KiB per stream", flush=True)
        if a.only == "spend":
            results["spend checks"] = spend_checks(a, llm, key)
        if a.only == "cache":
            results["response cache"] = cache_hits(a, direct, key)
        print(json.dumps(results, indent=2))
    finally:
        stop_all()


if __name__ == "__main__":
    main()
