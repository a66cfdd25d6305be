#!/bin/bash
# Test job: each rank is sent SIGTERM before Python even starts (as when mlx.launch stops
# the ranks because one failed at once), then runs launch/run.py with the job's arguments.
# Started by launch/start.py, the signal waits (blocked, inherited) for the rank's signal
# thread; started by a bare mlx.launch, it kills the rank without a word.
kill -TERM $$
exec "${PIPELINE_TEST_PYTHON:-python3}" "$(dirname "$0")/../../launch/run.py" "$@"
