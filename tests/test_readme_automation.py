"""The README's drift automation is one Prefect accepts: its YAML validates as an automation."""

import re

import yaml

from tests.conftest import ROOT


def test_the_readme_drift_automation_is_a_valid_prefect_automation():
    from prefect.events.schemas.automations import AutomationCore

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```yaml\n(# drift-alert\.yaml.*?)```", readme, re.S)
    assert block, "the README has no drift-alert.yaml block"
    automation = AutomationCore.model_validate(yaml.safe_load(block.group(1).replace("<id of a notification block, e.g. Slack or email>",
                                                                                     "00000000-0000-0000-0000-000000000000")))
    assert automation.trigger.expect == {"thermocal.calibration.drifted"}
    assert automation.trigger.match.root == {"prefect.resource.id": "thermocal.sensor.*"}
    assert automation.actions[0].type == "send-notification"
