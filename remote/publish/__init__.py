"""The publish pack: the bundle in ``publish/`` that the controller fetches and verifies.

    bundle        assembles publish/ and writes SHA256SUMS last
    model_card    the Hugging Face README.md
    report_html   the self-contained report.html
    receipt       receipt.json: hardware, steps, durations, spend
"""
