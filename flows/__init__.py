"""Prefect orchestration of the DVC pipeline.

    flows.pipeline   the pipeline and on-demand training flows (deployed by prefect.yaml)
    flows.workspace  every DVC call and params.yaml edit under one workspace lock
    flows.compare    `deepnets compare`: results across commits, tags and experiments
    flows.setup      the server-side automation that marks dead runs as crashed

See docs/orchestration.md.
"""
