"""lm-eval task YAMLs shipped with the project (``evaluation.tasks.SHIPPED_TASKS``) and their glue (``utils``)."""
