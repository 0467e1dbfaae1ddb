"""Runtime checks against described machines (plain functions, no patching)."""

from __future__ import annotations

import io
from pathlib import Path

from remote.checks import (Probes, choose_mount, measure_bandwidth, parse_nvidia_smi_apps,
                           parse_nvidia_smi_gpus, run_checks)

GB = 1024 ** 3
MEMINFO = "MemTotal:       65843200 kB\nMemFree:  1000 kB\nMemAvailable:   60000000 kB\n"
SMI_GPUS = "NVIDIA GeForce RTX 4090, 24564, 23000, 580.65.06\n"
SMI_HEADER = "| NVIDIA-SMI 580.65.06   Driver Version: 580.65.06   CUDA Version: 13.0     |\n"
SMI_APPS = "1234, /usr/bin/python3, 1400\n"


def spec(trainer: str = "ai-toolkit", **gpu) -> dict:
    return {"training": {"trainer": trainer, "quantize": True},
            "gpu": {"min_vram_gb": 24.0, "min_ram_gb": 48.0, "num_gpus": 1, "min_cuda": 12.4,
                    "min_inet_down_mbps": 200.0, **gpu},
            "provider": {"auto_mount_paths": True}}


def machine(*, smi: bool = True, free_gb: float = 500.0, mounts: str = "", env=None,
            writable=lambda p: True, apps: str = "", torch=None) -> Probes:
    def run(argv: list[str]) -> str | None:
        if not smi:
            return None
        if argv == ["nvidia-smi"]:
            return SMI_HEADER
        if "--query-gpu=name,memory.total,memory.free,driver_version" in argv:
            return SMI_GPUS
        return apps

    files = {"/proc/meminfo": MEMINFO, "/proc/mounts": mounts}
    if smi or torch:
        files["/proc/driver/nvidia/version"] = "NVRM version: 580.65.06"
    return Probes(run=run, read=files.get, disk_free=lambda p: int(free_gb * GB),
                  writable=writable, same_device=lambda a, b: False, torch_info=lambda: torch,
                  package_version=lambda name: "1.0", env=env or {})


def by_name(report) -> dict:
    return {c.name: c for c in report.checks}


PLAN = {"run_dir": "/workspace/flux-remote/r1", "provider": "vast"}


def test_a_good_gpu_box_passes_with_numbers_and_thresholds() -> None:
    report = run_checks(spec(), PLAN, probes=machine())
    checks = by_name(report)
    assert not report.failed
    assert checks["gpu"].status == "pass" and "RTX 4090" in checks["gpu"].detail
    assert checks["vram_total_gb"].value == 24.0 and checks["vram_total_gb"].threshold == 24.0
    assert checks["driver"].value == "580.65.06"
    assert checks["cuda"].value == "13.0" and checks["cuda"].status == "pass"
    assert checks["ram_gb"].value == 62.8 and checks["ram_gb"].status == "pass"
    assert checks["disk_free_gb"].status == "pass" and checks["disk_free_gb"].threshold == 45.0
    assert report.gpu["name"] == "NVIDIA GeForce RTX 4090" and report.gpu["count"] == 1


def test_small_gpu_old_cuda_and_busy_vram() -> None:
    report = run_checks(spec(min_vram_gb=40.0, min_cuda=13.1, min_driver="590"), PLAN,
                        probes=machine(apps=SMI_APPS))
    checks = by_name(report)
    assert checks["vram_total_gb"].status == "fail"
    assert checks["vram_free_gb"].status == "warn"
    assert "pid 1234" in checks["vram_free_gb"].detail
    assert checks["cuda"].status == "fail" and checks["driver"].status == "fail"
    assert {c.name for c in report.failed} == {"vram_total_gb", "cuda", "driver"}
    assert parse_nvidia_smi_apps(SMI_APPS) == [{"pid": 1234, "name": "/usr/bin/python3",
                                                "used_mb": 1400.0}]


def test_cpu_only_box_skips_gpu_checks_for_tiny_and_fails_for_ai_toolkit() -> None:
    tiny = run_checks(spec("tiny"), PLAN, probes=machine(smi=False))
    assert by_name(tiny)["gpu"].status == "skipped" and not tiny.failed
    assert by_name(tiny)["disk_free_gb"].threshold == 0.5
    aitk = run_checks(spec(), PLAN, probes=machine(smi=False))
    assert [c.name for c in aitk.failed] == ["gpu"]


def test_gpu_from_torch_when_nvidia_smi_is_missing() -> None:
    torch = {"version": "2.7", "cuda_build": "12.8", "cuda_available": True,
             "devices": [{"name": "NVIDIA H100", "total_gb": 79.6, "free_gb": 79.0}]}
    report = run_checks(spec(), PLAN, probes=machine(smi=False, torch=torch))
    assert by_name(report)["gpu"].detail == "NVIDIA H100"
    assert by_name(report)["cuda"].value == "12.8"


