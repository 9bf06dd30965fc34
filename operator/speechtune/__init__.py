"""speechtune: tune speech models with Optuna, locally or as Kubernetes Jobs.

Only the dependency-free metric protocol is imported here, so a trainer can
``from speechtune import report`` without pulling in Optuna or Kubernetes.
"""

from speechtune.protocol import report

__all__ = ["report"]
