"""Design search under an accuracy floor and a MAC ceiling (NACHOS, METHODS.md §4), on Optuna.

    from eenn.search import load_config, run_search
    result = run_search(load_config("configs/search_digits.yaml"), n_trials=12, out="runs/search")
    for d in result.front:            # admissible, non-dominated, by expected MACs
        print(d["number"], d["val_accuracy"], d["val_macs"], d["test_accuracy"])

The space is data (:class:`SearchSpace`, a ``space:`` section in YAML); a trial trains one design
briefly, calibrates its exit thresholds on validation and repairs them against the ceiling; the
study lives in Optuna storage (SQLite by default), so a search resumes and workers share it.
"""
from .candidate import evaluate_design, load_search_data, repair_thresholds
from .config import SAMPLERS, SearchConfig, load_config
from .report import design_config, pareto_designs, pareto_front, plot_trials, trial_records, write_report
from .space import ConfigError, Design, SearchSpace
from .study import ImpossibleConstraints, SearchResult, constraint_values, create_study, run_search

__all__ = ["ConfigError", "Design", "ImpossibleConstraints", "SAMPLERS", "SearchConfig", "SearchResult", "SearchSpace",
           "constraint_values", "create_study", "design_config", "evaluate_design", "load_config", "load_search_data",
           "pareto_designs", "pareto_front", "plot_trials", "repair_thresholds", "run_search", "trial_records",
           "write_report"]
