"""Training one run: the data on the device (data), the solvers (solvers), the (captured) step, checkpoints, the
loop over an explicit TrainState (loop) and what happens around it: resume, guards, progress, loggers (callbacks)."""
