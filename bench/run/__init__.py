"""Running sweeps: sweep files -> plan -> runner -> results, executors, training, estimates and perf."""
