"""make bench: serve.py against a naive peer-style service, same network, same photos.

    python bench.py                       # models/ and the shared photo sample
    python bench.py --clients 1,8 --seconds 4
    python bench.py --clients 8 --skip-baseline --against ../parent   # a change against its parent

First it prints the CPU cost of each step of a prediction (decode, preprocess, drift
statistics, the model, all four photo after photo, and a 12 MP phone JPEG decoded both ways),
without HTTP: the model's is what the service's own CPU per request is set against. Then the
HTTP benchmark. The baseline is what peers ship: Flask's own server, the same network in PyTorch eager
(nets.load_model of models/model.pt), one image per forward, no batching. Both are driven over loopback with real photos by 1, 8 and 32 concurrent clients,
each a keep-alive connection posting multipart uploads back to back: --rounds rounds of
--seconds per level, services taking turns, the median round reported. Prints requests/s,
p50/p95/p99 and server CPU per request for each service, the speed-up and start -> ready,
then per level the service's CPU per request against the model's own, and the targets.
serve.py runs a second time storing into PostgreSQL (a server of its own on this machine,
started like the tests' one) instead of its SQLite file, to show what the shared store costs.
With --against, the serve.py of another folder (a `git worktree add ../parent HEAD~1`) runs in
the same rounds too: the way to measure one change alone on a shared machine.
Settings of serve.py come from the environment as usual (e.g. ORT_THREADS=2).
This prints figures; it is not a test.

    python bench.py --breakdown --clients 1,8 --seconds 15

instead drives serve.py alone and prints where its CPU goes per request: the CPU clock of the
thread around each step of a POST /predict (STEPS), and of each thread.
"""
import collections
import contextlib
import http.client
import importlib
import os
import signal
import sys
import tempfile
import threading
import time

import numpy as np
from PIL import Image

import catdog
import harness

# ---------------------------------------------------------------- config (--name value overrides)
models = catdog.MODELS_DIR  # folder with model.onnx, model.json and (for the baseline) model.pt
photos = catdog.SHARED_SAMPLE  # folder of real photos to send
n_photos = 64  # how many different photos the clients send
clients = "1,8,32"  # concurrent clients per level, comma-separated
seconds = 4.0  # how long each service is driven per level and round
rounds = 3  # rounds per level; the median round is reported
skip_baseline = False  # skip the naive Flask + PyTorch peer
against = ""  # a folder with another serve.py (e.g. a git worktree of the parent commit), driven in the same rounds
against_env = ""  # NAME=VALUE,... for that serve.py (e.g. THREADS=4 with --against .)
breakdown = False  # instead of the comparison: serve.py alone, its CPU per request step by step
baseline_server = 0  # internal: run the naive peer on this port and nothing else
probe_server = ""  # internal: run serve.py with its STEPS timed, writing them to this file on SIGUSR2


def parse_args(argv=None):
    return catdog.config_parser(globals()).parse_args(argv)


# ---------------------------------------------------------------- the peer-style baseline
def run_baseline(port, models):
    import torch
    from flask import Flask, jsonify, request

    import nets

    model, meta = nets.load_model(os.path.join(models, "model.pt"))
    app = Flask("baseline")

    @app.post("/predict")
    def predict():
        img = catdog.open_image(request.files["file"].read())
        x = torch.from_numpy(catdog.preprocess(img, meta["preprocess"]))[None]
        with torch.no_grad():
            probabilities = catdog.softmax(model(x)[0].numpy())
        best = int(probabilities.argmax())
        return jsonify(label=meta["classes"][best], confidence=float(probabilities[best]))

    @app.get("/health")
    def health():
        return jsonify(status="ok")

    app.run(host="127.0.0.1", port=port, threaded=True)


