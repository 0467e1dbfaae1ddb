"""Batches: many runs under one total budget, several machines at once.

``spec`` (the batch file's ``batch:`` section and its expansion into runs), ``ledger`` (the total
budget: reservations and metered spend), ``setup`` (the batch and its slots journaled),
``scheduler`` (the slots driven to their ends), ``stop`` (a stop of the whole batch), ``board``
(the live table's data) and ``report`` (``batch_summary.json`` and ``batch_report.html``).
"""
