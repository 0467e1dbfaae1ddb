"""Launching one run from a front end: the terminal (``flux-remote launch``) or the notebook.

Both front ends do the same four things and differ only in how they draw and ask, so the
things themselves live here and return data:

* ``machine_checks``: what this machine needs for the spec's provider (tools, keys, tokens);
* ``plan_run``: the orchestrator for the spec's provider and the run's estimate, refused before
  anything is rented when the estimate exceeds the budget;
* ``drive_interactive``: drive the run to its end; on Ctrl-C stop it or detach from it, and never
  leave a rented machine idle;
* the dataset check lives in ``controller.dataset_check``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

from controller.run import states as R
from controller.errors import BudgetError, FluxRemoteError, SpecError

if TYPE_CHECKING:
    from controller.hosts.rsync_version import RsyncVerdict
    from controller.journal import Journal
    from controller.run.orchestrator import Options, Orchestrator, Outcome
    from controller.providers.base import Estimate
    from controller.spec.model import RunSpec


@dataclass(frozen=True)
class MachineCheck:
    """One line of the "this machine" table: what was checked, what was found, and whether the
    run can go ahead with it (``ok`` False: it will fail; warnings stay ok). ``brief`` is the
    word for one-line displays (``launch``'s ``checks:`` line) where ``result`` is long."""

    name: str
    result: str
    ok: bool = True
    brief: Optional[str] = None

    @property
    def short(self) -> str:
        return self.brief or self.result

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "result": self.result, "ok": self.ok}


def machine_checks(spec: "RunSpec", *, env: Optional[Mapping[str, str]] = None,
                   which: Callable[[str], Optional[str]] = shutil.which,
                   rsync_verdict: Optional[Callable[[], "RsyncVerdict"]] = None,
                   ) -> list[MachineCheck]:
    """What this machine needs to launch ``spec``: Python, ssh and rsync for remote providers
    (rsync with the fixes for the January 2025 CVEs: a warning, or a refusal for a build known to
    be unfixed), the Vast.ai key, a Hub token for the gated flux-dev and for publishing,
    WANDB_API_KEY."""
    from controller.hosts.rsync_version import check_rsync

    env = os.environ if env is None else env
    checks = [MachineCheck("python", sys.version.split()[0])]
    if spec.provider.type in ("vast", "ssh"):
        for tool in ("ssh", "rsync"):
            found = which(tool)
            checks.append(MachineCheck(tool, found or "missing: install it", found is not None,
                                       brief="ok" if found else "missing"))
        if which("rsync"):
            verdict = (rsync_verdict or check_rsync)()
            if verdict.message:
                checks.append(MachineCheck("rsync version", verdict.message, not verdict.refuse,
                                           brief=f"{verdict.version}: "
                                                 f"{'unfixed' if verdict.refuse else 'warning'}"))
    if spec.provider.type == "vast":
        from controller.vast.client import find_api_key

        try:
            find_api_key()
            checks.append(MachineCheck("Vast.ai key", "found", brief="ok"))
        except FluxRemoteError as exc:
            checks.append(MachineCheck("Vast.ai key", str(exc), False, brief="missing"))
    if (spec.provider.type in ("vast", "ssh") and spec.base_model == "flux-dev"
            and spec.training.trainer == "ai-toolkit"):
        token = bool(env.get("HF_READ_TOKEN") or env.get("HF_TOKEN"))
        checks.append(MachineCheck("HF_TOKEN", "set" if token else
                                   "not set: FLUX.1-dev is gated (export HF_READ_TOKEN=hf_... , a "
                                   "read token of an account that accepted its license)", token,
                                   brief=None if token else "not set"))
    if spec.wandb.enabled:
        mode = env.get("WANDB_MODE", "online")
        checks.append(MachineCheck("WANDB_API_KEY", "set" if env.get("WANDB_API_KEY") else
                                   f"not set (WANDB_MODE={mode})"))
    if spec.publish.hf_repo:
        token = bool(env.get("HF_TOKEN"))
        checks.append(MachineCheck("HF_TOKEN (publish)", "set" if token else "not set", token))
    return checks


