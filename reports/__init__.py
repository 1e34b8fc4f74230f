"""Review surfaces: HTML report and plots, Prefect artifacts, FiftyOne push. May import `storage`, and
`pipeline.geometry` (where a stored map lies on its image)."""
