"""Names of the FiftyOne review views a push saves, and the command that opens one.

The push (`reports.fiftyone_push`) saves them; the HTML report, the Prefect artifacts and the CLI point to
them. Kept apart from the push so those can name a view without importing FiftyOne (which starts its
database at import). A classification run's views have the same names: its outcomes correct, wrong and missed
play tp, fp and fn (`pipeline.config.OUTCOME_ROLES`), so `tp-off-object` holds its correct predictions flagged off
their object, `fp-background` its wrong ones driven by background, `missed` the true classes of wrong ones.
"""

from __future__ import annotations

import shlex

TP_OFF_OBJECT = "tp-off-object"
FP_BACKGROUND = "fp-background"
MISSED = "missed"
LOWEST_INSERTION_AUC = "lowest-insertion-auc"


def view_name(run_id: str, suffix: str) -> str:
    """The saved view `suffix` (one of the constants above) of run `run_id`."""
    return f"{run_id}-{suffix}"


def explainer_view(run_id: str, explainer: str) -> str:
    """The instance dataset's view of one explainer's maps."""
    return f"{run_id}-explainer-{explainer}"


def cue_view(run_id: str, cue_id: str) -> str:
    """The view of the instances the findings put in one candidate cue."""
    return f"{run_id}-cue-{cue_id}"


def open_command(dataset: str, view: str | None = None) -> str:
    """The shell command that serves the FiftyOne App on `dataset` (opened on `view`), quoted for a shell."""
    command = f"eive-audit app --dataset {shlex.quote(dataset)}"
    return f"{command} --view {shlex.quote(view)}" if view else command
