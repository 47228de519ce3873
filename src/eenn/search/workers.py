"""The study's storage and the worker processes on it: the storage opened (an RDB whose
stale-trial check knows worker processes); trials that a dead worker left RUNNING, how a dead
worker is told from a live one, and how its trials are failed and their designs queued again;
and a worker stopped by Ctrl-C, which leaves no traceback (used by :mod:`eenn.search.study`)."""
from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import socket
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

from ..config import ConfigError

# --------------------------------------------------------------------- trials of dead workers
# Optuna marks a trial RUNNING when it creates it; the worker can die any time after (killed, out
# of memory, machine lost). Such a trial is failed and its design queued again, once, so that a
# resumed search (or a sibling worker) neither keeps it RUNNING for ever nor loses the design.
# SQLite keeps timestamps in whole seconds: an age read from two of them may be up to a second
# short or long, so a heartbeat counts as stale only once it is a second past the grace period.
_CLOCK_SLACK = 1.0

# Attributes that describe one trial rather than its design's figures (not copied to a repeat).
_OWN_ATTRS = ("network", "worker", "worker_process", "retried_from", "retry_reason", "failed_because")


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state, start time in clock ticks after boot)`` of process ``pid`` from /proc; None when
    that cannot be read (no such process, or no /proc on this system)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # what follows the command name (which may hold spaces)
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _this_process(heartbeat: int | None = None) -> dict[str, Any]:
    """Who runs this trial: host, pid and start time (so a reused pid is not taken for it), plus
    the boot and pid namespace that make a pid meaningful, and whether it sends heartbeats."""
    pid = os.getpid()
    stat = _proc_stat(pid)
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = None
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = None
    return {"host": socket.gethostname(), "pid": pid, "start": stat[1] if stat else None, "boot": boot,
            "pid_ns": pid_ns, "heartbeat": heartbeat}


def _record_worker(trial) -> None:
    """First thing in a trial: name its worker, so that a later run can tell whether it is alive."""
    storage = trial.study._storage
    me = _this_process(storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None)
    trial.set_user_attr("worker_process", me)
    trial.set_user_attr("worker", f"{me['host']}:{me['pid']}")


def _process_gone(proc: dict[str, Any]) -> bool | None:
    """Whether the worker process ``proc`` (recorded on this machine) has ended: no process with
    its pid, a zombie, or a pid now held by a process that started at another time. None when
    this cannot be told (then its heartbeat decides)."""
    pid = proc.get("pid")
    if not isinstance(pid, int) or pid <= 0 or os.name == "nt":  # Windows' os.kill would end the process
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # a process of another user holds the pid: look at its start time
    except OSError:
        return None
    stat = _proc_stat(pid)
    if stat is None:
        return False  # no /proc: the pid exists, take it for the worker
    state, started = stat
    return state in ("Z", "X", "x") or (proc.get("start") is not None and started != proc["start"])


def _rdb(storage):
    """The RDB storage under ``storage`` (a study wraps it in Optuna's cache), or None."""
    import optuna

    for s in (storage, getattr(storage, "_backend", None)):
        if isinstance(s, optuna.storages.RDBStorage):
            return s
    return None


def _grace(rdb) -> int | None:
    interval = getattr(rdb, "heartbeat_interval", None)
    if not interval:
        return None
    return getattr(rdb, "grace_period", None) or 2 * interval


def _heartbeats(storage, trial_ids: list[int]) -> tuple[datetime, dict[int, datetime]]:
    """The database's clock now, and the last heartbeat of each of ``trial_ids`` that has one
    (Optuna's ``trial_heartbeats`` table; both read from the same clock)."""
    import sqlalchemy as sa

    beats = sa.table("trial_heartbeats", sa.column("trial_id"), sa.column("heartbeat", sa.DateTime))
    with storage.engine.connect() as conn:
        now = conn.execute(sa.select(sa.func.now())).scalar()
        rows = conn.execute(sa.select(beats.c.trial_id, beats.c.heartbeat).where(beats.c.trial_id.in_(trial_ids))).all()
    return now.replace(tzinfo=None), {tid: beat.replace(tzinfo=None) for tid, beat in rows}


def _dead_trials(storage, study_id: int) -> list[tuple[Any, str]]:
    """The RUNNING trials of the study whose worker is dead, each with the reason. A trial whose
    worker recorded itself on this machine is dead exactly when that process is gone, and is
    never touched while the process lives (whatever its heartbeat says). Any other trial (worker
    on another machine, killed before it recorded its worker, or a system where a process cannot
    be looked up) is dead when its last heartbeat
    is older than the grace period plus a second (both times from the database's clock); one
    that never beat counts from its start. Without heartbeats only the first rule applies."""
    from optuna.trial import TrialState

    running = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return []
    rdb = _rdb(storage)
    grace = _grace(rdb)
    now, beats = _heartbeats(rdb, [t._trial_id for t in running]) if grace else (None, {})
    me = _this_process()
    dead = []
    for t in running:
        proc = t.user_attrs.get("worker_process")
        proc = proc if isinstance(proc, dict) else None
        if proc is not None and all(proc.get(k) == me[k] for k in ("host", "boot", "pid_ns")):
            gone = _process_gone(proc)
            if gone:
                dead.append((t, f"its worker process {proc.get('pid')} on {proc.get('host')} is gone"))
            if gone is not None:
                continue
        if grace is None or (proc is not None and not proc.get("heartbeat")):
            continue  # no heartbeats to go by: a worker elsewhere may still be at it
        beat = beats.get(t._trial_id)
        if beat is not None:
            age, what = (now - beat).total_seconds(), "no heartbeat for"
        elif t.datetime_start is not None:
            # datetime_start is the starting process's local time; compared with this process's
            age, what = (datetime.now() - t.datetime_start).total_seconds(), "no heartbeat ever, started"
        else:
            continue
        if age >= grace + _CLOCK_SLACK:
            dead.append((t, f"{what} {age:.0f} s ago (grace period {grace} s)"))
    return dead


