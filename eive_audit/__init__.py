"""eive-audit: dataset audits of transformer detectors with EIVE instance saliency.

One import namespace over the folders of the design card, each a layer (setuptools `package-dir` maps
`eive_audit.<layer>` to the top-level folder of that name, so the folders stay where they are):

- `eive_audit.cli` (this folder): the `eive-audit` command line, the top layer;
- `eive_audit.flows` (flows/): Prefect flows that plan, submit and gather;
- `eive_audit.pipeline` (pipeline/): the engine, from sources through models, matching and metrics to findings;
- `eive_audit.explainers` (explainers/): one file per saliency method, one registry;
- `eive_audit.storage` (storage/): Parquet tables, map encoding, the DuckDB catalog;
- `eive_audit.reports` (reports/): HTML report, Prefect artifacts, FiftyOne push.

Imports go one way: cli -> flows -> pipeline, explainers, storage, reports; reports -> storage;
explainers -> pipeline.models, pipeline.config; reports may also use pipeline.geometry; storage imports none of
the others (tests/test_imports.py checks these rules and that no import cycle exists).
"""
