"""Raw cat/dog photos -> a clean, deduplicated, split dataset of 224x224 RGB JPEGs.

    python preprocess.py --source ../shared/datasets/dogs-vs-cats-3k --out data/processed

A source is a Kaggle-style flat folder or zip (cat.123.jpg), Microsoft's PetImages
folder or zip (PetImages/Cat/123.jpg), or an http(s) URL of such a zip, which is
downloaded (resumably) into data/raw/ first.

Every file is decoded fully with catdog.open_image (the loader serving uses too); files
that fail, and exact or near-duplicates, are dropped with a reason. The survivors are
split 80/10/10 per class with a fixed seed and written to
    <out>/{train,val,test}/{cat,dog}/<name>.jpg
beside a manifest CSV (one row per input file) and a quality report (JSON + Markdown)
in the parent folder of <out>.

Feedback (--feedback, default <out>/../feedback: data/feedback, which harvest.py writes and
`make data` restores from data/feedback.dvc) is staff-labelled photos the service kept, in
{cat,dog,other}/ folders; the folder must exist (empty: no feedback). They join the training
split only, after the sample is split (so they never move a sample photo), decoded with the
same loader. Dropped with a reason: any that copies or near-copies an evaluation photo (the
sample's val and test splits, the extra evaluation photos --eval-extra, the not-pets photos
--not-pets, whose test part is evaluated) or a training photo, copies among themselves, and
those labelled "other" (the cat/dog splits have no such class; "other" is learnt from the
not-pets folder, train.py). The quality report names the folders they were checked against
(train.py warns when it evaluates on others). Without feedback photos the output is byte for
byte what it was.
"""
import collections
import csv
import hashlib
import io
import json
import multiprocessing
import os
import random
import shutil
import sys
import time
import urllib.request
import warnings
import zipfile

import numpy as np
from PIL import Image

import catdog

# ---------------------------------------------------------------- configuration (--name value overrides)
source = catdog.SHARED_SAMPLE  # a folder, a .zip, or an http(s) URL of a .zip
out = catdog.PROCESSED_DIR  # the processed dataset folder (only its split folders are replaced)
raw_dir = os.path.join(catdog.DATA_DIR, "raw")  # where a downloaded zip is kept (its sha256 is in the quality report)
feedback = ""  # harvested staff-labelled photos, {cat,dog,other}/ (make harvest), an existing folder; "": feedback/ beside --out
eval_extra = catdog.EXTRA_SAMPLE  # train.py's --eval-extra: evaluation photos no feedback photo may copy ("": none)
not_pets = catdog.NOT_PETS_SAMPLE  # train.py's --not-pets: photos no feedback photo may copy ("": none)
size = catdog.STORE_SIZE  # side of the stored square images, in pixels
resize = catdog.STORE_RESIZE  # shorter_crop (resize the shorter side, centre crop) or squash
workers = os.cpu_count() or 1  # decoding processes; 1 decodes in this process
# Near-duplicates (re-encoded, resized, lightly edited copies of one photo) in two steps:
# 64-bit difference hashes within near_duplicate_bits make a candidate pair, confirmed when
# their 16x16 grey thumbnails differ by at most near_duplicate_mad grey levels on average.
# The hash alone is not enough: on the Kaggle sample distinct photos come as close as 5 bits,
# while they differ by 20+ grey levels and true copies by under 2.
near_duplicate_bits = 10  # dHash distance that makes two photos a candidate pair
near_duplicate_mad = 8.0  # mean grey-level difference of 16x16 thumbnails that confirms a pair
seed = catdog.SEED  # seed of the split
QUALITY = catdog.STORE_QUALITY
SPLITS = catdog.SPLITS


def parse_args(argv=None):
    return catdog.config_parser(globals(), choices={"resize": ("shorter_crop", "squash")}).parse_args(argv)


