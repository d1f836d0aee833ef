"""Server-side set-up the flows rely on: the automation that marks dead runs as crashed.

A flow run whose machine or worker dies stops reporting, but the server would show it as
Running for ever. The deployments in prefect.yaml make every run send a heartbeat event
(PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30); this automation moves a run that has sent a heartbeat
and then neither another one nor a final state within ``within`` seconds to Crashed. Its
training backup stays; rerunning the flow resumes the training from it.

    python -m flows.setup [--within 90]      (scripts/prefect-up.sh runs it)
"""

from __future__ import annotations

import argparse
from datetime import timedelta

NAME = "deepnets: crash runs that stopped sending heartbeats"


def ensure_zombie_automation(within_s: int = 90) -> str:
    """Create the automation unless one with its name exists; returns its id."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    try:
        return str(Automation.read(name=NAME).id)
    except ValueError:
        pass  # not there yet
    final = {f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled",
                                                        "Crashed")}
    automation = Automation(
        name=NAME,
        description="Marks a flow run Crashed when its heartbeats stop (its worker or machine "
                    "died); rerun it to resume the training from its backup.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *final},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"no heartbeat for {within_s} s: the worker or its machine stopped",
        )],
    )
    return str(automation.create().id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--within", type=int, default=90,
                        help="seconds without a heartbeat before a run is marked Crashed")
    args = parser.parse_args(argv)
    print(f"automation {ensure_zombie_automation(args.within)}: {NAME}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