# ---------------------------------------------------------------- where serve.py's CPU goes
# The steps of a POST /predict, each timed on the CPU clock of its thread: (module[:class],
# function, name). Indented names run inside the one above them.
STEPS = (
    ("waitress.channel:HTTPChannel", "service", "request on a waitress thread, all of it"),
    ("flask:Flask", "wsgi_app", "  the Flask app, all of it"),
    ("serve:Model", "run", "    model (ONNX Runtime run)"),
    ("catdog", "preprocess", "    preprocess (resize, crop, normalise)"),
    ("catdog", "decode_header_checked", "    decode"),
    ("catdog", "open_checked", "    open, check the header, set the DCT scale"),
    ("upload", "read_upload", "    multipart parsing (werkzeug)"),
    ("catdog", "image_stats", "    drift statistics (catdog.image_stats)"),
    ("serve:Service", "record", "    record: answer, store, drift window, 2 metrics"),
    ("store:SQLiteStore", "record_prediction", "      of which the SQLite insert"),
    ("serve", "jsonify", "    JSON answer"),
    ("serve", "log", "    log line"),
)


def thread_clocks():
    """{thread id: (name without its number, CPU s)} of this process's Python threads."""
    return {t.ident: (t.name.split("-")[0], time.clock_gettime(time.pthread_getcpuclockid(t.ident)))
            for t in threading.enumerate()}


def run_probed_service(out):
    """serve.main() with the CPU time of each of STEPS added up; SIGUSR1 zeroes the sums,
    SIGUSR2 writes them, and each thread's CPU since, to the JSON file `out`."""
    import serve

    spent, zero, lock = collections.Counter(), {}, threading.Lock()

    def timed(function, name):
        def step(*args, **kwargs):
            started = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                with lock:
                    spent[name] += time.thread_time() - started
        return step

    for where, attr, name in STEPS:
        module, _, cls = where.partition(":")
        owner = importlib.import_module(module)
        owner = getattr(owner, cls) if cls else owner
        setattr(owner, attr, timed(getattr(owner, attr), name))

    def reset(signum, frame):
        with lock:
            spent.clear()
            zero.update(thread_clocks())

    def write(signum, frame):
        threads = collections.Counter()
        for ident, (name, clock) in thread_clocks().items():
            threads[name] += clock - zero.get(ident, (name, 0.0))[1]
        with lock:
            catdog.write_json(out, {"steps": dict(spent), "threads": dict(threads)})

    signal.signal(signal.SIGUSR1, reset)
    signal.signal(signal.SIGUSR2, write)
    serve.main()


def breakdown_at(bodies, serve_env, clients, seconds, model_ms):
    """Drive the probed serve.py with `clients` for `seconds` and print its CPU ms per request:
    by step (STEPS), what is left of the app and of the request threads, and by thread."""
    with tempfile.TemporaryDirectory(prefix="catdog-bench-probe-") as folder:
        out = os.path.join(folder, "steps.json")
        server = start(serve_env, bodies, lambda port: [sys.executable, "bench.py", "--probe-server", out])[0]
        try:
            os.kill(server.pid, signal.SIGUSR1)
            time.sleep(0.2)
            r = drive(server.port, bodies, clients, seconds, server.pid)
            os.kill(server.pid, signal.SIGUSR2)
            time.sleep(0.5)
            found = catdog.read_json(out)
        finally:
            server.stop()
    per_request = lambda s: s * 1000 / r["n"]  # noqa: E731
    steps = {name: per_request(found["steps"].get(name, 0.0)) for _, _, name in STEPS}
    names = [name for _, _, name in STEPS]
    inside_app = sum(ms for name, ms in steps.items() if name.startswith("    ") and not name.startswith("      "))
    print(f"\nat {clients} clients, {seconds:g} s: {r['rps']:.1f} req/s, p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms, "
          f"{r['n']} requests; process CPU {r['cpu_ms']:.2f} ms per request = {r['cpu_ms'] / model_ms:.2f}x "
          f"the model's {model_ms:.2f} ms alone (load avg {os.getloadavg()[0]:.1f}). CPU ms per request:")
    for name in names:
        print(f"  {name:<54} {steps[name]:6.2f}")
    print(f"  {'    the rest of the app: Flask, werkzeug, hooks, metrics':<54} {steps[names[1]] - inside_app:6.2f}")
    print(f"  {'  the rest: waitress on the request thread':<54} {steps[names[0]] - steps[names[1]]:6.2f}")
    for name, cpu in sorted(found["threads"].items(), key=lambda item: -item[1]):
        print(f"  thread {name:<47} {per_request(cpu):6.2f}")


