"""`python -m pipelines.serving.serve SERVICE [bentoml serve options]`: `bentoml serve` with metrics of
its own.

BentoML keeps the Prometheus files of its workers in $BENTOML_HOME/prometheus_multiproc_dir and
empties that folder whenever a server starts: a second server on the same machine deleted the first
one's metrics. Here each server gets its own folder, named after its port
($BENTOML_HOME/prometheus_multiproc_dir-PORT; two servers cannot share a port), and everything else
is `bentoml serve` as it is. `make serve`, the demo and the tests start servers this way.
"""

from __future__ import annotations

import os
import sys


def metrics_dir(argv: list[str]) -> str:
    from bentoml._internal.configuration.containers import BentoMLContainer

    port = "3000"
    for i, arg in enumerate(argv):
        if arg == "--port" and i + 1 < len(argv):
            port = argv[i + 1]
        elif arg.startswith("--port="):
            port = arg.split("=", 1)[1]
    return os.path.join(BentoMLContainer.bentoml_home.get(), f"prometheus_multiproc_dir-{port}")


def main(argv: list[str] | None = None) -> None:
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml_cli.cli import cli

    argv = sys.argv[1:] if argv is None else argv
    BentoMLContainer.prometheus_multiproc_dir.set(metrics_dir(argv))
    cli(["serve", *argv], prog_name="bentoml")


if __name__ == "__main__":
    main()
