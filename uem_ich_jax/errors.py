"""The project's errors that the CLI reports alike whichever command raised them."""

import signal
from typing import Any

# Exit status of `uem-ich` after a preemption notice: 128 + SIGTERM, as a shell
# reports a process that SIGTERM ended, so a chain of stages stops too.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class InputError(ValueError):
  """Bad input at a boundary (file, dataset, config); the message names it and the reason."""


class TrainingPreempted(RuntimeError):
  """Training saved the step in progress and stopped on a preemption notice (SIGTERM).

  Raised rather than returned, so that a caller that chains stages or folds
  stops there too. Running the same training again resumes from `step`.
  """

  def __init__(self, step: int, workdir: Any):
    super().__init__(
        f"stopped by SIGTERM after step {step}, which is saved in {workdir}; run the same"
        " training again to resume"
    )
    self.step = step
    self.workdir = workdir
