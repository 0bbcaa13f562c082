"""The "continue with:" hint names the command that really continues the run: under a launcher that runs
training stages itself (``python -m t2i_train.pipeline`` sets it), that launcher's command."""

from __future__ import annotations

from pathlib import Path

from t2i_train.run_state import resume_command, set_continue_command


def test_a_training_run_is_continued_with_its_own_overrides_and_resume_auto() -> None:
    command = resume_command(Path("runs/a"), ["model=muse", "resume=never", "hydra.run.dir=old"])
    assert command == "python -m t2i_train model=muse resume=auto hydra.run.dir=runs/a"


def test_a_launcher_command_replaces_the_hint_until_it_is_reset() -> None:
    pipeline = "python -m t2i_train.pipeline --recipe gill --out 'outputs/x y'"
    set_continue_command(pipeline)
    try:
        assert resume_command(Path("outputs/x y/gill")) == pipeline
    finally:
        set_continue_command(None)
    assert "pipeline" not in resume_command(Path("r"))
