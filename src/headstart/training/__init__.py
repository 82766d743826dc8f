"""Training: parameter groups and schedules, the feature cache, the loop, fit, resume, lr-find, run folders."""
