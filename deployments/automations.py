"""Prefect automations that distributed mode relies on; run once per Prefect server (scripts/cluster.sh does):

    python deployments/automations.py [--heartbeat-s 30]

A flow run whose process dies with its machine or its worker (kill -9, OOM, a lost host) would stay
Running (or Pending, when the worker died while starting it) for ever, and the parent waiting for that
shard with it. Both automations watch runs of deployments only (the workers' environment sets the
heartbeat; a flow a CLI runs heartbeats at Prefect's default, 180 s). Prefect's documented answer is heartbeats + an automation, not our own watchdog
(https://docs.prefect.io/v3/advanced/detect-zombie-flows): flow runs emit ``prefect.flow-run.heartbeat``
every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (the workers' environment; at least 30), and

* "smsflow: crash runs without heartbeats": no heartbeat and no final state within 3 heartbeats of
  the last one (or of Running, for a run killed before its first heartbeat arrived) -> Crashed;
* "smsflow: crash command runs without heartbeats": the same for runs an ``smsflow`` command started against
  the server (tag ``smsflow-cli``; the command heartbeats every 30 s whatever the environment says), e.g. the
  campaign run of a command killed with -9;
* "smsflow: crash runs stuck in Pending": a run Pending for longer than ``pending_s`` without Running
  (or a final state) -> Crashed (its worker died before it started the process).

The parent (tasks/shards.dispatch) then starts the shard's next attempt. Creating them again replaces
them (same names).
"""
from __future__ import annotations

import argparse
from datetime import timedelta

from smsflow.processes import CLI_HEARTBEAT_S, CLI_TAG

HEARTBEAT_NAME = "smsflow: crash runs without heartbeats"
COMMAND_NAME = "smsflow: crash command runs without heartbeats"
PENDING_NAME = "smsflow: crash runs stuck in Pending"
# a run killed after it started but before its first heartbeat reached the server must be caught too: the
# window opens at Running as well as at each heartbeat
ARMED_BY = {"prefect.flow-run.Running", "prefect.flow-run.heartbeat"}
FINAL = {"prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
         "prefect.flow-run.Crashed"}


def automations(heartbeat_s: int = 30, pending_s: int = 120):
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    runs = ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]})
    # runs of deployments only (workers set the heartbeat frequency): a flow run a CLI or a script runs
    # against the server heartbeats at Prefect's default (180 s) and must never be crashed by this
    of_deployments = ResourceSpecification({"prefect.resource.role": "deployment"})
    # runs an smsflow command started against the server (tagged, heartbeat every CLI_HEARTBEAT_S whatever the
    # environment says): a command killed with -9 would leave its campaign run Running for ever
    of_commands = ResourceSpecification({"prefect.resource.id": f"prefect.tag.{CLI_TAG}", "prefect.resource.role": "tag"})
    command_window = 3 * max(heartbeat_s, CLI_HEARTBEAT_S)
    return [
        Automation(
            name=HEARTBEAT_NAME,
            description="Flow runs whose process died (no heartbeat) are marked Crashed; smsflow starts the "
                        "shard again.",
            trigger=EventTrigger(after=ARMED_BY, expect={"prefect.flow-run.heartbeat", *FINAL},
                                 match=runs, match_related=of_deployments, for_each={"prefect.resource.id"}, posture=Posture.Proactive,
                                 threshold=1, within=timedelta(seconds=3 * heartbeat_s)),
            actions=[ChangeFlowRunState(state=StateType.CRASHED, force=True,
                                        message=f"no heartbeat for {3 * heartbeat_s} s: the flow-run process died")],
        ),
        Automation(
            name=COMMAND_NAME,
            description="Flow runs of an smsflow command whose process died (kill -9, a lost host) are marked Crashed; "
                        "running the command again resumes the campaign.",
            trigger=EventTrigger(after=ARMED_BY, expect={"prefect.flow-run.heartbeat", *FINAL},
                                 match=runs, match_related=of_commands, for_each={"prefect.resource.id"},
                                 posture=Posture.Proactive, threshold=1, within=timedelta(seconds=command_window)),
            actions=[ChangeFlowRunState(state=StateType.CRASHED, force=True,
                                        message=f"no heartbeat for {command_window} s: the smsflow command died")],
        ),
        Automation(
            name=PENDING_NAME,
            description="Flow runs a worker died while starting are marked Crashed; smsflow starts the shard again.",
            trigger=EventTrigger(after={"prefect.flow-run.Pending"}, expect={"prefect.flow-run.Running", *FINAL},
                                 match=runs, match_related=of_deployments, for_each={"prefect.resource.id"}, posture=Posture.Proactive,
                                 threshold=1, within=timedelta(seconds=pending_s)),
            actions=[ChangeFlowRunState(state=StateType.CRASHED, force=True,
                                        message=f"Pending for {pending_s} s: its worker died before starting it")],
        ),
    ]


def install(heartbeat_s: int = 30, pending_s: int = 120) -> list[str]:
    """Create (or replace) the automations on the server of PREFECT_API_URL; returns their ids."""
    from prefect.automations import Automation

    ids = []
    for a in automations(heartbeat_s, pending_s):
        try:
            Automation.read(name=a.name).delete()
        except ValueError:
            pass
        ids.append(str(a.create().id))
    return ids


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heartbeat-s", type=int, default=30, help="PREFECT_FLOWS_HEARTBEAT_FREQUENCY of the workers")
    ap.add_argument("--pending-s", type=int, default=120)
    args = ap.parse_args()
    for i in install(args.heartbeat_s, args.pending_s):
        print(i)
