"""The method: schedules, objectives, the denoiser contract, experts, the step plan and the trainer."""
