"""The search itself: one Optuna trial = sample a design, train it on the proxy budget, calibrate its
thresholds on the validation split, repair them against the MAC ceiling (those steps live in
:mod:`eenn.search.candidate`), and report two objectives (validation accuracy, up; expected MACs
per sample with every head counted, down).
The accuracy floor and the MAC ceiling go to the sampler as constraints (``constraints_func``),
not into the objectives. The study lives in Optuna storage (SQLite by default), so a killed
search continues where it stopped and several processes can search one study together; the
trials a killed worker left running are failed and their designs queued again (see
:func:`eenn.search.workers._dead_trials` for how a dead worker is told from a live one).
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..data import DataSplits
from .candidate import Pruned, _shape_kw, evaluate_design, load_search_data
from .config import SearchConfig
from .space import ConfigError
from .workers import (_OWN_ATTRS, _quiet_interrupts, _record_worker, _recover_dead_trials, _requeue, _storage,
                      default_storage)

__all__ = ["ImpossibleConstraints", "SearchResult", "constraint_values", "create_study", "run_search",
           "default_storage"]

# What must match for two runs to share a study (the rest, e.g. constraints or the trial count,
# may change between runs: the report re-reads every trial against the current constraints).
_STUDY_KEYS = ("dataset", "space", "objective", "policy", "train")


class ImpossibleConstraints(ConfigError):
    """No design of the space can satisfy the constraints (known before any training)."""


# ------------------------------------------------------------------------------------ the study
def constraint_values(attrs: dict[str, Any], floor: float, ceiling: float) -> list[float]:
    """Optuna's convention (<= 0 is satisfied): ``[floor - accuracy, (MACs - ceiling) / ceiling]``;
    the MACs are scaled by the ceiling so both violations are fractions."""
    return [floor - float(attrs.get("val_accuracy", 0.0)), (float(attrs.get("val_macs", math.inf)) - ceiling) / ceiling]


CONSTRAINT_NAMES = ("accuracy_floor", "macs_ceiling")


def _set_constraints(trial, attrs: dict[str, Any], config: SearchConfig) -> None:
    """Hand the constraints to Optuna (``Trial.set_constraint``, Optuna >= 5; older versions read
    them through the samplers' ``constraints_func`` from the same user attributes)."""
    if hasattr(trial, "set_constraint"):
        for k, v in zip(CONSTRAINT_NAMES, constraint_values(attrs, config.accuracy_floor, config.macs_ceiling)):
            trial.set_constraint(k, v)


def _sampler(config: SearchConfig, seed: int):
    import optuna

    floor, ceiling = config.accuracy_floor, config.macs_ceiling

    def constraints_func(trial) -> list[float]:
        return constraint_values(trial.user_attrs, floor, ceiling)

    # Optuna >= 5 takes the constraints from each trial (set_constraint); before, from here.
    constraints = None if hasattr(optuna.trial.Trial, "set_constraint") else constraints_func
    if config.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=config.population, seed=seed, constraints_func=constraints)
    if config.sampler == "tpe":
        return optuna.samplers.TPESampler(n_startup_trials=config.startup_trials, seed=seed, multivariate=True,
                                          constraints_func=constraints)
    if config.sampler == "gp":
        return optuna.samplers.GPSampler(n_startup_trials=config.startup_trials, seed=seed, constraints_func=constraints)
    return optuna.samplers.RandomSampler(seed=seed)


def _sampler_seed(seed: int, worker: int, trials_before: int) -> int:
    """The sampler seed of local worker ``worker``. A study without trials draws from ``seed``
    (plus 1000 per worker), so a new search is reproducible from the config; a study that holds
    trials already gets a seed mixed from the same numbers and that count, so that a resumed
    search draws new designs instead of replaying those its earlier run drew."""
    if trials_before == 0:
        return seed + 1000 * worker
    import numpy as np

    return int(np.random.SeedSequence([seed, worker, trials_before]).generate_state(1)[0])



