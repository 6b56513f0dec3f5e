"""make fuzz: hostile inputs against a real serve.py process; 0 5xx, 0 deaths, memory measured.

    python fuzz.py                        # the champion in models/ (a tiny model when there is none)
    python fuzz.py --seed 7 --inputs 600 --strict-memory

Starts serve.py on 127.0.0.1 (its own DB_PATH and TMPDIR in a temporary folder) and sends it,
all generated from --seed (same seed, same bytes):
1. files (harness.hostile_files; tests/test_fuzz.py sends the same families in-process, drawn
   by hypothesis): small synthetic JPEG/PNG/WebP/GIF/HEIC/BMP/TIFF photos mutated by byte flips,
   truncation, repeated chunks or segments and rewritten size fields (PNG IHDR, JPEG SOF,
   GIF, WebP) that lie; random bytes, with and without a real magic number; empty files; huge
   declared sizes; 16-bit PNGs. Each goes to POST /predict (multipart, or a raw body), some
   in groups to POST /predict/batch.
2. protocol abuse over raw sockets: bad chunked encodings, lying Content-Lengths, a
   10,000-part multipart, long and many headers, a huge path, garbage request lines,
   slowloris-like partial requests; deeply nested, non-UTF-8 and huge JSON on /feedback.
3. memory: 8 clients sending the largest images the limits accept (a 16-bit grey PNG just under
   catdog.LOSSLESS_MAX_PIXELS, a lossless RGBA WebP just under catdog.WEBP_MAX_PIXELS, a 40 MP
   JPEG); the latency of normal photos from a 5th client while 4 send those; 16 connections
   pausing in the middle of 60 MB bodies.
   The service's RSS is sampled every --sample-ms throughout.
Every answer is judged: the JSON contract ({error, message, request_id}) for 4xx, 2xx
answers, 503 busy / not_ready (the decode budget); a plain-text answer of waitress itself
(400/413/431/501, before the app sees the request) is listed apart. Exits 1 on a 5xx from the
app, a complete request never answered, or the process dying; missed memory and latency targets
are figures, not failures, unless --strict-memory.
"""
import collections
import http.client
import json
import os
import socket
import sys
import tempfile
import threading
import time

import numpy as np
from PIL import Image

import catdog
import harness

# ---------------------------------------------------------------- config (--name value overrides)
models = catdog.MODELS_DIR  # folder with the champion model.onnx; without one a tiny model is exported
tiny = False  # use the tiny model even when the champion is there
seed = catdog.SEED  # every generated input comes from this seed: same seed, same bytes
inputs = 400  # mutated, random and lying files, each POSTed to /predict
batches = 12  # POST /predict/batch requests of batch_size such files each
batch_size = 8  # files per POST /predict/batch
clients = 4  # concurrent connections sending the files
worst_clients = 8  # clients sending the largest accepted images at once
worst_seconds = 4.0  # how long worst_clients send them
latency_seconds = 4.0  # how long 4 clients send them while a 5th sends normal photos
settle_s = 3.0  # RSS is read again this long after each load
slow_uploads = 16  # connections each declaring a big body, sending half of it and pausing
slow_upload_mb = 60  # the Content-Length each slow upload declares (MB)
slow_pause_s = 2.0  # how long the slow uploads pause mid-body (RSS sampled meanwhile)
sample_ms = 50.0  # RSS sampling period
timeout = 30.0  # seconds to wait for any answer
peak_rss_mib = 500.0  # target: the service's peak RSS (VmHWM) over the whole run
settled_rss_mib = 250.0  # target: its RSS settle_s after each load
slow_rss_mib = 400.0  # target: its RSS while the slow uploads pause
p99_ms = 250.0  # target: p99 of normal /predict while 4 clients send worst-case uploads
strict_memory = False  # also exit 1 on a missed memory or latency target
measure_memory = True  # run the worst-case and slow-upload phases (--no-measure-memory: correctness only)

MIB = 1 << 20
WAITRESS_STATUSES = (400, 413, 431, 501)  # waitress's own plain-text refusals, before the app
ALLOWED_5XX = ("busy", "not_ready")  # 503 from the decode budget, or before the model is loaded


def parse_args(argv=None):
    return catdog.config_parser(globals()).parse_args(argv)


