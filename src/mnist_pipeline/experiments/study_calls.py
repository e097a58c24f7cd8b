"""Several calls of one Optuna study at once: Optuna's way to parallelise a study (the same
command started in two terminals against one storage), made to end with exactly the study's
``n_trials`` and one MLflow parent run.

What the calls share, and how:

- **The trial count.** Each call, under the study's lock (``search.claim_lock``), fails the
  trials whose call died, counts the study's trials and asks only what is missing
  (``Asks``): the total is ``n_trials`` exactly, where Optuna's ``MaxTrialsCallback``
  would overshoot by the trials in flight. The lock is a file lock: calls on one machine (or
  one SQLite file) are serialised; calls on several machines sharing a server storage are not.
- **Whose a trial is.** Each asked trial records its call (``OWNER_ATTR``: host, pid, process
  start time, boot id; ``core.liveness``). A RUNNING trial is failed as interrupted only when
  that call is dead, so a call never takes a trial another live call is training.
- **The parent run.** The study's first call opens it; a later call joins it while it is open
  (``search.link_parent``). The study records its live calls (``CALLS_ATTR``). A call that
  ends while others run hands the parent to one of them (its ``process.pid`` tag, what
  ``tracking.close_dead_runs`` checks) and leaves it open; the last call to end closes it. A
  call whose parent's owner died takes the parent over before its next trial.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from mnist_pipeline import tracking
from mnist_pipeline.core import liveness
from mnist_pipeline.core.errors import ConfigError
from mnist_pipeline.experiments import search, sweep_tracking

log = logging.getLogger(__name__)

#: On the study: the calls running it now (owner records).
CALLS_ATTR = "calls"
#: On a trial: the call that asked it (an owner record).
OWNER_ATTR = "owner"


@contextmanager
def study_lock(storage: str, study_name: str | None) -> Iterator[None]:
    """The study's lock, beside its storage. Never makes the storage's folder: with none,
    opening the study fails with its own message."""
    folder_exists = search.study_lock(storage, study_name).parent.is_dir()
    with search.claim_lock(storage, study_name) if folder_exists else nullcontext():
        yield


def _same(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("host", "pid", "start", "boot"))


def others(study: Any) -> list[dict]:
    """The other calls of the study that are still alive (dead ones are forgotten)."""
    me = liveness.identity()
    calls = study.user_attrs.get(CALLS_ATTR, [])
    return [c for c in calls if not _same(c, me) and liveness.alive(c)]


def join(study: Any) -> list[dict]:
    """Record this call among the study's calls (under the lock). Returns the others."""
    running = others(study)
    study.set_user_attr(CALLS_ATTR, [*running, liveness.identity()])
    return running


def leave(study: Any, storage: str, sweep_dir: str | Path, study_name: str | None) -> bool:
    """Under the study's lock, take this call off the study's calls. If another call still
    runs the study, the parent run becomes its (so ``close_dead_runs`` judges the parent by a
    live process) and stays open (``sweep_tracking.keep_parent_open``): True. False: this call
    was the last; its sweep's end closes the parent."""
    with study_lock(storage, study_name):
        running = others(study)
        study.set_user_attr(CALLS_ATTR, running)
        if not running:
            return False
        heir = running[0]
        parent = sweep_tracking.read_sweep(sweep_dir)["parent_run_id"]
        tracking.set_run_tags(parent, {"process.pid": heir["pid"], "process.host": heir["host"]})
        sweep_tracking.keep_parent_open(sweep_dir, liveness.describe(heir))
        return True


def leave_after_error(joined: tuple[Any, str, str] | None, study_name: str | None) -> bool:
    """``leave`` after an error, if this call had joined the study (``joined``: study,
    storage, sweep folder): whether the parent stays open for another call (then this call's
    error must not fail it). Never raises: the storage may be what failed."""
    if joined is None:
        return False
    try:
        return leave(*joined, study_name)
    except Exception as again:
        log.debug("could not leave the study: %s", again)
        return False


def keep_parent(parent_run_id: str) -> None:
    """Take the parent run over if the call that held it died (it is then RUNNING with a dead
    process, or KILLED by a ``close_dead_runs``): the trials still to come need it open."""
    run = tracking.get_run(parent_run_id)
    me = liveness.identity()
    tags = run.data.tags
    if run.info.status == "RUNNING" and tags.get("process.pid") == str(me["pid"]):
        return
    try:
        if tracking.reopen_run(parent_run_id):
            log.warning("the call holding parent run %s ended: this call keeps it", parent_run_id)
    except ConfigError:
        pass  # open by another live call: its to close


def fail_stale_trials(study: Any) -> list[int]:
    """Mark FAIL, as interrupted, the RUNNING trials whose call died (SIGKILL; SIGINT and
    SIGTERM too: a stage exits at once on them, ``stages.cli``), and those asked before trials
    recorded their call. A trial of a live call, or of a call on another host, is left alone."""
    import optuna

    stale = [
        t.number
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if OWNER_ATTR not in t.user_attrs or not liveness.alive(t.user_attrs[OWNER_ATTR])
    ]
    search.mark_interrupted(study, stale)
    return stale


class Asks:
    """A call's asks of the study, batch by batch, each under the study's lock."""

    def __init__(
        self, study: Any, storage: str, parent_run_id: str, n_trials: int, n_jobs: int
    ) -> None:
        self.study, self.storage, self.parent_run_id = study, storage, parent_run_id
        self.n_trials, self.n_jobs = n_trials, n_jobs

    def batches(self, space: dict, make_sampler: Callable[[int], Any]) -> Iterator[list[Any]]:
        """The batches of trials this call runs, until the study has its ``n_trials``. The
        sampler is made at the first ask, seeded by the trials there are then
        (``make_sampler``): two calls started together draw different trials."""
        sampler = None
        while True:
            with study_lock(self.storage, self.study.study_name):
                keep_parent(self.parent_run_id)
                if sampler is None:
                    sampler = self.study.sampler = make_sampler(len(self.study.trials))
                batch = self.next_trials(space)
            if not batch:
                return
            yield batch

    def next_trials(self, space: dict) -> list[Any]:
        """Under the lock: at most ``n_jobs`` trials; none once the study's counted trials
        (those of every call, running ones included) reach ``n_trials``."""
        stale = fail_stale_trials(self.study)
        if stale:
            log.warning("trials %s of a call that died never finished: marked FAIL", stale)
        to_go = self.n_trials - search.trials_done(self.study)
        trials = [self.study.ask(space) for _ in range(max(0, min(self.n_jobs, to_go)))]
        for trial in trials:
            trial.set_user_attr(OWNER_ATTR, liveness.identity())
        return trials
