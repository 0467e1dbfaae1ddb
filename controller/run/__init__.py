"""One run's lifecycle, laptop side.

``launch`` (the steps as a library: checks, plan, drive), ``orchestrator`` (the journaled state
machine: rent, ship, run, follow, fetch, release), ``ship`` (the agent and dataset to the instance),
``follow`` (polling status and log while it trains), ``fetch`` (the bundle home, verified),
``reconcile`` (journal intents matched against the provider) and ``states`` (run ids, named states,
per-run locks).
"""
