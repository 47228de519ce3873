"""Deciding where each sample exits: rules (``rules``), threshold calibration on the validation
split (``calibrate``) and the first-correct-exit oracle (``oracle``)."""
from .calibrate import Goal, calibrate, evaluate_policy, msdnet_distribution, report_goal
from .oracle import captured_share, oracle, oracle_exit
from .rules import (Decision, Scores, as_thresholds, decide, get_policy, list_policies, policy_scores,
                    register_policy, route)

__all__ = ["Decision", "Goal", "Scores", "as_thresholds", "calibrate", "captured_share", "decide",
           "evaluate_policy", "get_policy", "list_policies", "msdnet_distribution", "oracle", "oracle_exit",
           "policy_scores", "register_policy", "report_goal", "route"]