def _requeue(study, trial, why: str, *, once: bool = True) -> bool:
    """Queue a dead trial's design again (the same parameters), once: a retry that dies too is not
    retried (``once=False``, for a trial stopped by Ctrl-C rather than killed by its design: it
    is), nor is a trial that died before drawing any parameter (the sampler draws anew)."""
    if not trial.params or (once and trial.user_attrs.get("retried_from") is not None):
        return False
    if any(t.user_attrs.get("retried_from") == trial.number for t in study.get_trials(deepcopy=False)):
        return False  # another process queued it already
    study.enqueue_trial(dict(trial.params), user_attrs={"retried_from": trial.number, "retry_reason": why})
    return True


def _retry_dead_trial(study, trial) -> None:
    """Optuna's callback for a trial its stale check failed (the check is :func:`_dead_trials`)."""
    _requeue(study, trial, trial.user_attrs.get("failed_because", "its heartbeat stopped"))


def _recover_dead_trials(study) -> list[tuple[int, str, bool]]:
    """Fail the trials of ``study`` that a dead worker left RUNNING and queue their designs again;
    ``(number, why, queued again)`` of each trial failed here (not of those another process
    failed first)."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage = study._storage
    if _rdb(storage) is None:
        return []  # in memory: the study lives and dies with its only process
    failed = []
    for trial, why in _dead_trials(storage, study._study_id):
        try:
            storage.set_trial_user_attr(trial._trial_id, "failed_because", why)
            if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:
            continue  # it finished meanwhile, or another process failed it first
        failed.append((trial.number, why, _requeue(study, trial, why)))
    return failed


@functools.lru_cache(maxsize=None)
def _storage_class():
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError

    class SearchStorage(optuna.storages.RDBStorage):
        """Optuna's RDB storage whose stale-trial check, which every worker runs before each of its
        trials, applies :func:`_dead_trials` (Optuna's own skips trials that never beat, and knows
        nothing of worker processes)."""

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            ids = []
            for trial, why in _dead_trials(self, study_id):
                try:
                    self.set_trial_user_attr(trial._trial_id, "failed_because", why)
                except UpdateFinishedTrialError:
                    continue
                ids.append(trial._trial_id)
            return ids

    return SearchStorage


class _NoInterruptTrace(logging.Filter):
    """Drops what Optuna logs for a trial stopped by Ctrl-C (the command says it in one line): the
    record with its traceback and the "Trial N failed with value None." line after it; a trial
    that fails for any other reason is still logged in full."""

    def __init__(self) -> None:
        super().__init__()
        self._stopped: set[str] = set()  # trial numbers whose second line is still to come

    def filter(self, record: logging.LogRecord) -> bool:
        trial = re.match(r"Trial (\d+) failed", str(record.msg))
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            if trial:
                self._stopped.add(trial.group(1))
            return False
        if trial and str(record.msg).startswith(f"Trial {trial.group(1)} failed with value") \
                and trial.group(1) in self._stopped:
            self._stopped.discard(trial.group(1))
            return False
        return True


def _quiet_interrupts() -> None:
    log = logging.getLogger("optuna.study._optimize")  # where Optuna logs a failed trial
    if not any(isinstance(f, _NoInterruptTrace) for f in log.filters):
        log.addFilter(_NoInterruptTrace())


def default_storage(out: str | Path) -> str:
    return f"sqlite:///{Path(out).resolve() / 'study.db'}"


def _storage(url: str | None, out: str | Path, heartbeat: tuple[int, int] | None):
    import optuna

    url = url or default_storage(out)
    if url == "memory":
        return optuna.storages.InMemoryStorage()
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the heartbeat options
        kw: dict[str, Any] = {}
        if heartbeat:
            # Before each trial, every worker fails the trials of dead workers (_dead_trials) and
            # queues their designs again, once (the callback's name changed in Optuna 4.9).
            cls = optuna.storages.RDBStorage
            key = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in
                   inspect.signature(cls.__init__).parameters else "failed_trial_callback")
            kw = {"heartbeat_interval": heartbeat[0], "grace_period": heartbeat[1], key: _retry_dead_trial}
        try:
            return _storage_class()(url, engine_kwargs=engine, **kw)
        except Exception as e:  # noqa: BLE001 - SQLAlchemy's and the database's errors, one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"cannot open the study storage {url!r} ({type(e).__name__}: {first}): give an RDB URL "
                              "such as sqlite:///runs/search/study.db; a file that is not an Optuna database must be "
                              "moved away first") from None
