"""Root cause: local vs inherited error by replay, drill-down into the culprit, noise injection.

``recorder`` keeps one forward pass's module inputs and outputs in memory; ``rootcause``
replays the target configuration of each module on the baseline's inputs and names the root
cause; ``drilldown`` goes one level down (children, attention operations, norm eps, weights);
``inject`` measures how noise added at one tap propagates.
"""