# ---------------------------------------------------------------- photos and load
def pick_photos(folder, count):
    """Real photos, from the held-out test split when the manifest says which they are."""
    names = sorted(os.listdir(folder))
    test_names = set()
    if os.path.exists(catdog.MANIFEST):
        test_names = {os.path.basename(row["source"]) for row in catdog.read_manifest(catdog.MANIFEST, "test")}
    chosen = [n for n in names if n in test_names] or names
    source = "test split" if test_names and chosen is not names else "sample"
    photos = []
    for name in chosen[::max(1, len(chosen) // count)][:count]:
        with open(os.path.join(folder, name), "rb") as f:
            photos.append(f.read())
    return photos, f"{len(photos)} photos from the {source} of {folder}"


def phone_photo(data, size=(4032, 3024)):
    """A 12 MP JPEG like a phone's: a real photo enlarged, with sensor-like noise so that it
    compresses (and decodes) like a real one (~2.7 MB at quality 90)."""
    img = catdog.open_image(data).resize(size, Image.BICUBIC)
    return harness.encode(harness.noisy(img, np.random.default_rng(0)), "JPEG", quality=90)


def stage_costs(photos, model_path):
    """CPU ms per photo of each step of /predict, on one thread in this process, without HTTP:
    where the service's time goes. Best of 3 passes. Returns the model's ms: the service's runs
    (Model.run, its outputs), one photo at a time. The four steps one after the other cost more
    than their sum (each evicts the others' data from the CPU's caches): what a request costs
    this service before HTTP, the store and the answer."""
    import upload
    from serve import Settings, load_model

    model = load_model(model_path, Settings.from_env().ort_threads)  # the service's own ONNX Runtime settings
    settings = model.meta["preprocess"]

    def cpu_ms(step, items):
        best = float("inf")
        for _ in range(3):
            started = time.thread_time()
            for item in items:
                step(item)
            best = min(best, time.thread_time() - started)
        return best * 1000 / len(items)

    def decode(data):
        return catdog.open_image(data, min_side=settings["resize"])  # as the service decodes

    def chain(data):  # what the service does to a photo (upload.prepare's steps), without HTTP or the store
        x, _ = upload.model_input(catdog.open_checked(data, min_side=settings["resize"]), settings)
        model.run(x[None])

    images = [decode(p) for p in photos]
    inputs = [catdog.preprocess(img, settings) for img in images]
    phone = [phone_photo(photos[0])]
    print(f"CPU per photo by step ({len(photos)} photos, one thread, {model.meta.get('backbone', model.meta['arch'])} "
          f"{model.meta.get('served_as', 'ONNX')}):")
    model_ms = cpu_ms(lambda x: model.run(x[None]), inputs)
    chain_ms = cpu_ms(chain, photos)
    for name, ms in (("decode (catdog.open_image)", cpu_ms(decode, photos)),
                     ("preprocess (catdog.preprocess)", cpu_ms(lambda img: catdog.preprocess(img, settings), images)),
                     ("drift statistics (catdog.image_stats)", cpu_ms(catdog.image_stats, images)),
                     ("model (ONNX Runtime, batch of 1)", model_ms),
                     (f"all four, photo after photo ({chain_ms / model_ms:.2f}x the model)", chain_ms),
                     ("12 MP phone JPEG: decode at full size", cpu_ms(catdog.open_image, phone)),
                     ("12 MP phone JPEG: decode as served (DCT scaling)", cpu_ms(decode, phone))):
        print(f"  {name:<50} {ms:6.2f} ms", flush=True)
    return model_ms


def cpu_model():
    """(CPU model name, whether it has VNNI): int8 inference is about 2x faster with VNNI, so
    every speed figure goes with these."""
    with open("/proc/cpuinfo") as f:
        info = f.read()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return name, "avx512_vnni" in flags or "avx_vnni" in flags


def cpu_seconds(pid):
    """User + system CPU time of a process (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drive(port, bodies, clients, seconds, pid=None):
    """`clients` threads post photos back to back for `seconds`. The same time window for
    every service: a fast one yields more samples, and a short burst of noise on a shared
    machine weighs less than it would in a fixed count of requests."""
    latencies, errors, lock = [], [], threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(offset):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        i = offset
        while time.perf_counter() < deadline:
            body, content_type = bodies[i % len(bodies)]
            i += 1
            started = time.perf_counter()
            try:
                conn.request("POST", "/predict", body, {"Content-Type": content_type})
                response = conn.getresponse()
                answer = response.read()
                ok = response.status == 200 and b'"label"' in answer
            except OSError as e:
                ok, answer = False, repr(e).encode()
                conn.close()
            with lock:
                (latencies if ok else errors).append(time.perf_counter() - started if ok else answer[:200])
        conn.close()

    threads = [threading.Thread(target=client, args=(k * 7,)) for k in range(clients)]
    cpu_before = cpu_seconds(pid) if pid else 0.0
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    cpu_ms = (cpu_seconds(pid) - cpu_before) * 1000 / max(1, len(latencies)) if pid else float("nan")
    ms = np.array(latencies) * 1000
    return {"rps": len(latencies) / elapsed, "p50": np.percentile(ms, 50), "p95": np.percentile(ms, 95),
            "p99": np.percentile(ms, 99), "n": len(latencies), "errors": len(errors), "cpu_ms": cpu_ms,
            "error_sample": errors[:1]}


def batch_cost(port, pid, photos, repeats=5):
    """Wall and server CPU ms per photo, one client: the photos as one POST /predict/batch
    (ONNX Runtime runs of 4 photos) against the same photos one POST /predict each."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    singles = [harness.multipart([("file", "photo.jpg", photo)], "image/jpeg") for photo in photos]
    album = harness.multipart([("file", f"{i}.jpg", photo) for i, photo in enumerate(photos)], "image/jpeg")

    def per_photo(send):
        cpu, started = cpu_seconds(pid), time.perf_counter()
        for _ in range(repeats):
            send()
        count = repeats * len(photos)
        return (time.perf_counter() - started) * 1000 / count, (cpu_seconds(pid) - cpu) * 1000 / count

    def post(path, body, content_type):
        conn.request("POST", path, body, {"Content-Type": content_type})
        response = conn.getresponse()
        response.read()
        assert response.status == 200, response.status

    one_by_one = per_photo(lambda: [post("/predict", *single) for single in singles])
    batched = per_photo(lambda: post("/predict/batch", *album))
    conn.close()
    return {"single": one_by_one, "batch": batched, "photos": len(photos)}


def store_costs(rows=2_000_000, judged=20_000):
    """ms of the store's part of /stats (live accuracy over 500 feedback, feedback count) with
    `rows` predictions, `judged` of them with feedback: retention's worst case."""
    from store import SQLiteStore

    with tempfile.TemporaryDirectory(prefix="catdog-bench-store-") as folder:
        store = SQLiteStore(os.path.join(folder, "catdog.db"))
        with store._transaction() as conn:
            now = time.time()
            conn.executemany("INSERT INTO predictions VALUES (?, ?, ?, 'v', 'cat', 0.9, 500, 375, 0.5, NULL)",
                             ((f"p{i}", f"r{i}", now - rows + i) for i in range(rows)))
            conn.executemany("INSERT INTO feedback VALUES (?, ?, 'cat')",
                             ((f"p{i}", now - judged + i) for i in range(rows - judged, rows)))
            conn.execute("UPDATE counters SET value = ? WHERE name = 'feedback'", (judged,))
        store.close()
        store = SQLiteStore(os.path.join(folder, "catdog.db"))  # as after a restart
        timings = []
        for _ in range(20):
            started = time.perf_counter()
            store.live_accuracy(500), store.feedback_count()
            timings.append((time.perf_counter() - started) * 1000)
        store.close()
    return float(np.median(timings))


def start(env, bodies, command=None):
    """Start serve.py (or `command(port)`) with `env` and warm it up; (server, start -> ready s)."""
    server = harness.Server(env, command)
    ready_s = server.wait(timeout=120)
    drive(server.port, bodies, 4, 1.0)  # warm-up: first requests allocate, fill caches
    return server, ready_s


def measure(services, bodies, levels, rounds, seconds):
    """Drive each service at each level for `rounds` rounds, the services taking turns within
    a round (a different one first each round), and report the median round: the machine may
    be shared, and a slow spell then hits one short window of one service, which the median
    discards."""
    results = {name: {} for name in services}
    for clients in levels:
        per_round = {name: [] for name in services}
        for k in range(rounds):
            order = list(services.items())
            for name, server in order[k % len(order):] + order[:k % len(order)]:  # each takes its turn first
                per_round[name].append(drive(server.port, bodies, clients, seconds, server.pid))
        for name, runs in per_round.items():
            r = results[name][clients] = {key: float(np.median([run[key] for run in runs]))
                                          for key in ("rps", "p50", "p95", "p99", "cpu_ms")}
            r.update(n=sum(run["n"] for run in runs), errors=sum(run["errors"] for run in runs))
            spread = "/".join(f"{run['rps']:.0f}" for run in runs)
            print(f"  {name:<26} {clients:>3} clients  {r['rps']:7.1f} req/s  p50 {r['p50']:6.1f}  "
                  f"p95 {r['p95']:6.1f}  p99 {r['p99']:6.1f} ms  server CPU {r['cpu_ms']:5.1f} ms/req  "
                  f"(rounds {spread} req/s; {r['n']} ok, {r['errors']} errors, "
                  f"load avg {os.getloadavg()[0]:.1f})", flush=True)  # the CPUs may be shared: say how busy
            errors = [e for run in runs for e in run["error_sample"]]
            if errors:
                print(f"    first error: {errors[0]!r}")
    return results


@contextlib.contextmanager
def postgres_database():
    """A URL of a database on a PostgreSQL server of its own (harness.PostgresServer), or
    None with the reason printed where none can run here."""
    reason = harness.why_no_postgres()
    if reason:
        print(f"  no PostgreSQL run: {reason}")
        yield None
        return
    with harness.PostgresServer() as server:
        yield server.new_database("bench")


def check_inputs(cfg):
    for needed in ("model.onnx", "model.json") + (() if cfg.skip_baseline else ("model.pt",)):
        if not os.path.exists(os.path.join(cfg.models, needed)):
            sys.exit(f"{cfg.models}/{needed} is missing: run `make train` first")
    if not os.path.isdir(cfg.photos):
        sys.exit(f"no photos at {cfg.photos}")
    if cfg.against and not os.path.exists(os.path.join(cfg.against, "serve.py")):
        sys.exit(f"--against {cfg.against}: no serve.py there (a checkout, e.g. `git worktree add ../parent HEAD~1`)")
    if cfg.against and cfg.breakdown:
        sys.exit("--against compares services; --breakdown looks into this one: one or the other")
    against_settings(cfg)


def against_settings(cfg):
    """--against-env's NAME=VALUE,... as a dict; exits naming a pair without '='."""
    pairs = [pair.strip() for pair in cfg.against_env.split(",") if pair.strip()]
    if bad := [pair for pair in pairs if "=" not in pair]:
        sys.exit(f"--against-env {cfg.against_env!r}: {bad[0]!r} is not NAME=VALUE")
    return dict(pair.split("=", 1) for pair in pairs)


# The services driven; the third is serve.py storing into PostgreSQL instead of its SQLite file,
# the fourth the --against one.
SERVICES = ("serve.py (ONNX Runtime)", "baseline (Flask + eager)", "serve.py, PostgreSQL store", "serve.py --against")


def run_services(cfg, photos, bodies, levels, serve_env, database_url=None):
    """Start every service, drive them all (measure), stop them; (results, serve.py start -> ready s,
    batch_cost of serve.py)."""
    peer = lambda port: [sys.executable, "bench.py", "--models", cfg.models, "--baseline-server", str(port)]  # noqa: E731
    services = {}
    try:
        ours, ready_s = start(serve_env, bodies)  # alone: start -> ready undisturbed
        services[SERVICES[0]] = ours
        print(f"  serve.py start -> ready: {ready_s:.2f} s", flush=True)
        others = [] if cfg.skip_baseline else [(SERVICES[1], {}, peer)]
        if database_url:
            others.append((SERVICES[2], {**serve_env, "DATABASE_URL": database_url}, None))
        if cfg.against:
            env = {**serve_env, "DB_PATH": serve_env["DB_PATH"] + ".against", **against_settings(cfg)}
            other_serve = os.path.join(os.path.abspath(cfg.against), "serve.py")
            others.append((SERVICES[3], env, lambda port: [sys.executable, other_serve]))
        for name, env, command in others:
            services[name] = start(env, bodies, command)[0]
        results = measure(services, bodies, levels, cfg.rounds, cfg.seconds)
        return results, ready_s, batch_cost(ours.port, ours.pid, photos[:32])
    finally:
        for server in services.values():
            server.stop()


def print_summary(results, levels, ready_s, model_ms):
    ours, baseline = results[SERVICES[0]], results.get(SERVICES[1])
    print("\nclients | serve.py req/s p50/p95/p99 ms | baseline req/s p50/p95/p99 ms | speed-up")
    for c in levels:
        o = ours[c]
        line = f"{c:>7} | {o['rps']:6.1f} {o['p50']:5.1f}/{o['p95']:5.1f}/{o['p99']:5.1f}"
        if baseline:
            b = baseline[c]
            line += f" | {b['rps']:6.1f} {b['p50']:6.1f}/{b['p95']:6.1f}/{b['p99']:6.1f} | {o['rps'] / b['rps']:5.1f}x"
        print(line)
    if baseline and 8 in ours:
        # CPU time per request barely depends on how busy the machine is, unlike req/s.
        ours_cpu, base_cpu = ours[8]["cpu_ms"], baseline[8]["cpu_ms"]
        print(f"\nserver CPU per request at 8 clients: serve.py {ours_cpu:.1f} ms, baseline {base_cpu:.1f} ms "
              f"({base_cpu / ours_cpu:.1f}x less work per request)")
    name, vnni = cpu_model()
    print(f"\nper request, serve.py against the model's own CPU (first block), on {name} "
          f"({'with' if vnni else 'without'} VNNI):")
    for c in (c for c in (1, 8) if c in ours):
        o = ours[c]
        peer = f"{o['rps'] / baseline[c]['rps']:.1f}x the peer's" if baseline else "no peer run"
        print(f"  {c} client{'s' if c > 1 else ' '}: server CPU {o['cpu_ms']:.1f} ms, model {model_ms:.1f} ms, "
              f"ratio {o['cpu_ms'] / model_ms:.2f}; {o['rps']:.1f} req/s ({peer}); "
              f"p50 {o['p50']:.1f} ms, p99 {o['p99']:.1f} ms")
    other = results.get(SERVICES[3], {})
    for c in other:
        print(f"\nthis serve.py against the --against one at {c} client{'s' if c > 1 else ''}: server CPU "
              f"{ours[c]['cpu_ms']:.2f} vs {other[c]['cpu_ms']:.2f} ms ({ours[c]['cpu_ms'] - other[c]['cpu_ms']:+.2f}), "
              f"{ours[c]['rps']:.1f} vs {other[c]['rps']:.1f} req/s, p99 {ours[c]['p99']:.1f} vs {other[c]['p99']:.1f} ms")
    print("\ntargets:")
    if 8 in ours:
        ratio = ours[8]["cpu_ms"] / model_ms
        print(f"  server CPU per request at 8 clients: {ratio:.2f}x the model's (target <= 1.3x) "
              f"{'PASS' if ratio <= 1.3 else 'MISS'}")
    if baseline and 8 in ours:
        ratio = ours[8]["rps"] / baseline[8]["rps"]
        print(f"  throughput at 8 clients vs baseline: {ratio:.1f}x (target >= 6x) {'PASS' if ratio >= 6 else 'MISS'}")
    if 8 in ours:
        print(f"  p99 at 8 clients: {ours[8]['p99']:.1f} ms (target <= 100 ms) {'PASS' if ours[8]['p99'] <= 100 else 'MISS'}")
    print(f"  start -> ready: {ready_s:.2f} s (target <= 3 s) {'PASS' if ready_s <= 3 else 'MISS'}")
    postgres = results.get(SERVICES[2])
    if postgres and 8 in ours:
        cost = 1 - postgres[8]["rps"] / ours[8]["rps"]
        print(f"  PostgreSQL store at 8 clients: {postgres[8]['rps']:.1f} req/s (p99 {postgres[8]['p99']:.1f} ms) "
              f"against SQLite's {ours[8]['rps']:.1f}: {cost:+.1%} throughput cost (target <= 10 %) "
              f"{'PASS' if cost <= 0.10 else 'MISS'}")


def main(argv=None):
    cfg = parse_args(argv)
    if cfg.baseline_server:
        return run_baseline(cfg.baseline_server, cfg.models)
    if cfg.probe_server:
        return run_probed_service(cfg.probe_server)
    check_inputs(cfg)
    photos, where = pick_photos(cfg.photos, cfg.n_photos)
    model_ms = stage_costs(photos, os.path.join(cfg.models, "model.onnx"))
    # (body, content type) of each upload in field `file`, as a browser or curl -F sends it
    bodies = [harness.multipart([("file", "photo.jpg", p)], "image/jpeg") for p in photos]
    levels = [int(c) for c in cfg.clients.split(",")]
    if cfg.breakdown:
        name, vnni = cpu_model()
        print(f"where serve.py's CPU goes, {where}, on {name} ({'with' if vnni else 'without'} VNNI):")
        with tempfile.TemporaryDirectory(prefix="catdog-bench-") as db_dir:
            serve_env = {"MODEL_PATH": os.path.join(cfg.models, "model.onnx"), "DB_PATH": os.path.join(db_dir, "b.db")}
            for clients in levels:
                breakdown_at(bodies, serve_env, clients, cfg.seconds, model_ms)
        return
    print(f"  /stats' store queries at 2,000,000 predictions (20,000 with feedback): {store_costs():.2f} ms "
          "(target <= 5 ms)", flush=True)
    meta = catdog.read_json(os.path.join(cfg.models, "model.json"))
    from serve import available_cpus  # for the printout only

    print(f"bench: {where}; model {meta['arch']} ({meta.get('backbone', 'efficientnet-lite0')}) "
          f"{meta.get('served_as', '')} {meta.get('version')}; "
          f"{available_cpus()} CPUs available; loopback", flush=True)
    with tempfile.TemporaryDirectory(prefix="catdog-bench-") as db_dir:
        serve_env = {"MODEL_PATH": os.path.join(cfg.models, "model.onnx"), "DB_PATH": os.path.join(db_dir, "bench.db")}
        with postgres_database() as database_url:
            results, ready_s, album = run_services(cfg, photos, bodies, levels, serve_env, database_url)
    print_summary(results, levels, ready_s, model_ms)
    (single_ms, single_cpu), (batch_ms, batch_cpu) = album["single"], album["batch"]
    print(f"\n{album['photos']} photos, one client: one POST /predict/batch (runs of 4) {batch_ms:.1f} ms "
          f"and {batch_cpu:.1f} ms server CPU per photo; one POST /predict each {single_ms:.1f} ms and "
          f"{single_cpu:.1f} ms")


if __name__ == "__main__":
    main()
