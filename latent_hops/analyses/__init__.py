"""The analyses: one module each, registered with ``latent_hops.analysis.register``.

Every module here is imported by ``latent_hops.analysis.analyses()``, so a new module is
all it takes to add an analysis to the CLI, ``stages`` and the report.
"""
