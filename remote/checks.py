"""Runtime checks before anything is downloaded or trained: Python, packages, GPU, RAM, disk.

Each check says pass / warn / fail / skipped with the number it saw and the threshold it used.
Everything the machine is asked goes through :class:`Probes`, so tests describe a machine with
plain functions instead of patching. On a CPU-only box with the ``tiny`` trainer the GPU checks
are skipped, not failed.

On an instance shared by several runs (:mod:`remote.seats`) the GPU checks are about this run's
GPU only: nvidia-smi lists every GPU of the machine in index order (which is the CUDA order once
the agent set ``CUDA_DEVICE_ORDER=PCI_BUS_ID``), the run's is row ``seat``, and processes on the
other GPUs are the other runs, not a problem. The RAM is shared by all the seats' trainers, so
the total is held to ``min_ram_gb`` times ``seats`` (what the planner rented).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping

from remote.seats import Seat, seat_of

MIN_PYTHON = (3, 10)
# Free disk needed where caches and outputs live: Flux weights ~33 GB + venv ~8 GB + outputs.
AITK_MIN_FREE_DISK_GB = 45.0
TINY_MIN_FREE_DISK_GB = 0.5
AGENT_PACKAGES = ("pyyaml", "pillow", "numpy", "safetensors")
# Filesystems that never hold caches: kernel views and RAM disks.
PSEUDO_FS = {"proc", "sysfs", "devtmpfs", "devpts", "tmpfs", "cgroup", "cgroup2", "mqueue",
             "securityfs", "debugfs", "tracefs", "pstore", "bpf", "autofs", "configfs",
             "fusectl", "hugetlbfs", "nsfs", "binfmt_misc", "ramfs", "squashfs", "efivarfs"}
SYSTEM_PREFIXES = ("/proc", "/sys", "/dev", "/run", "/boot", "/etc", "/usr", "/snap",
                   "/var/lib/docker")
GB = 1024 ** 3


@dataclass
class Check:
    name: str
    status: str  # pass | warn | fail | skipped
    value: Any = None
    threshold: Any = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _run(argv: list[str]) -> str | None:
    if not shutil.which(argv[0]):
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


_TORCH_PROBE = """
import json
try:
    import torch
except ImportError:
    print("null")
    raise SystemExit(0)
info = {"version": torch.__version__, "cuda_build": torch.version.cuda,
        "cuda_available": bool(torch.cuda.is_available()), "devices": []}
if info["cuda_available"]:
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        info["devices"].append({"name": torch.cuda.get_device_name(index),
                                "total_gb": total / 1024 ** 3, "free_gb": free / 1024 ** 3})
