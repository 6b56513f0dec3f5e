"""What bench.py, fuzz.py, post_eval.py and the tests drive the service with: multipart
bodies, test images, the tiny model, and real processes (serve.py, a throwaway PostgreSQL)
started on 127.0.0.1, waited for and stopped by their PID.

post_eval.py runs against a deployed service: nothing heavy is imported at module level
(torch only inside export_tiny_model).
"""
import contextlib
import io
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
import zlib

import numpy as np
from PIL import Image

import catdog

SERVE = os.path.join(catdog.ROOT, "serve.py")
TINY_PREPROCESS = {"resize": 40, "crop": 32, "mean": 127.0, "std": 128.0}


# ---------------------------------------------------------------- HTTP bodies
def multipart(files, content_type="application/octet-stream"):
    """(body, Content-Type header) of a multipart/form-data upload of [(field, filename, bytes)],
    as a browser or curl -F sends it."""
    boundary = uuid.uuid4().hex
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                    f"Content-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n" for field, name, data in files)
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


# ---------------------------------------------------------------- test images
def encode(img, fmt, **save_args):
    """The bytes of `img` saved as `fmt` (JPEG, PNG, WEBP, HEIF, ...)."""
    buffer = io.BytesIO()
    img.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def noisy(img, rng, sigma=6.0):
    """The RGB picture with sensor-like Gaussian noise: it compresses (and decodes) like a photo."""
    noise = rng.normal(0, sigma, (img.height, img.width, 3))
    return Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8), "RGB")


