"""Where a ``cxr-deploy batch`` image's time goes: per-stage cost, per format, and the main process's
profile during a real run.

Inputs come from benchmarks/batch_throughput.py's generators (imported, not copied): 1024² 8-bit
PNG, 1024² JPEG (quality 90, the same synthetic content) and 2048² 16-bit DICOM (rescale + window).
Stages (median ms per image, one process, one thread unless said):

- read: the file's bytes; parse+decode: container + entropy decode to stored samples (read_stored,
  minus read); transforms: the pixel plan in numpy (rescale, VOI, inversion, scaling to [0, 1]);
  resize: ``PreprocessSpec.resize_gray`` (Pillow, reducing_gap=2.0);
- transfer: pickle dumps + loads of what a worker sends back (``Decoded``), today (224² float32
  gray, + a 512² view with overlays) and with ``--preprocess-on device`` (the stored samples);
  then worker → main process through a real pool, 1024² uint8 and 2048² uint16: pickled through
  the pipe vs the shared-memory ring (``--transfer-only`` prints just these rows);
- normalize (numpy, per image of a batch of 16); device path on CPU tensors (plan + resize +
  normalize per image, a batch of 16, grouped by size vs one by one); host→device: n/a without GPU;
- model: ONNX Runtime and eager torch on the CPU, batch 16, at the tiny test size (64) and 224;
- CSV: one batch of 16 rows written + fsync'ed; overlay: render + PNG save of one overlay;
- first file in a fresh worker process (lazy imports) vs the next ones; pool start-up per worker;
- pool: decode rate of a warm 2-worker pool, gray vs stored (pickled through the pool's pipe).

Then ``--cprofile``: the main process of a real ``batch`` run under cProfile, top entries by
own time (tottime). Usage::

    python benchmarks/batch_profile.py --n 16 [--workdir DIR] [--cprofile]
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch_throughput import chest_like, make_bundle, make_inputs  # noqa: E402 (the realistic generators)


def write_jpeg(path: Path, seed: int) -> None:
    Image.fromarray(np.round(chest_like(1024, seed) * 255).astype(np.uint8)).save(path, quality=90)


def inputs(root: Path, fmt: str, n: int) -> list[Path]:
    if fmt == "jpeg":
        folder = root / "jpeg"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            if not (folder / f"img{i:04d}.jpg").exists():
                write_jpeg(folder / f"img{i:04d}.jpg", i)
    else:
        folder = root / fmt
        if not folder.is_dir() or len(list(folder.iterdir())) < n:
            make_inputs(root, fmt, n)
    return sorted(folder.iterdir())[:n]


def ms(fn, items, repeat: int = 1) -> float:
    """Median wall ms of fn(item) over items."""
    times = []
    for item in items:
        for _ in range(repeat):
            t = time.perf_counter()
            fn(item)
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def stage_table(files: list[Path], spec, view_size: int = 512) -> dict:
    from cxr_deploy.batch.decode import Decoded
    from cxr_deploy.batch.overlay import view_image
    from cxr_deploy.imaging.reader import gray_from_stored, read_stored

    row = {}
    row["read"] = ms(lambda f: f.read_bytes(), files)
    row["parse+decode"] = max(0.0, ms(read_stored, files) - row["read"])
    stored = [read_stored(f) for f in files]
    row["transforms"] = ms(lambda s: gray_from_stored(s, Path(s.meta.path)), stored)
    grays = [gray_from_stored(s, Path(s.meta.path)) for s in stored]
    row["resize"] = ms(spec.resize_gray, grays)
    small = [spec.resize_gray(g) for g in grays]
    today = Decoded("ok", gray=small[0], original_hw=grays[0].shape)
    with_view = Decoded("ok", gray=small[0], view=view_image(grays[0], view_size), original_hw=grays[0].shape)
    device = Decoded("ok", original_hw=grays[0].shape, stored=stored[0].stored, plan=stored[0].plan)
    for name, obj in (("pickle gray", today), ("pickle gray+view", with_view), ("pickle stored", device)):
        blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        row[name] = ms(lambda o: pickle.loads(pickle.dumps(o, protocol=pickle.HIGHEST_PROTOCOL)), [obj], repeat=9)
        row[name + " KiB"] = len(blob) / 1024
    batch = np.stack([small[i % len(small)] for i in range(16)])
    row["normalize"] = ms(spec.normalize, [batch], repeat=9) / 16
    row.update(device_stage(stored, spec))
    return row


def device_stage(stored, spec) -> dict:
    import torch

    from cxr_deploy.batch.device_stage import DeviceStager

    items = [(stored[i % len(stored)].stored, stored[i % len(stored)].plan) for i in range(16)]
    out = {}
    for name, group in (("device path, grouped", True), ("device path, one by one", False)):
        stager = DeviceStager(spec, "cpu", group_by_size=group)
        stager(items)  # warm-up
        out[name] = ms(stager, [items], repeat=5) / 16
    out["threads"] = torch.get_num_threads()
    return out


def model_table(root: Path, png: list[Path]) -> dict:
    import torch

    from cxr_deploy.serving.backends import open_backend
    from cxr_deploy.bundle import ModelBundle

    out = {}
    for size in (64, 224):
        bundle_dir = root / f"bundle{size}"
        if not (bundle_dir / "model.onnx").exists():
            sub = root / f"b{size}"
            sub.mkdir(exist_ok=True)
            make_bundle(sub, png[0].parent, size, int8=False)
            (sub / "bundle").rename(bundle_dir)
        bundle = ModelBundle.load(bundle_dir)
        x = np.random.default_rng(0).normal(0, 1, (16, *bundle.spec.input_shape)).astype(np.float32)
        for backend in ("onnx", "torch"):
            model = open_backend(bundle, backend, "cpu")
            model(x)
            out[f"model {backend} cpu {size}²"] = ms(model, [x], repeat=3) / 16
    out["torch threads"] = torch.get_num_threads()
    return out


def io_table(root: Path, files: list[Path], spec) -> dict:
    from cxr_deploy.batch.decode import DecodeConfig, results_task
    from cxr_deploy.batch.overlay import view_image
    from cxr_deploy.batch.results_file import ResultsWriter
    from cxr_deploy.imaging import read_image

    rows = [dict(path=str(f), status="ok", probability=0.5, predicted_label="NORMAL", threshold="0.5") for f in files]
    rows = (rows * 16)[:16]
    writer = ResultsWriter(root / "profile.csv")
    out = {"CSV (16 rows + fsync)": ms(writer.write_rows, [rows], repeat=5) / 16}
    writer.close()
    image = read_image(files[0]).pixels
    view, cam = view_image(image, 512), np.random.default_rng(0).random((7, 7)).astype(np.float32)
    config = DecodeConfig(spec=spec, view_size=512)
    (root / "cams").mkdir(exist_ok=True)
    out["overlay (render + PNG)"] = ms(lambda i: results_task([str(root / "cams" / f"o{i}.png")], "x", view, cam,
                                                              image.shape, "caption", "footer", config=config),
                                       range(5))
    return out


FIRST_FILE = """
import sys, time
t = time.perf_counter()
from cxr_deploy.batch.decode import DecodeConfig, decode_file
from cxr_deploy.preprocessing import PreprocessSpec
imported = time.perf_counter() - t
config = DecodeConfig(spec=PreprocessSpec())
files = sys.argv[1:]
t = time.perf_counter(); decode_file(files[0], config); first = time.perf_counter() - t
t = time.perf_counter(); decode_file(files[1], config); second = time.perf_counter() - t
print(imported * 1000, first * 1000, second * 1000)
"""


def first_file(files: list[Path]) -> tuple[float, float, float]:
    out = subprocess.run([sys.executable, "-c", FIRST_FILE, *map(str, files[:2])], capture_output=True, text=True,
                         check=True)
    return tuple(float(v) for v in out.stdout.split())


def pool_rates(files: list[Path], spec, workers: int) -> dict:
    """A warm pool (every worker started and past its imports), gray vs stored."""
    from cxr_deploy.batch.decode import DecodeConfig, decode_file
    from cxr_deploy.batch.pool import DecodePool

    out = {}
    for send in ("gray", "stored"):
        pool = DecodePool(workers, DecodeConfig(spec=spec, send=send))
        t = time.perf_counter()
        pool.warm_up()
        for f in pool_warm_futures(pool, files, workers):
            f.result()
        out["pool start-up s"] = time.perf_counter() - t
        many = files * max(1, 48 // len(files))
        t = time.perf_counter()
        results = [f.result() for f in [pool.submit(decode_file, str(p)) for p in many]]
        out[f"pool {send} ms/img"] = 1000 * (time.perf_counter() - t) / len(many)
        assert all(r.status == "ok" for r in results)
        pool.close()
    return out


def pool_warm_futures(pool, files, workers):
    """Decode one file per worker (and once more) so every worker has paid its first-file imports."""
    return [pool.submit(__import__("cxr_deploy.batch.decode", fromlist=["decode_file"]).decode_file, str(f))
            for f in (files * workers)[: 2 * workers]]


TRANSFER_CASES = (((1024, 1024), "uint8"), ((2048, 2048), "uint16"))


def _send_pickled(i: int, shape, dtype):
    """What ``decode_file`` returns with ``send="stored"``: the samples pickled through the pipe."""
    from cxr_deploy.batch.decode import Decoded

    return Decoded("ok", stored=np.full(shape, i, dtype))


def _send_shared(i: int, shape, dtype, target):
    """What :func:`cxr_deploy.batch.shm.decode_to_slot` returns: the samples in a slot, a header."""
    from cxr_deploy.batch import shm
    from cxr_deploy.batch.decode import Decoded

    result = Decoded("ok", stored=np.full(shape, i, dtype))
    result.transfer = shm._write(result, target)
    return result


def transfer_table(n: int = 30) -> dict:
    """Worker → main process, one image of stored samples, through the pool's pipe (pickled) vs the
    shared-memory ring of :mod:`cxr_deploy.batch.shm` (a header pickled), both with the copy-out
    into a reused buffer; "in place" is the ring without the copy-out (what the CPU stager does).
    Both include the worker making the array (np.full)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from cxr_deploy.batch.shm import ShmRing

    out = {}
    ring = ShmRing(4, 64 << 20)
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            pool.submit(len, []).result()
            for shape, dtype in TRANSFER_CASES:
                dest = np.empty(shape, dtype)
                label = f"{shape[0]}² {dtype}"

                def pickled(i):
                    dest[:] = pool.submit(_send_pickled, i, shape, dtype).result().stored

                def shared(i, copy=True):
                    target = ring.acquire()
                    result = pool.submit(_send_shared, i, shape, dtype, target).result()
                    assert result.transfer == "shm", result.transfer
                    view = ring.view(result.shm)
                    if copy:
                        dest[:] = view
                    else:
                        assert view[0, 0] == i % 256
                    ring.release(target.index)

                cases = ((f"{label} pickled via pipe", pickled), (f"{label} shm ring + copy-out", shared),
                         (f"{label} shm ring, in place", lambda i: shared(i, copy=False)))
                for name, fn in cases:
                    for i in range(ring.slots):  # first touch of every slot's pages: not per image
                        fn(i)
                    out[name] = ms(fn, range(n))
    finally:
        ring.close()
    return out


