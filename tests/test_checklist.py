"""The stage checklist read from the agent's status.json (untrusted: any shape, any text)."""

from controller.run.checklist import plain, stage_fact, stage_rows

# the stages of a finished demo run's status.json (remote.status.RunRecorder), paths shortened
DEMO_STAGES = {
    "checks": {"state": "done", "started_at": 10.0, "ended_at": 10.5, "detail": {
        "checks": [{"name": "python", "status": "pass", "value": "3.11.7", "threshold": "3.10"},
                   {"name": "gpu", "status": "skipped", "value": 0, "threshold": None},
                   {"name": "disk_free_gb", "status": "warn", "value": 3.0, "threshold": 5}],
        "gpu": {"devices": [], "driver": None, "count": 0, "name": None}}},
    "bootstrap": {"state": "done", "started_at": 11.0, "ended_at": 11.0, "detail": {
        "trainer": "tiny", "aitk_dir": None, "source": "tiny", "commit": None}},
    "ingest": {"state": "done", "started_at": 12.0, "ended_at": 13.0, "detail": {
        "dataset_dir": "/w/dataset", "totals": {"files": 14, "ingested": 12, "unusable": 2,
                                                "skipped": 0, "orphan_captions": 0}}},
    "caption": {"state": "done", "started_at": 13.0, "ended_at": 13.0, "detail": {
        "mode": "template", "kept": 0, "trigger_inserted": 6, "templated": 6, "generated": 0,
        "missing": 0, "orphan_captions": [], "issues": []}},
    "quality_gate": {"state": "done", "started_at": 13.0, "ended_at": 14.0, "detail": {
        "passed": True, "usable": 12, "excluded": 0, "warnings": [], "report": "/w/q.json"}},
    "config": {"state": "done", "started_at": 14.0, "ended_at": 14.0, "detail": {
        "config_path": "/w/config.yaml", "steps": 80, "save_every": 20, "rank": 4}},
    "train": {"state": "done", "started_at": 14.0, "ended_at": 94.0, "detail": {
        "state": "done", "step": 80, "s_per_step": 0.5, "final_lora": "/o/demo.safetensors",
        "stop_reason": None}},
    "validate": {"state": "done", "started_at": 94.0, "ended_at": 95.0, "detail": {
        "ok": True, "lora": {"ok": True, "problems": [], "tensors": 24, "step": 80},
        "samples": {"ok": True, "count": 6, "problems": []}}},
    "publish": {"state": "done", "started_at": 95.0, "ended_at": 96.0, "detail": {
        "files": 26, "publish_dir": "/w/publish"}},
}


def test_each_finished_stage_has_its_one_fact_in_words() -> None:
    rows = stage_rows({"stages": DEMO_STAGES})
    facts = {row.label: row.fact for row in rows}
    assert facts == {
        "checks": "no GPU, 2/3 checks, 1 warning",
        "bootstrap": "tiny trainer (CPU)",
        "ingest": "12 images (2 unusable)",
        "caption": "6 from the template, trigger added to 6",
        "quality gate": "12/12 images pass",
        "config": "80 steps, rank 4",
        "train": "80 steps, 0.50 s/step",
        "validate": "LoRA loads (24 tensors), 6 samples",
        "publish": "26 files packed",
    }
    assert [row.seconds for row in rows][:3] == [0.5, 0.0, 1.0]
    assert all(row.state == "done" for row in rows)


def test_a_gpu_machine_a_real_trainer_and_a_stopped_run() -> None:
    gpu = {"gpu": {"name": "NVIDIA GeForce RTX 4090", "count": 2},
           "checks": [{"status": "pass"}] * 4}
    assert stage_fact("checks", "done", gpu) == "2x NVIDIA GeForce RTX 4090, 4/4 checks"
    assert stage_fact("bootstrap", "done", {"trainer": "ai-toolkit", "source": "cached",
                                            "commit": "27a03a91f23eb1b7"}) == \
        "ai-toolkit 27a03a9 (cached)"
    assert stage_fact("train", "stopped", {"state": "stopped", "step": 40}) == \
        "stopped at step 40"
    assert stage_fact("quality_gate", "failed", {"error": "quality gate FAILED: 2 usable"}) == \
        "quality gate FAILED: 2 usable"
    assert stage_fact("config", "skipped", {"reason": "stop requested"}) == "stop requested"


def test_pending_running_and_the_current_stage() -> None:
    rows = stage_rows({"stage": "ingest", "stages": {
        "checks": {"state": "done", "started_at": 1, "ended_at": 2},
        "bootstrap": {"state": "running", "started_at": 2, "ended_at": None}}})
    states = {row.stage: row.state for row in rows}
    assert states["checks"] == "done" and states["bootstrap"] == "running"
    assert states["ingest"] == "running"  # status.json's stage, before its entry says so
    assert states["publish"] == "pending"
    assert next(row for row in rows if row.stage == "bootstrap").seconds is None


def test_a_hostile_or_broken_status_shows_no_repr_and_no_control_codes() -> None:
    hostile = {"stage": ["x"], "stages": {
        "checks": {"state": "done", "detail": {"gpu": {"name": "\x1b[2JGPU\x07", "count": "8"},
                                               "checks": "all"}},
        "ingest": {"state": "done", "started_at": "yesterday", "detail": {"totals": [1, 2]}},
        "caption": {"state": "exploded", "detail": None},
        "quality_gate": {"state": "done", "detail": {"usable": True, "excluded": None}},
        "train": {"state": "failed", "detail": {"error": "bad\nthing\x1b]0;title\x07" + "x" * 500}},
        "publish": "nonsense", "../../etc": {"state": "done"}}}
    rows = stage_rows(hostile)
    assert [row.stage for row in rows][0] == "checks" and len(rows) == 9
    text = " | ".join(f"{row.label} {row.state} {row.fact}" for row in rows)
    assert "\x1b" not in text and "\x07" not in text and "\n" not in text
    assert "None" not in text and "{" not in text and "[" not in text and "etc" not in text
    assert next(r for r in rows if r.stage == "checks").fact == "GPU"
    assert next(r for r in rows if r.stage == "caption").state == "pending"
    assert len(next(r for r in rows if r.stage == "train").fact) <= 200
    assert stage_rows(None)[0].state == "pending" and stage_rows({"stages": 3})[0].fact == ""


def test_plain_strips_escape_sequences_and_caps_length() -> None:
    assert plain("\x1b[31mred\x1b[0m \x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\") == "red link"
    assert plain("a\tb\nc\x00\x9b") == "a b; c"
    assert plain("gate FAILED: 2 usable\n  found: nothing\n\n  fail: too few") == \
        "gate FAILED: 2 usable; found: nothing; fail: too few"
    assert plain("x" * 50, limit=10) == "x" * 9 + "…"