# ---------------------------------------------------------------- the largest accepted images, a normal photo
def worst_case_images(seed):
    """{name: (bytes, content type)}: the largest images the limits ACCEPT, of real data (no
    lying header), each under MAX_UPLOAD_MB: a 16-bit grey PNG just under LOSSLESS_MAX_PIXELS,
    a lossless RGBA WebP just under WEBP_MAX_PIXELS, and a JPEG just under MAX_PIXELS. Coarse
    random blocks (or random colours upscaled) keep them quick to make and small to send."""
    rng = np.random.default_rng(seed)
    width, height = 4000, catdog.LOSSLESS_MAX_PIXELS // 4000 - 1  # 4000 x 3999 = 15,996,000 px

    def blocks(shape, size, dtype, high):
        low = rng.integers(0, high, (shape[0] // size + 1, shape[1] // size + 1, *shape[2:]), dtype=dtype)
        return np.repeat(np.repeat(low, size, 0), size, 1)[:shape[0], :shape[1]]

    gray16 = harness.encode(Image.fromarray(blocks((height, width), 32, np.uint16, 65536)), "PNG", compress_level=1)
    rgba = blocks((height, width, 4), 64, np.uint8, 256)
    rgba[..., 3] |= 0x80  # real, varied transparency (all-opaque would be stored as RGB)
    webp_height = catdog.WEBP_MAX_PIXELS // width - 1  # 4000 x 2499 = 9,996,000 px
    webp = harness.encode(Image.fromarray(rgba[:webp_height], "RGBA"), "WEBP", lossless=True, method=0, quality=0)
    jpeg_w, jpeg_h = 7999, catdog.MAX_PIXELS // 7999 - 1  # 7999 x 5000 = 39,995,000 px
    coarse = Image.fromarray(rng.integers(0, 256, (jpeg_h // 40, jpeg_w // 40, 3), dtype=np.uint8), "RGB")
    jpeg = harness.encode(coarse.resize((jpeg_w, jpeg_h), Image.BILINEAR), "JPEG", quality=85)
    return {f"png-16bit-gray-{width}x{height}": (gray16, "image/png"),
            f"webp-lossless-rgba-{width}x{webp_height}": (webp, "image/webp"),
            f"jpeg-{jpeg_w}x{jpeg_h}": (jpeg, "image/jpeg")}


def normal_photo(seed):
    """(bytes, where from): a photo of the shared sample when present, else a synthetic 500x375 JPEG."""
    if os.path.isdir(catdog.SHARED_SAMPLE):
        names = sorted(n for n in os.listdir(catdog.SHARED_SAMPLE) if n.lower().endswith(".jpg"))
        if names:
            with open(os.path.join(catdog.SHARED_SAMPLE, names[0]), "rb") as f:
                return f.read(), f"shared photo {names[0]}"
    return harness.encode(harness.picture(np.random.default_rng(seed), 500, 375), "JPEG", quality=90), \
        "synthetic 500x375 JPEG"


# ---------------------------------------------------------------- judging answers
class Tally:
    """Answers by phase and status (with the JSON error reason), and the findings: failures
    (a 5xx, no answer, a death), waitress's own answers, app answers outside the JSON contract."""

    def __init__(self):
        self.counts = collections.Counter()
        self.findings = []  # (kind, phase, input, detail)
        self._lock = threading.Lock()

    def add(self, phase, name, status, headers, body):
        kind, label = judge(status, headers, body)
        with self._lock:
            self.counts[phase, label] += 1
            if kind != "ok":
                self.findings.append((kind, phase, name, f"{label}: {body[:160]!r}"))
        return kind

    def note(self, kind, phase, name, detail):
        with self._lock:
            self.counts[phase, kind] += 1
            self.findings.append((kind, phase, name, detail))

    def of(self, kind):
        return [f for f in self.findings if f[0] == kind]


def judge(status, headers, body):
    """(kind, label) of one answer: kind "ok", "waitress" (its own plain-text refusal), "contract"
    (an app error without the JSON body) or "failure" (a 5xx other than 503 busy/not_ready)."""
    if "x-request-id" not in headers:  # the app sets it on every answer; waitress's own have none
        return ("waitress" if status in WAITRESS_STATUSES else "failure"), f"waitress {status}"
    reason = None
    if status >= 400:
        try:
            reason = json.loads(body).get("error")
        except (ValueError, AttributeError):
            return ("failure" if status >= 500 else "contract"), f"{status} (not JSON)"
    label = f"{status} {reason}" if reason else str(status)
    if status >= 500 and not (status == 503 and reason in ALLOWED_5XX):
        return "failure", label
    if status >= 400 and not reason:
        return "contract", label
    return "ok", label


def batch_failures(body):
    """Labels of the photos of a /predict/batch answer that got a 5xx other than 503 busy."""
    try:
        results = json.loads(body)["results"]
    except (ValueError, KeyError, TypeError):
        return ["batch answer without results"]
    return [f"photo {r.get('index')}: {r.get('status')} {r.get('error')}" for r in results
            if r.get("status", 200) >= 500 and not (r.get("status") == 503 and r.get("error") in ALLOWED_5XX)]


# ---------------------------------------------------------------- HTTP clients
class Client:
    """One keep-alive connection; post() reconnects once when the server had closed it."""

    def __init__(self, port, timeout):
        self.port, self.timeout, self.conn = port, timeout, None

    def post(self, path, body, headers):
        """(status, lower-cased headers, body) of the answer; OSError when there was none."""
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                self.conn.request("POST", path, body, headers)
                response = self.conn.getresponse()
                answer = response.read()
                if response.getheader("Connection", "").lower() == "close":
                    self.close()
                return response.status, {k.lower(): v for k, v in response.getheaders()}, answer
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


RAW_TYPES = ("image/jpeg", "image/png", "application/octet-stream", "image/webp")


def request_of(index, data):
    """(body, content type) of input `index`: a multipart upload, or a raw body whose content
    type may well be wrong (the service sniffs the bytes)."""
    if index % 3 == 0:
        return data, RAW_TYPES[index // 3 % len(RAW_TYPES)]
    return harness.multipart([("file" if index % 7 else "image", "photo.jpg", data)])


def send_files(port, files, tally, phase="files", clients=4, timeout=30.0):
    """POST each (name, bytes) to /predict from `clients` connections (each its share of the
    files), every answer judged."""
    def worker(first):
        client = Client(port, timeout)
        for index in range(first, len(files), clients):
            name, data = files[index]
            body, content_type = request_of(index, data)
            try:
                tally.add(phase, name, *client.post("/predict", body, {"Content-Type": content_type}))
            except (OSError, http.client.HTTPException) as e:
                tally.note("failure", phase, name, f"no answer ({type(e).__name__}: {e})")
        client.close()

    run_threads(worker, [(k,) for k in range(clients)])


def send_batches(port, files, count, size, tally, timeout=30.0):
    """`count` POST /predict/batch of `size` files each, taken in turn from `files`."""
    client = Client(port, timeout)
    for k in range(count):
        group = [files[(k * size + j) % len(files)] for j in range(size)]
        body, content_type = harness.multipart([("file", name, data) for name, data in group])
        name = "batch of " + ", ".join(n for n, _ in group)
        try:
            status, headers, answer = client.post("/predict/batch", body, {"Content-Type": content_type})
        except (OSError, http.client.HTTPException) as e:
            tally.note("failure", "batch", name, f"no answer ({type(e).__name__}: {e})")
            continue
        if tally.add("batch", name, status, headers, answer) == "ok" and status == 200:
            for failure in batch_failures(answer):
                tally.note("failure", "batch", name, failure)
    client.close()


def run_threads(target, calls):
    """target(*args) for each args of `calls`, each in a thread of its own, all at once; back when all are."""
    threads = [threading.Thread(target=target, args=args, daemon=True) for args in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# ---------------------------------------------------------------- protocol abuse over raw sockets
def http_request(method, path, headers=(), body=b"", version="HTTP/1.1", close=True):
    lines = [f"{method} {path} {version}".rstrip(), "Host: 127.0.0.1", *headers, *(["Connection: close"] if close else [])]
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body


def parse_responses(data):
    """[(status, lower-cased headers, body)] of the HTTP/1.x responses in `data` (1xx skipped)."""
    found = []
    while data.startswith(b"HTTP/"):
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = 0 if status < 200 else int(headers.get("content-length", len(rest)))
        if status >= 200:
            found.append((status, headers, rest[:length]))
        data = rest[length:]
    return found


def exchange(port, parts, pause_s=0.0, half_close=False, idle_s=1.5, timeout=30.0):
    """Send `parts` over one connection (`pause_s` between them; the write side shut after the
    last with `half_close`), then read until the server closes, is idle `idle_s` after having
    answered, or `timeout` passes; the responses read."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            for k, part in enumerate(parts):
                if k and pause_s:
                    time.sleep(pause_s)
                sock.sendall(part)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server answered and closed before taking it all: read what it said
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sock.settimeout(idle_s if parse_responses(received) else max(0.1, deadline - time.monotonic()))
            try:
                chunk = sock.recv(1 << 16)
            except (TimeoutError, OSError):
                break
            if not chunk:
                break
            received += chunk
    return parse_responses(received)


def chunked(data, sizes=(1000, 5000)):
    """`data` in the chunked transfer coding, in chunks of the sizes in turn."""
    out, pos, k = b"", 0, 0
    while pos < len(data):
        piece = data[pos:pos + sizes[k % len(sizes)]]
        out += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        pos, k = pos + len(piece), k + 1
    return out + b"0\r\n\r\n"


def protocol_cases(photo):
    """[(name, parts, expect, options)]: raw requests, each on its own connection. expect
    "answer": a complete request, which must get an answer; "any": the client gives up (closes
    its side: options half_close) before the request is complete, so no answer is due."""
    jpeg = ["Content-Type: image/jpeg"]
    many, many_type = harness.multipart([("file", f"{k}.jpg", b"x") for k in range(10_000)])
    huge_json = json.dumps(list(range(1_500_000))).encode()  # ~12 MB: over MAX_UPLOAD_MB
    big_json = json.dumps({"request_id": "x", "label": "cat", "pad": "a" * (8 << 20)}).encode()
    gives_up = {"half_close": True}

    def post(path, body, headers=jpeg, **kw):
        return http_request("POST", path, [*headers, f"Content-Length: {len(body)}"], body, **kw)

    def framed(headers, body=b"", **kw):
        """POST /predict of a JPEG body framed by `headers` as they are."""
        return [http_request("POST", "/predict", [*jpeg, *headers], body, **kw)]

    def chunks(body, coding="chunked", *headers):
        return framed([*headers, f"Transfer-Encoding: {coding}"], body)

    def get(*headers, path="/health", version="HTTP/1.1"):
        return [http_request("GET", path, headers, version=version)]

    def form(body, boundary):
        return [post("/predict", body, [f"Content-Type: multipart/form-data{boundary}"])]

    def feedback(body, content_type="application/json"):
        return [post("/feedback", body, [f"Content-Type: {content_type}"])], {}

    end = b"\r\n0\r\n\r\n"
    cases = {
        "chunked photo (valid)": (chunks(chunked(photo)), {}),
        "Transfer-Encoding: gzip, chunked": (chunks(chunked(photo), "gzip, chunked"), {}),
        "Transfer-Encoding: chunked, gzip": (chunks(chunked(photo), "chunked, gzip"), {}),
        "chunk size not hex": (chunks(b"zz\r\n" + photo[:100] + end), {}),
        # waitress waits for the 2^72 bytes the chunk declares: incomplete, so the client closes
        "chunk size 2^72, then close": (chunks(b"ffffffffffffffffff\r\n" + photo[:100] + end), gives_up),
        "chunk size negative": (chunks(b"-10\r\n" + photo[:16] + end), {}),
        "chunk longer than its data, then close": (chunks(b"100000\r\n" + photo[:100]), gives_up),
        "chunked without the last chunk, then close": (chunks(chunked(photo)[:-5]), gives_up),
        "chunk extensions and trailers": (chunks(f"{len(photo):x};name=value\r\n".encode() + photo
                                                 + b"\r\n0\r\nX-Trailer: 1\r\n\r\n"), {}),
        "Content-Length larger than the body, then close": (framed([f"Content-Length: {len(photo) * 2}"], photo),
                                                            gives_up),
        "Content-Length smaller than the body": (framed([f"Content-Length: {len(photo) // 2}"], photo, close=False),
                                                 {}),
        "Content-Length not a number": (framed(["Content-Length: 12abc"], photo), {}),
        "Content-Length negative": (framed(["Content-Length: -1"], photo), {}),
        "two different Content-Lengths": (framed(["Content-Length: 10", f"Content-Length: {len(photo)}"], photo), {}),
        "Content-Length and Transfer-Encoding": (chunks(chunked(photo), "chunked", "Content-Length: 5"), {}),
        "Content-Length 100 MB (over waitress's cap)": (framed([f"Content-Length: {100 * MIB}"], photo), {}),
        "Expect: 100-continue": (framed(["Expect: 100-continue", f"Content-Length: {len(photo)}"]) + [photo],
                                 {"pause_s": 0.2}),
        "10,000-part multipart on /predict": ([post("/predict", many, [f"Content-Type: {many_type}"])], {}),
        "10,000-part multipart on /predict/batch": ([post("/predict/batch", many, [f"Content-Type: {many_type}"])], {}),
        "multipart without a boundary": (form(photo, ""), {}),
        "multipart without its closing boundary": (
            form(harness.multipart([("file", "a.jpg", photo)])[0][:-40],
                 "; boundary=" + harness.multipart([])[1].split("=")[1]), {}),
        "multipart with a 1,000-char boundary": (form(b"--" + b"b" * 1000 + b"\r\n\r\n" + photo,
                                                      "; boundary=" + "b" * 1000), {}),
        "multipart part with a 64 KB part header": (
            form(b"--xx\r\nContent-Disposition: form-data; name=\"file\"; filename=\"" + b"a" * 65536
                 + b'"\r\n\r\n' + photo + b"\r\n--xx--\r\n", "; boundary=xx"), {}),
        "64 KB header line": (get("X-Long: " + "a" * 65536), {}),
        "300 KB header line": (get("X-Long: " + "a" * 300_000), {}),
        "5,000 headers": (get(*(f"X-H{k}: {k}" for k in range(5000))), {}),
        "100 KB path": (get(path="/" + "a" * 100_000), {}),
        "300 KB path": (get(path="/" + "a" * 300_000), {}),
        "HTTP/0.9 request line": ([b"GET /\r\n\r\n"], {}),
        "HTTP/0.9 request line, no blank line, then close": ([b"GET /health\r\n"], gives_up),
        "HTTP/2 preface": ([b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"], {}),
        "HTTP/7.0": (get(version="HTTP/7.0"), {}),
        "TLS ClientHello": ([bytes.fromhex("16030100c4010000c00303") + bytes(180)], gives_up),
        "binary garbage": ([bytes(range(256)) * 4 + b"\r\n\r\n"], {}),
        # waitress ends a header block only at CRLF CRLF: without one it waits, so the client closes
        "bare LF line ends, then close": ([b"GET /health HTTP/1.1\nHost: x\nConnection: close\n\n"], gives_up),
        "NUL in a header": (get("X-Nul: a\0b"), {}),
        "UTF-8 in the path and a header": ([("GET /caf\u00e9?q=\u732b HTTP/1.1\r\nHost: x\r\nX-U: \u00e9\r\n"
                                             "Connection: close\r\n\r\n").encode()], {}),
        "absolute URI": (get(path="http://example.com/health"), {}),
        "unknown method": ([http_request("BREW", "/predict")], {}),
        "header without a colon": (get("NoColonHere"), {}),
        "header with a space before the colon": (get("X-A : b"), {}),
        "raw image with Content-Length 0": ([post("/predict", b"")], {}),
        "feedback: [ x 100000": feedback(b"[" * 100_000 + b"]" * 100_000),
        "feedback: {\"a\": x 100000": feedback(b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
        "feedback: non-UTF-8 bytes": feedback(b'{"request_id": "\xff\xfe", "label": "cat\xc3"}'),
        "feedback: UTF-16 with BOM": feedback('{"request_id": "x", "label": "cat"}'.encode("utf-16")),
        "feedback: lone surrogate escape": feedback(b'{"request_id": "\\ud800", "label": "\\udfff"}'),
        "feedback: NaN and 1e999": feedback(b'{"request_id": NaN, "label": 1e999}'),
        "feedback: 12 MB JSON array": feedback(huge_json),
        "feedback: 8 MB JSON object": feedback(big_json),
        "feedback: JSON as text/plain": feedback(b'{"request_id": "x", "label": "cat"}', "text/plain"),
    }
    return [(name, parts, "any" if options.get("half_close") else "answer", options)
            for name, (parts, options) in cases.items()]


def run_protocol(port, photo, tally, timeout=30.0):
    """Every protocol case on its own connection; [(name, what came back)] for the table."""
    rows = []
    for name, parts, expect, options in protocol_cases(photo):
        try:
            answers = exchange(port, parts, timeout=timeout, **options)
        except OSError as e:
            answers, error = [], f"{type(e).__name__}"
        else:
            error = ""
        for status, headers, body in answers:
            tally.add("protocol", name, status, headers, body)
        if not answers and expect == "answer":
            tally.note("failure", "protocol", name, f"a complete request got no answer {error}".strip())
        rows.append((name, ", ".join(judge(*a)[1] for a in answers) or f"no answer{' (' + error + ')' if error else ''}"
                     + ("" if expect == "answer" else " (none due)")))
    return rows


def slowloris(port, photo, tally, connections=20, seconds=1.5, timeout=30.0):
    """`connections` requests whose headers trickle in a byte at a time, closed unfinished;
    meanwhile a normal photo must still be answered. The milliseconds that photo took."""
    socks = []
    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\nX-Slow: ")
        socks.append(sock)
    client, started, took = Client(port, timeout), time.perf_counter(), None
    deadline = started + seconds
    try:
        while time.perf_counter() < deadline:
            for sock in socks:
                sock.sendall(b"a")
            if took is None:
                sent = time.perf_counter()
                tally.add("protocol", "photo during slowloris", *client.post("/predict", photo,
                                                                             {"Content-Type": "image/jpeg"}))
                took = (time.perf_counter() - sent) * 1000
            time.sleep(0.1)
    except (OSError, http.client.HTTPException) as e:
        tally.note("failure", "protocol", "photo during slowloris", f"no answer ({type(e).__name__})")
    finally:
        client.close()
        for sock in socks:
            sock.close()
    return took


# ---------------------------------------------------------------- memory
def proc_status(pid, field):
    """A /proc/PID/status field in MiB (VmRSS, VmHWM); None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class RssSampler(threading.Thread):
    """The service's RSS every `period_s`: peak() over any window of the run."""

    def __init__(self, pid, period_s):
        super().__init__(daemon=True)
        self.pid, self.period_s, self.samples, self.stopped = pid, period_s, [], threading.Event()

    def run(self):
        while not self.stopped.is_set():
            rss = proc_status(self.pid, "VmRSS")
            if rss is not None:
                self.samples.append((time.monotonic(), rss))
            self.stopped.wait(self.period_s)

    def peak(self, since=0.0):
        return max((rss for t, rss in list(self.samples) if t >= since), default=float("nan"))


def spooled_bytes(pid, folder):
    """Bytes of the files the service has open in `folder`: request bodies waitress spooled to
    TMPDIR (already unlinked, so only /proc/PID/fd still sees them)."""
    total = 0
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(os.path.join(fd_dir, fd)).startswith(folder):
                total += os.stat(os.path.join(fd_dir, fd)).st_size
        except OSError:
            continue
    return total


def drive(port, bodies, deadline, tally, phase, latencies=None, timeout=30.0, offset=0):
    """Post `bodies` [(name, bytes, content type)] in turn until `deadline`, every answer judged;
    client-side milliseconds of each 200 appended to `latencies` when given."""
    client, k = Client(port, timeout), offset
    while time.monotonic() < deadline:
        name, body, content_type = bodies[k % len(bodies)]
        k += 1
        started = time.perf_counter()
        try:
            status, headers, answer = client.post("/predict", body, {"Content-Type": content_type})
        except (OSError, http.client.HTTPException) as e:
            tally.note("failure", phase, name, f"no answer ({type(e).__name__})")
            continue
        tally.add(phase, name, status, headers, answer)
        if latencies is not None and status == 200:
            latencies.append((time.perf_counter() - started) * 1000)
    client.close()


def drive_together(port, groups, seconds, tally, phase, timeout=30.0):
    """Run drive() for each (bodies, latencies) of `groups` at once for `seconds`."""
    deadline = time.monotonic() + seconds
    run_threads(drive, [(port, bodies, deadline, tally, phase, latencies, timeout, k)
                        for k, (bodies, latencies) in enumerate(groups)])


def worst_bodies(images):
    """[(name, body, content type)]: each worst-case image raw and as a multipart upload."""
    bodies = []
    for name, (data, content_type) in images.items():
        bodies.append((name, data, content_type))
        bodies.append((name + " (multipart)", *harness.multipart([("file", "big", data)])))
    return bodies


def check_accepted(port, pid, images, sampler, tally, timeout=30.0):
    """Each worst-case image alone must be answered 200 (an accepted image, not a refused one);
    {name: how far RSS rose above its level before, MiB} while the service handled it alone."""
    client, rise = Client(port, timeout), {}
    for name, (data, content_type) in images.items():
        before, since = proc_status(pid, "VmRSS"), time.monotonic()
        status, headers, body = client.post("/predict", data, {"Content-Type": content_type})
        time.sleep(2 * sampler.period_s)  # the last samples of this request
        rise[name] = sampler.peak(since) - before
        if status != 200:
            tally.note("failure", "worst", name, f"the worst-case image was refused: {status} {body[:160]!r}")
    client.close()
    return rise


def slow_bodies(port, count, declared_mb, pause_s, sampler, spool_dir, pid, timeout=30.0):
    """`count` connections declare a `declared_mb` MB body to POST /predict, send half of it in
    turns, and pause `pause_s`; (peak RSS meanwhile, bytes spooled to TMPDIR), then all close."""
    declared = int(declared_mb * MIB)
    socks = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            sock.sendall(http_request("POST", "/predict", ["Content-Type: image/jpeg",
                                                           f"Content-Length: {declared}"], close=False))
            socks.append(sock)
        block = b"\xff\xd8\xff" + bytes(MIB - 3)
        for _ in range(declared // 2 // MIB):
            for sock in socks:
                sock.sendall(block)
        paused = time.monotonic()
        time.sleep(pause_s)
        return sampler.peak(paused), spooled_bytes(pid, spool_dir)
    finally:
        for sock in socks:
            sock.close()


def percentile(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


# ---------------------------------------------------------------- the server
def start_server(model_path, workdir):
    """serve.py (harness.Server) with its DB and TMPDIR in `workdir`, ready. stdout (one JSON line
    per request) and stderr (tracebacks) go to files there."""
    spool = os.path.join(workdir, "tmp")
    os.makedirs(spool, exist_ok=True)
    server = harness.Server({"MODEL_PATH": model_path, "DB_PATH": os.path.join(workdir, "fuzz.db"), "TMPDIR": spool},
                            log=os.path.join(workdir, "serve.log"), err=os.path.join(workdir, "serve.err"))
    try:
        server.wait(timeout=120)
    except RuntimeError as e:
        sys.exit(f"serve.py did not get ready: {e}")
    return server


def server_errors(workdir, limit=60):
    """([(count, line)] of the service's stderr, each distinct line once, first seen first;
    the number of lines). Waitress's "Task queue depth" warnings are expected under load: left out."""
    with open(os.path.join(workdir, "serve.err"), errors="replace") as f:
        lines = [line.rstrip() for line in f if "task queue depth" not in line.lower()]
    counts = collections.Counter(lines)
    return [(counts[line], line) for line in dict.fromkeys(lines)][:limit], len(lines)


# ---------------------------------------------------------------- the run
def check(phase, server, tally):
    """The service must still run and be ready after each phase."""
    if not server.alive():
        tally.note("failure", phase, "the process", f"died or not ready after {phase} "
                   f"(exit status {server.proc.poll()})")
        return False
    return True


def memory_phases(cfg, server, sampler, workdir, tally, figures):
    port, pid = server.port, server.pid
    """Worst-case uploads at worst_clients, then normal photos beside 4 of them, then slow bodies."""
    started = time.monotonic()
    images = worst_case_images(cfg.seed)
    figures["worst_images"] = ", ".join(f"{name} {len(data) / MIB:.1f} MB" for name, (data, _) in images.items())
    figures["worst_generation_s"] = time.monotonic() - started
    figures["solo_rise"] = check_accepted(port, pid, images, sampler, tally, cfg.timeout)
    bodies = worst_bodies(images)
    photo, figures["normal_photo"] = normal_photo(cfg.seed)
    normal = [("normal photo", photo, "image/jpeg")]

    idle = []  # the normal photo alone first: what the latency under load compares with
    drive_together(port, [(normal, idle)], 1.0, tally, "normal")
    figures["idle_p50"], figures["idle_p99"] = percentile(idle, 50), percentile(idle, 99)

    since = time.monotonic()
    drive_together(port, [(bodies, None)] * cfg.worst_clients, cfg.worst_seconds, tally, "worst")
    figures["worst_peak"] = sampler.peak(since)
    time.sleep(cfg.settle_s)
    figures["worst_settled"] = proc_status(pid, "VmRSS")

    latencies, since = [], time.monotonic()
    drive_together(port, [(bodies, None)] * 4 + [(normal, latencies)], cfg.latency_seconds, tally, "latency")
    figures["latency_peak"] = sampler.peak(since)
    figures["p50"], figures["p99"], figures["normal_n"] = percentile(latencies, 50), percentile(latencies, 99), len(latencies)
    time.sleep(cfg.settle_s)
    figures["latency_settled"] = proc_status(pid, "VmRSS")
    if not check("worst-case uploads", server, tally):
        return

    figures["slow_peak"], figures["slow_spooled"] = slow_bodies(
        port, cfg.slow_uploads, cfg.slow_upload_mb, cfg.slow_pause_s, sampler, os.path.join(workdir, "tmp"),
        pid, cfg.timeout)
    time.sleep(cfg.settle_s)
    figures["slow_settled"] = proc_status(pid, "VmRSS")
    check("slow uploads", server, tally)


def fuzz(cfg, model_path, workdir, tally, figures, memory=True):
    """Start the service, run every phase against it, stop it; the protocol table rows."""
    started = time.monotonic()
    server = start_server(model_path, workdir)
    port, pid = server.port, server.pid
    figures["start_s"] = time.monotonic() - started
    figures["pid"] = pid
    sampler = RssSampler(pid, cfg.sample_ms / 1000)
    sampler.start()
    rows = []
    try:
        figures["rss_ready"] = proc_status(pid, "VmRSS")
        files = harness.hostile_files(cfg.seed, cfg.inputs)
        figures["files"] = len(files)
        phase = time.monotonic()
        send_files(port, files, tally, clients=cfg.clients, timeout=cfg.timeout)
        send_batches(port, files, cfg.batches, cfg.batch_size, tally, cfg.timeout)
        figures["files_s"] = time.monotonic() - phase
        if check("files", server, tally):
            phase = time.monotonic()
            photo, _ = normal_photo(cfg.seed)
            rows = run_protocol(port, photo, tally, min(cfg.timeout, 10.0))
            figures["slowloris_ms"] = slowloris(port, photo, tally, timeout=cfg.timeout)
            figures["protocol_s"] = time.monotonic() - phase
            if check("protocol abuse", server, tally) and memory:
                phase = time.monotonic()
                memory_phases(cfg, server, sampler, workdir, tally, figures)
                figures["memory_s"] = time.monotonic() - phase
        figures["hwm"] = proc_status(pid, "VmHWM")
        figures["alive_at_end"] = server.alive()
    finally:
        sampler.stopped.set()
        figures["exit_status"] = server.stop()
        figures["sampled_peak"] = sampler.peak()
    return rows


def target(name, value, limit, unit, fmt="{:.0f}"):
    """A bench.py-style target line and whether it is met (a missing figure is a miss)."""
    met = value is not None and value == value and value <= limit
    unit = f" {unit}" if unit else ""
    shown = "n/a" if value is None or value != value else fmt.format(value) + unit
    print(f"  {name}: {shown} (target <= {fmt.format(limit)}{unit}) {'PASS' if met else 'MISS'}")
    return met


def mib(value):
    return "n/a" if value is None or value != value else f"{value:.0f} MiB"


def print_summary(cfg, tally, figures, rows, model_note, workdir):
    print(f"\nanswers by phase and status ({figures.get('files', 0)} files, {cfg.batches} batches of "
          f"{cfg.batch_size}, {len(rows)} protocol cases):")
    for phase in ("files", "batch", "protocol", "normal", "worst", "latency"):
        counts = sorted((label, n) for (p, label), n in tally.counts.items() if p == phase)
        if counts:
            print(f"  {phase:<9} " + ", ".join(f"{label}: {n}" for label, n in counts))
    print("\nprotocol abuse (one connection each; what came back):")
    for name, answer in rows:
        print(f"  {name:<50} {answer}")
    waitress = tally.of("waitress")
    print(f"\nwaitress's own plain-text answers (not the JSON contract; the app never saw these requests): {len(waitress)}")
    for _, phase, name, detail in waitress:
        print(f"  {phase}: {name}: {detail.split(':')[0]}")
    contract = tally.of("contract")
    if contract:
        print(f"\napp errors without the JSON body: {len(contract)}")
        for _, phase, name, detail in contract[:20]:
            print(f"  {phase}: {name}: {detail}")
    lines, total = server_errors(workdir)
    print(f"\nserver stderr (without waitress's queue-depth warnings): {total} lines" + (", distinct:" if lines else ""))
    for count, line in lines:
        print(f"  {count:>4} | {line}")
    print(f"\nmemory ({model_note}; RSS of the serve.py process, sampled every {cfg.sample_ms:g} ms):")
    f = figures.get
    print(f"  ready: {mib(f('rss_ready'))}; worst-case images: {f('worst_images', 'n/a')} "
          f"(made in {f('worst_generation_s', float('nan')):.1f} s)")
    print("  each alone: RSS rose " + ", ".join(f"{mib(v)} ({name})" for name, v in f("solo_rise", {}).items()))
    print(f"  {cfg.worst_clients} clients sending them for {cfg.worst_seconds:g} s: peak {mib(f('worst_peak'))}, "
          f"{cfg.settle_s:g} s after {mib(f('worst_settled'))}")
    print(f"  4 of them + 1 client of normal photos ({f('normal_photo', 'n/a')}), {cfg.latency_seconds:g} s: peak "
          f"{mib(f('latency_peak'))}, {cfg.settle_s:g} s after {mib(f('latency_settled'))}; normal /predict "
          f"p50 {f('p50', float('nan')):.0f} / p99 {f('p99', float('nan')):.0f} ms over {f('normal_n', 0)} "
          f"(alone: p50 {f('idle_p50', float('nan')):.0f} / p99 {f('idle_p99', float('nan')):.0f} ms)")
    print(f"  {cfg.slow_uploads} slow {cfg.slow_upload_mb:g} MB uploads paused at half: peak {mib(f('slow_peak'))}, "
          f"{(f('slow_spooled') or 0) / MIB:.0f} MB spooled to TMPDIR; {cfg.settle_s:g} s after {mib(f('slow_settled'))}")
    print(f"  peak over the run: VmHWM {mib(f('hwm'))} (sampled {mib(f('sampled_peak'))}); a normal photo during "
          f"slowloris: {f('slowloris_ms') or float('nan'):.0f} ms")
    failures = tally.of("failure")
    deaths = [x for x in failures if x[2] == "the process"]
    print(f"\nfailures: {len(failures)}")
    for _, phase, name, detail in failures[:40]:
        print(f"  {phase}: {name}: {detail}")
    settled = [v for v in (f("worst_settled"), f("latency_settled"), f("slow_settled")) if v is not None]
    print("\ntargets:")
    correct = [target("5xx from the app (503 busy/not_ready allowed) and unanswered requests",
                      len(failures) - len(deaths), 0, ""),
               target("process deaths", int(bool(deaths) or not f("alive_at_end")), 0, "")]
    memory = [target("peak RSS (VmHWM)", f("hwm"), cfg.peak_rss_mib, "MiB"),
              target(f"RSS {cfg.settle_s:g} s after each load (the highest)", max(settled, default=None),
                     cfg.settled_rss_mib, "MiB"),
              target("normal /predict p99 while 4 clients send worst-case uploads", f("p99"), cfg.p99_ms, "ms"),
              target(f"RSS with {cfg.slow_uploads} slow {cfg.slow_upload_mb:g} MB uploads paused", f("slow_peak"),
                     cfg.slow_rss_mib, "MiB")]
    return all(correct), all(memory)


def main(argv=None):
    cfg = parse_args(argv)
    started = time.monotonic()
    tally, figures = Tally(), {}
    with tempfile.TemporaryDirectory(prefix="catdog-fuzz-") as workdir:
        champion = os.path.join(cfg.models, "model.onnx")
        if os.path.exists(champion) and not cfg.tiny:
            model_path = champion
            meta = catdog.read_json(os.path.join(cfg.models, "model.json"))
            note = f"champion {meta.get('arch')} {meta.get('backbone', '')} {meta.get('version')}"
        else:
            model_path = harness.export_tiny_model(os.path.join(workdir, "model"), version="fuzz-tiny")
            note = "tiny model (no champion in models/)"
        # The CPUs may be shared (CI runs other jobs): say how busy they were.
        print(f"fuzz: seed {cfg.seed}, {cfg.inputs} files, {note}; {len(os.sched_getaffinity(0))} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        rows = fuzz(cfg, model_path, workdir, tally, figures, cfg.measure_memory)
        correct, memory = print_summary(cfg, tally, figures, rows, note, workdir)
    print(f"\nexit status of serve.py after SIGTERM: {figures.get('exit_status')}; "
          f"fuzz took {time.monotonic() - started:.0f} s (start {figures.get('start_s', 0):.1f} s, files "
          f"{figures.get('files_s', 0):.0f} s, protocol {figures.get('protocol_s', 0):.0f} s, memory "
          f"{figures.get('memory_s', 0):.0f} s)")
    if not correct or (cfg.strict_memory and not memory):
        sys.exit(1)


if __name__ == "__main__":
    main()
