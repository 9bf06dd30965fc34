"""`python -m speechtune.k8s [kopf run options]`: the operator.

Defaults: every namespace, standalone (one replica: no peering), liveness on
127.0.0.1:8081/healthz, metrics on $SPEECHTUNE_METRICS_ADDRESS (127.0.0.1):$SPEECHTUNE_METRICS_PORT
(8080)/metrics. In a pod both must listen on 0.0.0.0: the Helm chart says so.
Extra arguments go to `kopf run`, e.g. `-n team-a` instead of all namespaces.
"""

from __future__ import annotations

import os
import sys

from kopf.cli import main as kopf_main


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("SPEECHTUNE_METRICS_PORT", "8080")
    scope = [] if any(arg in ("-n", "--namespace", "-A", "--all-namespaces") or arg.startswith("--namespace=")
                      for arg in argv) else ["--all-namespaces"]
    liveness = [] if any(arg.startswith("--liveness") for arg in argv) else ["--liveness=http://127.0.0.1:8081/healthz"]
    kopf_main(["run", "--standalone", *scope, *liveness, "-m", "speechtune.k8s.handlers", *argv],
              prog_name="python -m speechtune.k8s", standalone_mode=True)


if __name__ == "__main__":
    main()
