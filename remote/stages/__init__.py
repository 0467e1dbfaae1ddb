"""The bodies of the agent's stages, one module per concern; :mod:`remote.runner` drives them.

Each body is a function of the :class:`~remote.runner.Runner` that returns ``(outcome, detail)``
and raises :class:`~remote.status.StageFailed` for a failure the run reports:

* :mod:`~remote.stages.prepare`: ``checks``, ``bootstrap``
* :mod:`~remote.stages.dataset`: ``ingest``, ``caption``, ``quality_gate``
* :mod:`~remote.stages.training`: ``config``, ``train`` (resume policy, cost guard wiring)
* :mod:`~remote.stages.finish`: ``validate``, ``publish``
* :mod:`~remote.stages.orphans`: ending a trainer a killed agent left behind
"""
