"""Process-level settings of the heavy jobs (training, scoring): nothing here imports the rest of recsys."""