def create_study(config: SearchConfig, storage: Any = None, study_name: str | None = None, *, out: str | Path = ".",
                 seed: int | None = None, heartbeat: tuple[int, int] | None = (5, 20)):
    """Create or load the study (directions: accuracy up, MACs down) with the configured sampler.
    A study made with a different space, data, objective, policy or proxy budget is refused."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    st = storage if not isinstance(storage, (str, type(None))) else _storage(storage, out, heartbeat)
    name = study_name or config.name
    sampler = _sampler(config, config.seed if seed is None else seed)
    study = optuna.create_study(storage=st, study_name=name, directions=["maximize", "minimize"], sampler=sampler,
                                load_if_exists=True)
    mine = json.loads(json.dumps(config.to_dict()))
    saved = study.user_attrs.get("config")
    if saved is None:
        study.set_user_attr("config", mine)
    else:
        differ = [k for k in _STUDY_KEYS if saved.get(k) != mine.get(k)]
        if differ:
            raise ConfigError(f"study {name!r} in this storage was made with a different {', '.join(differ)}; "
                              "its trials would not compare with new ones: use another --study name or --storage")
    return study


def _objective(config: SearchConfig, data: DataSplits, device: str | None) -> Callable:
    import optuna
    from optuna.trial import TrialState

    shape = _shape_kw(data)

    def objective(trial) -> tuple[float, float]:
        _record_worker(trial)  # before anything slow (a sampler can take seconds)
        design = config.space.sample(trial, gated=config.gated, **shape)
        trial.set_user_attr("network", design.network)
        # The same design again (NSGA-II's children often repeat a parent): reuse its figures.
        for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.params == trial.params and "val_accuracy" in t.user_attrs:
                for k, v in t.user_attrs.items():
                    if k not in _OWN_ATTRS:
                        trial.set_user_attr(k, v)
                trial.set_user_attr("duplicate_of", t.number)
                _set_constraints(trial, t.user_attrs, config)
                return t.values[0], t.values[1]
        # ... or a design another worker is training now (two searches started on one study draw
        # alike): left to that trial, free; this worker draws again
        for t in trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number != trial.number and t.params == trial.params:
                trial.set_user_attr("duplicate_of", t.number)
                raise optuna.TrialPruned(f"the same design is being trained by trial {t.number}")
        try:
            result = evaluate_design(config, design, data, device=device)
        except KeyboardInterrupt:  # Optuna marks it failed; the design is trained when the search resumes
            trial.set_user_attr("failed_because", "stopped by Ctrl-C")
            _requeue(trial.study, trial, "stopped by Ctrl-C", once=False)
            raise
        except Pruned as p:
            for k, v in p.attrs.items():
                trial.set_user_attr(k, v)
            _set_constraints(trial, p.attrs, config)
            raise optuna.TrialPruned(str(p)) from None
        for k, v in result.items():
            trial.set_user_attr(k, v)
        _set_constraints(trial, result, config)
        return result["val_accuracy"], result["val_macs"]

    return objective


class _Progress:
    """One line per finished trial: counts, this trial's figures, the best admissible so far."""

    def __init__(self, config: SearchConfig, target: int, prefix: str = "", stream=None) -> None:
        self.config, self.target, self.prefix = config, target, prefix
        self.stream = stream or sys.stdout

    def __call__(self, study, trial) -> None:
        from optuna.trial import TrialState

        from .report import trial_records

        fl, ce = self.config.accuracy_floor, self.config.macs_ceiling
        recs = trial_records(study, fl, ce)
        done = sum(counts_as_trained(r["state"], r) for r in recs)
        pruned = sum(r["state"] == "PRUNED" for r in recs)
        a = trial.user_attrs
        if trial.state == TrialState.COMPLETE:
            ok = "admissible" if all(c <= 0 for c in constraint_values(a, fl, ce)) else "violates a constraint"
            this = f"val acc {100 * a['val_accuracy']:.2f}% at {a['val_macs'] / 1e3:,.1f}K MACs ({ok})"
            if a.get("duplicate_of") is not None:
                this += f", same design as trial {a['duplicate_of']}"
        elif trial.state == TrialState.PRUNED:
            this = f"pruned: {a.get('pruned_reason', '')}"
        else:
            this = f"{trial.state.name.lower()}"
        adm = [r for r in recs if r["admissible"]]
        if adm:
            best = max(adm, key=lambda r: (r["val_accuracy"], -r["val_macs"]))
            cheap = min(adm, key=lambda r: (r["val_macs"], -r["val_accuracy"]))
            b = (f"best admissible: {100 * best['val_accuracy']:.2f}% at {best['val_macs'] / 1e3:,.1f}K (trial "
                 f"{best['number']}); cheapest: {cheap['val_macs'] / 1e3:,.1f}K at {100 * cheap['val_accuracy']:.2f}% "
                 f"(trial {cheap['number']})")
        else:
            b = "no admissible design yet"
        print(f"{self.prefix}[{done}/{self.target} trained, {pruned} pruned] trial {trial.number}: {this} | {b}",
              file=self.stream, flush=True)