# ---------------------------------------------------------------- download
def download(url, raw_dir):
    """Fetch url into raw_dir (resuming a partial .part file with an HTTP Range request);
    return (path, sha256). A finished file is never fetched again."""
    os.makedirs(raw_dir, exist_ok=True)
    path = os.path.join(raw_dir, os.path.basename(url.split("?")[0]) or "dataset.zip")
    if not os.path.exists(path):
        part = path + ".part"
        done = os.path.getsize(part) if os.path.exists(part) else 0
        request = urllib.request.Request(url, headers={"User-Agent": "catdog-preprocess"})
        if done:
            request.add_header("Range", f"bytes={done}-")
        with urllib.request.urlopen(request, timeout=60) as response:
            if done and response.status != 206:  # the server ignored Range: start over
                done = 0
            total = done + int(response.headers.get("Content-Length") or 0)
            with open(part, "ab" if done else "wb") as f:
                last_print = 0.0
                while block := response.read(1 << 20):
                    f.write(block)
                    done += len(block)
                    if time.time() - last_print > 2:
                        last_print = time.time()
                        share = f"{100 * done / total:5.1f}%" if total else ""
                        print(f"download {done / 1e6:8.1f} MB {share}", file=sys.stderr, flush=True)
        os.replace(part, path)
    digest = catdog.sha256_file(path)
    with open(path + ".sha256", "w") as f:
        f.write(f"{digest}  {os.path.basename(path)}\n")
    print(f"{path} sha256 {digest}")
    return path, digest


# ---------------------------------------------------------------- listing inputs
def list_inputs(source):
    """Sorted [(name, label)]: name is a path inside the folder or zip; label may be None."""
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as z:
            names = [i.filename for i in z.infolist() if not i.is_dir()]
    else:
        names = [os.path.relpath(os.path.join(d, f), source)
                 for d, _, files in os.walk(source) for f in files]
    # macOS zips carry resource-fork shadows of every file; they are not photos.
    names = [n for n in names if "__MACOSX" not in n.split("/")]
    return [(n, catdog.label_from_name(n)) for n in sorted(names)]


_zip = None  # one open ZipFile per worker process


def read_bytes(source, name):
    global _zip
    if os.path.isdir(source):
        with open(os.path.join(source, name), "rb") as f:
            return f.read()
    if _zip is None or _zip.filename != source:
        _zip = zipfile.ZipFile(source)
    return _zip.read(name)


# ---------------------------------------------------------------- one file (runs in workers)
def difference_hash(img):
    """64-bit dHash: is each pixel of a 9x8 grey thumbnail brighter than its right neighbour?
    Survives re-encoding and resizing, so near-copies of a photo get (almost) the same bits."""
    grey = np.asarray(img.convert("L").resize((9, 8), Image.BILINEAR), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).flatten()
    return int(np.packbits(bits).view(">u8")[0])


