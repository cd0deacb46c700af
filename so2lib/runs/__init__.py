"""Run directories and their manifest (rundir), the headless runner, parameter checks, run sizes from power (power), progress output, and the real-model smoke profile."""
