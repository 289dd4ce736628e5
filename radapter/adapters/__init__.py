"""The R-Adapter method: adapters, where they go, how they fold, train and are stored.

- ``config``: :class:`RAdapterConfig`, everything that defines a set of adapters;
- ``adapter``: the residual linear branch ``x + s * A x`` with dropping and its EMA copy;
- ``sites`` / ``placement`` (+ ``placements/*.json``): where adapters attach and how each kind folds;
- ``inject``: attaching named adapter sets to a model; ``adapter_sets``: switch, delete, unload;
- ``merge``: the weight-space ensemble (fold at alpha, per tower); ``ema``: the temporal ensemble;
- ``checkpoint``: adapter files; ``fingerprint``: the base model they belong to; ``export``: merged
  open_clip folders; ``frozen_layers``: leaner autograd through the frozen base while training.

Every public name is importable from ``radapter``.
"""

import lazy_loader as _lazy

# Each module loads on first attribute access (``radapter.adapters.merge`` without an import).
__getattr__, __dir__, _ = _lazy.attach(__name__, [
    "adapter", "adapter_sets", "checkpoint", "config", "ema", "export", "fingerprint", "frozen_layers", "inject",
    "merge", "placement", "sites",
])
