"""``hybrid-lightning``: LightningCLI for YAML experiments (model, data, trainer, callback, strategy).

    hybrid-lightning fit --config configs/char_gpt.yaml
    hybrid-lightning fit --config configs/char_gpt.yaml --print_config
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

import hybrid_lightning  # noqa: F401  (registers the "hybrid" and "hybrid_ddp" strategies)


def main(args: list[str] | None = None) -> None:
    LightningCLI(args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
