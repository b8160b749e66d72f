"""Pager hooks for the tests of `erasure.on_failure_callback`.

`page` (policy: `pager_probe:page`) appends one JSON line per call to the file named by
$PAGER_PROBE_FILE: what a pager would receive. `notifier` is an Airflow notifier instance, the other
kind of hook the policy may name. (Under dag.test() a DAG callback gets the serialized DAG, on which a
BaseNotifier cannot render its templates; in a deployment the dag processor gives the parsed DAG.)
"""

from __future__ import annotations

import json
import os
from typing import Any

from airflow.sdk import BaseNotifier


def page(context: Any) -> None:
    ti = context.get("ti")
    with open(os.environ["PAGER_PROBE_FILE"], "a", encoding="utf-8") as out:
        out.write(json.dumps({"dag_id": context["dag"].dag_id, "run_id": context["run_id"],
                              "reason": context.get("reason"), "task_id": getattr(ti, "task_id", None)}) + "\n")


class FilePager(BaseNotifier):
    template_fields = ("message",)

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def notify(self, context: Any) -> None:
        page(context)


notifier = FilePager("{{ dag.dag_id }} failed: run {{ run_id }}")
