"""How the method runs: processes (FSDP2), checkpoints, the run directory, optimizers, compile and memory layout."""