def picture(rng, width, height, noise=6.0):
    """A smooth random RGB picture (6x6 random colours, upscaled), with `noise` (0: none)."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), "RGB")
    img = coarse.resize((width, height), Image.BICUBIC)
    return noisy(img, rng, noise) if noise else img


def synthetic_photo(rng, kind=None, fmt="JPEG", size=None, dark=False, gray=False):
    """Photo-like bytes: a tinted gradient with noise. kind 'cat' is reddish, 'dog' bluish (the
    tiny model's rule)."""
    width, height = size or (int(rng.integers(120, 360)), int(rng.integers(100, 300)))
    base = rng.uniform(60, 200, 3)
    if kind == "cat":
        base[0], base[2] = max(base[0], base[2]) + 40, min(base[0], base[2]) - 20
    elif kind == "dog":
        base[0], base[2] = min(base[0], base[2]) - 20, max(base[0], base[2]) + 40
    ramp = np.linspace(-30, 30, width)[None, :, None] * rng.uniform(-1, 1, 3)
    arr = base + ramp + 20 * rng.standard_normal((height, width, 3), dtype=np.float32)
    if gray:
        arr = arr.mean(axis=2, keepdims=True).repeat(3, axis=2)
    if dark:
        arr = arr * 0.12
    return encode(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB"), fmt)


def png_chunks(width, height, bit_depth, color_type, idat):
    """A PNG written by hand, for headers Pillow will not write (bombs, lies, 16-bit RGB)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ---------------------------------------------------------------- hostile files
# Valid files of every kind the service accepts, then the same files broken: mutated, lying
# about their size, random, huge. Every choice goes through a Pick: a seeded numpy generator
# here (make fuzz: same seed, same bytes), hypothesis in tests/test_fuzz.py (a failure shrinks).
class Pick:
    """The random choices of a hostile file, all made by integer(low, high) -> an int in [low, high]."""

    def __init__(self, integer):
        self.integer = integer

    @classmethod
    def seeded(cls, rng):
        return cls(lambda low, high: int(rng.integers(low, high + 1)))

    def choice(self, items):
        return items[self.integer(0, len(items) - 1)]

    def random_bytes(self, size):
        # from one drawn seed: hypothesis draws a few KB at most, and a seed shrinks as well
        return np.random.default_rng(self.integer(0, 2**32 - 1)).bytes(size)


def png_bomb(side, rows=None):
    """A small PNG that inflates to side x side 8-bit grey pixels (only `rows` of them present when given)."""
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(b"\0" * (side + 1)) for _ in range(rows or side)) + compressor.flush()
    return png_chunks(side, side, 8, 0, idat)


def png_16bit_rgb(img):
    rows = np.asarray(img).astype(">u2") * 257
    return png_chunks(img.width, img.height, 16, 2, zlib.compress(b"".join(b"\0" + row.tobytes() for row in rows), 6))


def animated_gif(img):
    frames = [img.point(lambda v, k=k: max(0, v - 25 * k)).convert("P") for k in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)


def with_alpha(img, rng):
    rgba = img.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8), "L").resize(img.size))
    return rgba


# name -> (format, writer of a picture): the valid files everything else starts from.
BASES = {
    "jpeg": ("JPEG", lambda img, rng: encode(img, "JPEG", quality=int(rng.integers(40, 95)))),
    "jpeg-progressive": ("JPEG", lambda img, rng: encode(img, "JPEG", progressive=True, quality=80)),
    "jpeg-gray": ("JPEG", lambda img, rng: encode(img.convert("L"), "JPEG")),
    "png": ("PNG", lambda img, rng: encode(img, "PNG")),
    "png-rgba": ("PNG", lambda img, rng: encode(with_alpha(img, rng), "PNG")),
    "png-palette": ("PNG", lambda img, rng: encode(img.convert("P"), "PNG")),
    "png-16bit-gray": ("PNG", lambda img, rng: encode(Image.fromarray(
        np.asarray(img.convert("L")).astype(np.uint16) * 257), "PNG")),
    "png-16bit-rgb": ("PNG", lambda img, rng: png_16bit_rgb(img)),
    "webp": ("WEBP", lambda img, rng: encode(img, "WEBP", quality=70)),
    "webp-lossless": ("WEBP", lambda img, rng: encode(with_alpha(img, rng), "WEBP", lossless=True)),
    "gif": ("GIF", lambda img, rng: encode(img.convert("P"), "GIF")),
    "gif-animated": ("GIF", lambda img, rng: animated_gif(img)),
    "heic": ("HEIF", lambda img, rng: encode(img, "HEIF", quality=50)),
    "bmp": ("BMP", lambda img, rng: encode(img, "BMP")),
    "tiff": ("TIFF", lambda img, rng: encode(img, "TIFF")),
}


def base_files(rng, per_kind=3):
    """[(kind, format, bytes)]: per_kind valid files of every kind in BASES, 40 to 320 px a side."""
    files = []
    for kind, (fmt, write) in BASES.items():
        for _ in range(per_kind):
            width, height = (int(v) for v in rng.integers(40, 320, 2))
            files.append((kind, fmt, write(picture(rng, width, height), rng)))
    return files


def spans(data, fmt):
    """(start, end) of each PNG chunk, JPEG segment (up to the scan) or RIFF chunk: what a
    duplicated-chunk mutation repeats. [] for other formats."""
    found, pos = [], 0
    if fmt == "PNG":
        pos = 8
        while pos + 12 <= len(data):
            end = pos + 12 + struct.unpack(">I", data[pos:pos + 4])[0]
            found.append((pos, min(end, len(data))))
            pos = end
    elif fmt == "JPEG":
        pos = 2
        while pos + 4 <= len(data) and data[pos] == 0xFF and data[pos + 1] not in (0xD9, 0xDA):
            end = pos + 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
            found.append((pos, min(end, len(data))))
            pos = end
    elif fmt == "WEBP":
        pos = 12
        while pos + 8 <= len(data):
            end = pos + 8 + struct.unpack("<I", data[pos + 4:pos + 8])[0]
            end += end % 2
            found.append((pos, min(end, len(data))))
            pos = end
    return found


def lie_about_size(data, fmt, width, height):
    """The file with its size fields rewritten to width x height (checksums fixed, so the lie is
    believed); None when the format has no field found here."""
    out = bytearray(data)
    if fmt == "PNG":
        struct.pack_into(">II", out, 16, width, height)
        struct.pack_into(">I", out, 29, zlib.crc32(bytes(out[12:29])))
    elif fmt == "JPEG":
        frame = next((i for i in range(2, len(out) - 9) if out[i] == 0xFF and 0xC0 <= out[i + 1] <= 0xC2), None)
        if frame is None:
            return None
        struct.pack_into(">HH", out, frame + 5, min(height, 65535), min(width, 65535))
    elif fmt == "GIF":
        struct.pack_into("<HH", out, 6, min(width, 65535), min(height, 65535))  # the logical screen
        frame = out.find(b"\x2c", 13)  # the first image descriptor, approximately
        if frame > 0 and frame + 9 <= len(out):
            struct.pack_into("<HH", out, frame + 5, min(width, 65535), min(height, 65535))
    elif fmt == "WEBP" and out[12:16] == b"VP8 ":
        struct.pack_into("<HH", out, 26, min(width, 16383), min(height, 16383))
    elif fmt == "WEBP" and out[12:16] == b"VP8L":
        w, h = min(width, 16384) - 1, min(height, 16384) - 1
        struct.pack_into("<I", out, 21, (w & 0x3FFF) | ((h & 0x3FFF) << 14) | (out[24] >> 4 << 28))
    else:
        return None
    return bytes(out)


def flip(data, pick, head=False):
    """A few bytes set to random values: anywhere, or in the first 64 (the headers)."""
    out = bytearray(data)
    for _ in range(pick.integer(1, 8)):
        out[pick.integer(0, (min(len(out), 64) if head else len(out)) - 1)] = pick.integer(0, 255)
    return bytes(out)


def duplicate(data, fmt, pick):
    """A chunk or segment repeated in place (a random slice for formats without spans)."""
    found = spans(data, fmt) or [sorted((pick.integer(0, len(data) - 1), pick.integer(0, len(data) - 1)))]
    start, end = pick.choice(found)
    return data[:end] + data[start:end] * pick.integer(1, 3) + data[end:]


def splice(data, fmt, pick):
    """Random bytes inserted anywhere."""
    at = pick.integer(0, len(data) - 1)
    return data[:at] + pick.random_bytes(pick.integer(1, 511)) + data[at:]


def zero_tail(data, fmt, pick):
    """The end of the file zeroed (a half-written upload)."""
    at = pick.integer(8, len(data) - 1)
    return data[:at] + bytes(len(data) - at)


MUTATIONS = {
    "flip": lambda data, fmt, pick: flip(data, pick),
    "flip-header": lambda data, fmt, pick: flip(data, pick, head=True),
    "truncate": lambda data, fmt, pick: data[:pick.integer(1, len(data) - 1)],
    "duplicate": duplicate,
    "splice-random": splice,
    "zero-tail": zero_tail,
}
# Sizes a rewritten header claims; (w, h) is the real size.
LIES = (lambda w, h: (w * 2, h * 2), lambda w, h: (w * 16, h * 16), lambda w, h: (6000, 6000),
        lambda w, h: (65535, 65535), lambda w, h: (1, h), lambda w, h: (0, 0), lambda w, h: (w, 16_000_000))
MAGICS = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"RIFF\0\0\0\0WEBPVP8 ", b"\0\0\0\x18ftypheic",
          b"BM", b"II*\0", b"MM\0*", b"%PDF-1.4\n", b"PK\x03\x04", b"\x1f\x8b")


def mutated(bases, pick):
    kind, fmt, data = pick.choice(bases)
    name = pick.choice(list(MUTATIONS))
    return f"{kind}/{name}", MUTATIONS[name](data, fmt, pick)


def lying(bases, pick):
    """A valid file whose size fields claim another size."""
    kind, fmt, data = pick.choice([b for b in bases if lie_about_size(b[2], b[1], 1, 1) is not None])
    with Image.open(io.BytesIO(data)) as img:
        claimed = pick.choice(LIES)(*img.size)
    return f"{kind}/lie-{'x'.join(map(str, claimed))}", lie_about_size(data, fmt, *claimed)


def random_file(bases, pick):
    """Pure random bytes, or random bytes behind a real magic number, or nothing at all."""
    size = pick.choice([0, 1, 7, 64, 1024, 65536])
    if pick.integer(0, 1):
        return f"random-{size}", pick.random_bytes(size)
    magic = pick.choice(MAGICS)
    return f"magic-{magic[:4].hex()}+random-{size}", magic + pick.random_bytes(size)


def huge(bases, pick):
    """Headers declaring huge (or absurd) sizes over little or no data."""
    choice = pick.integer(0, 5)
    if choice == 0:
        side = pick.choice([4001, 10_000, 100_000, 1 << 31])
        return f"png-{side}x{side}-no-data", png_chunks(side, side, 8, 2, zlib.compress(b"\0" * 100))
    if choice == 1:
        return "png-1x16000000", png_chunks(1, 16_000_000, 8, 0, b"")
    if choice == 2:
        side = pick.choice([1000, 3000, 7000])  # a deflate bomb: little data, side x side zeros
        return f"png-bomb-{side}x{side}", png_bomb(side)
    if choice == 3:
        return "png-16bit-4000x4001-no-data", png_chunks(4000, 4001, 16, 0, zlib.compress(b"\0" * 8001))
    fmt = "JPEG" if choice == 4 else "GIF"
    side = pick.choice([6300, 20_000, 65_535])
    _, _, small = pick.choice([b for b in bases if b[0] == fmt.lower()])
    return f"{fmt.lower()}-claims-{side}x{side}", lie_about_size(small, fmt, side, side)


def valid(bases, pick):
    kind, _, data = pick.choice(bases)
    return f"{kind}/valid", data


def sixteen_bit(bases, pick):
    """16-bit PNGs (grey or RGB) of real data, as they are or mutated."""
    sixteen = [b for b in bases if b[0].startswith("png-16bit")]
    return valid(sixteen, pick) if pick.integer(0, 1) else mutated(sixteen, pick)


# One file in ten of each family in turn: most are mutated photos.
FAMILIES = (mutated, mutated, mutated, mutated, mutated, lying, random_file, huge, valid, sixteen_bit)


def hostile_files(seed, count):
    """[(name, bytes)]: `count` files of every family in turn, from `seed` alone."""
    rng = np.random.default_rng(seed)
    bases, pick = base_files(rng), Pick.seeded(rng)
    return [FAMILIES[i % len(FAMILIES)](bases, pick) for i in range(count)]


# ---------------------------------------------------------------- the tiny model
def export_tiny_model(folder, version="tiny-1", dog_if_blue=True, profile=True, card=False):
    """model.onnx + model.json (+ reference_profile.json, + MODEL_CARD.md) in `folder` of a rule a test can check:
    a reddish photo is a cat, a bluish one a dog, a very green one (mean green above 229) is
    "other". The champion's layout (features -> Linear head), exported by nets.export_onnx like
    the real model, so the service cannot tell the difference. The path of model.onnx."""
    import torch
    from torch import nn

    import nets

    features = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # the mean of each channel
    model = nets.CatDogNet(features, nn.Linear(3, 2), nets.PetDecision(3, components=3))
    sign = 1.0 if dog_if_blue else -1.0
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[4.0, 0.0, -4.0], [-4.0, 0.0, 4.0]]) * sign)
        model.head.bias.zero_()
        model.pet.head.weight.copy_(torch.tensor([[0.0, -20.0, 0.0, 0.0]]))
        model.pet.head.bias.fill_(16.0)
    meta = catdog.model_meta("baseline", version=version, other={"label": "other", "score": "head", "threshold": 0.5})
    meta["preprocess"] = dict(TINY_PREPROCESS)
    os.makedirs(folder, exist_ok=True)
    nets.export_onnx(model, meta, os.path.join(folder, "model.onnx"))
    if profile:
        rng = np.random.default_rng(0)
        stats = [catdog.image_stats(catdog.open_image(synthetic_photo(rng))) for _ in range(400)]
        catdog.write_json(os.path.join(folder, "reference_profile.json"), catdog.reference_profile(stats))
    if card:  # the image ships a card beside every model
        with open(os.path.join(folder, catdog.MODEL_CARD), "w") as f:
            f.write(f"# catdog model card: {version}\n\nNot a trained model: a fixed rule for smoke tests "
                    "(reddish = cat, bluish = dog, very green = other).\n")
    return os.path.join(folder, "model.onnx")


# ---------------------------------------------------------------- processes
def free_port():
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url, proc=None, timeout=30):
    """Poll `url` until it answers 200; seconds waited. Fails early when `proc` exits."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer 200 within {timeout} s")


# The Makefile's malloc tuning is for training's feature extraction: a service runs as in the image.
TRAINING_MALLOC = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


class Server:
    """A service on 127.0.0.1:<free port>: serve.py, or command(port) -> argv. `env` is added to
    this process's environment (values as str), `unset` names and TRAINING_MALLOC are removed
    from it. stdout goes to the file `log`, stderr to `err` (or with stdout when err is None;
    nowhere without log)."""

    def __init__(self, env=None, command=None, log=None, err=None, unset=()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log, self.err = log, err
        env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port), "PYTHONDONTWRITEBYTECODE": "1",
               **{k: str(v) for k, v in (env or {}).items()}}
        for name in (*TRAINING_MALLOC, *unset):
            env.pop(name, None)
        argv = command(self.port) if command else [sys.executable, SERVE]
        self.started = time.monotonic()
        with contextlib.ExitStack() as files:  # the child keeps its own copies of the descriptors
            stdout = files.enter_context(open(log, "wb")) if log else subprocess.DEVNULL
            stderr = files.enter_context(open(err, "wb")) if err else subprocess.STDOUT if log else subprocess.DEVNULL
            self.proc = subprocess.Popen(argv, cwd=catdog.ROOT, env=env, stdout=stdout, stderr=stderr)
        self.pid = self.proc.pid

    def wait(self, path="/health", timeout=30):
        """Seconds from the start until `path` answered 200. On a failure the process is stopped
        and RuntimeError says why, with the end of its output."""
        try:
            wait_ready(self.url + path, self.proc, timeout)
        except (RuntimeError, TimeoutError) as e:
            self.stop()
            raise RuntimeError(f"{e}; its output:\n{self.logs(self.err or self.log)[-3000:]}") from None
        return time.monotonic() - self.started

    def alive(self, path="/health"):
        """True while the process runs and `path` answers 200."""
        if self.proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as response:
                return response.status == 200
        except OSError:
            return False

    def logs(self, path=None):
        """The text of its stdout file (or of `path`), "" when there is none."""
        path = path or self.log
        if not path:
            return ""
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def send(self, signum):
        os.kill(self.pid, signum)

    def stop(self, signum=signal.SIGTERM, timeout=30):
        """`signum` (SIGTERM: the service drains, then exits), SIGKILL after `timeout` s; the exit status."""
        if self.proc.poll() is None:
            os.kill(self.pid, signum)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def postgres_binaries():
    """The folder holding initdb and pg_ctl, or None (backup.postgres_folder: the one search)."""
    from backup import postgres_folder

    return postgres_folder("initdb", "pg_ctl")


