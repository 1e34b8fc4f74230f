"""Review surfaces: HTML report and plots, Prefect artifacts, FiftyOne push. May import `storage` only."""
