"""Uploads, from the request to the model's input: the limits on request bodies, the photos'
bytes out of the request, and their decoding within a memory budget, heavy images on
low-priority lanes.

serve.py's routes call read_upload() (POST /predict) or read_batch() (POST /predict/batch), then
prepare(bytes, ...) for each photo's (model input, image stats). Every refusal is a
catdog.ImageError whose reason status_of() turns into an HTTP status. Decoding and preprocessing
are catdog's (open_checked, decode_header_checked, preprocess): the functions training uses.
"""
import concurrent.futures
import contextlib
import ctypes
import functools
import io
import os
import sys
import threading

from flask import Request, request

import catdog

HEAVY_DECODE_BYTES = 16 << 20  # a decode over this (about 4 MP of RGBA) is heavy: see DecodeBudget
BATCH_BODY_PHOTOS = 4  # a POST /predict/batch body holds this many photos at the size limit (or 32 ordinary ones)
ERROR_STATUS = {"busy": 503, "no_file": 400, "empty": 400, "too_many_files": 400, "too_many_photos": 400,
                "too_large": 413, "unsupported_media_type": 415, "unsupported_format": 415}


def status_of(e):
    """The HTTP status of a catdog.ImageError: 422 for an unusable image, else ERROR_STATUS's."""
    return ERROR_STATUS.get(e.reason, 422)


class InMemoryRequest(Request):
    # Uploads are capped by MAX_UPLOAD_MB, so keep them in memory: werkzeug would spool
    # big ones to temporary files, and the container's root file system is read-only.
    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


def waitress_body_limits(settings):
    """waitress.create_server's limits on request bodies. The app answers oversize uploads with a
    JSON 413; waitress's own (plain-text) cap only guards against absurd bodies. Bodies over
    MAX_UPLOAD_MB (a batch, or an upload about to be refused) wait in a temporary file (TMPDIR, a
    volume in the deployments), not in memory: 16 slow 60 MB uploads would otherwise hold 1 GB."""
    return {"max_request_body_size": max(BATCH_BODY_PHOTOS * settings.max_upload_bytes, 64 << 20),
            "inbuf_overflow": settings.max_upload_bytes}


def body_limit(settings):
    """The most bytes the body of this request may hold: one photo's, or a batch's."""
    return settings.max_upload_bytes * (BATCH_BODY_PHOTOS if request.endpoint == "catdog.predict_batch" else 1)


def too_large(settings):
    """(reason, message) of a body werkzeug refused with 413: over body_limit, or a small form in
    too many parts."""
    limit = body_limit(settings)
    if request.content_length is not None and request.content_length <= limit:
        return "too_many_parts", f"the form has more than {request.max_form_parts} parts"
    return "too_large", f"the upload exceeds the {limit / (1 << 20):g} MB limit"


def read_upload():
    """Bytes of the one photo of a POST /predict: multipart field `file` (or `image`), or a raw
    image/* body; ImageError when there is none, or more than one."""
    if request.mimetype == "multipart/form-data":
        uploads = request.files.getlist("file") + request.files.getlist("image")
        if not uploads:
            raise catdog.ImageError("no_file", "send the photo as multipart field 'file' (or 'image')")
        if len(uploads) > 1:
            raise catdog.ImageError("too_many_files",
                                    "one photo per POST /predict: send several to POST /predict/batch")
        return uploads[0].read()
    if not request.content_length and not request.headers.get("Transfer-Encoding"):
        raise catdog.ImageError("no_file", "no photo: send multipart field 'file' or an image/* body")
    if request.mimetype.startswith("image/") or request.mimetype == "application/octet-stream":
        return request.get_data()
    raise catdog.ImageError("unsupported_media_type",
                            f"content type {request.mimetype or 'none'} is not accepted: "
                            "send multipart/form-data or an image/* body")


def read_batch(max_photos):
    """The file parts (werkzeug FileStorage) of a POST /predict/batch: multipart parts `file`,
    at most `max_photos`; ImageError when there are none or too many."""
    if request.mimetype != "multipart/form-data":
        raise catdog.ImageError("unsupported_media_type", "send multipart/form-data with one part 'file' per photo")
    parts = request.files.getlist("file")
    if not parts:
        raise catdog.ImageError("no_file", "send each photo as a multipart part named 'file'")
    if len(parts) > max_photos:
        raise catdog.ImageError("too_many_photos", f"{len(parts)} photos: at most {max_photos} per request")
    return parts


def prepare(data, preprocess, settings, budget):
    """(model input, image stats) of untrusted bytes, for a model of these `preprocess` settings;
    ImageError when they are not a usable photo. `settings` gives the limits (max_upload_bytes,
    max_pixels). The format is sniffed from the bytes, never the name; big JPEGs decode at a
    reduced scale that still covers the model's input (catdog.open_checked). The decode budget
    is held from decoding until only the small model input is left."""
    if len(data) > settings.max_upload_bytes:
        raise catdog.ImageError("too_large", f"the photo exceeds the {settings.max_upload_mb:g} MB limit")
    try:
        img = catdog.open_checked(data, settings.max_pixels, preprocess["resize"])
        return budget.run(catdog.decoding_bytes(img), lambda: model_input(img, preprocess))
    except catdog.ImageError:
        raise
    except Exception as e:  # noqa: BLE001 (any other failure inside a decoder is still a bad file)
        raise catdog.ImageError("corrupt", f"the image could not be decoded ({type(e).__name__})") from None


