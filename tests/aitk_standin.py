"""ai-toolkit's ``run.py`` as the tests meet it: the lines it prints, in its order, and its files.

One stand-in for every test that needs ai-toolkit (supervision, stop, resume, bootstrap, the
agent end to end). Standard library only, so it runs in the bootstrap tests' bare venv: copy it
as ``run.py`` into a fake checkout, or run it as ``python tests/aitk_standin.py CONFIG``.

What it copies, from ai-toolkit at 27a03a91f23eb1b757d5ec2e80ee3e129cfcc350:

* model loading: ``toolkit/stable_diffusion_model.py`` ``load_model`` (Flux branch, lines
  650-849) prints "Loading Flux model", "Loading transformer", "Quantizing transformer",
  "Loading VAE", "Loading T5", "Quantizing T5", "Loading CLIP", "Making pipe", "Preparing
  Model"; diffusers draws "Loading checkpoint shards" bars in between.
* dataset: ``toolkit/dataloader_mixins.py:1950`` "Caching latents to disk" bar.
* resume: ``jobs/process/BaseSDTrainProcess.py`` ``get_latest_save_path`` (line 823) takes the
  newest ``<name>*.safetensors`` by ``os.path.getctime``; ``run`` prints "#### IMPORTANT
  RESUMING FROM ... ####" and "Loading from ..." (lines 2051-2052); ``toolkit/network_mixins.py``
  ``load_weights`` prints ``Missing keys: [...]`` always (line 780; the list holds the file's
  keys the network lacks) and loads non-strictly; ``load_training_state_from_metadata`` prints
  "Found step N in metadata, starting from there" (line 889); the optimizer state is loaded
  from ``optimizer.pt`` (lines 2190-2216; a file that does not load is reported and skipped).
  A truncated LoRA makes safetensors raise (the run crashes).
* baseline: "Generating baseline samples before training" (line 2480), then ``sample``: a
  "Generating Images" bar (``toolkit/stable_diffusion_model.py:1394``, leave=False) with an
  inner denoise bar with no description (line 2355, leave=False); ``sample`` ends with an empty
  line (line 386).
* the training bar: ``ToolkitProgressBar(total=steps, desc=job name, initial=step_num)``
  (line 2484), postfix ``lr: {lr:.1e} loss: {loss:.3e}`` (lines 2693-2698), updated to
  ``step + 1`` at the end of each step (line 2798, since this commit; before it ``step``).
  Its clock is paused while saving and sampling (``toolkit/progress_bar.py``), so its rate
  and remaining time leave those out.
* saves: "\\nSaving at step N" (line 2715) then ``save``: the LoRA, "Saved checkpoint to
  PATH" (line 699), ``optimizer.pt``, "Saved optimizer to PATH" (line 711), then
  ``clean_up_saves`` prints "Removing old save: PATH" (line 482). Saves happen when
  ``step_num % save_every == 0`` and not at the first step of the session (line 2706); samples
  likewise, after the save.
* the end: the bar is closed, the final ``save()`` (no "Saving at step": line 2819) writes
  ``<name>.safetensors`` with the same two lines, then the final samples.
* failures (``AITK_STANDIN_FAIL=cause[@step]``), each with the text the real stack prints:
  ``oom`` (``torch.OutOfMemoryError`` from the caching stage), ``cuda_async`` (``CUDA error:
  out of memory`` from an asynchronous kernel), ``oom_steps`` (the "OOM during training step"
  banner three times, then its RuntimeError: lines 2636-2644), ``import`` (diffusers lacking a
  name), ``module`` (``ModuleNotFoundError``), ``hf_401`` / ``hf_gated`` (huggingface_hub's
  ``GatedRepoError``), ``no_config`` (a gated repo seen without a token: no ``config.json``),
  ``disk`` (ENOSPC during a save).

Knobs (environment; all optional)::

    AITK_STANDIN_DELAY        seconds per training step (default 0.01)
    AITK_STANDIN_SAVE_DELAY   seconds between "Saved checkpoint to" and the optimizer write
    AITK_STANDIN_SAMPLE_DELAY seconds per sample image (baseline and during training)
    AITK_STANDIN_HANG         loading | baseline | training | final (after the final save):
                              print nothing from there on
    AITK_STANDIN_KILL_IN_SAVE step at which the save dies half-written (SIGKILL, like a host
                              OOM), once per output folder
    AITK_STANDIN_IGNORE_TERM  1: ignore SIGTERM (the grace period then ends it)
    AITK_STANDIN_OLD_BAR      1: the bar as before the pinned commit (shows the step index)
    AITK_STANDIN_RECORD       a path: argv, cwd and python are written there as JSON
    AITK_STANDIN_SAVE_AT      extra steps to save at, comma-separated (besides save_every)
    AITK_STANDIN_FAIL         cause, cause@STEP (at that step) or cause@saveSTEP (in that save)
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import sys
import time
import zipfile
import zlib
from pathlib import Path

SCRIPT = Path(__file__)
FLUX_DIM = 3072  # the Flux transformer's inner dim: LoRA A is [rank, in], B is [out, rank]
# the modules the stand-in's network holds (a slice of what ai-toolkit wraps for Flux)
MODULES = ("transformer.transformer_blocks.0.attn.to_q",
           "transformer.single_transformer_blocks.0.attn.to_k")
ENV = os.environ.get


def config_value(text: str, key: str, default: str | None = None) -> str | None:
    m = re.search(rf"^[ \t-]*{key}:\s*['\"]?([^'\"\n#]+?)['\"]?\s*$", text, re.M)
    return m.group(1).strip() if m else default


def count_prompts(text: str) -> int:
    """The items of the first ``prompts:`` list (more indented than the key, or at its level)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "prompts:":
            indent = len(line) - len(line.lstrip())
            n = 0
            for item in lines[i + 1:]:
                depth = len(item) - len(item.lstrip())
                if item.lstrip().startswith("- ") and depth >= indent:
                    n += 1
                elif item.strip() and depth <= indent:
                    break
            return n
    return 0