def inspect(job):
    """Decode one file; on success store it resized in the staging folder (None: nowhere). Returns a row."""
    index, source, name, label, staging, size, resize = job
    row = {"index": index, "source": name, "label": label or "", "sha256": "", "bytes": 0,
           "width": "", "height": "", "format": "", "drop_reason": "", "dhash": None, "thumb": None}
    if os.path.basename(name).lower() == "thumbs.db":  # Windows thumbnail cache
        row["drop_reason"] = "thumbs_db"
        return row
    data = read_bytes(source, name)
    row["sha256"], row["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    if label is None:
        row["drop_reason"] = "no_label"
        return row
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "corrupt EXIF" noise on real photos
            img = catdog.open_image(data)
            row["format"] = Image.open(io.BytesIO(data)).format  # header only: cheap
    except catdog.ImageError as e:
        row["drop_reason"] = e.reason
        return row
    row["width"], row["height"] = img.size
    stored = catdog.fit_for_storage(img, size, resize)
    if staging:
        stored.save(os.path.join(staging, f"{index}.jpg"), "JPEG", quality=QUALITY)
    row["dhash"] = difference_hash(stored)
    row["thumb"] = stored.convert("L").resize((16, 16), Image.BILINEAR).tobytes()
    return row


def decode_all(jobs, workers):
    """inspect() of every job, in `workers` processes."""
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            return list(pool.imap(inspect, jobs, chunksize=16))
    return [inspect(job) for job in jobs]  # in-process: easier to debug, and safe inside a multi-threaded caller


# ---------------------------------------------------------------- duplicates
def drop_exact_duplicates(rows):
    """Keep the first file of each sha256; a photo filed under both labels is dropped entirely."""
    groups = collections.defaultdict(list)
    for row in rows:
        if not row["drop_reason"]:
            groups[row["sha256"]].append(row)
    for group in groups.values():
        _drop_group(group, "duplicate")


def drop_near_duplicates(rows, max_bits, max_mad):
    """Group near-copies (transitively) and keep one of each group, so no near-copy can
    land in two splits. Returns the smallest distance left
    between kept images (how close the closest two distinct photos are)."""
    kept = [row for row in rows if not row["drop_reason"]]
    parent = list(range(len(kept)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in close_pairs([row["dhash"] for row in kept], max_bits)[0]:
        if thumb_difference(kept[i], kept[j]) <= max_mad:
            parent[root(i)] = root(j)
    groups = collections.defaultdict(list)
    for i, row in enumerate(kept):
        groups[root(i)].append(row)
    for group in groups.values():
        _drop_group(group, "near_duplicate")
    return close_pairs([row["dhash"] for row in rows if not row["drop_reason"]], -1)[1]


def thumb_difference(a, b):
    """Mean absolute difference of two 16x16 grey thumbnails, in grey levels (0-255)."""
    return float(np.abs(np.frombuffer(a["thumb"], np.uint8).astype(np.int16)
                        - np.frombuffer(b["thumb"], np.uint8)).mean())


def close_pairs(hashes, max_bits, block=1024):
    """([(i, j), ...] with i < j and Hamming distance <= max_bits, smallest distance of any pair)."""
    hashes = np.array(hashes, dtype=np.uint64)
    pairs, smallest = [], None
    for start in range(0, len(hashes), block):  # blocks keep memory small on 25k images
        distance = np.bitwise_count(hashes[start:start + block, None] ^ hashes[None, :])
        upper = np.triu(np.ones(distance.shape, bool), k=start + 1)  # each pair once
        if upper.any():
            low = int(distance[upper].min())
            smallest = low if smallest is None else min(smallest, low)
        rows_i, cols = np.nonzero(upper & (distance <= max_bits))
        pairs += zip((rows_i + start).tolist(), cols.tolist())
    return pairs, smallest


def _drop_group(group, reason):
    if len(group) < 2:
        return
    if len({row["label"] for row in group}) > 1:  # the same photo labelled cat and dog
        for row in group:
            row["drop_reason"] = "conflicting_labels"
        return
    keeper = group[0]
    for row in group[1:]:
        row["drop_reason"], row["duplicate_of"] = reason, keeper["source"]


def drop_copies(rows, references, reason, max_bits, max_mad):
    """Drop every row that is a copy (the same sha256) or a near-copy (the rule above) of one
    of the decoded `references`."""
    usable = [r for r in references if r["dhash"] is not None]
    shas = {r["sha256"]: r for r in usable}
    hashes = np.array([r["dhash"] for r in usable], dtype=np.uint64)
    for row in rows:
        if row["drop_reason"]:
            continue
        match = shas.get(row["sha256"])
        if match is None:
            close = np.flatnonzero(np.bitwise_count(hashes ^ np.uint64(row["dhash"])) <= max_bits)
            match = next((usable[i] for i in close if thumb_difference(row, usable[i]) <= max_mad), None)
        if match is not None:
            row["drop_reason"], row["duplicate_of"] = reason, match["source"]


# ---------------------------------------------------------------- feedback
def feedback_inputs(folder):
    """Sorted [(name, label)] of the files in folder's label folders (cat/, dog/, other/)."""
    return [(f"{label}/{name}", label) for label in catdog.ANSWERS if os.path.isdir(os.path.join(folder, label))
            for name in sorted(os.listdir(os.path.join(folder, label)))
            if os.path.isfile(os.path.join(folder, label, name))]


def outside_photos(args, report_dir):
    """{drop reason: decoded rows} of the photos outside the sample no feedback photo may copy:
    the extra evaluation photos and the not-pets photos (the whole folder: its test part is
    evaluated, the rest teaches "other"). A folder that is named but absent stops the run: the
    check would silently not happen."""
    found = {}
    for reason, option, folder in (("evaluation_duplicate", "eval-extra", args.eval_extra),
                                   ("not_pets_duplicate", "not-pets", args.not_pets)):
        if not folder:
            continue
        if not os.path.isdir(folder):
            sys.exit(f"--{option} {folder} does not exist: feedback photos cannot be checked against its photos "
                     f"(--{option} \"\" to check without them)")
        names = [name for name, _ in list_inputs(folder) if name.lower().endswith(catdog.IMAGE_SUFFIXES)]
        rows = decode_all([(i, folder, name, catdog.OTHER, None, args.size, args.resize)
                           for i, name in enumerate(names)], args.workers)
        for row in rows:  # named in duplicate_of as the manifest names sources: relative to its folder
            row["source"] = os.path.relpath(os.path.join(folder, row["source"]), report_dir)
        found[reason] = rows
    return found


def feedback_rows(args, folder, sample, staging, report_dir):
    """Rows of the feedback photos in `folder`, added after the sample is split: the kept ones
    in train; the others dropped with a reason."""
    inputs = feedback_inputs(folder)
    if not inputs:
        return []
    rows = decode_all([(len(sample) + i, folder, name, label, staging, args.size, args.resize)
                       for i, (name, label) in enumerate(inputs)], args.workers)
    kept = [row for row in sample if not row["drop_reason"]]
    outside = outside_photos(args, report_dir)
    checks = (("evaluation_duplicate", [r for r in kept if r["split"] != "train"] + outside.get("evaluation_duplicate", [])),
              ("not_pets_duplicate", outside.get("not_pets_duplicate", [])),
              ("training_duplicate", [r for r in kept if r["split"] == "train"]))
    for reason, references in checks:
        drop_copies(rows, references, reason, args.near_duplicate_bits, args.near_duplicate_mad)
    drop_exact_duplicates(rows)
    drop_near_duplicates(rows, args.near_duplicate_bits, args.near_duplicate_mad)
    for row in rows:
        row["feedback"] = True
        if row["drop_reason"] == "evaluation_duplicate":
            # evaluate.extra_photos leaves out extra photos whose sha256 the manifest holds:
            # a refused copy must not take its original out of the evaluation set.
            row["sha256"] = ""
        elif not row["drop_reason"] and row["label"] == catdog.OTHER:
            row["drop_reason"] = "other_label"  # the splits are cat/dog; "other" is learnt from --not-pets
        elif not row["drop_reason"]:
            row["split"] = "train"
    return rows


# ---------------------------------------------------------------- split
def assign_splits(rows, seed):
    """Stratified 80/10/10: per class, order by content hash (independent of file names and
    listing order), shuffle with the seed, cut. Same inputs + seed -> same split."""
    for label in catdog.CLASSES:
        members = sorted((r for r in rows if not r["drop_reason"] and r["label"] == label),
                         key=lambda r: r["sha256"])
        random.Random(f"{seed}-{label}").shuffle(members)
        start = 0
        for k, (split, share) in enumerate(SPLITS):
            end = len(members) if k == len(SPLITS) - 1 else start + round(share * len(members))
            for row in members[start:end]:
                row["split"] = split
            start = end


def output_name(row, taken):
    """cat.123.jpg for both layouts (Kaggle's cat.123.jpg and PetImages/Cat/123.jpg)."""
    stem = os.path.splitext(os.path.basename(row["source"]))[0]
    if not stem.lower().startswith(row["label"] + "."):
        stem = f"{row['label']}.{stem}"
    name = f"{stem}.jpg"
    if name in taken:  # same file name in two folders of the source
        name = f"{stem}.{row['sha256'][:8]}.jpg"
    taken.add(name)
    return name


# ---------------------------------------------------------------- reports
def write_manifest(path, rows, source_prefix, feedback_prefix):
    columns = ["path", "source", "sha256", "label", "width", "height", "format", "bytes",
               "split", "drop_reason", "duplicate_of"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "source": (feedback_prefix if row.get("feedback") else source_prefix) + row["source"]})


def drop_counts(rows):
    return dict(sorted(collections.Counter(r["drop_reason"] for r in rows if r["drop_reason"]).items()))


def drop_table(dropped):
    """Markdown table lines of {reason: files}."""
    return (["| reason | files |", "| --- | --- |"]
            + ([f"| {reason} | {n} |" for reason, n in dropped.items()] or ["| (none) | 0 |"]))


def quality_report(rows, args, source_info, smallest_distance, feedback_folder, checked_against):
    """What was kept, dropped and why: the same inputs give the same bytes (no timings, no
    worker count), so the DVC-tracked data does not change on a rerun. A "feedback" part only
    when there were feedback photos (its "trained" is the lineage's feedback_photos;
    "checked_against" the outside folders they were compared with, relative to the report)."""
    dropped = drop_counts(rows)
    kept = [r for r in rows if not r["drop_reason"]]
    splits = {split: {label: sum(r["split"] == split and r["label"] == label for r in kept)
                      for label in catdog.CLASSES} for split, _ in SPLITS}
    report = {"source": source_info, "inputs": len(rows), "kept": len(kept),
              "dropped": dropped, "dropped_total": sum(dropped.values()),
              "splits": splits, "store": {"size": args.size, "resize": args.resize, "quality": QUALITY},
              "near_duplicate": {"hash_bits": args.near_duplicate_bits, "thumb_mad": args.near_duplicate_mad},
              "smallest_hash_distance_between_kept": smallest_distance,
              "seed": args.seed}
    feedback = [r for r in rows if r.get("feedback")]
    if feedback:
        report["feedback"] = {"folder": feedback_folder, "inputs": len(feedback),
                              "trained": sum(not r["drop_reason"] for r in feedback), "dropped": drop_counts(feedback),
                              "checked_against": checked_against}
    return report


def report_markdown(report):
    lines = ["# Data quality report", "",
             f"Source: `{report['source']['path']}`  ",
             f"Inputs: {report['inputs']}, kept: {report['kept']}, dropped: {report['dropped_total']}", "",
             "## Dropped", "", *drop_table(report["dropped"])]
    lines += ["", "## Splits", "", "| split | " + " | ".join(catdog.CLASSES) + " | total |",
              "| --- |" + " --- |" * (len(catdog.CLASSES) + 1)]
    for split, counts in report["splits"].items():
        lines.append(f"| {split} | " + " | ".join(str(counts[c]) for c in catdog.CLASSES)
                     + f" | {sum(counts.values())} |")
    near = report["near_duplicate"]
    lines += ["", f"Near-duplicates: dHash within {near['hash_bits']} bits and 16x16 grey thumbnails within "
              f"{near['thumb_mad']} levels; closest dHashes left between kept images: "
              f"{report['smallest_hash_distance_between_kept']} bits.", ""]
    if feedback := report.get("feedback"):
        lines += ["## Feedback", "", f"Folder `{feedback['folder']}`: {feedback['inputs']} photos, "
                  f"{feedback['trained']} into the training split (counted above); dropped:", "",
                  *drop_table(feedback["dropped"]), "",
                  "Checked for copies of the photos of " + ", ".join(
                      f"--{option.replace('_', '-')} `{folder or '(none)'}`"
                      for option, folder in feedback["checked_against"].items()) + ".", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- main
def main(args):
    t0 = time.time()
    # The manifest and report sit beside <out> (data/), paths in them relative to it.
    report_dir = os.path.dirname(os.path.abspath(args.out))
    feedback_folder = args.feedback or os.path.join(report_dir, "feedback")
    if not os.path.isdir(feedback_folder):  # a mistyped one would train on no feedback, silently
        sys.exit(f"--feedback {feedback_folder} is not a folder: name the harvest folder (make harvest writes "
                 "data/feedback, make data restores it from data/feedback.dvc), or an empty one for no feedback")
    source_info = {"path": args.source}
    source = args.source
    if source.startswith(("http://", "https://")):
        source, digest = download(source, args.raw_dir)
        source_info.update(file=source, sha256=digest)
    elif os.path.isfile(source):
        source_info["sha256"] = catdog.sha256_file(source)
    elif not os.path.isdir(source):
        sys.exit(f"source {source!r} is neither a folder, a zip, nor an http(s) URL")
    t_fetch = time.time()

    # Replace only what this script writes, so a mistaken --out cannot wipe other files.
    out = args.out
    for split, _ in SPLITS:
        shutil.rmtree(os.path.join(out, split), ignore_errors=True)
    staging = os.path.join(out, ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)

    inputs = list_inputs(source)
    rows = decode_all([(i, source, name, label, staging, args.size, args.resize)
                       for i, (name, label) in enumerate(inputs)], args.workers)
    t_decode = time.time()

    drop_exact_duplicates(rows)
    smallest = drop_near_duplicates(rows, args.near_duplicate_bits, args.near_duplicate_mad)
    assign_splits(rows, args.seed)
    rows += feedback_rows(args, feedback_folder, rows, staging, report_dir)

    taken = set()
    for row in rows:
        if row["drop_reason"]:
            row["split"] = ""
            continue
        folder = os.path.join(out, row["split"], row["label"])
        os.makedirs(folder, exist_ok=True)
        target = os.path.join(folder, output_name(row, taken))
        os.replace(os.path.join(staging, f"{row['index']}.jpg"), target)
        row["path"] = os.path.relpath(target, os.path.dirname(os.path.abspath(out)))
    shutil.rmtree(staging)

    # Sources are written relative to the manifest's folder, as the processed paths are, so
    # the manifest reads the same from any folder (catdog.read_manifest resolves both).
    relative = os.path.relpath(os.path.abspath(source), report_dir)
    prefix = relative + "/" if os.path.isdir(source) else relative + "!"
    feedback_folder = os.path.relpath(os.path.abspath(feedback_folder), report_dir)
    write_manifest(os.path.join(report_dir, "manifest.csv"), rows, prefix, feedback_folder + "/")
    seconds = {"fetch": round(t_fetch - t0, 2), "decode": round(t_decode - t_fetch, 2),
               "total": round(time.time() - t0, 2)}
    # Relative to the report, as the manifest's sources: the same bytes from any checkout.
    checked_against = {option: folder and os.path.relpath(os.path.abspath(folder), report_dir)
                       for option, folder in (("eval_extra", args.eval_extra), ("not_pets", args.not_pets))}
    report = quality_report(rows, args, source_info, smallest, feedback_folder, checked_against)
    catdog.write_json(os.path.join(report_dir, "quality_report.json"), report)
    with open(os.path.join(report_dir, "quality_report.md"), "w") as f:
        f.write(report_markdown(report))
    print(json.dumps({k: report[k] for k in ("inputs", "kept", "dropped", "splits", "feedback") if k in report}))
    print(f"preprocess: {len(rows)} files -> {report['kept']} images in {seconds['total']:.1f} s wall "
          f"(fetch {seconds['fetch']:.1f} s, decode {seconds['decode']:.1f} s; {args.workers} workers)")
    return report


if __name__ == "__main__":
    main(parse_args())