def model_input(img, preprocess):
    """(preprocessed image, image stats) of an opened image, decoding it (header checked)."""
    img = catdog.decode_header_checked(img)
    return catdog.preprocess(img, preprocess), catdog.image_stats(img)


class DecodeBudget:
    """Bytes of images being decoded at once, across request threads: a decode waits until its
    bytes fit (or nothing else is decoding), at most `wait_s`, else ImageError "busy" (503).
    Bounds the service's memory whatever several worst-case uploads arrive together.
    A heavy decode (over `heavy_bytes`: a 16 MP PNG takes a CPU for a second) also needs one of
    `heavy_lanes`, fewer than the CPUs, so that ordinary photos always have a CPU left. When
    every lane is taken it gets the 503 at once: waiting, it would hold a request thread that
    an ordinary photo queued behind it needs. Each lane is a thread of its own at the lowest
    CPU priority, so that where a heavy decode and ordinary photos want the same CPU (the
    model's threads run on every CPU), the ordinary photos mostly get it first (the lane still
    takes the GIL between blocks of the file). `log` is the service's log(**fields)."""

    def __init__(self, limit_bytes, wait_s, log, heavy_bytes=HEAVY_DECODE_BYTES, heavy_lanes=1):
        self.limit, self.wait_s, self.used = limit_bytes, wait_s, 0
        self.heavy_bytes, self.heavy_lanes, self.heavy = heavy_bytes, heavy_lanes, 0
        self._cond = threading.Condition()
        self._lanes = concurrent.futures.ThreadPoolExecutor(heavy_lanes, "heavy-decode",
                                                            functools.partial(lowest_cpu_priority, log))

    def run(self, cost, decode):
        """decode() once `cost` bytes fit the budget: on a low-priority lane when it is heavy.
        A lane pool that is shut down (the process exiting) answers 503, not the client's
        fault. (It cannot break: lowest_cpu_priority, its initializer, never raises.)"""
        with self.reserve(cost):
            if cost <= self.heavy_bytes:
                return decode()
            try:
                future = self._lanes.submit(decode)
            except RuntimeError:  # "cannot schedule new futures after shutdown"
                raise catdog.ImageError("busy", "the service cannot decode large images now: retry in a second") from None
            return future.result()

    def close(self):
        """Let the lane threads go once their decodes are done."""
        self._lanes.shutdown(wait=False)

    def _lanes_taken(self, heavy):
        return heavy and self.heavy >= self.heavy_lanes

    def _fits(self, cost, heavy):
        if self._lanes_taken(heavy):
            return False
        return self.used == 0 or self.used + cost <= self.limit

    @contextlib.contextmanager
    def reserve(self, cost):
        heavy = cost > self.heavy_bytes
        with self._cond:
            if self._lanes_taken(heavy) or not self._cond.wait_for(lambda: self._fits(cost, heavy), self.wait_s):
                raise catdog.ImageError("busy", "the service is decoding other large images: retry in a second")
            self.used += cost
            self.heavy += heavy
        try:
            yield
        finally:
            with self._cond:
                self.used -= cost
                self.heavy -= heavy
                self._cond.notify_all()
            if cost > 32 << 20:
                release_memory()


def lowest_cpu_priority(log):
    """Nice 19 for the calling thread alone: Linux keeps a nice value per thread (elsewhere the
    id would name a process, so nothing is changed there). Where a sandbox forbids it, the
    lane keeps its priority: a failed initializer would break the lane for every heavy photo."""
    if not sys.platform.startswith("linux"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError as e:
        log(event="decode_lane_priority_unchanged", error=str(e))


@functools.cache
def glibc():
    """The C library when it is glibc (malloc_trim, mallopt), else None. Loaded on first use:
    importing this module opens nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def release_memory():
    """Give freed heap back to the system after a large decode (glibc keeps it otherwise)."""
    if glibc():
        glibc().malloc_trim(0)


def tune_malloc():
    """Blocks of 1 MB and more come from mmap and go back to the system when freed: glibc's
    default threshold grows with use, after which a decoded 16 MP image stays in the heap.
    Freed heap stays with the process up to 8 MB per arena: at glibc's default (128 kB) every
    request gave its photo's arrays back and faulted them in again, pages the kernel zeroes
    (docs/benchmarks.md). release_memory() still trims after a large decode."""
    if glibc():
        glibc().mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (a fixed one also stops the growth)
        glibc().mallopt(-1, 8 << 20)  # M_TRIM_THRESHOLD