def preflight(spec: "RunSpec", *, env: Optional[Mapping[str, str]] = None,
              which: Callable[[str], Optional[str]] = shutil.which,
              passed: Optional[set[str]] = None) -> list[MachineCheck]:
    """Refuse, before anything is rented or shipped, what would only fail on the instance.

    For ``vast`` and ``ssh``: a failing machine check (no rsync, no Vast key, no HF_TOKEN for
    the gated FLUX.1-dev) and a dataset that fails the spec's quality gate here are SpecErrors
    (exit 2, nothing rented). The gate runs on the instance again (on the ingested copy); this
    run costs seconds on the laptop and saves renting a GPU to learn the same thing. ``local``
    skips it: its agent says the same at no cost. ``passed`` remembers the dataset checks that
    passed (a batch's runs often share one). Returns the checks for display.
    """
    checks = machine_checks(spec, env=env, which=which)
    if spec.provider.type == "local":
        return checks
    failed = [f"{check.name}: {check.result}" for check in checks if not check.ok]
    if failed:
        raise SpecError(failed, hint="nothing was rented; fix these and launch again")
    if spec.quality_gate.enabled:
        from controller.dataset_check import check_arguments, run_check

        arguments = check_arguments(spec)
        key = json.dumps(arguments, sort_keys=True, default=str)
        if passed is not None and key in passed:
            return checks
        report = run_check(arguments)
        if report["passed"] and passed is not None:
            passed.add(key)
        if not report["passed"]:
            reasons = "; ".join(report["gate"].get("reasons") or []) or "see the report"
            raise SpecError(
                f"{spec.dataset.path}: the dataset fails the quality gate ({reasons}), so the "
                "run would fail on the instance; nothing was rented",
                hint="`flux-remote check-dataset run.yaml` lists every image and why")
    return checks


def check_budget(spec: "RunSpec", estimate: "Estimate") -> None:
    """Refuse (BudgetError) a run whose estimate exceeds its budget, before anything is rented."""
    if estimate.est_usd is not None and estimate.est_usd > spec.budget.max_usd:
        raise BudgetError(f"estimated ${estimate.est_usd:.2f} exceeds the budget "
                          f"${spec.budget.max_usd:.2f}")


def plan_run(spec: "RunSpec", journal: "Journal", *, reporter: Any = None,
             enforce_budget: bool = True,
             **provider_options: Any) -> tuple["Orchestrator", "Estimate"]:
    """The orchestrator for the spec's provider and the run's estimate (BudgetError when the
    estimate exceeds the budget, unless ``enforce_budget`` is False: then the caller shows the
    plan first and calls ``check_budget`` itself). Nothing is rented; Vast offers are queried."""
    from controller.run.orchestrator import Orchestrator
    from controller.providers import provider_named

    provider = provider_named(spec.provider.type, journal=journal, **provider_options)
    orch = Orchestrator(journal, provider, reporter=reporter)
    estimate = provider.estimate(spec)
    if enforce_budget:
        check_budget(spec, estimate)
    return orch, estimate


def drive_interactive(orch: "Orchestrator", run_id: str, options: "Options", *,
                      estimate: "Estimate | None" = None,
                      ask_stop: Optional[Callable[[], bool]] = None) -> "Outcome":
    """Drive the run to its end; on Ctrl-C, stop it or detach from it.

    ``ask_stop`` is asked, after a Ctrl-C while the agent runs, whether to stop the run
    (graceful: checkpoint, publish, fetch, destroy); None or False detaches: the run carries on,
    its own cost guard and watchdog still bound its spend, and ``flux-remote resume RUN``
    reattaches. After a stop a second Ctrl-C detaches. Before the agent runs there is nothing to
    detach from: Ctrl-C then releases the machine at once (a rented instance must not bill while
    nothing uses it). The reporter is closed before asking so that the question is visible.
    """
    from controller.run.orchestrator import Options

    while True:
        try:
            return orch.drive(run_id, options, estimate)
        except KeyboardInterrupt:
            close = getattr(orch.reporter, "close", None)
            if close is not None:
                close()
            state = orch.state(run_id)
            if state in R.TERMINAL_STATES:
                return orch.outcome(run_id)
            if state != R.RUNNING:
                return orch.down(run_id, force=True)
            if ask_stop is None or not ask_stop():
                return orch.outcome(run_id, detached=True)
            orch.request_stop(run_id)
            options = Options(**{**options.__dict__, "detach": False})
            ask_stop = None  # a second Ctrl-C detaches