@dataclass
class SearchResult:
    """What :func:`run_search` returns: the study and the report it wrote."""

    study: Any
    config: SearchConfig
    records: list[dict[str, Any]]
    front: list[dict[str, Any]]
    message: str
    files: dict[str, str]

    @property
    def feasible(self) -> bool:
        return bool(self.front)


def _check_possible(config: SearchConfig, data: DataSplits) -> None:
    shape = _shape_kw(data)
    lows = []
    for d in config.space.cheapest(gated=config.gated, **shape):
        try:
            lows.append(min(d.build().cost().dynamic_macs))
        except ValueError as e:  # e.g. a head that needs a feature map on a flat stage
            raise ConfigError(f"space: design {d.network} cannot be built: {e}") from None
    low = min(lows)
    if low > config.macs_ceiling:
        raise ImpossibleConstraints(
            f"impossible constraints: the MAC ceiling {config.macs_ceiling:,.0f} is below the cheapest design of this "
            f"space ({low:,} MACs per sample, smallest stages and its first exit alone); raise macs_ceiling or make "
            "the space smaller")


def counts_as_trained(state: str, attrs: dict[str, Any]) -> bool:
    """Whether a finished trial used the training budget: designs turned away on MACs before
    training, and repeats of a design already measured, are free (they cost no training)."""
    if state == "COMPLETE":
        return attrs.get("duplicate_of") is None
    return state == "PRUNED" and "train_seconds" in attrs


def _n_finished(study) -> int:
    """Finished trials that count towards ``n_trials`` (see :func:`counts_as_trained`)."""
    from optuna.trial import TrialState

    return sum(counts_as_trained(t.state.name, t.user_attrs)
               for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


class _StopWhenTrained:
    """Stops the study once ``n`` trials have used the training budget (across all workers), or
    once every design of a space of ``size`` designs has been finished (further trials could
    only repeat them)."""

    def __init__(self, n: int, size: int | None = None) -> None:
        self.n, self.size = n, size

    def __call__(self, study, trial) -> None:
        from optuna.trial import TrialState

        if _n_finished(study) >= self.n:
            study.stop()
        elif self.size is not None:
            seen = {tuple(sorted(t.params.items())) for t in
                    study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))}
            if len(seen) >= self.size:
                study.stop()


# Free trials (pruned before training, repeats) are bounded too, so that a space whose designs
# nearly all exceed the ceiling cannot spin for ever.
_FREE_TRIALS_FACTOR = 10


def _work(config: SearchConfig, storage: Any, study_name: str, n_trials: int, *, seed: int, out: str | Path,
          prefix: str, device: str | None, data: DataSplits | None = None, heartbeat=(5, 20),
          progress: bool = True) -> None:
    """One worker: optimise until the study holds ``n_trials`` finished (complete or pruned) trials."""
    torch.set_num_threads(int(os.environ.get("EENN_SEARCH_THREADS", "1")))
    data = data if data is not None else load_search_data(config)
    study = create_study(config, storage, study_name, out=out, seed=seed, heartbeat=heartbeat)
    if _n_finished(study) >= n_trials:
        return
    cap = _FREE_TRIALS_FACTOR * n_trials + 20 - len(study.get_trials(deepcopy=False))
    if cap <= 0:
        print(f"{prefix}eenn search: the study already holds {len(study.get_trials(deepcopy=False))} trials, most of them "
              "pruned before training or repeats; stopping. Raise the MAC ceiling or shrink the space.", flush=True)
        return
    callbacks: list = [_StopWhenTrained(n_trials, config.space.size())]
    if progress:
        callbacks.append(_Progress(config, n_trials, prefix))
    _quiet_interrupts()
    study.optimize(_objective(config, data, device), n_trials=cap, callbacks=callbacks, catch=(FloatingPointError,))