def write_config(path: Path, *, name: str, training_folder: Path, steps: int, save_every: int,
                 sample_every: int = 0, prompts: int = 0, rank: int = 4, keep: int = 4) -> Path:
    """A job file with the keys the stand-in reads, laid out as the agent renders them."""
    sample = (f"      sample:\n        sample_every: {sample_every}\n        prompts:\n"
              + "".join(f"        - prompt {i}\n" for i in range(prompts))) if prompts else ""
    path.write_text(
        f"job: extension\nconfig:\n  name: {name}\n  process:\n"
        f"    - type: sd_trainer\n      training_folder: {training_folder}\n"
        f"      network:\n        type: lora\n        linear: {rank}\n"
        f"      save:\n        save_every: {save_every}\n        max_step_saves_to_keep: {keep}\n"
        f"      train:\n        steps: {steps}\n" + sample, encoding="utf-8")
    return path


def out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def bar(desc: str, n: int, total: int, rate: str = "1.50it/s", postfix: str = "",
        end: str = "") -> None:
    """One tqdm redraw on stderr (tqdm writes there), ``\\r``-led like tqdm's ``sp``."""
    pct = n * 100 // max(total, 1)
    cells = ("#" * (pct // 10)).ljust(10)
    head = f"{desc}: " if desc else ""
    tail = f", {postfix}" if postfix else ""
    sys.stderr.write(f"\r{head}{pct:3d}%|{cells}| {n}/{total} [00:{n % 60:02d}<00:10, {rate}{tail}]"
                     + end)
    sys.stderr.flush()


def hang(phase: str) -> None:
    if ENV("AITK_STANDIN_HANG") == phase:
        while True:
            time.sleep(1)


def fail(cause: str) -> None:
    """Print what the real stack prints for ``cause`` and exit 1 like run.py does."""
    texts = {
        "oom": "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 90.00 MiB. GPU 0 "
               "has a total capacity of 23.55 GiB of which 17.06 MiB is free.",
        "cuda_async": "RuntimeError: CUDA error: out of memory\nCUDA kernel errors might be "
                      "asynchronously reported at some other API call, so the stacktrace below "
                      "might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1",
        "oom_steps": "\n".join(f"\n################################################\n"
                               f"# OOM during training step, skipping batch {i}/3 #\n"
                               f"################################################\n"
                               for i in (1, 2, 3))
                     + "RuntimeError: OOM during training step 3 times in a row, aborting training",
        "import": "ImportError: cannot import name 'FluxKontextPipeline' from 'diffusers' "
                  "(/venv/lib/python3.12/site-packages/diffusers/__init__.py)",
        "module": "ModuleNotFoundError: No module named 'optimum'",
        "hf_401": "requests.exceptions.HTTPError: 401 Client Error: Unauthorized for url: "
                  "https://huggingface.co/black-forest-labs/FLUX.1-dev/resolve/main/model_index.json",
        "hf_gated": "huggingface_hub.errors.GatedRepoError: 403 Client Error. Cannot access gated "
                    "repo for url https://huggingface.co/black-forest-labs/FLUX.1-dev/resolve/main/"
                    "transformer/config.json.\nAccess to model black-forest-labs/FLUX.1-dev is "
                    "restricted and you are not in the authorized list.",
        "no_config": "OSError: black-forest-labs/FLUX.1-dev does not appear to have a file named "
                     "config.json.",
        "disk": "OSError: [Errno 28] No space left on device",
    }
    last = texts[cause].splitlines()[-1]
    message = last.split(": ", 1)[1] if re.match(r"[\w.]+(Error|Exception): ", last) else last
    # run.py main(): "Error running job: {e}", print_end_message, then `raise e` (the traceback)
    out("\n".join(texts[cause].splitlines()[:-1]))
    out(f"Error running job: {message}")
    out("\n========================================\nResult:\n - 0 completed jobs\n - 1 failure\n"
        "========================================")
    sys.stderr.write("Traceback (most recent call last):\n  File \"run.py\", line 133, in main\n"
                     f"{last}\n")
    sys.exit(1)


def failure_at(where: str) -> str | None:
    """The cause to fail with at ``where`` (``load`` or a step number)."""
    cause, _, at = (ENV("AITK_STANDIN_FAIL") or "").partition("@")
    return cause if cause and (at or "load") == where else None


def write_lora(path: Path, rank: int, step: int | None, name: str, *, half: bool = False) -> None:
    header: dict = {"__metadata__": {"format": "pt", "name": name,
                                     "training_info": json.dumps({"step": step or 0})}}
    blobs, offset = [], 0
    for module in MODULES:
        for part, shape in (("lora_A", [rank, FLUX_DIM]), ("lora_B", [FLUX_DIM, rank])):
            data = bytes(4 * shape[0] * shape[1])
            header[f"{module}.{part}.weight"] = {"dtype": "F32", "shape": shape,
                                                 "data_offsets": [offset, offset + len(data)]}
            blobs.append(data)
            offset += len(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    blob = struct.pack("<Q", len(head)) + head + b"".join(blobs)
    # ai-toolkit writes in place (safetensors save_file): a kill leaves half a file
    path.write_bytes(blob[: len(blob) // 2] if half else blob)


def read_lora(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata) like safetensors' loader; a truncated file raises as it does."""
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0] if len(raw) >= 8 else 0
    header = json.loads(raw[8:8 + size]) if 8 + size <= len(raw) else None
    end = max((t["data_offsets"][1] for k, t in (header or {}).items() if k != "__metadata__"),
              default=0)
    if header is None or len(raw) < 8 + size + end:
        raise RuntimeError("safetensors_rust.SafetensorError: Error while deserializing header: "
                           "MetadataIncompleteBuffer")
    meta = header.pop("__metadata__", {})
    return header, meta


def write_optimizer(path: Path, step: int, *, half: bool = False) -> None:
    """``torch.save`` writes a zip archive (``archive/data.pkl`` ...); so does the stand-in."""
    tmp = path.with_name(path.name + ".part")
    with zipfile.ZipFile(tmp, "w") as zf:
        zf.writestr("archive/data.pkl", json.dumps({"step": step}).encode() + bytes(4096))
        zf.writestr("archive/version", b"3\n")
    data = tmp.read_bytes()
    tmp.unlink()
    path.write_bytes(data[: len(data) // 2] if half else data)


def png(path: Path) -> None:
    raw = b"".join(b"\x00" + b"\x80\x40\x20" * 8 for _ in range(8))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def sample(folder: Path, step: int, n_prompts: int, steps: int = 4) -> None:
    """``BaseSDTrainProcess.sample``: the Generating Images bar and each image's denoise bar;
    files named ``{time ms}__{step:09d}_{i}.png`` like ``GenerateImageConfig.get_image_path``."""
    delay = float(ENV("AITK_STANDIN_SAMPLE_DELAY") or 0)
    for i in range(n_prompts):
        bar("Generating Images", i, n_prompts, rate="?it/s")
        for t in range(1, steps + 1):
            bar("", t, steps, rate="2.31it/s")
            time.sleep(delay / steps)
        png(folder / f"{int(time.time() * 1000)}__{step:09d}_{i}.png")
    bar("Generating Images", n_prompts, n_prompts, rate="0.40it/s")
    sys.stderr.write("\r")
    out("")


def main() -> int:
    cfg_path = Path(sys.argv[1])
    text = cfg_path.read_text()
    name = config_value(text, "name") or "standin"
    folder = Path(config_value(text, "training_folder") or "output")
    steps = int(config_value(text, "steps") or 40)
    save_every = int(config_value(text, "save_every") or 10)
    sample_every = int(config_value(text, "sample_every") or 0)
    keep = int(config_value(text, "max_step_saves_to_keep") or 4)
    rank = int(config_value(text, "linear") or 4)
    prompts = count_prompts(text)
    delay = float(ENV("AITK_STANDIN_DELAY") or 0.01)
    save_delay = float(ENV("AITK_STANDIN_SAVE_DELAY") or 0)
    kill_in_save = int(ENV("AITK_STANDIN_KILL_IN_SAVE") or -1)
    extra_saves = {int(s) for s in (ENV("AITK_STANDIN_SAVE_AT") or "").split(",") if s}
    if ENV("AITK_STANDIN_RECORD"):
        Path(ENV("AITK_STANDIN_RECORD")).write_text(json.dumps(
            {"argv": sys.argv, "cwd": os.getcwd(), "python": sys.executable}))
    if ENV("AITK_STANDIN_IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    root = folder / name
    root.mkdir(parents=True, exist_ok=True)
    (root / "samples").mkdir(exist_ok=True)

    out("Running 1 job")  # run.py main()
    for line in ("Loading Flux model", "Loading transformer"):
        out(line)
    hang("loading")
    if cause := failure_at("load"):
        fail(cause)
    bar("Loading checkpoint shards", 3, 3, rate="1.31it/s", end="\n")
    for line in ("Quantizing transformer", "Loading VAE", "Loading T5"):
        out(line)
    bar("Loading checkpoint shards", 2, 2, rate="1.05it/s", end="\n")
    for line in ("Quantizing T5", "Loading CLIP", "Making pipe", "Preparing Model"):
        out(line)
    bar("Caching latents to disk", 8, 8, rate="6.20it/s", end="\n")

    step = 0
    saves = [p for p in root.glob(f"{name}*.safetensors")]
    if saves:
        latest = max(saves, key=os.path.getctime)
        out(f"#### IMPORTANT RESUMING FROM {latest} ####")
        out(f"Loading from {latest}")
        try:
            tensors, meta = read_lora(latest)
        except (RuntimeError, ValueError) as exc:
            out(f"Error running job: {str(exc).split(': ', 1)[1]}")
            sys.stderr.write(f"Traceback (most recent call last):\n{exc}\n")
            return 1
        wanted = {f"{m}.lora_{p}.weight" for m in MODULES for p in "AB"}
        out(f"Missing keys: {sorted(k for k in tensors if k not in wanted)}")
        step = int(json.loads(meta.get("training_info") or "{}").get("step", 0))
        out(f"Found step {step} in metadata, starting from there")
    optimizer = root / "optimizer.pt"
    if optimizer.exists():
        out(f"Loading optimizer state from {optimizer}")
        try:
            zipfile.ZipFile(optimizer).testzip()
        except (zipfile.BadZipFile, OSError) as exc:
            out(f"Failed to load optimizer state from {optimizer}")
            out(str(exc))
        out("Updating optimizer LR from params")

    if step <= 1:
        out("Generating baseline samples before training")
        hang("baseline")
        sample(root / "samples", step, prompts)

    def save(at: int | None) -> None:
        path = root / (f"{name}_{at:09d}.safetensors" if at is not None else f"{name}.safetensors")
        if cause := failure_at(f"save{at}"):
            fail(cause)
        once = root / f".standin_killed_at_{at}"
        dying = at == kill_in_save and not once.exists()
        if dying:
            once.write_text("killed once\n")
        write_lora(path, rank, at if at is not None else steps, name, half=dying)
        if dying:
            os.kill(os.getpid(), signal.SIGKILL)
        out(f"Saved checkpoint to {path}")
        time.sleep(save_delay)
        write_optimizer(optimizer, at or steps)
        out(f"Saved optimizer to {optimizer}")
        step_saves = sorted(root.glob(f"{name}_*.safetensors"), key=os.path.getctime)
        for old in step_saves[:-keep]:
            out(f"Removing old save: {old}")
            old.unlink()

    start = step
    offset = 0 if ENV("AITK_STANDIN_OLD_BAR") == "1" else 1
    bar(name, step, steps, rate="?it/s")
    hang("training")
    for index in range(start, steps):
        if cause := failure_at(str(index)):
            fail(cause)
        time.sleep(delay)
        loss = 0.5 / (index + 1)
        postfix = f"lr: 1.0e-04 loss: {loss:.3e}"
        # set_postfix_str redraws at the count of the last update (line 2698)
        bar(name, start if index == start else index - 1 + offset, steps, rate=" 2.00s/it",
            postfix=postfix)
        if index != start:
            if save_every and index % save_every == 0 or index in extra_saves:
                out(f"\nSaving at step {index}")
                save(index)
            if sample_every and index % sample_every == 0:
                sample(root / "samples", index, prompts)
        bar(name, index + offset, steps, rate=" 2.00s/it", postfix=postfix)
    sys.stderr.write("\n")
    save(None)
    hang("final")
    if sample_every:
        sample(root / "samples", steps, prompts)
    out("")
    return 0


if __name__ == "__main__":
    sys.exit(main())