def cprofile_run(folder: Path, bundle: Path, root: Path, mode: str, top: int = 14) -> str:
    import pstats

    prof = root / f"main_{folder.name}_{mode}.prof"
    cmd = [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "cxr_deploy.cli", "batch", str(folder), "--model",
           str(bundle), "--out", str(root / f"cp_{folder.name}_{mode}.csv"), "--overwrite", "--no-progress",
           "--preprocess-on", mode]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    summary = [line for line in proc.stderr.splitlines() if "inputs processed" in line]
    import io

    text = io.StringIO()
    # tottime: where the main process itself spends its time (cumulative is all click/runpy frames)
    pstats.Stats(str(prof), stream=text).sort_stats("tottime").print_stats(top)
    body = text.getvalue()
    return (summary[0] if summary else proc.stderr[-500:]) + "\n" + body[body.find("ncalls"):]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8, help="files per format (default 8)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--workers", type=int, default=2, help="pool size for the pool rows (default 2)")
    ap.add_argument("--formats", default="png,jpeg,dicom")
    ap.add_argument("--cprofile", action="store_true", help="also profile the main process of real batch runs")
    ap.add_argument("--cprofile-formats", default="dicom")
    ap.add_argument("--transfer-only", action="store_true", help="only worker → main transfer, pickle vs shm")
    ap.add_argument("--repeat", type=int, default=30, help="images per transfer case (default 30)")
    args = ap.parse_args()
    if args.transfer_only:
        print(f"# worker → main transfer, {len(os.sched_getaffinity(0))} cores; median ms per image")
        for name, value in transfer_table(args.repeat).items():
            print(f"{name:36s}{value:8.2f}")
        return

    import torch

    from cxr_deploy.preprocessing import PreprocessSpec

    torch.set_num_threads(1)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="cxr-profile-"))
    root.mkdir(parents=True, exist_ok=True)
    spec = PreprocessSpec()
    formats = args.formats.split(",")
    files = {fmt: inputs(root, fmt, args.n) for fmt in formats}
    print(f"# batch profile: {len(os.sched_getaffinity(0))} cores, N={args.n}/format, torch {torch.__version__}, "
          f"workdir {root}; median ms per image", flush=True)
    columns = {fmt: stage_table(files[fmt], spec) for fmt in formats}
    for fmt in formats:
        imported, first, second = first_file(files[fmt])
        columns[fmt].update({"worker imports": imported, "first file (fresh process)": first,
                             "next file": second})
        columns[fmt].update(pool_rates(files[fmt], spec, args.workers))
    rows = list(columns[formats[0]])
    print(f"{'stage':28s}" + "".join(f"{fmt:>12s}" for fmt in formats))
    for name in rows:
        print(f"{name:28s}" + "".join(f"{columns[fmt].get(name, float('nan')):12.2f}" for fmt in formats))
    print("host→device copy: n/a (no GPU here)")
    png = files.get("png") or inputs(root, "png", args.n)
    for name, value in {**transfer_table(), **model_table(root, png), **io_table(root, png, spec)}.items():
        print(f"{name:28s}{value:12.2f}")
    if args.cprofile:
        for fmt in args.cprofile_formats.split(","):
            for mode in ("workers", "device"):
                print(f"\n## main process, batch {fmt} --preprocess-on {mode} (onnx, 224², default workers)")
                print(cprofile_run(files[fmt][0].parent, root / "bundle224", root, mode))


if __name__ == "__main__":
    main()