def postgres_user():
    """Who runs the server: PostgreSQL refuses to run as root, so root hands it to the
    `postgres` account Debian's package creates."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres").pw_name
    except KeyError:
        return None


def why_no_postgres():
    """None when a PostgreSQL server can be started here, else the reason (for a skip)."""
    if postgres_binaries() is None:
        return "PostgreSQL server binaries not found (Debian: apt-get install postgresql; make system-deps)"
    if os.geteuid() == 0 and postgres_user() is None:
        return "running as root without a 'postgres' account to run the server as"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (make setup)"
    return None


class PostgresServer:
    """A throwaway PostgreSQL server: initdb in a temporary folder, then pg_ctl start on
    127.0.0.1:<free port> (trust auth: only this machine's loopback reaches it), stopped by its PID.

        with PostgresServer() as pg:
            url = pg.new_database("catdog_test")     # postgresql://catdog@127.0.0.1:PORT/catdog_test
    """

    def __init__(self, superuser="catdog"):
        self.bin = postgres_binaries()
        self.user = postgres_user()
        self.superuser = superuser
        self.folder = tempfile.mkdtemp(prefix="catdog-pg-")
        self.data = os.path.join(self.folder, "data")
        self.port = free_port()
        self.pid = None
        if self.user:
            account = pwd.getpwnam(self.user)
            os.chown(self.folder, account.pw_uid, account.pw_gid)

    def _run(self, tool, *args):
        subprocess.run([os.path.join(self.bin, tool), *args], check=True, user=self.user, cwd=self.folder,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self):
        self._run("initdb", "-D", self.data, "-U", self.superuser, "--auth=trust", "-E", "UTF8", "--no-sync")
        return self.restart()

    def restart(self):
        """Start the server on the data folder (again, after stop_server: same port, same data)."""
        options = f"-h 127.0.0.1 -p {self.port} -k {self.folder} -c max_connections=200"
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", self.data, "-o", options,
                  "-l", os.path.join(self.folder, "server.log"))
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            self.pid = int(f.readline())
        return self

    def url(self, database="postgres"):
        return f"postgresql://{self.superuser}@127.0.0.1:{self.port}/{database}"

    def new_database(self, name):
        """A new, empty database; its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def logs(self):
        with open(os.path.join(self.folder, "server.log"), errors="replace") as f:
            return f.read()

    def stop_server(self, timeout=30):
        """Fast shutdown (SIGINT to the postmaster's PID: sessions end, the server checkpoints)."""
        if not self.pid:
            return
        try:
            os.kill(self.pid, signal.SIGINT)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                os.kill(self.pid, 0)  # ProcessLookupError once it has exited
                time.sleep(0.05)
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.pid = None

    def stop(self):
        """Stop the server and delete its data."""
        self.stop_server()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
