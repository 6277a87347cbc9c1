"""Stand-alone tools: the memory planner and the diversity metrics."""
