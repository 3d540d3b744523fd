"""Read-only commands over an output: plan preview, status, verify, inspect, plot."""
