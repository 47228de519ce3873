"""Deciding where each sample exits: an exit policy as an object (``policy``: rule, thresholds,
options, fallback), the rules (``rules``), the one exit loop every runner uses (``loop``),
threshold calibration on the validation split (``calibrate``) and the first-correct-exit oracle
(``oracle``)."""
from .calibrate import Goal, calibrate, evaluate_policy, msdnet_distribution, report_goal
from .loop import Answers, Decision, Running, decide, run_exits
from .oracle import captured_share, oracle, oracle_exit
from .policy import BoundPolicy, ExitPolicy, as_policy, policy_scores
from .rules import Scores, as_thresholds, get_policy, list_policies, register_policy, route

__all__ = ["Answers", "BoundPolicy", "Decision", "ExitPolicy", "Goal", "Running", "Scores", "as_policy",
           "as_thresholds", "calibrate", "captured_share", "decide", "evaluate_policy", "get_policy", "list_policies",
           "msdnet_distribution", "oracle", "oracle_exit", "policy_scores", "register_policy", "report_goal", "route",
           "run_exits"]