print(json.dumps(info))
"""


def _torch_info() -> dict[str, Any] | None:
    """What torch says about CUDA, or None without torch.

    Asked in a child process: a CUDA context in the agent itself would hold VRAM all run long.
    """
    try:
        done = subprocess.run([sys.executable, "-c", _TORCH_PROBE], capture_output=True,
                              text=True, timeout=120)
        return json.loads(done.stdout) if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@dataclass
class Probes:
    """How the checks ask the machine; the defaults ask the real one."""

    run: Callable[[list[str]], str | None] = _run
    read: Callable[[str], str | None] = _read
    disk_free: Callable[[str], int] = lambda path: shutil.disk_usage(path).free
    writable: Callable[[str], bool] = lambda path: os.path.isdir(path) and os.access(path, os.W_OK)
    same_device: Callable[[str, str], bool] = lambda a, b: os.stat(a).st_dev == os.stat(b).st_dev
    torch_info: Callable[[], dict[str, Any] | None] = _torch_info
    package_version: Callable[[str], str | None] = _package_version
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


@dataclass
class ChecksReport:
    checks: list[Check]
    gpu: dict[str, Any]
    cache_root: str | None  # where HF cache and the ai-toolkit install go
    mount_choice: dict[str, Any]

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def to_dict(self) -> dict[str, Any]:
        return {"checks": [c.to_dict() for c in self.checks], "gpu": self.gpu,
                "cache_root": self.cache_root, "mount_choice": self.mount_choice}


# -- GPU ---------------------------------------------------------------------------------------
SMI_GPU_FIELDS = "name,memory.total,memory.free,driver_version"
SMI_APP_FIELDS = "pid,process_name,used_memory"


def parse_nvidia_smi_gpus(csv_text: str) -> list[dict[str, Any]]:
    """Rows of ``nvidia-smi --query-gpu=name,memory.total,memory.free,driver_version
    --format=csv,noheader,nounits`` (MiB); a fifth column (``,uuid``, asked on a shared machine)
    becomes ``uuid``."""
    gpus = []
    for line in csv_text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4:
            continue
        try:
            gpu = {"name": parts[0], "total_gb": float(parts[1]) / 1024,
                   "free_gb": float(parts[2]) / 1024, "driver": parts[3]}
        except ValueError:
            continue
        if len(parts) >= 5 and parts[4]:
            gpu["uuid"] = parts[4]
        gpus.append(gpu)
    return gpus


def parse_nvidia_smi_apps(csv_text: str) -> list[dict[str, Any]]:
    """``--query-compute-apps=pid,process_name,used_memory --format=csv,noheader,nounits``; a
    fourth column (``,gpu_uuid``, asked on a shared machine) becomes ``gpu_uuid``."""
    apps = []
    for line in csv_text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3 and parts[0].isdigit():
            used = float(parts[2]) if re.fullmatch(r"[\d.]+", parts[2]) else None
            app = {"pid": int(parts[0]), "name": parts[1], "used_mb": used}
            if len(parts) >= 4 and parts[3]:
                app["gpu_uuid"] = parts[3]
            apps.append(app)
    return apps


def gpu_facts(probes: Probes, *, shared: bool = False) -> dict[str, Any]:
    """GPU name/count/VRAM/driver/CUDA from nvidia-smi when present, else from torch.

    ``shared`` (a machine several runs share) also asks each GPU's and each process's GPU
    uuid, so the processes can be told apart by GPU."""
    facts: dict[str, Any] = {"source": None, "devices": [], "driver": None, "cuda": None,
                             "processes": []}
    uuid = ",uuid" if shared else ""
    smi = probes.run(["nvidia-smi", f"--query-gpu={SMI_GPU_FIELDS}{uuid}",
                      "--format=csv,noheader,nounits"])
    if smi:
        facts["devices"] = parse_nvidia_smi_gpus(smi)
        facts["source"] = "nvidia-smi"
        if facts["devices"]:
            facts["driver"] = facts["devices"][0]["driver"]
        header = probes.run(["nvidia-smi"]) or ""
        match = re.search(r"CUDA Version:\s*([\d.]+)", header)
        facts["cuda"] = match.group(1) if match else None
        apps = probes.run(["nvidia-smi", f"--query-compute-apps={SMI_APP_FIELDS}"
                           + (",gpu_uuid" if shared else ""), "--format=csv,noheader,nounits"])
        facts["processes"] = parse_nvidia_smi_apps(apps or "")
    # torch is asked only when nvidia-smi is missing but a driver is loaded (a child process that
    # imports torch costs seconds); on a box without a driver there is no GPU to find.
    driver_loaded = probes.read("/proc/driver/nvidia/version") is not None
    torch_info = probes.torch_info() if not smi and driver_loaded else None
    if torch_info:
        facts["torch"] = {k: torch_info.get(k) for k in ("version", "cuda_build", "cuda_available")}
        if not facts["devices"] and torch_info.get("devices"):
            facts["devices"] = torch_info["devices"]
            facts["source"] = "torch"
            facts["cuda"] = torch_info.get("cuda_build")
    return facts


def seat_facts(facts: dict[str, Any], seat: Seat, env: Mapping[str, str]) -> dict[str, Any]:
    """The facts about the seat's GPU only: its row of the machine's GPUs (``devices`` empty
    when the machine has no such GPU), the processes on it, the others' as ``co_tenants``,
    and ``host_devices``, how many GPUs the machine has.

    nvidia-smi ignores ``CUDA_VISIBLE_DEVICES`` and lists every GPU: the seat's is row
    ``seat``. torch (the fallback without nvidia-smi) asks in a child of the pinned agent, which
    sees only the seat's GPU, as device 0. A process whose GPU is unknown counts as the seat's
    (it may hold this GPU's memory)."""
    devices = facts["devices"]
    pinned = facts["source"] == "torch" and env.get("CUDA_VISIBLE_DEVICES") == str(seat.seat)
    row = 0 if pinned else seat.seat
    mine = devices[row] if row < len(devices) else None
    uuid = (mine or {}).get("uuid")
    others = [p for p in facts["processes"] if uuid and p.get("gpu_uuid") not in (None, uuid)]
    return {**facts, "devices": [mine] if mine else [], "host_devices": len(devices),
            "processes": [p for p in facts["processes"] if p not in others],
            "co_tenants": others, "seat": seat.seat, "seats": seat.seats}


def _version_tuple(text: str | None) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text or ""))


