"""GPU machine (issue 10, item 6): agent checks on a real GPU, tiny trainer CUDA vs CPU, ingest on
all cores. One script, meant to finish in under 8 minutes on a rented GPU box (16 cores).

1. **checks**: ``remote.checks.run_checks`` as the agent runs it for an ai-toolkit Flux run (GPU
   count and name, VRAM total/free, driver, CUDA, RAM, disk), plus a bf16 matmul on the GPU to show
   the device really computes (TFLOP/s).
2. **tiny trainer**: ``python -m remote.trainers.tiny`` on the same job with ``device: cuda:0`` and
   ``device: cpu`` (no sampling), batch 1 and batch 16 at 64 px; steps/s from the trainer's own
   progress bar, and the CUDA / CPU ratio.
3. **ingest**: ``remote.dataset.ingest`` + quality gate on ``--n`` generated 2048x1536 JPEGs (as
   ``bench_ingest.py``) with every core vs one worker, and the naive Pillow loop on a subset.

Without CUDA (as on the CI box) the CUDA parts are skipped with a message and everything else
runs, so the script is exercised everywhere. Needs only what the agent needs (torch, pillow,
numpy, pyyaml, safetensors); the controller is not imported.

    python bench/bench_gpu.py [--quick] [--n 200] [--steps 300]

Results go to bench/results/gpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

RATE_RE = re.compile(r"(\d+(?:\.\d+)?)(it/s|s/it)")
TRAINER_TIMEOUT_S = 180


# ---- pure helpers -----------------------------------------------------------------------------

def steps_per_s(trainer_output: str) -> float | None:
    """The last rate on the tiny trainer's progress bar (``9.80it/s`` or ``1.25s/it``), as steps/s."""
    found = RATE_RE.findall(trainer_output)
    if not found:
        return None
    value, unit = found[-1]
    return float(value) if unit == "it/s" else 1.0 / float(value)


def tiny_job(root: Path, dataset: Path, *, device: str, steps: int, batch: int) -> Path:
    """An ai-toolkit job YAML for the tiny trainer: no sampling, one save at the end."""
    name = f"gpu_{device.replace(':', '')}_b{batch}"
    process = {
        "type": "sd_trainer", "training_folder": str(root / "output"), "device": device,
        "trigger_word": "sks",
        "network": {"type": "lora", "linear": 4, "linear_alpha": 4},
        "save": {"dtype": "float16", "save_every": steps, "max_step_saves_to_keep": 1},
        "datasets": [{"folder_path": str(dataset), "caption_ext": "txt", "resolution": [64]}],
        "train": {"batch_size": batch, "steps": steps, "lr": 1e-4, "disable_sampling": True},
        "model": {"name_or_path": "black-forest-labs/FLUX.1-dev", "is_flux": True},
    }
    job = {"job": "extension", "config": {"name": name, "process": [process]},
           "meta": {"name": "[name]", "version": "1.0"}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    return path


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    mem = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:")), 0)
    return {"cpus": os.cpu_count(), "cpu": cpu, "ram_gib": round(mem / 1024 ** 2, 1),
            "python": platform.python_version(), "platform": platform.platform()}


# ---- 1. checks -------------------------------------------------------------------------------

def agent_checks(tmp: Path) -> dict[str, Any]:
    from remote.checks import run_checks

    spec = {"training": {"trainer": "ai-toolkit", "quantize": True},
            "gpu": {"num_gpus": 1, "min_vram_gb": 24.0, "min_cuda": "12.1"},
            "provider": {"type": "vast"}}
    run_dir = tmp / "root" / "run"
    run_dir.mkdir(parents=True)
    started = time.perf_counter()
    report = run_checks(spec, {"run_dir": str(run_dir), "provider": "vast"})
    took = time.perf_counter() - started
    rows = [c.to_dict() for c in report.checks]
    return {"seconds": round(took, 3), "checks": rows, "gpu": report.gpu,
            "failed": [c.name for c in report.failed], "matmul": cuda_matmul()}


def cuda_matmul(n: int = 8192, repeat: int = 20) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "CUDA is not available (torch.cuda.is_available() is False)"}
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    torch.matmul(a, b)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeat):
        torch.matmul(a, b)
    torch.cuda.synchronize()
    took = time.perf_counter() - started
    return {"device": torch.cuda.get_device_name(0), "n": n,
            "tflops_bf16": round(2 * n ** 3 * repeat / took / 1e12, 1)}


# ---- 2. tiny trainer -------------------------------------------------------------------------

