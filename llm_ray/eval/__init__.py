"""Evaluation: metrics as plain functions, a document scorer, tasks, the report and `llm-ray eval`."""