def gpu_checks(spec: dict[str, Any], facts: dict[str, Any]) -> list[Check]:
    """``facts`` from :func:`gpu_facts`, or :func:`seat_facts` on a shared machine."""
    gpu_spec = spec.get("gpu") or {}
    tiny = (spec.get("training") or {}).get("trainer") == "tiny"
    devices = facts["devices"]
    if "seat" in facts:
        seat_check = _seat_gpu_check(facts, tiny)
        if seat_check.status != "pass":
            return [seat_check]
    if not devices:
        if tiny:
            return [Check("gpu", "skipped", 0, None, "no GPU; the tiny trainer runs on the CPU")]
        return [Check("gpu", "fail", 0, gpu_spec.get("num_gpus", 1),
                      "no NVIDIA GPU found (nvidia-smi and torch.cuda see none)")]
    names = ", ".join(sorted({d["name"] for d in devices}))
    checks = [Check("gpu", "pass", len(devices), gpu_spec.get("num_gpus", 1), names)]
    need_count = int(gpu_spec.get("num_gpus", 1))
    if "seat" in facts:
        checks = [seat_check]
    elif not tiny and len(devices) < need_count:
        checks[0].status = "fail"
        checks[0].detail += f": {len(devices)} GPU(s), the spec asks for {need_count}"
    min_vram = None if tiny else float(gpu_spec.get("min_vram_gb", 24.0))
    total = min(d["total_gb"] for d in devices)
    free = min(d["free_gb"] for d in devices)
    status = "pass" if min_vram is None or total >= min_vram * 0.97 else "fail"
    checks.append(Check("vram_total_gb", status, round(total, 1), min_vram,
                        "smallest GPU's memory" + ("" if status == "pass" else ": too small")))
    status = "pass" if min_vram is None or free >= min_vram * 0.9 else "warn"
    holders = ", ".join(f"{p['name']} (pid {p['pid']}, {p['used_mb']} MB)"
                        for p in facts["processes"])
    detail = f"held by: {holders}" if holders else "no other processes hold VRAM"
    if facts.get("co_tenants"):
        detail += f"; {len(facts['co_tenants'])} process(es) of the other runs on other GPUs"
    checks.append(Check("vram_free_gb", status, round(free, 1), min_vram, detail))
    min_driver = gpu_spec.get("min_driver")
    if facts["driver"]:
        ok = not min_driver or _version_tuple(facts["driver"]) >= _version_tuple(min_driver)
        checks.append(Check("driver", "pass" if ok else "fail", facts["driver"], min_driver))
    min_cuda = None if tiny else gpu_spec.get("min_cuda")
    if facts["cuda"]:
        ok = min_cuda is None or _version_tuple(facts["cuda"]) >= _version_tuple(str(min_cuda))
        checks.append(Check("cuda", "pass" if ok else "fail", facts["cuda"], min_cuda,
                            "highest CUDA the driver supports"))
    return checks


def _seat_gpu_check(facts: dict[str, Any], tiny: bool) -> Check:
    """A shared machine must have the seat's GPU: at least ``seat + 1`` GPUs. Without one the
    tiny trainer still runs (on the CPU)."""
    host, seat, seats = facts["host_devices"], facts["seat"], facts["seats"]
    if facts["devices"]:
        name = facts["devices"][0]["name"]
        return Check("gpu", "pass", host, seat + 1,
                     f"{name}: GPU {seat} is this run's, one of {seats} runs on this machine")
    if not host and tiny:
        return Check("gpu", "skipped", 0, None, "no GPU; the tiny trainer runs on the CPU")
    return Check("gpu", "warn" if tiny else "fail", host, seat + 1,
                 f"this run's seat is GPU {seat} of {seats}, the machine has {host} GPU(s)")


