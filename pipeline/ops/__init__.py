"""Read-only commands over an output: plan preview, status, verify, inspect, plot.

The commands' defaults live here, so that the CLI shows them without importing the modules behind them.
"""

INSPECT_ROWS = 3  # rows shown decoded per shard
PLOT_SAMPLE = 2000  # rows drawn for the PCA picture
PLOT_LABELS = 40  # points labelled with their text
