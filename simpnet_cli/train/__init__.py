"""Training one run: the data on the device, the solvers, the (captured) step, checkpoints and the loop."""
