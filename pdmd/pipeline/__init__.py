"""Real models end to end: the run, prompt encoding and export."""
