import sys

import pytest


@pytest.fixture(autouse=True)
def no_wandb_run_left_open():
    """A wandb run left open by one test breaks the next: ``wandb.init`` hands that stale run back instead of starting
    one (so the next run logs into the old run's folder), and finishing it later puts the old test's stdout writer
    back on the current ``sys.stdout`` (the next test's printed output goes elsewhere)."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()
        pytest.fail("this test left a wandb run open (a Trainer neither closed nor garbage-collected)")