def make_images(folder: Path, count: int = 16) -> Path:
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        im = Image.new("RGB", (96, 96), tuple(int(c) for c in rng.integers(0, 255, 3)))
        x, y = (int(v) for v in rng.integers(5, 60, 2))
        ImageDraw.Draw(im).ellipse([x, y, x + 30, y + 30],
                                   fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        im.save(folder / f"img{i:02d}.jpg")
        (folder / f"img{i:02d}.txt").write_text("a photo of [trigger], a disc", encoding="utf-8")
    return folder


def run_tiny(job: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_REMOTE_TINY_")}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "remote.trainers.tiny", str(job)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=TRAINER_TIMEOUT_S)
    wall = time.perf_counter() - started
    out = proc.stdout + proc.stderr
    result: dict[str, Any] = {"rc": proc.returncode, "wall_s": round(wall, 2),
                              "steps_per_s": steps_per_s(proc.stdout)}
    if proc.returncode != 0:
        result["tail"] = out[-1500:]
    if "is not available: training on" in out:
        result["fell_back_to_cpu"] = True
    return result


def tiny_trainer(tmp: Path, steps: int, batches: list[int]) -> dict[str, Any]:
    import torch

    dataset = make_images(tmp / "tiny-data")
    rows: dict[str, Any] = {}
    for batch in batches:
        cpu = run_tiny(tiny_job(tmp, dataset, device="cpu", steps=steps, batch=batch))
        row: dict[str, Any] = {"cpu": cpu}
        if torch.cuda.is_available():
            cuda = run_tiny(tiny_job(tmp, dataset, device="cuda:0", steps=steps, batch=batch))
            row["cuda"] = cuda
            if cuda.get("steps_per_s") and cpu.get("steps_per_s"):
                row["cuda_over_cpu"] = round(cuda["steps_per_s"] / cpu["steps_per_s"], 2)
        else:
            row["cuda"] = {"skipped": "CUDA is not available: only the CPU run was timed"}
        rows[f"batch {batch}"] = row
    return {"steps": steps, "resolution": 64, "torch": torch.__version__, "runs": rows}


# ---- 3. ingest on all cores ------------------------------------------------------------------

def _generate_chunk(folder: str, count: int, seed: int) -> None:
    from bench_ingest import generate

    generate(Path(folder), count, seed=seed)


def generate_parallel(folder: Path, n: int, workers: int) -> None:
    """``n`` images like bench_ingest.generate, made by ``workers`` processes (renamed apart)."""
    chunks = [n // workers + (1 if i < n % workers else 0) for i in range(workers)]
    parts = [folder.parent / f"gen-{i}" for i in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        for part in parts:
            part.mkdir(parents=True)
        list(pool.map(_generate_chunk, [str(p) for p in parts], chunks, range(workers)))
    folder.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(parts):
        for path in part.iterdir():
            path.rename(folder / f"w{i}_{path.name}")
        part.rmdir()


def ingest_all_cores(tmp: Path, n: int, naive_n: int) -> dict[str, Any]:
    from bench_ingest import run_agent, run_naive

    cpus = os.cpu_count() or 1
    src = tmp / "ingest-src"
    started = time.perf_counter()
    generate_parallel(src, n, cpus)
    gen_s = time.perf_counter() - started
    subset = tmp / "ingest-subset"
    subset.mkdir()
    for path in sorted(src.glob("*.jpg"))[:naive_n]:
        shutil.copy(path, subset / path.name)
    naive_s = run_naive(subset, tmp / "naive", 1024)
    _, all_s = run_agent(src, tmp / "work-all", 1024, None)
    _, one_s = run_agent(src, tmp / "work-one", 1024, 1)
    return {"n": n, "generate_s": round(gen_s, 2), "workers": cpus,
            "naive_images_per_s": round(naive_n / naive_s, 2), "naive_n": naive_n,
            "one_worker_images_per_s": round(n / one_s, 2),
            "all_cores_images_per_s": round(n / all_s, 2),
            "all_over_one": round(one_s / all_s, 2),
            "all_over_naive": round((n / all_s) / (naive_n / naive_s), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and steps")
    parser.add_argument("--n", type=int, default=None, help="ingest images (200; quick 24)")
    parser.add_argument("--steps", type=int, default=None, help="trainer steps (300; quick 30)")
    args = parser.parse_args(argv)
    n = args.n or (24 if args.quick else 200)
    steps = args.steps or (30 if args.quick else 300)
    batches = [1] if args.quick else [1, 16]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp_name:
        tmp = Path(tmp_name)
        checks = agent_checks(tmp)
        trainer = tiny_trainer(tmp, steps, batches)
        ingest = ingest_all_cores(tmp, n, min(n, 8 if args.quick else 40))
    out = {"benchmark": "gpu", "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": machine(), "quick": args.quick, "checks": checks, "tiny_trainer": trainer,
           "ingest": ingest, "seconds": round(time.perf_counter() - started, 1),
           "cuda": "skipped" not in checks["matmul"]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpu.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    print_report(out)
    return 0


def print_report(out: dict[str, Any]) -> None:
    m = out["machine"]
    print(f"GPU benchmark on {m['cpus']} x {m['cpu']}, {m['ram_gib']} GiB RAM "
          f"({out['seconds']:.0f} s)")
    if not out["cuda"]:
        print("  CUDA is not available here: the GPU checks report what the agent would see, "
              "the CUDA trainer runs and the matmul are skipped")
    print("agent checks (ai-toolkit Flux run):")
    for c in out["checks"]["checks"]:
        print(f"  {c['name']:22} {c['status']:8} {c['value']!s:>12}  need {c['threshold']}")
    mm = out["checks"]["matmul"]
    print(f"  bf16 matmul: {mm.get('tflops_bf16', mm.get('skipped'))}")
    print(f"tiny trainer, {out['tiny_trainer']['steps']} steps at 64 px (steps/s):")
    for name, row in out["tiny_trainer"]["runs"].items():
        cuda = row["cuda"].get("steps_per_s") or row["cuda"].get("skipped") or row["cuda"]
        print(f"  {name:10} cpu {row['cpu'].get('steps_per_s')}  cuda {cuda}  "
              f"ratio {row.get('cuda_over_cpu', 'n/a')}")
    ing = out["ingest"]
    print(f"ingest + gate, {ing['n']} 2048x1536 JPEGs: {ing['all_cores_images_per_s']} img/s on "
          f"{ing['workers']} workers, {ing['one_worker_images_per_s']} on 1 "
          f"({ing['all_over_one']}x), naive loop {ing['naive_images_per_s']} "
          f"({ing['all_over_naive']}x)")


if __name__ == "__main__":
    sys.exit(main())
