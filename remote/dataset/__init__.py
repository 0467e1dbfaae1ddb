"""The dataset stages the agent runs before any training is paid for.

    ingest.ingest        the user's folder -> work_dir/dataset (converted, resized) + manifest.json
    caption.caption      keep sidecars, fill missing ones (template or a captioning model)
    quality.run_gate     per-image categories, exclusions and a pass/fail verdict
    check                all three into a temp dir: ``python -m remote check-dataset DIR``

Only the standard library, Pillow and numpy are needed; transformers is imported lazily, only
when a captioning or NSFW model is asked for.
"""