# -- host --------------------------------------------------------------------------------------
def meminfo_gb(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        match = re.match(r"(\w+):\s+(\d+)\s*kB", line)
        if match:
            values[match.group(1)] = int(match.group(2)) / (1024 ** 2)
    return values


def software_checks(spec: dict[str, Any], probes: Probes) -> list[Check]:
    tiny = (spec.get("training") or {}).get("trainer") == "tiny"
    version = sys.version_info[:3]
    checks = [Check("python", "pass" if version[:2] >= MIN_PYTHON else "fail",
                    ".".join(map(str, version)), ".".join(map(str, MIN_PYTHON)),
                    platform.python_implementation())]
    aitk = (spec.get("training") or {}).get("ai_toolkit") or {}
    if not tiny and not aitk.get("path"):  # a venv will be built: is there a Python for it?
        from remote.bootstrap import aitk_python_problem

        problem = aitk_python_problem()
        checks.append(Check("python_for_ai_toolkit", "fail" if problem else "pass",
                            ".".join(map(str, version[:2])), "3.10-3.12",
                            problem or "ai-toolkit's requirements have wheels for it"))
    # torch runs in the agent's own Python only for tiny; ai-toolkit brings it in its venv.
    needed = AGENT_PACKAGES + (("torch",) if tiny else ())
    for package in needed + (() if tiny else ("torch",)):
        found = probes.package_version(package)
        if found:
            checks.append(Check(f"package:{package}", "pass", found))
        else:
            status = "fail" if package in needed else "skipped"
            checks.append(Check(f"package:{package}", status, None, "installed",
                                "not installed" if status == "fail" else "not needed by the agent"))
    return checks


def ram_check(spec: dict[str, Any], probes: Probes, *, seats: int = 1) -> Check:
    """The machine's total RAM against ``min_ram_gb`` (times ``seats``: the trainers of a shared
    machine each quantize in it)."""
    tiny = (spec.get("training") or {}).get("trainer") == "tiny"
    info = meminfo_gb(probes.read("/proc/meminfo") or "")
    if "MemTotal" not in info:
        return Check("ram_gb", "skipped", None, None, "/proc/meminfo not readable")
    total, available = info["MemTotal"], info.get("MemAvailable", info["MemTotal"])
    gpu_spec = spec.get("gpu") or {}
    quantize = (spec.get("training") or {}).get("quantize", True)
    need = None if tiny or not quantize else float(gpu_spec.get("min_ram_gb", 48.0)) * seats
    status = "pass" if need is None or total >= need * 0.95 else "warn"
    shared = f" (shared by {seats} runs)" if seats > 1 else ""
    return Check("ram_gb", status, round(total, 1), need,
                 f"{available:.1f} GB available{shared}" + (
                     "" if status == "pass" else "; quantizing Flux needs about 50 GB"
                     + (" per run" if seats > 1 else "")))


def disk_check(path: str, spec: dict[str, Any], probes: Probes) -> Check:
    tiny = (spec.get("training") or {}).get("trainer") == "tiny"
    need = TINY_MIN_FREE_DISK_GB if tiny else AITK_MIN_FREE_DISK_GB
    free = probes.disk_free(path) / GB
    return Check("disk_free_gb", "pass" if free >= need else "fail", round(free, 1), need,
                 f"free where caches and outputs go ({path})")


def choose_mount(probes: Probes, default_root: str) -> tuple[str, dict[str, Any]]:
    """The largest writable volume for caches: mounts from /proc/mounts, ``DATA_DIRECTORY``,
    and the run's own root (``<remote_root>/cache``, kept when it is on the chosen volume anyway).
    Returns (cache root, a record of the choice)."""
    candidates: list[tuple[str, str]] = [(default_root, "remote_root")]
    data_dir = probes.env.get("DATA_DIRECTORY")
    if data_dir:
        candidates.append((data_dir.rstrip("/") or "/", "DATA_DIRECTORY"))
    for line in (probes.read("/proc/mounts") or "").splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        mount, fstype, opts = parts[1].replace("\\040", " "), parts[2], parts[3].split(",")
        if fstype in PSEUDO_FS or "rw" not in opts or mount == "/":
            continue
        if any(mount == p or mount.startswith(p + "/") for p in SYSTEM_PREFIXES):
            continue
        candidates.append((mount, "mount"))
    scored = []
    for order, (path, origin) in enumerate(candidates):
        if not probes.writable(path):
            continue
        scored.append((probes.disk_free(path), -order, path, origin))
    if not scored:
        root = str(Path(default_root) / "cache")
        return root, {"chosen": root, "reason": "no writable candidate"}
    free, _, path, origin = max(scored)
    if (origin != "remote_root" and probes.writable(default_root)
            and probes.same_device(path, default_root)):
        path, origin = default_root, "remote_root"  # same volume: keep caches next to the run
    root = str(Path(path) / ("cache" if origin == "remote_root" else "flux-remote-cache"))
    return root, {"chosen": root, "volume": path, "origin": origin, "free_gb": round(free / GB, 1),
                  "candidates": [{"path": p, "origin": o, "free_gb": round(f / GB, 1)}
                                 for f, _, p, o in sorted(scored, reverse=True)]}


# -- bandwidth ---------------------------------------------------------------------------------
def measure_bandwidth(url: str, *, max_bytes: int = 50 * 1024 * 1024,
                      opener: Callable[..., Any] = urllib.request.urlopen,
                      clock: Callable[[], float] = time.monotonic) -> float:
    """Download up to ``max_bytes`` of ``url``; returns megabits per second."""
    begun = clock()
    got = 0
    with opener(url, timeout=30) as response:
        while got < max_bytes:
            chunk = response.read(min(1 << 20, max_bytes - got))
            if not chunk:
                break
            got += len(chunk)
    took = max(clock() - begun, 1e-6)
    return got * 8 / 1e6 / took


def bandwidth_check(url: str, spec: dict[str, Any], *, opener: Callable[..., Any],
                    clock: Callable[[], float]) -> Check:
    need = float((spec.get("gpu") or {}).get("min_inet_down_mbps", 0.0)) or None
    try:
        mbps = measure_bandwidth(url, opener=opener, clock=clock)
    except OSError as exc:
        return Check("bandwidth_mbps", "warn", None, need, f"could not measure: {exc}")
    status = "pass" if need is None or mbps >= need * 0.5 else "warn"
    return Check("bandwidth_mbps", status, round(mbps, 1), need, f"download from {url}")


def _nearest_existing(path: str) -> str:
    """``path`` or its closest existing ancestor (the volume a folder will be created on)."""
    current = Path(path)
    while not current.exists() and current.parent != current:
        current = current.parent
    return str(current)


def run_checks(spec: dict[str, Any], plan: dict[str, Any], *, probes: Probes | None = None,
               opener: Callable[..., Any] = urllib.request.urlopen,
               clock: Callable[[], float] = time.monotonic) -> ChecksReport:
    """All checks for this plan. ``plan["bandwidth_url"]`` (optional) turns on the download test."""
    probes = probes or Probes()
    run_dir = str(plan["run_dir"])
    remote_root = str(Path(run_dir).parent)
    provider = spec.get("provider") or {}
    if provider.get("auto_mount_paths", True) and plan.get("provider", "local") != "local":
        cache_root, choice = choose_mount(probes, remote_root)
    else:
        cache_root = str(Path(remote_root) / "cache")
        choice = {"chosen": cache_root, "reason": "auto_mount_paths off or local provider"}
    seat = seat_of(plan)
    facts = gpu_facts(probes, shared=seat.shared)
    if seat.shared:
        facts = seat_facts(facts, seat, probes.env)
    checks = (software_checks(spec, probes) + gpu_checks(spec, facts)
              + [ram_check(spec, probes, seats=seat.seats)])
    checks.append(disk_check(_nearest_existing(cache_root), spec, probes))
    if plan.get("bandwidth_url"):
        checks.append(bandwidth_check(plan["bandwidth_url"], spec, opener=opener, clock=clock))
    gpu = {"devices": facts["devices"], "driver": facts["driver"], "cuda": facts["cuda"],
           "count": len(facts["devices"]), "processes": facts["processes"],
           "name": facts["devices"][0]["name"] if facts["devices"] else None,
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "ram_gb": next((c.value for c in checks if c.name == "ram_gb"), None)}
    if seat.shared:
        gpu.update(seat=seat.seat, seats=seat.seats, host_devices=facts["host_devices"],
                   co_tenants=facts["co_tenants"])
    return ChecksReport(checks=checks, gpu=gpu, cache_root=cache_root, mount_choice=choice)
