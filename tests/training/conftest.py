"""The one-process launches of test_families.py and test_overfit.py, side by side.

Each is a single-threaded process, so started together they use both cores of a
2-core machine instead of one after the other."""

from __future__ import annotations

import pytest

from tests.runs import Launch, start_runs
from tests.training.test_families import family_runs_spec
from tests.training.test_overfit import overfit_run_spec


@pytest.fixture(scope="session")
def single_process_launches(tmp_path_factory, train_data, sp_model) -> dict[str, Launch]:
    """{"families": its launch, "overfit": its launch}, both started; each test module's
    fixture waits for its own (its files beside its ``directory``)."""
    families = tmp_path_factory.mktemp("families")
    overfit = tmp_path_factory.mktemp("overfit")
    launches = {"families": start_runs(1, family_runs_spec(families, train_data),
                                       families / "launch"),
                "overfit": start_runs(1, overfit_run_spec(overfit, sp_model),
                                      overfit / "launch")}
    yield launches
    for launch in launches.values():
        if launch.process.poll() is None:
            launch.process.kill()
            launch.process.wait()