def test_low_disk_fails_and_low_ram_warns() -> None:
    report = run_checks(spec(min_ram_gb=128.0), PLAN, probes=machine(free_gb=10.0))
    checks = by_name(report)
    assert checks["disk_free_gb"].status == "fail" and checks["disk_free_gb"].value == 10.0
    assert checks["ram_gb"].status == "warn" and checks["ram_gb"].threshold == 128.0


def test_choose_mount_prefers_the_largest_writable_volume() -> None:
    mounts = ("overlay / overlay rw,relatime 0 0\n"
              "proc /proc proc rw 0 0\n"
              "tmpfs /dev/shm tmpfs rw 0 0\n"
              "/dev/nvme1n1 /data ext4 rw,relatime 0 0\n"
              "/dev/nvme2n1 /scratch ext4 ro,relatime 0 0\n"
              "/dev/sdb /small xfs rw 0 0\n")
    sizes = {"/workspace/flux-remote": 40, "/data": 900, "/small": 100, "/scratch": 5000,
             "/workspace": 300}
    probes = Probes(read={"/proc/mounts": mounts}.get, disk_free=lambda p: sizes[p] * GB,
                    writable=lambda p: p in sizes, same_device=lambda a, b: False,
                    env={"DATA_DIRECTORY": "/workspace/"})
    root, choice = choose_mount(probes, "/workspace/flux-remote")
    assert root == "/data/flux-remote-cache"
    assert choice["origin"] == "mount" and choice["free_gb"] == 900
    assert "/scratch" not in [c["path"] for c in choice["candidates"]]  # read-only
    sizes["/workspace"] = 2000
    root, choice = choose_mount(probes, "/workspace/flux-remote")
    assert choice["origin"] == "DATA_DIRECTORY" and root == "/workspace/flux-remote-cache"


def test_choose_mount_keeps_caches_by_the_run_on_the_same_volume() -> None:
    probes = Probes(read={"/proc/mounts": "/dev/sda /workspace ext4 rw 0 0\n"}.get,
                    disk_free=lambda p: 100 * GB, writable=lambda p: True,
                    same_device=lambda a, b: True, env={})
    root, choice = choose_mount(probes, "/workspace/flux-remote")
    assert root == "/workspace/flux-remote/cache" and choice["origin"] == "remote_root"


def test_local_provider_does_not_move_caches(tmp_path: Path) -> None:
    report = run_checks(spec("tiny"), {"run_dir": str(tmp_path / "run"), "provider": "local"},
                        probes=machine(smi=False))
    assert report.cache_root == str(tmp_path / "cache")


def test_bandwidth_with_an_injected_opener() -> None:
    class Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    ticks = iter([0.0, 2.0])
    def opener(url, timeout):
        return Response(b"x" * 25_000_000)

    mbps = measure_bandwidth("http://x/blob", opener=opener, clock=lambda: next(ticks))
    assert mbps == 100.0
    plan = {**PLAN, "bandwidth_url": "http://x/blob"}
    ticks2 = iter([0.0, 20.0])
    report = run_checks(spec(), plan, probes=machine(),
                        opener=lambda url, timeout: Response(b"x" * 25_000_000),
                        clock=lambda: next(ticks2))
    assert by_name(report)["bandwidth_mbps"].status == "warn"


def test_parse_gpus_skips_garbage() -> None:
    assert parse_nvidia_smi_gpus("garbage\nA100, 81920, [N/A], 550\n") == []
    assert len(parse_nvidia_smi_gpus(SMI_GPUS * 2)) == 2


def test_a_spec_that_asks_for_it_measures_the_real_download(tmp_path: Path) -> None:
    """``gpu.bandwidth_check_url`` reaches the plan, and the checks download it for real."""
    import threading
    from functools import partial
    from http.server import HTTPServer, SimpleHTTPRequestHandler

    from remote.plan import make_plan

    (tmp_path / "blob").write_bytes(b"x" * 3_000_000)
    handler = partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/blob"
        run_spec = {**spec(), "name": "bw"}
        run_spec["gpu"] = {**run_spec.get("gpu", {}), "bandwidth_check_url": url,
                           "min_inet_down_mbps": 1.0}
        plan = make_plan(run_id="r1", spec=run_spec, run_dir=PLAN["run_dir"],
                         dataset_dir=str(tmp_path), provider="vast")
        assert plan["bandwidth_url"] == url
        check = by_name(run_checks(run_spec, plan, probes=machine()))["bandwidth_mbps"]
    finally:
        server.shutdown()
        server.server_close()
    assert check.status == "pass" and check.value > 0 and check.threshold == 1.0
    assert url in check.detail
    unset = make_plan(run_id="r1", spec={**spec(), "name": "bw"}, run_dir=PLAN["run_dir"],
                      dataset_dir=str(tmp_path), provider="vast")
    assert "bandwidth_mbps" not in by_name(run_checks(spec(), unset, probes=machine()))