def _worker_main(config_dict: dict, storage: str, study_name: str, n_trials: int, seed: int, out: str, prefix: str,
                 device: str | None, heartbeat, progress: bool) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config = SearchConfig.from_dict(config_dict)
    try:
        _work(config, storage, study_name, n_trials, seed=seed, out=out, prefix=prefix, device=device,
              heartbeat=heartbeat, progress=progress)
    except KeyboardInterrupt:  # Ctrl-C reaches every worker: the parent says it once
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # and a second one cannot interrupt the exit
        sys.exit(130)


def run_search(config: SearchConfig, *, storage: str | None = None, study_name: str | None = None,
               n_trials: int | None = None, workers: int = 1, out: str | Path = "search-out", device: str | None = None,
               progress: bool = True, heartbeat: tuple[int, int] | None = (5, 20), report: bool = True) -> SearchResult:
    """Search until the study holds ``n_trials`` trained trials (default: the config's; designs
    pruned before training and repeats of a measured design are free, up to a bound), with
    ``workers`` local processes on one study, then write the report to ``out``.

    ``storage`` is an Optuna RDB URL (default ``sqlite:///<out>/study.db``; ``"memory"`` keeps it
    in this process only, one worker). Re-running the same call continues the same study: the
    trials already trained count towards ``n_trials``; trials a killed run left RUNNING are failed
    and their designs queued again, as are those of trials stopped by Ctrl-C, and the sampler is seeded anew (from ``config.seed`` and the
    number of trials the study holds) so that it does not replay the designs drawn before.
    Raises :class:`ImpossibleConstraints` before any training when the MAC ceiling is below the
    cheapest design of the space."""
    from .report import summarise, write_report

    out = Path(out)
    n_trials = config.trials if n_trials is None else int(n_trials)
    if n_trials < 1 or workers < 1:
        raise ConfigError(f"need trials >= 1 and workers >= 1, got {n_trials} and {workers}")
    out.mkdir(parents=True, exist_ok=True)
    url = storage or default_storage(out)
    if url == "memory" and workers > 1:
        raise ConfigError("workers > 1 need a shared storage: give an RDB URL (sqlite:///..., postgresql://...)")
    name = study_name or config.name
    data = load_search_data(config)
    _check_possible(config, data)
    st = _storage(url, out, heartbeat) if url == "memory" else url
    study = create_study(config, st, name, out=out, heartbeat=heartbeat)  # created once, before the workers race
    recovered = _recover_dead_trials(study)  # trials a killed run left RUNNING
    trials_before = len(study.get_trials(deepcopy=False))
    seeds = [_sampler_seed(config.seed, w, trials_before) for w in range(workers)]
    if progress:
        have = _n_finished(study)
        print(f"eenn search: study {name!r} in {url if url != 'memory' else 'memory'}; {have} of {n_trials} trials "
              f"already finished; {workers} worker(s); space of {config.space.size():,} designs; constraints: "
              f"val accuracy >= {config.accuracy_floor:.4f}, expected MACs <= {config.macs_ceiling:,.0f}", flush=True)
        if config.space.size() < n_trials:
            print(f"eenn search: the space holds {config.space.size():,} designs, fewer than the {n_trials} trials asked: "
                  "the search stops once every design is measured", flush=True)
        for number, why, queued in recovered:
            print(f"eenn search: trial {number} was left running by a worker that stopped ({why}): marked failed"
                  + ("; its design is queued again" if queued else ""), flush=True)
    if workers == 1:
        _work(config, study._storage if url == "memory" else url, name, n_trials, seed=seeds[0], out=out, prefix="",
              device=device, data=data, heartbeat=heartbeat, progress=progress)
    else:
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_worker_main, args=(config.to_dict(), url, name, n_trials, seeds[w],
                                                        str(out), f"[worker {w}] ", device, heartbeat, progress))
                 for w in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        bad = [p.exitcode for p in procs if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"{len(bad)} search worker(s) failed (exit codes {bad}); the study keeps what they finished")
    import optuna

    study = optuna.load_study(study_name=name, storage=study._storage if url == "memory" else _storage(url, out, None))
    records, front, message = summarise(study, config)
    files = write_report(out, study, config, records, front, message, study_name=name, storage=url) if report else {}
    return SearchResult(study, config, records, front, message, files)
