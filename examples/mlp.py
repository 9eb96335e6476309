"""The mlp example workload with hybrid_lightning. Run: python examples/mlp.py [--steps N] [--plain]"""

from hybrid_lightning.examples.run import main

if __name__ == "__main__":
    main("mlp")
