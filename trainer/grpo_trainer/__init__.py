"""grpo_trainer: the GRPO trainer, its rewards and grader, and the `grpo` command line."""

__version__ = "0.1.0"
